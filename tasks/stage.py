"""The Stage contract and its runner.

A stage module declares itself once, as `STAGE = Stage(...)`: its name, the versions it reads, its
config section (the pydantic model the YAML was validated into, passed as it is), how it splits work
into parts, how it makes one part, how it summarizes, and its code version. `run` does the rest, the
same for every stage: fix the version id, return a version already committed, resume the parts an
interrupted run finished, reuse the parts an earlier version made from unchanged inputs with unchanged
code and config, run the rest on the executor, report progress, and commit last.

Prefect-free: `flows/` passes an executor that maps part work onto Prefect tasks.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa

from storage import PartRecord, Store, Version, VersionWriter, digest
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


@dataclass(frozen=True)
class Stage:
    """A stage, declared once in its module. Every function gets the `StageRun`.

    name      the loop's name for it (`--from`/`--until`, the Prefect subflow, progress): "parse"
    output    the dataset it writes ("parsed"), or a function of its section ("models/<train.name>")
    inputs    the versions it reads, by name ("images"); the loop passes them under these names
    section   the `EngineConfig` field it runs with ("parse"): `run.cfg` is that pydantic model itself
    version   the label of its code version ("parse-1"); the digest of its module's code is added
    split     run -> the parts: one `PartTask` per unit of input, with the digest of what it reads
    process   (run, writer, part) -> the part's record; runs where the executor puts it
    summarize (run, records) -> the version's metrics (default: `merge_metrics`)
    identify  run -> None, or a committed version that already answers the run: adds to `run.config`,
              `run.parents` or `run.input_digest` what else determines the output (a label system, a
              model's digest, the sources' content) before the version id is fixed
    prepare   run -> None: work done once before the parts, only when the version is not committed
              yet (load a model to fail before any part, cluster every crop)
    also      other config sections it reads (by field name), in `run.sections` and in its identity
    one_part  not part-wise (training): its single part runs in the caller's process
    schema    the output schema, when `storage/schemas.py` does not declare one for `output`
    """

    name: str
    output: str | Callable[[Any], str]
    inputs: tuple[str, ...]
    section: str
    version: str
    split: Callable[["StageRun"], list[PartTask]]
    process: Callable[["StageRun", VersionWriter, PartTask], PartRecord]
    summarize: Callable[["StageRun", list[PartRecord]], dict] | None = None
    identify: Callable[["StageRun"], Version | None] | None = None
    prepare: Callable[["StageRun"], None] | None = None
    also: tuple[str, ...] = ()
    one_part: bool = False
    schema: pa.Schema | None = None

    def output_of(self, section: Any) -> str:
        """The dataset this stage writes under `section` (its config section)."""
        return self.output(section) if callable(self.output) else self.output

    @property
    def module(self) -> str:
        """The module whose code (and every project module it imports) the code version covers."""
        return self.process.__module__

    def code_version(self) -> str:
        from .code_version import code_version

        return code_version(self.module, self.version)


@dataclass
class StageRun:
    """One run of a stage: what its functions read (config, inputs) and what they add (identity, state).
    It travels to Dask/Ray workers with the part function, so `state` holds plain data, never a model."""

    stage: Stage
    store: Store
    cfg: Any                                   # the stage's section, the loaded pydantic model itself
    sections: dict[str, Any]                   # the sections of `stage.also`, by field name
    inputs: dict[str, Any]                     # input versions (or model refs) by name
    config: dict = field(default_factory=dict)     # what enters the version id with the code version
    parents: list = field(default_factory=list)    # the versions this one descends from
    input_digest: str | None = None            # for stages whose input is not a version (ingest's sources)
    extra: dict = field(default_factory=dict)      # written into the manifest as it is
    state: dict = field(default_factory=dict)      # what identify/prepare computed for the parts
    progress: Callable[[str, int, int], None] | None = None   # the caller's; never shipped to a worker

    def __getstate__(self):
        return self.__dict__ | {"progress": None}

    @property
    def output(self) -> str:
        return self.stage.output_of(self.cfg)


def section_of(cfg: Any, name: str) -> Any:
    """Section `name` of an `EngineConfig` (or of a mapping of sections, as single-stage calls pass)."""
    if isinstance(cfg, Mapping):
        if name not in cfg:
            raise ValueError(f"config section {name!r} is missing (given: {', '.join(cfg) or 'none'})")
        return cfg[name]
    return getattr(cfg, name)


def _versions(values: Iterable[Any]) -> list[Version]:
    found = []
    for value in values:
        if isinstance(value, Version):
            found.append(value)
        elif isinstance(value, Mapping):
            found += _versions(value.values())
    return found


def begin_run(stage: Stage, store: Store, cfg: Any, inputs: Mapping[str, Any]) -> tuple[StageRun, VersionWriter | Version]:
    """The run's identity, fixed: its writer, or the committed version that already answers it."""
    from .config import section_dict

    missing = [n for n in stage.inputs if n not in inputs]
    if missing:
        raise ValueError(f"stage {stage.name}: input(s) {missing} not given (it reads {', '.join(stage.inputs)})")
    section = section_of(cfg, stage.section)
    sections = {n: section_of(cfg, n) for n in stage.also}
    run = StageRun(stage, store, section, sections, {n: inputs[n] for n in stage.inputs},
                   config=section_dict(section) | {n: section_dict(s) for n, s in sections.items()})
    run.parents = _versions(run.inputs.values())
    found = stage.identify(run) if stage.identify else None
    if found is not None:
        return run, found
    writer = store.begin(run.output, code_version=stage.code_version(), config=run.config, parents=run.parents,
                         input_digest=run.input_digest, schema=stage.schema)
    committed = writer.committed
    return (run, committed) if committed is not None else (run, writer)


