"""The Stage contract and its runner.

A stage module declares itself once, as `STAGE = Stage(...)`: its name, what it reads (config fields, input
versions and models, files by content), the code it runs, how it splits work into parts, how it makes one
part and how it summarizes. `run` does the rest, the same for every stage: compute the version's identity
from that declaration (`identity`: nothing a stage's functions do can change it), return a version already
committed, resume the parts an interrupted run finished, reuse the parts an earlier version made from
unchanged inputs with unchanged code and config, run the rest on the executor, report progress, record the
metrics and commit last.

Prefect-free: `flows/` passes an executor that maps part work onto Prefect tasks.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

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
class Input:
    """An input a stage declares, and how it enters the version's identity.

    kind      version   a Version, read part by part (its id is a parent; each part's own bytes enter
                        that part's identity, so new data reuses the parts that did not change)
              versions  {name: Version}, each a parent, the names part of the identity
              model     a model ref: a store version (`models/<name>@...`, a parent) or a local path /
                        official checkpoint (by content)
              models    {name: model ref}
              source    what ingest reads: identified by the content of the parts `split` plans
              value     plain JSON data, entered as it is (None where the caller gives none)
    whole     a version read whole, not part by part (clean's clusters): its id enters every part's identity
    """

    name: str
    kind: Literal["version", "versions", "model", "models", "source", "value"] = "version"
    whole: bool = False


def _as_input(value: "str | Input") -> Input:
    return value if isinstance(value, Input) else Input(value)


@dataclass(frozen=True)
class Stage:
    """A stage, declared once in its module. Everything that determines its output is declared here as data,
    and the runner alone turns it into the version's identity (`identity`): no function of a stage sets it.

    name      the loop's name for it (`--from`/`--until`, the Prefect subflow, progress): "parse"
    output    the dataset it writes ("parsed"), or a function of its section ("models/<train.name>")
    inputs    what it reads, by name: "images" (a version read part by part) or `Input(name, kind)`
    section   the `EngineConfig` field it runs with ("parse"): `run.cfg` is that pydantic model itself
    also      other config sections it runs with (by field name), in `run.sections`
    reads     the config fields that determine its output (dotted: "clean.embedder"); default: `section`
              and `also` whole
    files     config fields that name a local file or folder: they enter by content, not by path
    version   the label of its code version ("parse-1"); the digest of the code it runs is added
    code      modules it runs beyond what its own module imports (e.g. a trainer started by name)
    runs      stages it runs through the runner (the ablation's trainings): their code is its code
    resolve   run -> {name: value}: inputs it derives from the config and the store before anything runs
              (the label system a parse maps to, the model a training starts from); each a declared
              `derives` input, whole
    derives   the inputs `resolve` returns, declared like `inputs`
    split     run -> the parts: one `PartTask` per unit of input (`parts_of` gives their input digests)
    process   (run, writer, part) -> the part's record; runs where the executor puts it
    summarize (run, records) -> the version's metrics (default: `merge_metrics`); a "per_tag" entry goes
              into the manifest's `per_tag_metrics`
    prepare   run -> None: work done once before the parts, only when the version is not committed yet
              (load a model's card to fail before any part, the tables every part needs)
    one_part  not part-wise (training): its single part runs in the caller's process
    schema    the output schema, when `storage/schemas.py` does not declare one for `output`
    """

    name: str
    output: str | Callable[[Any], str]
    inputs: tuple["str | Input", ...]
    section: str
    version: str
    split: Callable[["StageRun"], list[PartTask]]
    process: Callable[["StageRun", VersionWriter, PartTask], PartRecord]
    summarize: Callable[["StageRun", list[PartRecord]], dict] | None = None
    prepare: Callable[["StageRun"], None] | None = None
    resolve: Callable[["StageRun"], dict] | None = None
    derives: tuple["str | Input", ...] = ()
    also: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()
    one_part: bool = False
    schema: pa.Schema | None = None

    def output_of(self, section: Any) -> str:
        """The dataset this stage writes under `section` (its config section)."""
        return self.output(section) if callable(self.output) else self.output

    @property
    def module(self) -> str:
        """The stage's own module: its code, and every project module it imports, is the stage's code."""
        return self.process.__module__

    @property
    def declared_inputs(self) -> tuple[Input, ...]:
        return tuple(_as_input(i) for i in self.inputs)

    def code_version(self) -> str:
        """`label+digest` of the code it runs: its module, `code`, and the stages of `runs` (their labels too,
        so a stage it runs that is relabelled makes a new version)."""
        from tasks.engine.identity import code_version
        from tasks.stages import stage

        ran = [stage(n) for n in self.runs]
        label = "+".join([self.version, *(s.version for s in ran)])
        return code_version((self.module, *self.code, *(m for s in ran for m in (s.module, *s.code))), label)


@dataclass
class StageRun:
    """One run of a stage: its config and inputs, and what its functions compute for its parts (`state`).
    It travels to Dask/Ray workers with the part function, so `state` holds plain data, never a model."""

    stage: Stage
    store: Store
    cfg: Any                                   # the stage's section, the loaded pydantic model itself
    sections: dict[str, Any]                   # the sections of `stage.also`, by field name
    inputs: dict[str, Any]                     # inputs (versions, model refs, values) by name, derived ones too
    salt: str = ""                             # the identity every part shares (config, code, whole inputs)
    extra: dict = field(default_factory=dict)  # what the manifest records beside the metrics (never identity)
    state: dict = field(default_factory=dict)  # what prepare/split computed for the parts
    progress: Callable[[str, int, int], None] | None = None   # the caller's; never shipped to a worker
    reusable: dict = field(default_factory=dict)               # parts earlier versions hold, by input digest

    def __getstate__(self):
        return self.__dict__ | {"progress": None, "reusable": {}}

    @property
    def output(self) -> str:
        return self.stage.output_of(self.cfg)

    def run_stage(self, name: str, cfg: Any, inputs: Mapping[str, Any], **kwargs) -> "StageResult":
        """Run stage `name` (declared in this stage's `runs`) through the runner, on this run's store."""
        if name not in self.stage.runs:
            raise ValueError(f"stage {self.stage.name} runs {name!r} but does not declare it in `runs`, so its "
                             f"identity would miss that stage's code")
        from tasks.stages import stage

        return run(stage(name), self.store, cfg, inputs, **kwargs)


def section_of(cfg: Any, name: str) -> Any:
    """Section `name` of an `EngineConfig` (or of a mapping of sections, as single-stage calls pass)."""
    if isinstance(cfg, Mapping):
        if name not in cfg:
            raise ValueError(f"config section {name!r} is missing (given: {', '.join(cfg) or 'none'})")
        return cfg[name]
    return getattr(cfg, name)


def _field(cfg: Any, path: str) -> Any:
    """`section.field.sub` of the config, as plain JSON data."""
    from tasks.engine.config import section_dict

    head, *rest = path.split(".")
    value = section_of(cfg, head)
    for name in rest:
        value = getattr(value, name)
    return section_dict(value) if hasattr(value, "model_dump") else value


def _set(tree: dict, path: str, value: Any) -> None:
    *heads, last = path.split(".")
    for h in heads:
        tree = tree.setdefault(h, {})
    tree[last] = value


@dataclass
class Identity:
    """What the runner computed: the store's arguments for the version, and the salt every part shares."""

    code_version: str
    config: dict
    parents: list
    input_digest: str | None
    salt: str


def identity(stage: Stage, run: StageRun, cfg: Any) -> Identity:
    """The version's identity from the stage's declaration: the config fields it reads (files by content), its
    inputs (versions as parents, models and files by content) and its code. The same declaration always gives
    the same identity, whatever the run's history; `run.inputs` must hold the derived inputs already."""
    from tasks.engine.identity import content_digest

    config: dict = {}
    for path in stage.reads or (stage.section, *stage.also):
        _set(config, path, _field(cfg, path))
    for path in stage.files:   # a path by its content; a name that is no local path (a hub id, "ram") as it is
        value = _field(cfg, path)
        _set(config, path, {"content": content_digest(value)} if value and Path(value).expanduser().exists() else value)
    parents: list = []
    shared: dict = {}      # inputs every part depends on (not read part by part)
    input_digest = None
    for inp in (*stage.declared_inputs, *(replace(_as_input(d), whole=True) for d in stage.derives)):
        value = run.inputs.get(inp.name)
        if inp.kind == "version":
            if value is not None:
                parents.append(value)
                if inp.whole:
                    shared[inp.name] = value.ref
        elif inp.kind == "versions":
            versions = dict(value or {})
            parents += list(versions.values())
            shared[inp.name] = {n: v.ref for n, v in versions.items()}
        elif inp.kind in ("model", "models"):
            refs = {None: value} if inp.kind == "model" else dict(value or {})
            idents = {}
            for n, ref in refs.items():
                mv, idents[n] = _model_identity(run.store, ref)
                parents += [mv] if mv is not None else []
            shared[inp.name] = idents[None] if inp.kind == "model" else idents
        elif inp.kind == "value":
            shared[inp.name] = value
        elif inp.kind == "source":
            # what ingest reads is what its planned parts hold: names and content digests, not paths
            input_digest = digest([[t.name, t.source_digest] for t in run.state["tasks"]])
    if shared:
        config["inputs"] = shared
    code = stage.code_version()
    return Identity(code, config, parents, input_digest, digest({"code": code, "config": config}))


def _model_identity(store: Store, ref: str | None) -> tuple[Version | None, str | None]:
    """A model input: (its store version, a parent; or None) and what identifies it: the version, or the
    content of a local folder or checkpoint file (a moved file is the same model)."""
    from tasks.engine.identity import content_digest
    from tasks.shared.models import model_version

    if ref is None:
        return None, None
    mv = model_version(store, ref)
    if mv is not None:
        return mv, mv.ref
    try:
        return None, content_digest(ref)
    except FileNotFoundError:
        return None, ref   # a hub id: its name is all there is (loading says when it is not there)


def begin_run(stage: Stage, store: Store, cfg: Any, inputs: Mapping[str, Any]) -> tuple[StageRun, VersionWriter | Version]:
    """The run's identity, fixed: its writer, or the committed version that already answers it."""
    declared = stage.declared_inputs
    missing = [i.name for i in declared if i.name not in inputs]
    if missing:
        raise ValueError(f"stage {stage.name}: input(s) {missing} not given (it reads "
                         f"{', '.join(i.name for i in declared)})")
    section = section_of(cfg, stage.section)
    sections = {n: section_of(cfg, n) for n in stage.also}
    run = StageRun(stage, store, section, sections, {i.name: inputs[i.name] for i in declared})
    if stage.resolve:
        derived = stage.resolve(run)
        undeclared = set(derived) - {_as_input(d).name for d in stage.derives}
        if undeclared:
            raise ValueError(f"stage {stage.name}: resolve returned {sorted(undeclared)}, not declared in `derives`")
        run.inputs.update(derived)
    if any(i.kind == "source" for i in declared):
        # a source's identity is its planned parts, and planning reads which parts earlier versions hold
        # (those depend on code and config only, never on this input)
        pre = identity(replace(stage, inputs=tuple(i for i in declared if i.kind != "source")), run, cfg)
        run.reusable = store.begin(run.output, code_version=pre.code_version, config=pre.config,
                                   parents=[]).reusable_parts()
        run.state["tasks"] = stage.split(run)
    ident = identity(stage, run, cfg)
    run.salt = ident.salt
    writer = store.begin(run.output, code_version=ident.code_version, config=ident.config, parents=ident.parents,
                         input_digest=ident.input_digest, schema=stage.schema)
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
        if store.get_ref(writer.stage, "latest") != writer.id:
            # what this run answers with is the latest: a later `--from` step reads this version, not another
            # one committed in between (new data ingested, then taken away again)
            store.set_ref(writer.stage, "latest", writer.id)
        return StageResult(writer, "reused")
    if stage.prepare:
        stage.prepare(sr)
    tasks = sr.state.pop("tasks") if "tasks" in sr.state else stage.split(sr)
    if stage.one_part and len(tasks) != 1:
        raise ValueError(f"stage {stage.name} declares one part, its split gave {len(tasks)}")

    def summarize(records: list[PartRecord]) -> dict:
        metrics = stage.summarize(sr, records) if stage.summarize else merge_metrics(records)
        if "per_tag" in metrics:   # beside the metrics, not in them: tables and artifacts show the metrics
            metrics = dict(metrics)
            sr.extra["per_tag_metrics"] = metrics.pop("per_tag")
        return metrics

    return run_stage(writer, tasks, _PartFunction(stage.process, sr),
                     executor=None if stage.one_part else executor, summarize=summarize,
                     progress=None if stage.one_part else progress, extra=sr.extra,
                     part_attempts=1 if stage.one_part else 4, part_errors=not stage.one_part,
                     reusable=sr.reusable or None)   # a source stage listed them to plan its parts: once is enough


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
              extra: dict | None = None, part_errors: bool = True,
              reusable: dict[str, PartRecord] | None = None) -> StageResult:
    """Run `process(writer, task)` for each part not already available, then commit.

    `process` must call `writer.write_part(task.name, ..., source_digest=task.source_digest)` and return
    its record. `extra` goes into the manifest as it is (e.g. the sources an ingest read). `reusable`: the
    parts earlier versions hold, when the caller listed them already (default: listed here). A failing
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
    reusable = writer.reusable_parts() if reusable is None else reusable
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
    version = writer.commit(metrics=metrics, part_order=names, extra=extra or None)
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
