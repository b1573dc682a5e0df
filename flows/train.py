"""The train flow: a model version from a labelled version (parsed or clean) and its images."""
from __future__ import annotations

import logging

from prefect import flow

from tasks.config import EngineConfig
from tasks.stage import StageResult
from tasks.train import train_stage

from .runtime import gpu_stage, open_store, publish, stage_progress

log = logging.getLogger("ram_engine")


@flow(name="train", log_prints=True)
def train_flow(cfg: EngineConfig, labels: str, images: str, name: str | None = None,
               init: str | None = None) -> StageResult:
    store = open_store(cfg)
    train_cfg = cfg.train if name is None else cfg.train.model_copy(update={"name": name})
    with gpu_stage(cfg):
        result = train_stage(store, cfg.model, train_cfg, store.open_ref(labels),
                             store.open_ref(images), init=init, progress=stage_progress())
    publish(result)
    return result


@flow(name="retrain", log_prints=True)
def retrain_flow(cfg: EngineConfig, images_version: str | None = None, new_samples: int | None = None) -> dict:
    """Run by the deployment trigger when an `images` version lands: when at least
    `orchestration.retrain_min_new_samples` (of the config the deployment is served with) samples are
    new since the images the latest `models/<train.name>` was trained on, the loop from parse on over
    that version (the latest when not given), fine-tuning from the latest model. Below it, nothing runs
    and the samples count again with the next version (they accumulate)."""
    from .data_engine import data_engine_flow
    from .deployments import samples_since_last_training

    store = open_store(cfg)
    images = store.open("images", images_version or "latest")
    pending, trained_on = samples_since_last_training(store, images, f"models/{cfg.train.name}")
    threshold = cfg.orchestration.retrain_min_new_samples
    since = f"since {trained_on}" if trained_on else f"(no models/{cfg.train.name} yet)"
    if pending < threshold:
        log.info("retrain: %s has %d new samples %s, fewer than orchestration.retrain_min_new_samples=%d: "
                 "not retraining yet (they count again with the next images version)", images.ref, pending,
                 since, threshold)
        return {}
    log.info("retrain: %s has %d new samples %s (threshold %d): running the loop from parse", images.ref,
             pending, since, threshold)
    return data_engine_flow(cfg, from_stage="parse", images_version=images.id)
