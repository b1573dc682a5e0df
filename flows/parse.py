"""The parse flow: an `images` version into a `parsed` version (and its `labels` version)."""
from __future__ import annotations

from prefect import flow

from tasks.config import EngineConfig
from tasks.parse import STAGE, parse_stage
from tasks.stage import StageResult

from .runtime import open_store, prefect_executor, publish


@flow(name="parse", log_prints=True)
def parse_flow(cfg: EngineConfig, images: str) -> StageResult:
    store = open_store(cfg)
    result = parse_stage(store, cfg.parse, store.open_ref(images), executor=prefect_executor(STAGE))
    publish(result)
    return result