def run(stage: Stage, store: Store, cfg: Any, inputs: Mapping[str, Any], *, executor: "Executor | None" = None,
        progress: Callable[[str, int, int], None] | None = None) -> StageResult:
    """Run `stage` over `inputs` with its section of `cfg` (an `EngineConfig`, or {section: model}):
    the committed version when there is one, else the parts not yet made, then the commit."""
    sr, writer = begin_run(stage, store, cfg, inputs)
    sr.progress = progress
    if isinstance(writer, Version):
        log.info("%s: version %s is committed already; nothing to do", writer.stage, writer.id)
        return StageResult(writer, "reused")
    if stage.prepare:
        stage.prepare(sr)
    tasks = stage.split(sr)
    if stage.one_part and len(tasks) != 1:
        raise ValueError(f"stage {stage.name} declares one part, its split gave {len(tasks)}")
    return run_stage(writer, tasks, _PartFunction(stage.process, sr),
                     executor=None if stage.one_part else executor,
                     summarize=(lambda records: stage.summarize(sr, records)) if stage.summarize else None,
                     progress=None if stage.one_part else progress, extra=sr.extra or None,
                     part_attempts=1 if stage.one_part else 4, part_errors=not stage.one_part)


@dataclass
class _PartFunction:
    """`process(run, writer, part)` bound to its run; a plain object, so Dask and Ray can ship it."""

    process: Callable[[StageRun, VersionWriter, PartTask], PartRecord]
    run: StageRun

    def __call__(self, writer: VersionWriter, task: PartTask) -> PartRecord:
        return self.process(self.run, writer, task)


def run_stage(writer: VersionWriter, tasks: Sequence[PartTask], process: Callable[[VersionWriter, PartTask], PartRecord],
              *, executor: Executor | None = None, summarize: Callable[[list[PartRecord]], dict] | None = None,
              progress: Callable[[str, int, int], None] | None = None, part_attempts: int = 4,
              extra: dict | None = None, part_errors: bool = True) -> StageResult:
    """Run `process(writer, task)` for each part not already available, then commit.

    `process` must call `writer.write_part(task.name, ..., source_digest=task.source_digest)` and return
    its record. `extra` goes into the manifest as it is (e.g. the sources an ingest read). A failing
    part raises `StageError` naming the part, or with `part_errors=False` (a one-part stage, whose own
    errors say it all) the stage's error as it is.
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
    stored = writer.stored_parts()   # one listing: only these can be finished already
    todo, resumed, shared = [], 0, []
    for task in tasks:
        if task.name in stored and writer.part_done(task.name):
            resumed += 1
        elif task.source_digest in reusable and reusable[task.source_digest].name == task.name:
            shared.append(task)
        else:
            todo.append(task)
    again = set()
    for task, outcome in zip(shared, writer.reuse_parts([reusable[t.source_digest] for t in shared])):
        if isinstance(outcome, (FileNotFoundError, CommittedFileConflict)):
            # The earlier version lost the file (removed by hand, collected), or this version's folder
            # holds other bytes under the part's name (an interrupted run's unrecorded leftover): the part
            # is made under its claim, where a leftover is replaced and a recorded file never is.
            log.warning("%s: part %s cannot be shared (%s); making it again", writer.stage, task.name, outcome)
            again.add(task.name)
    reused = len(shared) - len(again)
    if again:
        again |= {t.name for t in todo}
        todo = [t for t in tasks if t.name in again]
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
            if not part_errors:
                raise
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
