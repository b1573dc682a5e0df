"""Running one stage over parts: skip what is committed, resume what is half done, reuse what an
earlier version already made from the same input with the same config, and commit last.

Prefect-free: `flows/` passes an executor that maps part work onto Prefect tasks.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from storage import PartRecord, Version, VersionWriter, digest
from storage.fs import CommittedFileConflict, retry_io
from storage.store import CorruptFile

log = logging.getLogger("ram_engine")


class StageError(RuntimeError):
    """A stage stopped; the message names the stage, the part and the cause, and says what to do."""


@dataclass
class PartTask:
    """One unit of stage work: a part name, the digest of its input, and what the worker needs."""

    name: str
    source_digest: str
    payload: Any = None


@dataclass
class StageResult:
    """A committed version and what this run did to get it (counters, not timings)."""

    version: Version
    status: str                     # "reused" (already committed) or "written"
    parts_written: int = 0
    parts_resumed: int = 0          # finished by an earlier, interrupted run
    parts_reused: int = 0           # referenced from an earlier version (incremental)
    notes: list[str] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return self.parts_written > 0

    def summary(self) -> dict:
        m = self.version.manifest
        return {"stage": self.version.stage, "version": self.version.id, "status": self.status,
                "parts_written": self.parts_written, "parts_resumed": self.parts_resumed,
                "parts_reused": self.parts_reused, "rows_in": m["rows_in"], "rows_out": m["rows_out"],
                "rows_rejected": m["rows_rejected"]}


# An executor runs the part function over the parts, possibly in other processes (Dask, Ray), and yields
# each part's record in order as it completes, so progress is reported here, in the caller's process.
Executor = Callable[[Callable[[PartTask], PartRecord], Sequence[PartTask]], Iterable[PartRecord]]


def sequential(fn: Callable[[PartTask], PartRecord], tasks: Sequence[PartTask]) -> Iterator[PartRecord]:
    return (fn(t) for t in tasks)


def run_stage(writer: VersionWriter, tasks: Sequence[PartTask], process: Callable[[VersionWriter, PartTask], PartRecord],
              *, executor: Executor | None = None, summarize: Callable[[list[PartRecord]], dict] | None = None,
              progress: Callable[[str, int, int], None] | None = None, part_attempts: int = 4,
              extra: dict | None = None) -> StageResult:
    """Run `process(writer, task)` for each part not already available, then commit.

    `process` must call `writer.write_part(task.name, ..., source_digest=task.source_digest)` and return
    its record. `extra` goes into the manifest as it is (e.g. the sources an ingest read).
    """
    committed = writer.committed
    if committed is not None:
        log.info("%s: version %s is committed already; nothing to do", writer.stage, writer.id)
        return StageResult(committed, "reused")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dupes = [n for n, c in Counter(names).items() if c > 1]
        raise ValueError(f"{writer.stage}: duplicate part names {dupes[:5]}: part inputs must be distinct")
    reusable = writer.reusable_parts()
    todo, resumed, reused = [], 0, 0
    for task in tasks:
        if writer.part_done(task.name):
            resumed += 1
        elif task.source_digest in reusable and reusable[task.source_digest].name == task.name:
            try:
                writer.reuse_part(reusable[task.source_digest])
                reused += 1
            except (FileNotFoundError, CommittedFileConflict) as exc:
                # The earlier version lost the file (removed by hand, collected), or this version's folder
                # holds other bytes under the part's name (an interrupted run's unrecorded leftover): the part
                # is made under its claim, where a leftover is replaced and a recorded file never is.
                log.warning("%s: part %s cannot be shared (%s); making it again", writer.stage, task.name, exc)
                todo.append(task)
        else:
            todo.append(task)
    total = len(todo)

    def work(task: PartTask) -> PartRecord:
        # Runs where the executor puts it (another process on Dask/Ray): it must not hold the progress
        # callback (a CLI bar, Prefect artifacts), which cannot be pickled and would report nowhere there.
        # One writer makes a part at a time (its claim); a part another run finished is adopted.
        with writer.claim(task.name) as finished:
            return finished if finished is not None else make(task)

    def make(task: PartTask) -> PartRecord:
        # A part is atomic (files moved into place whole, then its record), so a retry is safe.
        try:
            return retry_io(lambda: process(writer, task), f"{writer.stage}@{writer.id} part {task.name}",
                            attempts=part_attempts)
        except StageError:
            raise
        except Exception as exc:
            if _finished_elsewhere(writer, task.name, wait_s=60 if isinstance(exc, CommittedFileConflict) else 0):
                log.info("%s: part %s was finished by another run", writer.stage, task.name)
                return writer.record(task.name)
            if isinstance(exc, CorruptFile):
                raise StageError(f"{writer.stage}: part {task.name} stopped: {exc}") from exc
            raise StageError(
                f"{writer.stage}: part {task.name} failed: {type(exc).__name__}: {exc}. Nothing was committed; "
                f"parts already finished are kept, and running the stage again resumes from them.") from exc

    if progress and total:
        progress(writer.stage, 0, total)  # the clock of the rate and ETA starts here, not at the first part
    records: list[PartRecord] = []
    try:
        for record in (executor or sequential)(work, todo):
            records.append(record)
            if progress:
                progress(writer.stage, len(records), total)
    except BaseException:
        writer.close()  # remove this run's temporary files; finished parts stay for the rerun
        raise
    for record in records:  # workers in other processes wrote through a copy of the writer
        if not writer.has_record(record.name):
            writer.adopt_part(record)
    all_records = [writer.record(n) for n in names]
    metrics = summarize(all_records) if summarize else merge_metrics(all_records)
    version = writer.commit(metrics=metrics, part_order=names, extra=extra)
    return StageResult(version, "written", parts_written=len(todo), parts_resumed=resumed, parts_reused=reused)


def _finished_elsewhere(writer: VersionWriter, name: str, wait_s: float) -> bool:
    """Whether another run of this version finished part `name`; waits up to `wait_s` for its record
    (a run that placed the same part's files first writes its record right after)."""
    deadline = time.monotonic() + wait_s
    while True:
        if writer.part_done(name):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def part_digest(part: PartRecord | None) -> str | None:
    return digest(sorted(f["sha256"] for f in part.files)) if part is not None else None


def parts_of(version: Version, with_parts: dict[str, Version] | None = None, salt: str = "") -> list[PartTask]:
    """One task per part of `version` (named like it), with the same-named parts of other versions
    in the payload. The source digest covers every input part's bytes and `salt` (e.g. a model id),
    so a later version reuses this part's output exactly when none of them changed."""
    others = {name: {p.name: p for p in v.parts} for name, v in (with_parts or {}).items()}
    tasks = []
    for part in version.parts:
        payload = {"part": part} | {name: parts.get(part.name) for name, parts in others.items()}
        ident = [salt] + [part_digest(p) for p in payload.values()]
        tasks.append(PartTask(part.name, digest(ident), payload))
    return tasks


def merge_metrics(records: list[PartRecord]) -> dict:
    """Sum numeric part metrics and add up counters (dicts of counts) across parts."""
    merged: dict[str, Any] = {}
    for record in records:
        for key, value in (record.metrics or {}).items():
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, dict):
                counter = merged.setdefault(key, Counter())
                counter.update({k: v for k, v in value.items() if isinstance(v, (int, float))})
    return {k: (dict(v.most_common()) if isinstance(v, Counter) else v) for k, v in merged.items()}


def top(counter: dict[str, int], n: int = 20) -> dict[str, int]:
    return dict(Counter(counter).most_common(n))
