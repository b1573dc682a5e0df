"""Schemas of every piece of store metadata: manifests, part records and their file entries, refs, leases
and in-part checkpoint records (a claim is read by its file name alone: `is_name` checks its owner).

Metadata is read from a store that other hosts, older or newer versions of this code, and people with a
text editor write to, so nothing in it is used before it is validated here: types are strict (a bool is
not a count, "5" is not a number), counts are non-negative, times parse, and every path a record names is
confined to the folder it belongs to (no absolute path, no `..`, no scheme, no backslash), so no record
can lead a reader out of its version. A record that fails names its file and the field, in one line
(`problem`), which the store raises as CorruptMetadata.

Unknown keys are kept (a newer writer may add some); a manifest whose `format` is newer than this code
is refused with what to do.
"""
from __future__ import annotations

import datetime as _dt
import re
from typing import Annotated, Any

from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

# The version of the bytes the store writes (Parquet parts and their settings, tar shards, rejects, manifests): in
# every version id. Move it with any change to written bytes; tests/test_format.py's golden digests fail until then.
FORMAT_VERSION = 1

# Stage names (`images`, `models/ram`), version ids, ref and part names: letters, digits, '_', '-', '.'.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")

Count = Annotated[StrictInt, Field(ge=0, lt=2**63)]


def is_name(text: Any) -> bool:
    return isinstance(text, str) and bool(NAME.match(text)) and ".." not in text


def is_stage_name(text: Any) -> bool:
    return (isinstance(text, str) and 0 < text.count("/") + 1 <= 2
            and all(is_name(seg) for seg in text.split("/")))


def relative_path(path: Any) -> str:
    """`path` when it is a plain relative '/'-separated path, else ValueError saying why."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"must be a non-empty path, got {path!r}")
    if "\\" in path or "\x00" in path or "://" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"{path!r} points outside the store (an absolute path, a scheme, a drive or a backslash)")
    segments = path.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise ValueError(f"{path!r} points outside its folder (an empty, '.' or '..' segment)")
    return path


def confined_path(path: Any, folder: str) -> str:
    """`path` when it is a plain relative path inside `folder`, else ValueError saying why."""
    relative_path(path)
    if not path.startswith(folder.rstrip("/") + "/"):
        raise ValueError(f"{path!r} lies outside {folder.rstrip('/')}/")
    return path


class Record(BaseModel):
    """Strict types, unknown keys kept as they are (a newer writer may add some)."""
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class FileEntry(Record):
    path: StrictStr
    kind: StrictStr = Field(pattern=r"^[A-Za-z0-9_]+$")
    rows: Count = 0
    bytes: Count
    sha256: StrictStr = Field(pattern=_SHA256.pattern)
    name: StrictStr | None = None          # a named file's name (models: weights, config, tag list)

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        return relative_path(path)


class PartRecordModel(Record):
    name: StrictStr
    files: list[FileEntry]
    rows_in: Count
    rows_out: Count
    rows_rejected: Count
    source_digest: StrictStr | None = None
    config_digest: StrictStr | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    shared_from: StrictStr | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not is_name(name) or name.startswith("_"):
            raise ValueError(f"{name!r} is not a part name (letters, digits, '_', '-', '.'; no '/')")
        return name

    @field_validator("shared_from")
    @classmethod
    def _ref(cls, ref: str | None) -> str | None:
        return ref if ref is None else version_ref(ref)

    def confine(self, folder: str) -> "PartRecordModel":
        prefix = folder.rstrip("/") + "/"
        for i, f in enumerate(self.files):   # (each path was checked as a relative path when parsed)
            if not f.path.startswith(prefix):
                raise RecordError(f"files.{i}.path", f"{f.path!r} lies outside {folder.rstrip('/')}/")
        return self


def version_ref(ref: Any) -> str:
    """`stage/version` (model stages: `models/name/version`), as manifests' parents and `shared_from` name them."""
    stage, _, vid = ref.rpartition("/") if isinstance(ref, str) else ("", "", "")
    if not is_stage_name(stage) or not is_name(vid):
        raise ValueError(f"{ref!r} is not a version reference stage/version")
    return ref


