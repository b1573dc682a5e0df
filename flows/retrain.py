"""The retrain flow, run by the `ram-retrain` deployment when a new `images` version is announced."""
from __future__ import annotations

import logging

from prefect import flow

from tasks.engine.config import EngineConfig

from .data_engine import data_engine_flow
from .deployments import samples_since_last_training
from .runtime import open_store

log = logging.getLogger("ram_engine")


@flow(name="retrain", log_prints=True)
def retrain_flow(cfg: EngineConfig, images_version: str | None = None, new_samples: int | None = None) -> dict:
    """Run by the deployment trigger when an `images` version lands: when at least
    `orchestration.retrain_min_new_samples` (of the config the deployment is served with) samples are
    new since the images the latest `models/<train.name>` was trained on, the loop from parse on over
    that version (the latest when not given), fine-tuning from the latest model. Below it, nothing runs
    and the samples count again with the next version (they accumulate)."""
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
