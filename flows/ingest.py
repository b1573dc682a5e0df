"""The ingest flow: a source into an `images` version."""
from __future__ import annotations

from prefect import flow

from storage import Store
from tasks.config import EngineConfig
from tasks.ingest import STAGE, ingest
from tasks.stage import StageResult

from .runtime import prefect_executor, publish


@flow(name="ingest", log_prints=True)
def ingest_flow(cfg: EngineConfig, source: str | None = None, progress=None) -> StageResult:
    store = Store(cfg.store.url, **cfg.store.storage_options)
    result = ingest(store, cfg.ingest, source=source, executor=prefect_executor(STAGE), progress=progress)
    publish(result)
    if result.status == "written":  # a new commit: announce its new samples (deployments trigger retraining)
        from .deployments import emit_images_committed, new_samples

        emit_images_committed(store, result.version, new_samples(result.version),
                              cfg.orchestration.retrain_min_new_samples)
    return result