def _created(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 time string, got {type(value).__name__} {value!r}")
    try:
        when = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone (the store writes UTC times)")
    return value


class Manifest(Record):
    format: StrictInt = FORMAT_VERSION
    stage: StrictStr
    version: StrictStr
    parents: list[StrictStr]
    parts: list[PartRecordModel]
    files: list[dict[str, Any]]   # the files of `parts`, in order (checked first: validated there, once)
    created: StrictStr
    rows_in: Count
    rows_out: Count
    rows_rejected: Count
    schema_ipc: StrictStr = Field(pattern=_HEX.pattern)
    code_version: StrictStr
    config_digest: StrictStr
    # Required too, though readers could do without: every manifest `commit` wrote has them, and `show`,
    # reports and the runner read them.
    config: dict[str, Any]
    input_digest: StrictStr | None
    metrics: dict[str, Any]
    schema_: StrictStr = Field(alias="schema")
    parts_written: Count
    parts_reused: Count
    duration_s: StrictFloat | StrictInt | None = None

    @field_validator("format")
    @classmethod
    def _format(cls, value: int) -> int:
        if value > FORMAT_VERSION:
            raise ValueError(f"is {value}: written by a newer ram-engine (this one reads format {FORMAT_VERSION}); "
                             f"upgrade ram-engine to read it")
        return value

    @field_validator("parents")
    @classmethod
    def _parents(cls, parents: list[str]) -> list[str]:
        return [version_ref(p) for p in parents]

    @field_validator("created")
    @classmethod
    def _time(cls, value: str) -> str:
        return _created(value)

    @model_validator(mode="before")
    @classmethod
    def _files_are_the_parts_files(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("parts"), list) and "files" in data:
            flat = [f for p in data["parts"] if isinstance(p, dict) and isinstance(p.get("files"), list)
                    for f in p["files"]]
            files = data["files"]
            if files != flat:
                i = next((i for i, (a, b) in enumerate(zip(files, flat)) if a != b), min(len(files), len(flat)))
                entry = files[i] if isinstance(files, list) and i < len(files) else None
                if isinstance(entry, dict):
                    relative_path(entry.get("path"))   # a path out of the store is named as such
                raise ValueError(f"files.{i}: files does not list the files of parts, in order (the manifest was "
                                 f"edited)")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if len({p.name for p in self.parts}) != len(self.parts):
            raise ValueError("parts names a part twice")
        return self


class Ref(Record):
    version: StrictStr
    stage: StrictStr | None = None
    updated: StrictStr | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, vid: str) -> str:
        if not is_name(vid):
            raise ValueError(f"{vid!r} is not a version id")
        return vid


class Lease(Record):
    owner: StrictStr | None = None
    host: StrictStr | None = None
    boot: StrictStr | None = None
    pidns: StrictStr | None = None
    pid: Annotated[StrictInt, Field(gt=0, lt=2**31)] | None = None
    start: StrictStr | None = None
    expires: StrictFloat | StrictInt | None = None   # the writer's clock: a hint only (see storage/leases.py)
    ttl: Annotated[StrictFloat | StrictInt, Field(gt=0)] | None = None   # seconds it lives without renewal


class CheckpointFile(Record):
    path: StrictStr
    bytes: Count
    sha256: StrictStr = Field(pattern=_SHA256.pattern)


class CheckpointRecord(Record):
    name: StrictStr
    data: Any = None
    files: dict[StrictStr, CheckpointFile] = Field(default_factory=dict)


class RecordError(ValueError):
    """A record that fails its schema; `field` is the dotted location, str() one line."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def _located(field: str, exc: Exception) -> RecordError:
    return RecordError(field, str(exc))


def problem(exc: ValidationError | RecordError) -> RecordError:
    """The first problem of a validation error as one line: `field.path: what (got …)`."""
    if isinstance(exc, RecordError):
        return exc
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"])   # empty: a check of the whole record, which names its fields
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if err["type"] in ("value_error", "missing") or isinstance(got, (dict, list)) else \
        f" (got {type(got).__name__} {_short(got)})"
    more = f"; {len(exc.errors()) - 1} more problem(s)" if len(exc.errors()) > 1 else ""
    return RecordError(field, f"{msg}{shown}{more}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def parse(model: type[Record], data: Any) -> Record:
    """`data` validated as `model`; RecordError (one line, naming the field) when it is not."""
    if not isinstance(data, dict):
        raise RecordError("", f"holds a JSON {type(data).__name__}, not an object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise problem(exc) from None


def parse_manifest(data: Any, stage: str, vid: str) -> Manifest:
    """A manifest found at `<stage>/<vid>/_manifest.json`: valid, about that version, every file inside it."""
    manifest = parse(Manifest, data)
    if manifest.stage != stage or manifest.version != vid:
        raise RecordError("stage", f"says it is {manifest.stage}@{manifest.version}, but it lies in {stage}/{vid}")
    folder = f"{stage}/{vid}"
    for i, part in enumerate(manifest.parts):
        try:
            part.confine(folder)
        except RecordError as exc:
            raise RecordError(f"parts.{i}.{exc.field}", str(exc).split(": ", 1)[1]) from None
    return manifest


def parse_part_record(data: Any, folder: str) -> PartRecordModel:
    """A part record of the version folder `folder`: valid, every file inside the folder."""
    return parse(PartRecordModel, data).confine(folder)  # type: ignore[union-attr]
