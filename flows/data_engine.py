"""The whole data-engine loop as one Prefect flow of stage subflows.

    ingest ─► parse ─► [train baseline] ─► generate ─► ground ─► embed ─► clean ─► train ─► evaluate

Each subflow returns the version it committed (or found committed: a rerun does no work), and each
version names its parents, so lineage ties the loop together. `from_stage` starts from the latest
committed versions of the earlier stages; `until_stage` stops after that stage.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import flow
from prefect.context import FlowRunContext

from storage import StoreError, Version
from tasks.engine.config import EngineConfig, section_dict
from tasks.shared.models import import_official
from tasks.engine.progress import apply_torch_threads
from tasks.engine.runner import Stage, StageResult, section_of

from .runners import default_workers, make_task_runner, release_cached_models, shared_cluster
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


@dataclass(frozen=True)
class Step:
    """One step of the loop: a declared stage, the name later steps read its output under, and how its
    inputs are found among the outputs so far (by their own names, unless `bind` says otherwise)."""

    stage: Stage
    provides: str
    bind: Callable[[dict, EngineConfig], dict] = lambda available, cfg: {}
    gpu: bool = False

    @property
    def name(self) -> str:
        return self.stage.name


def _loop_steps() -> tuple[Step, ...]:
    """The loop after ingest and the baseline, in order: each step a stage module's declaration."""
    from tasks.stages import clean, evaluate, generate, ground, parse, train

    return (
        Step(parse.STAGE, "parsed"),
        Step(generate.STAGE, "generated", gpu=True),
        Step(ground.STAGE, "regions", gpu=True),
        Step(clean.EMBED, "embeddings", gpu=True),
        Step(clean.STAGE, "clean"),
        Step(train.STAGE, "model", lambda got, cfg: {"labels": got["clean"], "init": None}, gpu=True),
        Step(evaluate.STAGE, "evaluate", lambda got, cfg: {
            "labels": {"parsed": got["parsed"], "parsed+generated": got["generated"], "cleaned": got["clean"]},
            "models": {"baseline": got["baseline"], cfg.train.name: got["model"].ref}}),
    )


def _loop(cfg: EngineConfig, from_stage, until_stage, source, images_version, progress) -> dict[str, StageResult]:
    from tasks.engine.runner import run

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

    def run_step(name: str, stage, sections, inputs: dict, gpu: bool) -> Version:
        # Training is one process (or nproc_per_node); part stages run max_workers parts at once.
        training = name in ("baseline", "train")
        if training:
            release_cached_models(cfg)
        workers = cfg.train.nproc_per_node if training else default_workers(cfg.orchestration)
        apply_torch_threads(cfg.orchestration.torch_threads, workers)
        executor = None if stage.one_part else prefect_executor(stage.output_of(section_of(sections, stage.section)))
        with gpu_stage(cfg) if gpu else nullcontext():
            results[name] = _run(name, cfg, run, stage, store, sections, inputs, executor=executor,
                                 progress=progress)
        return results[name].version

    if wanted("ingest"):
        results["ingest"] = _run("ingest", cfg, ingest_and_announce, cfg, source=source, progress=progress)
        images = results["ingest"].version
    else:
        images = store.open("images", images_version) if images_version else latest("images")
    got: dict = {"images": images}
    for step in _loop_steps():
        if step.name == "generate":  # the baseline comes first: it is what generate, embed and clean use
            if stop < STAGES.index("baseline"):
                break
            got["baseline"] = _baseline(cfg, store, got, wanted, latest, run_step, results)
        if stop < STAGES.index(step.name):
            break
        if step.name == "evaluate" and not cfg.evaluate.ground_truth:
            if wanted("evaluate"):
                log.info("evaluate: skipped, evaluate.ground_truth is not set")
            break
        if not wanted(step.name):
            got[step.provides] = latest(step.stage.output_of(section_of(cfg, step.stage.section)))
            continue
        inputs = {n: got[n] for n in step.stage.inputs if n in got} | step.bind(got, cfg)
        got[step.provides] = run_step(step.name, step.stage, cfg, inputs, step.gpu)
    return results


def _baseline(cfg: EngineConfig, store, got: dict, wanted, latest, run_step, results) -> str:
    """The baseline model's ref: an official checkpoint imported once, the baseline trained before (it stays
    fixed as data grows, so generation of old parts is reused), or one trained now on the parsed labels."""
    from tasks.stages import train

    baseline = cfg.generate.baseline
    baseline_stage = f"models/{cfg.generate.baseline_name}"
    if baseline is not None and Path(baseline).is_file():
        # an official checkpoint: imported once as models/<baseline_name> with its tag list, thresholds and
        # tokenizer, so workers on any host load it from the store and lineage names it
        if not wanted("baseline"):
            return latest(baseline_stage).ref
        results["baseline"] = _run("baseline", cfg, import_official, store, baseline, cfg.model,
                                   cfg.generate.baseline_name)
        return results["baseline"].version.ref
    baseline_cfg = cfg.train.model_copy(update={"name": cfg.generate.baseline_name, "init": None,
                                                "fine_tune_latest": False,
                                                "steps": cfg.generate.baseline_steps or cfg.train.steps})
    if baseline is None and store.versions(baseline_stage):
        kept = store.versions(baseline_stage)[-1]
        baseline = kept.ref
        if changed := _config_changes(kept, {"train": baseline_cfg, "model": cfg.model}):
            log.warning("%s stays the baseline, so that the tags it generated stay valid, but it was trained under "
                        "another config (%s); to train a new one, name it anew: --set generate.baseline_name=...",
                        baseline, "; ".join(changed))
        if wanted("baseline"):
            results["baseline"] = StageResult(store.open_ref(baseline), "reused")
            publish(results["baseline"])  # its artifact shows in every run, not only the one that trained it
        return baseline
    if baseline is None:  # no baseline yet: train one on the parsed labels
        if not wanted("baseline"):
            return latest(baseline_stage).ref
        return run_step("baseline", train.STAGE, {"train": baseline_cfg, "model": cfg.model},
                        {"labels": got["parsed"], "images": got["images"], "init": None}, True).ref
    return baseline


def _config_changes(version: Version, sections: dict) -> list[str]:
    """`section.field: was → now` for each field of `sections` that differs from the config `version` was made
    under (fields the version does not record, and train.init, which names what it started from, are skipped)."""
    made_under = version.manifest.get("config", {})
    changes = []
    for name, section in sections.items():
        then = made_under.get(name, {})
        for field, now in section_dict(section).items():
            if field in then and field != "init" and then[field] != now:
                changes.append(f"{name}.{field}: {then[field]!r} → {now!r}")
    return changes
