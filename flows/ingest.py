"""The ingest flow: a source into an `images` version, announced to the deployments when it is new."""
from __future__ import annotations

from prefect import flow

from storage import Store
from tasks.engine.config import EngineConfig
from tasks.engine.runner import StageResult, run
from tasks.stages.ingest import STAGE

from .runtime import as_config, open_store, prefect_executor, publish, stage_progress


def announce(store: Store, cfg: EngineConfig, result: StageResult) -> None:
    """A new commit with new samples emits `ram.images.committed` (the served retrain deployment decides, with
    its own `orchestration.retrain_min_new_samples`, whether enough is new to retrain)."""
    from .deployments import emit_images_committed, samples_since_last_training

    if result.status == "written":  # counted as the served retrain counts them (one definition)
        new, trained_on = samples_since_last_training(store, result.version, f"models/{cfg.train.name}")
        emit_images_committed(store, result.version, new, threshold=1, trained_on=trained_on)


def ingest_and_announce(cfg: EngineConfig, source: str | None = None, progress=None) -> StageResult:
    store = open_store(cfg)
    result = run(STAGE, store, cfg, {"source": source}, executor=prefect_executor(STAGE.output),
                 progress=stage_progress(progress))
    announce(store, cfg, result)
    return result


@flow(name="ingest", log_prints=True, validate_parameters=False)
def ingest_flow(cfg: EngineConfig, source: str | None = None, progress=None) -> StageResult:
    result = ingest_and_announce(as_config(cfg), source, progress)
    publish(result)
    return result
