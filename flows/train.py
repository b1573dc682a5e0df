"""The train flow: a model version from a labelled version (parsed or clean) and its images."""
from __future__ import annotations

from prefect import flow

from tasks.config import EngineConfig
from tasks.stage import StageResult
from tasks.train import train_stage

from .runtime import gpu_stage, open_store, publish


@flow(name="train", log_prints=True)
def train_flow(cfg: EngineConfig, labels: str, images: str, name: str | None = None,
               init: str | None = None) -> StageResult:
    store = open_store(cfg)
    train_cfg = cfg.train if name is None else cfg.train.model_copy(update={"name": name})
    with gpu_stage(cfg):
        result = train_stage(store, cfg.model, train_cfg, store.open_ref(labels),
                             store.open_ref(images), init=init)
    publish(result)
    return result


@flow(name="retrain", log_prints=True)
def retrain_flow(cfg: EngineConfig, images_version: str | None = None, new_samples: int | None = None) -> dict:
    """Run by the deployment trigger when an `images` version lands with enough new samples: the loop
    from parse on, over that version (the latest when not given), fine-tuning from the latest model."""
    from .data_engine import data_engine_flow

    return data_engine_flow(cfg, from_stage="parse", images_version=images_version)
