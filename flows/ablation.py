"""The ablation flow: one model per label version (same budget, architecture and seeds), scored on
held-out keys against a ground truth, committed as an `ablation` version (tasks/stages/ablation.py)."""
from __future__ import annotations

from prefect import flow

from storage import StoreError
from tasks.engine.config import EngineConfig
from tasks.engine.runner import StageResult, run
from tasks.shared.lineage import lineage
from tasks.stages.ablation import STAGE, latest_label_versions

from .runtime import gpu_stage, open_store, publish


@flow(name="ablation", log_prints=True, validate_parameters=False)
def ablation_flow(cfg: EngineConfig, versions: list[str] | None = None, images: str | None = None,
                  progress=None) -> StageResult:
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
        result = run(STAGE, store, cfg, {"images": images_version, "labels": label_versions}, progress=progress)
    publish(result)
    return result


def _images_of(store, version):

    for _, v, _ in lineage(store, version):
        if v is not None and v.stage == "images":
            return v
    raise StoreError(f"{version.ref} has no images version in its lineage; give --images images@VERSION")
