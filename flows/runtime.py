"""The thin Prefect layer: part work as Prefect tasks, and an artifact for every committed version.

Stage logic lives in `tasks/`; this module only decides how parts run (Prefect's task runner) and
what the UI shows.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from storage import PartRecord, Store
from tasks.engine.config import EngineConfig
from tasks.stages.evaluate import ablation_columns
from tasks.shared.lineage import display_metrics, format_value
from tasks.engine.progress import ProgressLog
from tasks.engine.runner import Executor, PartTask, StageResult

# prefect_api_available is looked up here at call time (deployments, publish_report): tests replace it on this module
from .runners import arm_prompt_exit, gpu_slot, in_prefect_run, prefect_api_available

log = logging.getLogger("ram_engine")

OUR_LOGGERS = ("ram_engine", "ram_model")


def route_logs_to_prefect() -> None:
    """Send our loggers' lines to the Prefect API of the current flow or task run (the UI's run logs),
    and to the console where nothing else prints them (a served run's subprocess). Idempotent; called
    when the flows are imported, which is also how a served or worker run loads them."""
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Forwards only inside a run: work outside one (tests, the CLI's local engine) stays quiet."""

        def emit(self, record: logging.LogRecord) -> None:
            if in_prefect_run():
                super().emit(record)

    from tasks.engine.progress import quiet_by_default

    quiet_by_default()   # a served or worker run's process too: no per-step trainer lines, no third-party bars
    level = os.environ.get("RAM_ENGINE_LOG", "INFO")
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
        if not any(type(h).__name__ == "RunLogHandler" for h in logger.handlers):
            logger.addHandler(RunLogHandler())
        if not logging.getLogger().handlers and not any(isinstance(h, logging.StreamHandler) and
                                                        type(h).__name__ != "RunLogHandler" for h in logger.handlers):
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
            logger.addHandler(console)


_console_progress: list[Callable[[str, int, int], None]] = []


@contextmanager
def console_progress(callback: Callable[[str, int, int], None] | None):
    """Feed this process's progress bar (the CLI's) from every stage that runs here. Never pass a bar as a
    flow parameter: a flow's parameters travel in its run context to Dask and Ray workers, and a bar
    (locks, a terminal) cannot be pickled."""
    if callback is None:
        yield
        return
    _console_progress.append(callback)
    try:
        yield
    finally:
        _console_progress.remove(callback)


class StageProgress:
    """The progress callback the flows hand to stages: a log line with rate and ETA (tasks.engine.progress), a
    Prefect progress artifact per stage in the current flow run, and the caller's own callback (the
    CLI's bar), whichever engine runs the stage."""

    def __init__(self, forward: Callable[[str, int, int], None] | None = None):

        self.forward = forward if forward is not None else (_console_progress[-1] if _console_progress else None)
        self.parts, self.steps = ProgressLog(unit="parts"), ProgressLog(unit="steps")
        self.artifacts: dict[str, object] = {}

    def __reduce__(self):
        # A subflow's parameters (this object among them) travel in its run context to Dask/Ray workers:
        # there it arrives fresh, without the caller's bar and artifacts, which cannot be pickled.
        return (StageProgress, ())

    def __call__(self, what: str, done: int, total: int) -> None:
        # Stages report parts; trainers report "<stage> training" steps (tasks.stages.train._step_progress).
        logged = (self.steps if what.endswith(" training") else self.parts)(what, done, total)
        if logged is not None:
            self._artifact(what, done, total, logged)
        if self.forward is not None:
            self.forward(what, done, total)

    def _artifact(self, what: str, done: int, total: int, line: str) -> None:
        if FlowRunContext.get() is None or not total:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        pct = 100.0 * done / total
        try:
            if what not in self.artifacts:
                self.artifacts[what] = create_progress_artifact(pct, key=artifact_key(what) + "-progress",
                                                                description=line)
            else:
                update_progress_artifact(self.artifacts[what], pct, description=line)
        except Exception as exc:  # the UI's bar is a nicety: a failing API call never stops the work
            log.debug("progress artifact for %s: %s", what, exc)


def stage_progress(forward=None) -> StageProgress:
    return forward if isinstance(forward, StageProgress) else StageProgress(forward)


def artifact_key(name: str, store: Store | None = None) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a stage name. With a store, the key
    ends in a digest of the store's URL: a key is one history in the Prefect UI, and several stores
    (staging and production, two teams) served by one Prefect server must not share it. Progress
    artifacts take no store: each belongs to one flow run, where it is shown."""
    key = "ram-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if store is not None:
        key += "-" + hashlib.sha256(store.full_url("").encode()).hexdigest()[:8]
    return key

# Transient I/O is retried inside the part work itself (tasks.engine.runner.run_stage), the same under every engine.
def gpu_stage(cfg: EngineConfig):
    """Hold a GPU slot (one GPU stage per device across workers) when a GPU is in use; nothing on CPU."""
    import torch


    return gpu_slot(cfg) if torch.cuda.is_available() else nullcontext()


def as_config(cfg: EngineConfig | dict) -> EngineConfig:
    """The config a flow was given: flows that skip parameter validation (to accept callables such as
    the CLI's progress bar) receive plain JSON from a deployment run, validated here."""
    return cfg if isinstance(cfg, EngineConfig) else EngineConfig.model_validate(cfg)


def open_store(cfg: EngineConfig) -> Store:
    return Store(cfg.store.url, **cfg.store.storage_options)


@task(name="part", cache_policy=NO_CACHE)
def run_part(fn: Callable[[PartTask], PartRecord], part: PartTask) -> PartRecord:
    return fn(part)


def prefect_executor(stage: str) -> Executor:
    """Map part work onto Prefect tasks in the current flow's task runner (threads, Dask, Ray); every part
    is submitted at once, and the records are yielded in order as they complete."""

    def execute(fn, parts):
        if FlowRunContext.get() is None:  # called outside a flow: run inline
            return (fn(p) for p in parts)
        arm_prompt_exit()  # SIGTERM ends the run within seconds, wherever its parts are
        futures = [run_part.with_options(task_run_name=f"{stage}:{p.name}").submit(fn, p) for p in parts]
        runner = FlowRunContext.get().task_runner
        if type(runner).__name__ == "ClusterTaskRunner":  # Dask: watch the cluster while waiting (flows/cluster.py)
            from .cluster import watch_parts

            return watch_parts(runner, stage, futures, [p.name for p in parts])
        return (f.result() for f in futures)

    return execute


def publish(result: StageResult, report_path: str | None = None) -> None:
    """A markdown artifact per stage under a stable key, so its history shows in the Prefect UI: counts,
    where the version lives, its metrics (counters ranked, tag ids named, tables as tables) and the
    report when one was written."""
    if FlowRunContext.get() is None:
        return
    v = result.version
    create_markdown_artifact(markdown=version_markdown(result, report_path), key=artifact_key(v.stage, v.store),
                             description=f"{v.stage} version {v.id} in {v.store.full_url('')}")


def publish_report(report_path: str | Path, version) -> str | None:
    """A `ram-report-<store digest>` artifact linking the HTML report of `version` (and where the version
    lives), when a Prefect API is configured or a run is active; its key when published. Never fails the
    caller."""
    if not prefect_api_available():
        return None  # no server to keep it: a temporary one would start just for this
    uri = Path(report_path).resolve().as_uri()
    key = artifact_key("report", version.store)
    link = {"key": key, "description": f"report of {version.stage}@{version.id}",
            "markdown": f"## report of {version.stage}@{version.id}\n\n[{uri}]({uri})\n\n"
                        f"store path: `{version.store.full_url(f'{version.stage}/{version.id}')}`\n"}
    try:
        if in_prefect_run():
            create_markdown_artifact(**link)
        else:  # `ram-engine report` after a run: Prefect deprecates artifacts made outside a flow or task run
            _publish_report_flow(**link)
    except Exception as exc:  # a report stays useful without its link in the UI
        log.warning("could not publish the report link to Prefect: %s: %s", type(exc).__name__, exc)
        return None
    return key


@flow(name="publish-report", log_prints=False)
def _publish_report_flow(key: str, description: str, markdown: str) -> None:
    create_markdown_artifact(key=key, description=description, markdown=markdown)


def version_markdown(result: StageResult, report_path: str | None = None) -> str:

    v = result.version
    m = v.manifest
    lines = [f"## {m['stage']} @ {m['version']}", "",
             "| rows in | rows out | rejected | parts written | resumed | reused | status |",
             "|---|---|---|---|---|---|---|",
             f"| {m['rows_in']} | {m['rows_out']} | {m['rows_rejected']} | {result.parts_written} | "
             f"{result.parts_resumed} | {result.parts_reused} | {result.status} |", "",
             f"store path: `{v.store.full_url(f'{v.stage}/{v.id}')}`", "",
             f"parents: {', '.join(m['parents']) or '(none)'}", ""]
    for name, kind, value in display_metrics(v.store, v):
        if kind == "counter":
            lines += [f"**{name}** (most frequent first): " + ", ".join(f"{k} ({format_value(n)})" for k, n in value), ""]
        elif kind == "table":
            cols = ablation_columns(value)
            lines += ["", f"**{name}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(format_value(r.get(c, "")).replace("|", "\\|") for c in cols) + " |"
                      for r in value]
            lines.append("")
        else:
            lines.append(f"- {name}: {value}")
    if report_path:
        lines += ["", f"report: [{report_path}]({Path(report_path).resolve().as_uri() if '://' not in report_path else report_path})"]
    return "\n".join(lines)


route_logs_to_prefect()  # on import: how the CLI, `serve` and a worker's flow-run process all load the flows
