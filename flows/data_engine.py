"""The whole data-engine loop as one Prefect flow of stage subflows.

    ingest ─► parse ─► baseline ─► generate ─► ground ─► embed ─► cluster ─► clean ─► train ─► evaluate

The steps are `tasks.stages.LOOP`, the one list; each runs its stage through the one runner
(`tasks.engine.runner.run`), which decides what is committed already and what to reuse. This module only
binds each step's inputs to the outputs of the steps before it (`_plan`). Each subflow returns the version
it committed (or found committed: a rerun does no work), and each version names its parents, so lineage
ties the loop together. `from_stage` starts from the latest committed versions of the earlier steps;
`until_stage` stops after that step.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext

from storage import Store, StoreError, Version
from tasks.engine.config import EngineConfig, section_dict
from tasks.engine.progress import apply_torch_threads
from tasks.engine.runner import StageResult, run, section_of
from tasks.stages import LOOP, STEPS, stage

from .runners import default_workers, make_task_runner, release_cached_models, shared_cluster
from .runtime import as_config, gpu_stage, open_store, prefect_executor, publish, stage_progress

log = logging.getLogger("ram_engine")

# the name later steps read a step's output under (the stages' input names), where it is not the dataset's
PROVIDES = {"baseline": "baseline", "train": "model"}
GPU_STEPS = {"baseline", "generate", "ground", "embed", "train"}
TRAINING_STEPS = {"baseline", "train"}


def step_range(from_stage: str | None, until_stage: str | None) -> tuple[int, int]:
    """The indices in `LOOP` of the first and last step to run (`--from`, `--until`), checked."""
    for name, what in ((from_stage, "--from"), (until_stage, "--until")):
        if name is not None and name not in STEPS:
            raise ValueError(f"{what} {name!r} is not a stage; stages: {', '.join(STEPS)}")
    start = STEPS.index(from_stage) if from_stage else 0
    stop = STEPS.index(until_stage) if until_stage else len(STEPS) - 1
    if start > stop:
        raise ValueError(f"--from {from_stage} comes after --until {until_stage}")
    return start, stop


def _run(name: str, cfg: EngineConfig, fn, *args, **kwargs) -> StageResult:
    """Run a stage function as a Prefect subflow named after the step, its part tasks on the configured
    task runner (inline outside a flow run, as with `--engine local`), and publish its artifact."""
    if FlowRunContext.get() is None:
        result = fn(*args, **kwargs)
    else:
        result = flow(name=name, log_prints=True, validate_parameters=False,
                      task_runner=make_task_runner(cfg))(fn)(*args, **kwargs)
    publish(result)
    log.info("%s: %s %s", name, result.status, result.version.ref)
    return result


@flow(name="data-engine", log_prints=True, validate_parameters=False)
def data_engine_flow(cfg: EngineConfig, from_stage: str | None = None, until_stage: str | None = None,
                     source: str | None = None, images_version: str | None = None,
                     progress=None) -> dict[str, StageResult]:
    """Run the loop; returns {step: StageResult} for the steps that ran or were reused."""
    if FlowRunContext.get() is None:  # --engine local: no task runner
        return _loop(cfg, from_stage, until_stage, source, images_version, progress)
    with shared_cluster(cfg) as run_cfg:
        return _loop(run_cfg, from_stage, until_stage, source, images_version, progress)


@dataclass
class Plan:
    """What a step does now: run `module`'s stage with `sections` over `inputs`, or answer with `kept` (a
    version found without running), or nothing (`skip` says why)."""

    module: str | None = None
    sections: Any = None
    inputs: dict = field(default_factory=dict)
    kept: Version | None = None
    skip: str | None = None


def _plan(step: str, module: str, cfg: EngineConfig, store: Store, got: dict, source) -> Plan:
    """Step `step`'s inputs from the outputs so far (`got`, by the names the stages read them under)."""
    if step == "ingest":
        return Plan(module, cfg, {"source": source})
    if step == "baseline":
        return _baseline_plan(cfg, store, got)
    if step == "train":
        return Plan(module, cfg, {"labels": got["clean"], "images": got["images"], "init": None})
    if step == "evaluate":
        if not cfg.evaluate.ground_truth:
            return Plan(skip="evaluate.ground_truth is not set")
        return Plan(module, cfg, {
            "images": got["images"],
            "labels": {"parsed": got["parsed"], "parsed+generated": got["generated"], "cleaned": got["clean"]},
            "models": {"baseline": got["baseline"], cfg.train.name: got["model"]}})
    declared = stage(module).declared_inputs
    return Plan(module, cfg, {i.name: got[i.name] for i in declared})


