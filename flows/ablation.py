"""The ablation flow: one model per label version (same budget, architecture and seeds), scored on
held-out keys against a ground truth, committed as an `ablation` version (tasks/stages/ablation.py)."""
from __future__ import annotations

from prefect import flow

from storage import StoreError
from tasks.stages.ablation import ablation_stage, latest_label_versions
from tasks.engine.config import EngineConfig
from tasks.shared.lineage import lineage
from tasks.engine.runner import StageResult
from tasks.stages.train import train_stage

from .runtime import gpu_stage, open_store, publish


@flow(name="ablation", log_prints=True, validate_parameters=False)
def ablation_flow(cfg: EngineConfig, versions: list[str] | None = None, images: str | None = None,
                  progress=None, say=None) -> StageResult:
    """`versions`: label versions as stage/version refs (default: ablation.versions, else the latest clean
    version's parsed, generated and clean); `images`: their images version (default: the one the
    first label version was made from), as a stage/version ref."""
    store = open_store(cfg)
    label_versions = latest_label_versions(store, versions or cfg.ablation.versions or None)
    if images:
        images_version = store.open_ref(images)
    else:
        images_version = _images_of(store, next(iter(label_versions.values())))
    with gpu_stage(cfg):
        result = ablation_stage(store, cfg.model, cfg.train, cfg.evaluate, cfg.ablation, images_version,
                                label_versions, train_stage, progress=progress, say=say or print)
    publish(result)
    return result


def _images_of(store, version):

    for _, v, _ in lineage(store, version):
        if v is not None and v.stage == "images":
            return v
    raise StoreError(f"{version.ref} has no images version in its lineage; give --images images@VERSION")
