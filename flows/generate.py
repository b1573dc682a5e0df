"""The generate flow: the baseline model's tags and captions over `images` + `parsed`."""
from __future__ import annotations

from prefect import flow

from tasks.config import EngineConfig
from tasks.generate import STAGE, generate
from tasks.stage import StageResult

from .runtime import gpu_stage, open_store, prefect_executor, publish


@flow(name="generate", log_prints=True)
def generate_flow(cfg: EngineConfig, images: str, parsed: str, baseline: str) -> StageResult:
    store = open_store(cfg)
    with gpu_stage(cfg):
        result = generate(store, cfg.generate, cfg.parse, store.open_ref(images),
                          store.open_ref(parsed), baseline, executor=prefect_executor(STAGE))
    publish(result)
    return result