def _baseline_plan(cfg: EngineConfig, store: Store, got: dict) -> Plan:
    """The baseline: an official checkpoint imported once, the baseline trained before (it stays fixed as data
    grows, so generation of old parts is reused), or one trained now on the parsed labels."""
    baseline = cfg.generate.baseline
    if baseline is not None and Path(baseline).is_file():
        # imported once as models/<baseline_name> with its tag list, thresholds and tokenizer, so workers on
        # any host load it from the store and lineage names it
        return Plan("import_model", cfg, {"checkpoint": baseline})
    sections = {"train": _baseline_train(cfg), "model": cfg.model}
    output = f"models/{cfg.generate.baseline_name}"
    if store.versions(output):
        kept = store.versions(output)[-1]
        if changed := _config_changes(kept, sections):
            log.warning("%s stays the baseline, so that the tags it generated stay valid, but it was trained under "
                        "another config (%s); to train a new one, name it anew: --set generate.baseline_name=...",
                        kept.ref, "; ".join(changed))
        return Plan(kept=kept)
    return Plan("train", sections, {"labels": got["parsed"], "images": got["images"], "init": None})


def _baseline_train(cfg: EngineConfig):
    return cfg.train.model_copy(update={"name": cfg.generate.baseline_name, "init": None, "fine_tune_latest": False,
                                        "steps": cfg.generate.baseline_steps or cfg.train.steps})


def _output(step: str, module: str, cfg: EngineConfig) -> str:
    if step == "baseline":
        return f"models/{cfg.generate.baseline_name}"
    s = stage(module)
    return s.output_of(section_of(cfg, s.section))


def _loop(cfg: EngineConfig, from_stage, until_stage, source, images_version, progress) -> dict[str, StageResult]:
    from .ingest import announce

    cfg = as_config(cfg)  # a served run passes the config as JSON
    start, stop = step_range(from_stage, until_stage)
    store = open_store(cfg)
    results: dict[str, StageResult] = {}
    progress = stage_progress(progress)  # log lines with rate and ETA, the UI's bar, and the caller's
    got: dict[str, Any] = {}

    def latest(output: str) -> Version:
        try:
            return store.open(output, "latest")
        except StoreError as exc:
            raise StoreError(f"the loop starts at {from_stage}, but {exc}") from None

    for i, (step, module, output) in enumerate(LOOP):
        if i > stop:
            break
        provides = PROVIDES.get(step, output)
        given_baseline = step == "baseline" and cfg.generate.baseline and not Path(cfg.generate.baseline).is_file()
        if given_baseline:   # a store ref or a model folder: generate reads it as it is
            got[provides] = cfg.generate.baseline
            continue
        if i < start:
            if step == "ingest" and images_version:
                got[provides] = store.open("images", images_version)
            elif step != "evaluate":
                found = latest(_output(step, module, cfg))
                got[provides] = found.ref if step in TRAINING_STEPS else found
            continue
        plan = _plan(step, module, cfg, store, got, source)
        if plan.skip is not None:
            log.info("%s: skipped, %s", step, plan.skip)
            continue
        if plan.kept is not None:
            results[step] = StageResult(plan.kept, "reused")
            publish(results[step])  # its artifact shows in every run, not only the one that made it
            version = plan.kept
        else:
            version = _run_step(step, plan, cfg, store, progress, results)
            if step == "ingest":
                announce(store, cfg, results[step])
        got[provides] = version.ref if step in TRAINING_STEPS else version
    return results


def _run_step(step: str, plan: Plan, cfg: EngineConfig, store: Store, progress, results: dict) -> Version:
    s = stage(plan.module)
    training = step in TRAINING_STEPS
    if training:   # training is one process (or nproc_per_node) and needs the memory the part workers' models hold
        release_cached_models(cfg)
    workers = cfg.train.nproc_per_node if training else default_workers(cfg.orchestration)
    apply_torch_threads(cfg.orchestration.torch_threads, workers)
    executor = None if s.one_part else prefect_executor(s.output_of(section_of(plan.sections, s.section)))
    with gpu_stage(cfg) if step in GPU_STEPS else nullcontext():
        results[step] = _run(step, cfg, run, s, store, plan.sections, plan.inputs, executor=executor,
                             progress=progress)
    return results[step].version


def _config_changes(version: Version, sections: dict) -> list[str]:
    """`section.field: was → now` for each field of `sections` that differs from the config `version` was made
    under (fields the version does not record, and train.init, which names what it started from, are skipped)."""
    made_under = version.manifest.get("config", {})
    changes = []
    for name, section in sections.items():
        then = made_under.get(name, {})
        for field_name, now in section_dict(section).items():
            recorded = then.get(field_name)
            if isinstance(recorded, dict) and set(recorded) == {"content"}:
                continue   # a file field, recorded by its content (the runner's identity), not comparable to a path
            if field_name in then and field_name != "init" and recorded != now:
                changes.append(f"{name}.{field_name}: {recorded!r} → {now!r}")
    return changes
