"""The thin Prefect layer: part work as Prefect tasks, and an artifact for every committed version.

Stage logic lives in `tasks/`; this module only decides how parts run (Prefect's task runner) and
what the UI shows.
"""
from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from typing import Callable, Sequence

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from storage import PartRecord, Store
from tasks.config import EngineConfig
from tasks.stage import PartTask, StageResult

log = logging.getLogger("ram_engine")

# Transient I/O is retried inside the part work itself (tasks.stage.run_stage), the same under every engine.
def gpu_stage(cfg: EngineConfig):
    """Hold a GPU slot (one GPU stage per device across workers) when a GPU is in use; nothing on CPU."""
    import torch

    from .runners import gpu_slot

    return gpu_slot(cfg) if torch.cuda.is_available() else nullcontext()


def open_store(cfg: EngineConfig) -> Store:
    return Store(cfg.store.url, **cfg.store.storage_options)


@task(name="part", cache_policy=NO_CACHE)
def run_part(fn: Callable[[PartTask], PartRecord], part: PartTask) -> PartRecord:
    return fn(part)


def prefect_executor(stage: str) -> Callable[[Callable[[PartTask], PartRecord], Sequence[PartTask]], list[PartRecord]]:
    """Map part work onto Prefect tasks in the current flow's task runner (threads, Dask, Ray)."""

    def execute(fn, parts):
        if FlowRunContext.get() is None:  # called outside a flow: run inline
            return [fn(p) for p in parts]
        futures = [run_part.with_options(task_run_name=f"{stage}:{p.name}").submit(fn, p) for p in parts]
        return [f.result() for f in futures]

    return execute


def publish(result: StageResult, report_path: str | None = None) -> None:
    """A markdown artifact per stage under a stable key, so its history shows in the Prefect UI."""
    if FlowRunContext.get() is None:
        return
    m = result.version.manifest
    lines = [f"## {m['stage']} @ {m['version']}", "",
             "| rows in | rows out | rejected | parts written | resumed | reused | status |",
             "|---|---|---|---|---|---|---|",
             f"| {m['rows_in']} | {m['rows_out']} | {m['rows_rejected']} | {result.parts_written} | "
             f"{result.parts_resumed} | {result.parts_reused} | {result.status} |", "",
             f"parents: {', '.join(m['parents']) or '(none)'}", ""]
    metrics = m.get("metrics") or {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            top = list(value.items())[:15]
            lines += [f"**{name}**: " + ", ".join(f"{k} ({v})" for k, v in top), ""]
        else:
            lines.append(f"- {name}: {value}")
    if report_path:
        lines += ["", f"report: {report_path}"]
    key = "ram-" + re.sub(r"[^a-z0-9-]+", "-", m["stage"].lower())  # Prefect keys: lowercase, digits, dashes
    create_markdown_artifact(markdown="\n".join(lines), key=key,
                             description=f"{m['stage']} version {m['version']}")
