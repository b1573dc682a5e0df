"""The whole data-engine loop as one Prefect flow of stage subflows.

    ingest ─► parse ─► [train baseline] ─► generate ─► ground ─► embed ─► clean ─► train ─► evaluate

Each subflow returns the version it committed (or found committed: a rerun does no work), and each
version names its parents, so lineage ties the loop together. `from_stage` starts from the latest
committed versions of the earlier stages; `until_stage` stops after that stage.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext

from storage import StoreError, Version
from tasks.config import EngineConfig
from tasks.models import import_official
from tasks.progress import apply_torch_threads
from tasks.stage import StageResult

from .runners import default_workers, make_task_runner, shared_cluster
from .runtime import as_config, gpu_stage, open_store, prefect_executor, publish, stage_progress

log = logging.getLogger("ram_engine")

STAGES = ("ingest", "parse", "baseline", "generate", "ground", "embed", "clean", "train", "evaluate")


def _check(name: str | None, what: str) -> None:
    if name is not None and name not in STAGES:
        raise ValueError(f"{what} {name!r} is not a stage; stages: {', '.join(STAGES)}")


def _run(stage: str, cfg: EngineConfig, fn, *args, **kwargs) -> StageResult:
    """Run a stage function as a Prefect subflow named after the stage, its part tasks on the configured
    task runner (inline outside a flow run, as with `--engine local`), and publish its artifact."""
    if FlowRunContext.get() is None:
        result = fn(*args, **kwargs)
    else:
        result = flow(name=stage, log_prints=True, validate_parameters=False,
                      task_runner=make_task_runner(cfg))(fn)(*args, **kwargs)
    publish(result)
    log.info("%s: %s %s", stage, result.status, result.version.ref)
    return result


@flow(name="data-engine", log_prints=True, validate_parameters=False)
def data_engine_flow(cfg: EngineConfig, from_stage: str | None = None, until_stage: str | None = None,
                     source: str | None = None, images_version: str | None = None,
                     progress=None) -> dict[str, StageResult]:
    """Run the loop; returns {stage: StageResult} for the stages that ran or were reused."""
    if FlowRunContext.get() is None:  # --engine local: no task runner
        return _loop(cfg, from_stage, until_stage, source, images_version, progress)
    with shared_cluster(cfg) as run_cfg:
        return _loop(run_cfg, from_stage, until_stage, source, images_version, progress)


def _loop(cfg: EngineConfig, from_stage, until_stage, source, images_version, progress) -> dict[str, StageResult]:
    from tasks import clean, evaluate, generate, ground, parse, train

    from .ingest import ingest_and_announce

    cfg = as_config(cfg)  # a served run passes the config as JSON
    _check(from_stage, "--from")
    _check(until_stage, "--until")
    start = STAGES.index(from_stage) if from_stage else 0
    stop = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
    if start > stop:
        raise ValueError(f"--from {from_stage} comes after --until {until_stage}")
    store = open_store(cfg)
    results: dict[str, StageResult] = {}
    progress = stage_progress(progress)  # log lines with rate and ETA, the UI's bar, and the caller's

    def wanted(stage: str) -> bool:
        return start <= STAGES.index(stage) <= stop

    def latest(stage: str) -> Version:
        try:
            return store.open(stage, "latest")
        except StoreError as exc:
            raise StoreError(f"the loop starts at {from_stage}, but {exc}") from None

    if wanted("ingest"):
        results["ingest"] = _run("ingest", cfg, ingest_and_announce, cfg, source=source, progress=progress)
        images = results["ingest"].version
    else:
        images = store.open("images", images_version) if images_version else latest("images")
    if stop < STAGES.index("parse"):
        return results

    def stage_version(name: str, stage: str, fn, *args, gpu: bool = False, **kwargs) -> Version:
        if not wanted(name):
            return latest(stage)
        # Training is one process (or nproc_per_node); part stages run max_workers parts at once.
        workers = cfg.train.nproc_per_node if name in ("baseline", "train") else default_workers(cfg.orchestration)
        apply_torch_threads(cfg.orchestration.torch_threads, workers)
        with gpu_stage(cfg) if gpu else nullcontext():
            results[name] = _run(name, cfg, fn, *args, **kwargs)
        return results[name].version

    parsed = stage_version("parse", "parsed", parse.parse_stage, store, cfg.parse, images,
                           executor=prefect_executor("parsed"), progress=progress)
    if stop < STAGES.index("baseline"):
        return results

    baseline = cfg.generate.baseline
    baseline_stage = f"models/{cfg.generate.baseline_name}"
    if baseline is not None and Path(baseline).is_file():
        # an official checkpoint: imported once as models/<baseline_name> with its tag list, thresholds and
        # tokenizer, so workers on any host load it from the store and lineage names it
        baseline = stage_version("baseline", baseline_stage, import_official, store, baseline, cfg.model,
                                 cfg.generate.baseline_name).ref
    elif baseline is None and store.versions(baseline_stage):
        # The baseline stays fixed as data grows: generation of old parts is reused, not redone.
        baseline = store.versions(baseline_stage)[-1].ref
        if wanted("baseline"):
            results["baseline"] = StageResult(store.open_ref(baseline), "reused")
            publish(results["baseline"])  # its artifact shows in every run, not only the one that trained it
    elif baseline is None:  # no baseline yet: train one on the parsed labels
        baseline_cfg = cfg.train.model_copy(update={"name": cfg.generate.baseline_name, "init": None,
                                                    "fine_tune_latest": False,
                                                    "steps": cfg.generate.baseline_steps or cfg.train.steps})
        baseline = stage_version("baseline", baseline_stage, train.train_stage, store, cfg.model, baseline_cfg,
                                 parsed, images, progress=progress, gpu=True).ref
    if stop < STAGES.index("generate"):
        return results

    generated = stage_version("generate", "generated", generate.generate, store, cfg.generate, cfg.parse, images,
                              parsed, baseline, executor=prefect_executor("generated"), progress=progress,
                              gpu=True)
    if stop < STAGES.index("ground"):
        return results
    regions = stage_version("ground", "regions", ground.ground_stage, store, cfg.ground, images, generated, parsed,
                            executor=prefect_executor("regions"), progress=progress, gpu=True)
    if stop < STAGES.index("embed"):
        return results
    embeddings = stage_version("embed", "embeddings", clean.embed_stage, store, cfg.clean, regions, baseline,
                               executor=prefect_executor("embeddings"), progress=progress, gpu=True)
    if stop < STAGES.index("clean"):
        return results
    cleaned = stage_version("clean", "clean", clean.clean_stage, store, cfg.clean, generated, regions, embeddings,
                            parsed, baseline, progress=progress)
    if stop < STAGES.index("train"):
        return results
    model = stage_version("train", f"models/{cfg.train.name}", train.train_stage, store, cfg.model, cfg.train,
                          cleaned, images, progress=progress, gpu=True)
    if stop < STAGES.index("evaluate") or not cfg.evaluate.ground_truth:
        if cfg.evaluate.ground_truth is None and wanted("evaluate"):
            log.info("evaluate: skipped, evaluate.ground_truth is not set")
        return results
    stage_version("evaluate", "evaluate", evaluate.evaluate_stage, store, cfg.evaluate, images,
                  {"parsed": parsed, "parsed+generated": generated, "cleaned": cleaned},
                  {"baseline": baseline, cfg.train.name: model.ref})
    return results
