"""The versioned dataset store.

Layout under the store root (any fsspec URL):

    <stage>/<version>/_manifest.json          the commit point, written last
    <stage>/<version>/parts/<part>.parquet    a part's table (only tables: any Parquet reader can take the folder)
    <stage>/<version>/shards/<part>.tar       a part's WebDataset shard (optional)
    <stage>/<version>/_rejects/<part>.parquet a part's rejected rows
    <stage>/<version>/_parts/<part>.json      a part's completion record (for resume)
    <stage>/<version>/_claims/<part>/<owner>.json  who is making a part now (removed at commit)
    <stage>/<version>/_progress/<part>/<name>.*    in-part checkpoints (VersionWriter.save_checkpoint;
                                              removed when the part is written and at commit)
    _refs/<stage>/<name>.json                 named refs: latest, prod, ...
    _tmp/<owner>/                             a writer's temporary files
    _leases/<owner>.json                      a writer's lease: alive while renewed (storage/leases.py)

A committed file never changes: a write that finds other bytes in place raises CommittedFileConflict,
and a run that finds a part finished by another run adopts it. Reads check files against the manifest.

Every version folder is self-contained: a part an earlier version made is hard-linked into the
new folder (copied where the filesystem has no links, server-side on object stores), so the
obvious glob of any outside reader (`<version>/parts/*.parquet`, `<version>/shards/*.tar`) sees the
whole version and nothing else. The manifest stays the commit point and lists every file.

A version id is derived from (stage, code version, resolved config, parent ids), so the same
inputs always land in the same folder: a rerun finds the committed manifest and does nothing,
and a crashed run finds its finished parts and skips them.
"""
from __future__ import annotations

import bisect
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schemas
from fsspec.implementations.local import LocalFileSystem

from . import records
from .fs import TMP_DIR, CommittedFileConflict, FileInfo, Placement, open_fs, retry_io, sha256_of
from .leases import owner_alive, put_whole, store_time as _store_time
from .parquet import Owned, iter_parquet_batches, read_owned, read_parquet
from .shards import LabelledShard, iter_tar, read_member, webdataset_pipeline, write_tar

log = logging.getLogger("ram_engine")

MANIFEST = "_manifest.json"
CHECKPOINTS = "_progress"
_CHECKPOINT_RECORD = ".checkpoint.json"
# The version of the bytes the store writes (in every version id): records.FORMAT_VERSION, the one definition
FORMAT_VERSION = records.FORMAT_VERSION
ID_LEN = 16
_INFO_PER_FILE = 4   # check_files: up to this many files of one folder are checked one `info` each, more by a listing


class StoreError(RuntimeError):
    """A user-facing store problem: the message says what, where and what to do."""


class VersionNotFound(StoreError):
    pass


class CorruptMetadata(StoreError):
    """A manifest, ref or part record that cannot be read; the message names the file."""


class CorruptFile(StoreError):
    """A committed file that does not match its manifest (changed, truncated or missing)."""


# Stage names (`images`, `models/ram`) and version ids / ref names: no way out of the store.
_NAME = records.NAME
_WARNED: set[str] = set()   # stray files already named in this process


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(value: Any, length: int = ID_LEN) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:length]


def shard_name(part: str) -> str:
    """Where a part's WebDataset shard lives, relative to its version folder (the `shard` column's value:
    it stays true in every version the part is linked into)."""
    return f"shards/{part}.tar"


def version_id(stage: str, code_version: str, config: dict, parents: list[str], input_digest: str | None = None) -> str:
    """The id of the version these inputs produce. Parents are `stage/version` strings; `input_digest`
    identifies an external input (the ingest source's content). The store's file format is in every id: the
    bytes a version is written as are part of what it is (tests/test_format.py guards them)."""
    ident = {"stage": stage, "code": code_version, "format": FORMAT_VERSION, "config": config,
             "parents": sorted(parents)}
    if input_digest:
        ident["input"] = input_digest
    return digest(ident)


@dataclass
class PartRecord:
    """What one finished part contributed. Written after its files, so it proves they are whole."""

    name: str
    files: list[dict]             # {path, kind: table|shard|rejects, rows, bytes, sha256}
    rows_in: int
    rows_out: int
    rows_rejected: int
    source_digest: str | None = None   # identity of the input this part was made from
    config_digest: str | None = None   # identity of the code + config that made it
    metrics: dict = field(default_factory=dict)
    shared_from: str | None = None     # `stage/version` that first wrote this part, when this version links it
    # [smallest, largest] `key` of every row of its tables (rows and rejects); None when it has no keyed rows, or
    # for records written before it was kept. A key outside it is in no file of the part (Store.rows_with_keys).
    key_range: list[str] | None = None

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if out["key_range"] is None:   # records without one read and hash as they always did
            del out["key_range"]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "PartRecord":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


class Store:
    """A versioned dataset store at an fsspec URL (`./ram-data`, `s3://bucket/prefix`, ...)."""

    def __init__(self, url: str = "./ram-data", **storage_options):
        self.url = url
        self.storage_options = dict(storage_options)
        self.fs, self.root = open_fs(url, **storage_options)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ----- paths
    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def full_url(self, rel: str) -> str:
        """A URL another process (webdataset, a worker) can open."""
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        path = self.abs(rel)
        if proto in ("file", "local"):
            return path
        return f"{proto}://{path}"

    def exists(self) -> bool:
        """Whether the store's root folder (or bucket prefix) exists."""
        return self.fs.exists(self.root)

    def check_writable(self) -> None:
        """Write and remove a probe file under the temporary folder; raises what the backend raises."""
        probe = self.abs(f"{TMP_DIR}/check-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        if "file" in self.fs.protocol:  # a run creates a local store's folder; a bucket must exist already
            self.fs.makedirs(probe.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(probe, "wb") as fh:
            fh.write(b"ram-engine check")
        self.fs.rm(probe)

    def labelled_shard(self, rel: str, labels: pa.Table | str | list[str]) -> LabelledShard:
        """The shard at store-relative `rel` with the label rows of its samples (a table, or local Parquet
        path(s)): one source of a training stream (ram_model.data_stream.ShardStream)."""
        return LabelledShard(self.fs, self.abs(rel), labels, name=self.full_url(rel), labels_fs=LocalFileSystem())

    def read_parquet(self, rel: str, entry: dict | None, columns: list[str] | None = None, *, where: str = "",
                     fix: str = "") -> pa.Table:
        """A Parquet file of the store, checked against its manifest or part-record `entry` (bytes, sha256).
        Its bytes are read once, into memory pyarrow owns, hashed there and decoded with pyarrow's threads."""
        def read() -> Owned:
            with self.fs.open(self.abs(rel), "rb") as fh:
                return read_owned(fh, entry["bytes"] if entry is not None else None)

        where = where or self.url
        try:
            data = retry_io(read, f"reading {rel}")
        except FileNotFoundError:
            raise CorruptFile(f"{where}: {rel} is missing. {fix}; recreate the version or restore the file.") from None
        if entry is not None:
            sha = hashlib.sha256(memoryview(data.buffer)).hexdigest()
            if data.size != entry["bytes"] or sha != entry["sha256"]:
                raise CorruptFile(f"{where}: {rel} is {data.size} bytes (sha256 {sha[:12]}…) but its manifest says "
                                  f"{entry['bytes']} bytes (sha256 {entry['sha256'][:12]}…): it changed after commit, "
                                  f"and nothing was built on it. {fix}.")
        return read_parquet(data, columns=columns)

    def rows_with_keys(self, records: Iterable[PartRecord], keys: Iterable[str],
                       columns: dict[str, list[str]] | None = None) -> dict[str, pa.Table]:
        """The rows of these parts whose `key` is one of `keys`, by file kind (default: `{"table": ["key"],
        "rejects": ["key"]}`; `columns` names the kinds and the columns to return, `key` always among them),
        each table with a `part` column (the part's name), in the order of `records`.

        Only the parts whose recorded key range (`PartRecord.key_range`) holds one of the keys are read (a
        record without one is read), and of those only the named columns: asking which of a new part's keys
        earlier parts hold costs the parts that may hold them, not every key of the store. Files are checked
        against their records (size and sha256) as every read is."""
        columns = columns or {"table": ["key"], "rejects": ["key"]}
        wanted = sorted(set(keys))
        found: dict[str, list[pa.Table]] = {kind: [] for kind in columns}
        if not wanted:
            return {kind: _with_part(pa.table({c: pa.array([], pa.string()) for c in cols}), [])
                    for kind, cols in columns.items()}
        value_set = pa.array(wanted, pa.string())
        for record in records:
            if record.key_range is not None:
                lo, hi = record.key_range
                i = bisect.bisect_left(wanted, lo)
                if i == len(wanted) or wanted[i] > hi:
                    continue   # no wanted key falls in this part's range: nothing to read
            for f in record.files:
                if f["kind"] not in columns:
                    continue
                cols = list(dict.fromkeys(["key", *columns[f["kind"]]]))
                table = self.read_parquet(f["path"], f, cols, where=f"part {record.name}")
                table = table.filter(pc.is_in(table.column("key"), value_set=value_set))
                if table.num_rows:
                    found[f["kind"]].append(_with_part(table, [record.name] * table.num_rows))
        out = {}
        for kind, tables in found.items():
            if tables:
                out[kind] = pa.concat_tables(tables, promote_options="permissive")
            else:
                out[kind] = _with_part(pa.table({c: pa.array([], pa.string())
                                                 for c in dict.fromkeys(["key", *columns[kind]])}), [])
        return out

    @staticmethod
    def overlapping_key_ranges(records: Iterable[PartRecord]) -> set[str]:
        """The names of the parts whose key range meets another's, through a chain of ranges that meet (or that
        have none recorded): the only parts that can share a key with another. Every other part's keys are its
        own, and need not be read to know it."""
        records = list(records)
        out = {r.name for r in records if r.key_range is None}
        group: list[str] = []
        reach = None
        for lo, hi, name in sorted((r.key_range[0], r.key_range[1], r.name) for r in records if r.key_range is not None):
            if reach is not None and lo <= reach:
                group.append(name)
                reach = max(reach, hi)
                continue
            if len(group) > 1:
                out.update(group)
            group, reach = [name], hi
        if len(group) > 1:
            out.update(group)
        return out

    def _read_json(self, rel: str) -> dict | None:
        def read():
            with self.fs.open(self.abs(rel), "rb") as f:
                return f.read()

        try:
            data = retry_io(read, f"reading {rel}")
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError):
            raise CorruptMetadata(f"{self.full_url(rel)} is a directory, not a file; remove it (or restore the "
                                  f"file it replaced)") from None
        try:
            value = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptMetadata(f"{self.full_url(rel)} is not valid JSON ({len(data)} bytes: {exc}); it was "
                                  f"damaged or truncated. The rest of the store is usable; restore or remove "
                                  f"this file.") from None
        if not isinstance(value, dict):
            raise CorruptMetadata(f"{self.full_url(rel)} holds a JSON {type(value).__name__}, not an object; "
                                  f"restore or remove this file.")
        return value

    def read_manifest(self, stage: str, vid: str) -> dict | None:
        """The manifest of stage/vid, checked: None when there is none, CorruptMetadata (naming the file
        and the field) when it is damaged."""
        check_stage_name(stage)
        check_version_name(vid)
        rel = f"{stage}/{vid}/{MANIFEST}"
        manifest = self._read_json(rel)
        if manifest is None:
            return None
        try:  # types, counts, times, and every file inside this version's folder (storage/records.py)
            records.parse_manifest(manifest, stage, vid)
        except records.RecordError as exc:
            raise CorruptMetadata(f"{self.full_url(rel)}: {exc}; not a valid manifest: restore it, or remove the "
                                  f"version folder {stage}/{vid}") from None
        return manifest

    def damaged(self) -> list[str]:
        """Every manifest and ref file that cannot be read, each with its problem (for `verify`)."""
        problems = []
        for stage in self._stage_folders():
            for vid in self._version_folders(stage):
                try:
                    self.read_manifest(stage, vid)
                except StoreError as exc:
                    problems.append(str(exc))
            for name in self._ref_names(stage):
                try:
                    self.get_ref(stage, name)
                except StoreError as exc:
                    problems.append(str(exc))
        return problems

    def check_files(self, files: list[dict], checksum: bool = False,
                    listings: dict[str, dict[str, int | None]] | None = None) -> list[str]:
        """What is wrong with these manifest entries: a file missing or of another size (or, with
        `checksum`, another sha256).

        What it costs is what it checks: with `checksum` each file is read once (its size comes with its
        hash; no listing); otherwise a folder that holds a few of these files costs one `info` per file,
        and one with more costs one listing. `listings` (folder -> {name: size}, filled as folders are
        listed) lets many calls share their listings: `reusable_parts` checks every part of a version
        with one listing per folder, not one per part."""
        problems = []
        by_folder: dict[str, list[dict]] = {}
        for f in files:
            by_folder.setdefault(f["path"].rsplit("/", 1)[0], []).append(f)
        listed: dict[str, dict[str, int | None] | None] = {}
        for folder, entries in by_folder.items():
            listed[folder] = listings.get(folder) if listings is not None else None
            if listed[folder] is None and not checksum and (listings is not None or len(entries) > _INFO_PER_FILE):
                listed[folder] = self.list_sizes(folder)
                if listings is not None:
                    listings[folder] = listed[folder]
        for f in files:
            folder, name = f["path"].rsplit("/", 1)
            if checksum:
                size, sha = self._checksum(f["path"])
            elif listed[folder] is not None:
                size, sha = listed[folder].get(name), None
            else:
                size, sha = self._size(f["path"]), None
            if size is None:
                problems.append(f"{f['path']}: missing")
            elif size != f["bytes"]:
                problems.append(f"{f['path']}: {size} bytes, manifest says {f['bytes']}")
            elif checksum and sha != f["sha256"]:
                problems.append(f"{f['path']}: sha256 does not match the manifest's {f['sha256'][:12]}…")
        return problems

    def list_sizes(self, folder: str) -> dict[str, int | None]:
        """{file name: size} of a store folder, in one listing ({} when there is no such folder)."""
        if isinstance(self.fs, LocalFileSystem):   # one scandir: fsspec's ls would stat every entry in Python
            try:
                with os.scandir(self.abs(folder)) as entries:
                    return {e.name: e.stat().st_size if not e.is_dir() else None for e in entries}
            except (FileNotFoundError, NotADirectoryError):
                return {}
        try:
            entries = self.fs.ls(self.abs(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in entries}

    def _size(self, rel: str) -> int | None:
        try:
            return self.fs.info(self.abs(rel)).get("size")
        except FileNotFoundError:
            return None

    def _checksum(self, rel: str) -> tuple[int | None, str | None]:
        try:
            return sha256_of(self.fs, self.abs(rel))
        except (FileNotFoundError, IsADirectoryError):
            return None, None

    def _folders(self, rel: str) -> list[str]:
        """The names of the folders in `rel`; a file where only folders belong (a README.md beside the
        stages) is left out with a warning."""
        try:
            entries = self.fs.ls(self.abs(rel) if rel else self.root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = []
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "directory":
                names.append(name)
            elif not name.startswith((".", "_")) and e["name"].rstrip("/") != self.abs(rel).rstrip("/"):
                url = self.full_url(f"{rel}/{name}" if rel else name)
                if url not in _WARNED:  # once per process: listings run often
                    _WARNED.add(url)
                    log.warning("ignoring %s: a file where the store keeps only folders", url)
        return sorted(names)

    def _stage_folders(self) -> list[str]:
        names = self._folders("")
        if "models" in names:  # models/<name> are stages of their own
            names.remove("models")
            names += [f"models/{n}" for n in self._folders("models")]
        return [n for n in names if not n.startswith(("_", ".")) and all(_NAME.match(s) for s in n.split("/"))]

    def _version_folders(self, stage: str) -> list[str]:
        return [v for v in self._folders(stage) if _NAME.match(v)]

    def _ref_names(self, stage: str) -> list[str]:
        try:
            entries = self.fs.ls(self.abs(f"_refs/{stage}"), detail=False)
        except FileNotFoundError:
            return []
        return [e.rsplit("/", 1)[-1][:-5] for e in entries if e.endswith(".json")
                and not e.rsplit("/", 1)[-1].startswith(".")]

    # ----- listing and opening
    def stages(self) -> list[str]:
        return [n for n in self._stage_folders() if self.versions(n)]

    def versions(self, stage: str) -> list["Version"]:
        """Committed versions of a stage, oldest first. A folder without a manifest is not a version;
        one with a damaged manifest is skipped with a warning (`verify` reports it)."""
        found = []
        for vid in self._version_folders(stage):
            try:
                manifest = self.read_manifest(stage, vid)
            except StoreError as exc:
                log.warning("skipping %s/%s: %s", stage, vid, exc)
                continue
            if manifest is not None:
                found.append(Version(self, manifest))
        found.sort(key=lambda v: (v.manifest["created"], v.id))
        return found

    def open(self, stage: str, ref: str = "latest") -> "Version":
        """Open a committed version by full id, unique prefix, or ref name (`latest`, `prod`, ...)."""
        if "@" in stage and ref == "latest":
            stage, ref = stage.split("@", 1)
        check_stage_name(stage)
        check_version_name(ref)
        manifest = self.read_manifest(stage, ref)
        if manifest is not None:
            return Version(self, manifest)
        try:
            target = self.get_ref(stage, ref)
            manifest = self.read_manifest(stage, target) if target is not None else None
        except CorruptMetadata as exc:  # a damaged ref or its target: `latest` falls back to the listing below
            if ref != "latest":
                raise
            log.warning("%s; using the newest readable version instead", exc)
            manifest = None
        if manifest is not None:
            return Version(self, manifest)
        if ref == "latest":
            versions = self.versions(stage)
            if versions:
                return versions[-1]
            raise VersionNotFound(f"stage '{stage}' has no committed version in {self.url}; run that stage first")
        matches = [v for v in self.versions(stage) if v.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            ids = ", ".join(v.id for v in matches)
            raise StoreError(f"'{stage}@{ref}' is ambiguous in {self.url}: matches {ids}; give more characters")
        raise VersionNotFound(
            f"no committed version '{ref}' of stage '{stage}' in {self.url}; `ram-engine ls {stage}` lists them")

    def open_ref(self, ref: str) -> "Version":
        """Open `stage/version` (as in manifests' parent lists; model stages have a slash too)."""
        stage, _, vid = ref.rpartition("/")
        if not stage:
            raise StoreError(f"{ref!r} is not a version reference of the form stage/version")
        return self.open(stage, vid)

    def find(self, stage: str, vid: str) -> "Version | None":
        manifest = self.read_manifest(stage, vid)
        return Version(self, manifest) if manifest is not None else None

    def delete_version(self, stage: str, vid: str) -> tuple[int, int]:
        """Delete a committed version without breaking any other: its manifest goes first (readers stop
        seeing it), then every file of its folder that no other version's manifest lists; files that
        newer versions reuse stay. Refs naming it are removed. Returns (files removed, files kept)."""
        version = self.find(stage, vid)
        if version is None:
            raise VersionNotFound(f"no committed version {stage}@{vid} in {self.url}")
        referenced = {f["path"] for s in self._stage_folders() for v in self.versions(s) if v.ref != version.ref
                      for f in v.files()}
        self.fs.rm(self.abs(f"{stage}/{vid}/{MANIFEST}"))
        for name, target in self.refs(stage).items():
            if target == vid:
                self.fs.rm(self.abs(f"_refs/{stage}/{name}.json"))
        removed = kept = 0
        prefix = f"{self.root}/{stage}/{vid}/"
        for path in self.fs.find(self.abs(f"{stage}/{vid}")):
            rel = f"{stage}/{vid}/{path[len(prefix):]}"
            if rel in referenced:
                kept += 1
            else:
                self.fs.rm(path)
                removed += 1
        remaining = self.versions(stage)
        if remaining and self.get_ref(stage, "latest") is None:
            self.set_ref(stage, "latest", remaining[-1].id)
        return removed, kept

    # ----- refs
    def set_ref(self, stage: str, name: str, vid: str) -> None:
        """Point a named ref at a committed version. Written whole by an atomic move: never torn."""
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"ref name {name!r} is invalid: use letters, digits, '-', '_'")
        if self.find(stage, vid) is None:
            raise VersionNotFound(f"cannot set ref '{name}': {stage}@{vid} is not committed")
        self._put_ref(stage, name, vid)

    def _put_ref(self, stage: str, name: str, vid: str, placement: Placement | None = None) -> None:
        body = canonical_json({"stage": stage, "version": vid, "updated": _now()}).encode()
        if placement is not None:   # a writer's, already started
            placement.put_bytes(f"_refs/{stage}/{name}.json", body, replace=True)
            return
        placement = Placement(self.fs, self.root)
        try:
            placement.put_bytes(f"_refs/{stage}/{name}.json", body, replace=True)
        finally:
            placement.cleanup()

    def get_ref(self, stage: str, name: str) -> str | None:
        check_stage_name(stage)
        check_version_name(name)
        rel = f"_refs/{stage}/{name}.json"
        data = self._read_json(rel)
        if data is None:
            return None
        try:
            ref = records.parse(records.Ref, data)
            if ref.stage is not None and ref.stage != stage:
                raise records.RecordError("stage", f"is {ref.stage!r}, but the ref lies in _refs/{stage}/")
        except records.RecordError as exc:
            raise CorruptMetadata(f"{self.full_url(rel)}: {exc}; set the ref again with `ram-engine ref "
                                  f"{stage}@VERSION {name}`") from None
        return ref.version

    def refs(self, stage: str) -> dict[str, str]:
        out = {}
        for name in self._ref_names(stage):
            try:
                vid = self.get_ref(stage, name)
            except CorruptMetadata as exc:
                log.warning("skipping ref %s: %s", name, exc)
                continue
            if vid:
                out[name] = vid
        return out

    # ----- writing
    def begin(self, stage: str, *, code_version: str, config: dict, parents: Iterable["Version | str"] = (),
              input_digest: str | None = None, schema: pa.Schema | None = None) -> "VersionWriter":
        """Start (or resume) writing the version these inputs determine."""
        parent_ids = sorted(p.ref if isinstance(p, Version) else str(p) for p in parents)
        if schema is None:
            schema = schemas.schema_for(stage)
        if schema is None:
            raise StoreError(f"stage '{stage}' has no schema in storage/schemas.py; declare one there")
        return VersionWriter(self, stage, code_version, config, parent_ids, schema, input_digest)


@dataclass
class Version:
    """A committed, immutable dataset version."""

    store: Store
    manifest: dict

    def __repr__(self) -> str:  # the manifest is long: name the version, not its contents
        m = self.manifest
        return f"Version({self.ref!r}, rows_out={m.get('rows_out')}, parts={len(m.get('parts', []))})"

    @property
    def id(self) -> str:
        return self.manifest["version"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.id}"

    @property
    def parents(self) -> list[str]:
        return list(self.manifest["parents"])

    @property
    def parts(self) -> list[PartRecord]:
        return [PartRecord.from_json(p) for p in self.manifest["parts"]]

    @property
    def schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(self.manifest["schema_ipc"])))

    def files(self, kind: str | None = None) -> list[dict]:
        return [f for p in self.manifest["parts"] for f in p["files"] if kind is None or f["kind"] == kind]

    def shard_urls(self) -> list[str]:
        shards = self.files("shard")
        self.check_inputs(shards)
        return [self.store.full_url(f["path"]) for f in shards]

    def check_inputs(self, files: list[dict]) -> None:
        """Stop with the file named when an input file is missing or not the size its manifest says
        (a stage must never build on a changed input). Reads of whole files also check the sha256."""
        problems = self.store.check_files(files)
        if problems:
            raise CorruptFile(f"{self.ref}: {'; '.join(problems[:5])}. A committed file changed or went missing: "
                              f"nothing was built on it. `ram-engine verify {self.stage}@{self.id}` lists every "
                              f"problem; recreate the version (remove its folder and rerun) or restore the files.")

    def _entry(self, rel: str) -> dict | None:
        by_path = self.__dict__.get("_by_path")
        if by_path is None:
            by_path = self.__dict__["_by_path"] = {f["path"]: f for f in self.files()}
        return by_path.get(rel)

    def iter_batches(self, kind: str = "table", columns: list[str] | None = None,
                     batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Stream record batches part by part; memory stays bounded by one batch."""
        self.check_inputs(self.files(kind))
        local = isinstance(self.store.fs, LocalFileSystem)
        for f in self.files(kind):
            if local:   # pyarrow opens the file itself and decodes with its threads (storage/parquet.py)
                yield from iter_parquet_batches(self.store.abs(f["path"]), columns=columns, batch_size=batch_size)
                continue
            fh = retry_io(lambda: self.store.fs.open(self.store.abs(f["path"]), "rb"), f"opening {f['path']}")
            with fh:
                yield from iter_parquet_batches(fh, columns=columns, batch_size=batch_size)

    def iter_part_tables(self, kind: str = "table", columns: list[str] | None = None
                         ) -> Iterator[tuple[PartRecord, pa.Table]]:
        """Each part's table in turn (one part in memory at a time)."""
        for part in self.parts:
            for f in part.files:
                if f["kind"] == kind:
                    yield part, self.read_file(f["path"], columns=columns)

    def read_file(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file of this version, checked against its manifest entry (size and sha256)."""
        return self.store.read_parquet(rel, self._entry(rel), columns, where=self.ref,
                                       fix=f"`ram-engine verify {self.stage}@{self.id}` lists every problem")

    def read_table(self, kind: str = "table", columns: list[str] | None = None) -> pa.Table:
        """The whole table of this version (for inspection and small data)."""
        schema = self.schema if kind == "table" else schemas.REJECTS
        tables = [self.read_file(f["path"], columns=columns) for f in self.files(kind)]
        if not tables:
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def rejects(self) -> pa.Table:
        return self.read_table("rejects")

    def iter_samples(self) -> Iterator[dict]:
        """Stream WebDataset samples of every shard, in order."""
        shards = self.files("shard")
        self.check_inputs(shards)
        return iter_tar(self.store.fs, [self.store.abs(f["path"]) for f in shards],
                        [self.store.full_url(f["path"]) for f in shards])

    def download(self, local_dir: str, names: Iterable[str] | None = None) -> str:
        """Copy this version's named files (kind `file`; only `names` when given) into a local folder (cached:
        skipped when the sizes already match). Returns the folder."""
        import pathlib

        target = pathlib.Path(local_dir)
        target.mkdir(parents=True, exist_ok=True)
        files = self.files("file")
        if names is not None:
            wanted = set(names)
            missing = wanted - {f["name"] for f in files}
            if missing:
                raise StoreError(f"{self.ref} has no file named {', '.join(sorted(missing))}")
            files = [f for f in files if f["name"] in wanted]
        for f in files:
            dest = target / f["name"]
            if dest.exists() and dest.stat().st_size == f["bytes"]:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            # A private temporary name: several processes may fill the same cache at once.
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
            retry_io(lambda: self.store.fs.get_file(self.store.abs(f["path"]), str(tmp)), f"downloading {f['path']}")
            tmp.replace(dest)
        return str(target)

    def iter_part_samples(self, part: PartRecord) -> Iterator[dict]:
        """Stream the WebDataset samples of one part's shard."""
        shards = [f for f in part.files if f["kind"] == "shard"]
        self.check_inputs(shards)
        return iter_tar(self.store.fs, [self.store.abs(f["path"]) for f in shards],
                        [self.store.full_url(f["path"]) for f in shards])

    def webdataset(self, **kwargs):
        """webdataset.WebDataset over this version's shards (local stores; remote ones use iter_samples)."""
        return webdataset_pipeline(self.shard_urls(), **kwargs)

    def read_member(self, shard_rel: str, member: str) -> bytes:
        return read_member(self.store.fs, self.store.abs(shard_rel), member)

    def verify(self, progress: Callable[[str], None] | None = None) -> list[str]:
        """Check every file's size and sha256 against the manifest. Returns the problems found."""
        problems = []
        for f in self.files():
            if progress:
                progress(f["path"])
            problems += self.store.check_files([f], checksum=True)
        return problems


@dataclass
class Checkpoint:
    """One in-part checkpoint, as `VersionWriter.checkpoints` lists it: its files checked out."""
    name: str
    data: Any
    files: dict[str, dict]          # "table" / "shard" -> {"path", "bytes", "sha256"}
    store: "Store" = field(repr=False)

    def table(self) -> pa.Table | None:
        entry = self.files.get("table")
        if entry is None:
            return None
        with self.store.fs.open(self.store.abs(entry["path"]), "rb") as f:
            return read_parquet(f)

    def samples(self) -> Iterator[dict]:
        entry = self.files.get("shard")
        if entry is None:
            return iter(())
        return ({k: v for k, v in s.items() if k != "__url__"}
                for s in iter_tar(self.store.fs, [self.store.abs(entry["path"])]))


class VersionWriter:
    """Writes one version part by part; `commit` writes the manifest last.

    A part is written whole or not at all: its files are moved into place, then its record.
    On a rerun, `part_done(name)` is true for parts whose record exists and whose files check out.
    """

    def __init__(self, store: Store, stage: str, code_version: str, config: dict, parents: list[str],
                 schema: pa.Schema, input_digest: str | None = None):
        self.store = store
        self.stage = stage
        self.code_version = code_version
        self.config = json.loads(canonical_json(config))
        self.parents = parents
        self.schema = schema
        self.input_digest = input_digest
        self.id = version_id(stage, code_version, self.config, parents, input_digest)
        self.config_digest = digest({"stage": stage, "code": code_version, "format": FORMAT_VERSION,
                                     "config": self.config})
        self.prefix = f"{stage}/{self.id}"
        self._records: dict[str, PartRecord] = {}
        self.reused_parts = 0
        self.written_parts = 0
        self._placement: Placement | None = None
        self._started = time.monotonic()

    def __getstate__(self):
        # A copy in another process (a Dask or Ray worker) writes through a placement of its own.
        return self.__dict__ | {"_placement": None}

    # ----- state
    @property
    def committed(self) -> Version | None:
        return self.store.find(self.stage, self.id)

    @property
    def placement(self) -> Placement:
        if self._placement is None:
            self._placement = Placement(self.store.fs, self.store.root)
            self._placement.remove_abandoned()
        return self._placement

    def part_done(self, name: str, verify: bool = True) -> bool:
        """Whether a previous run of this version finished part `name` (its files intact)."""
        if name in self._records:
            return True
        record = self._stored_record(name)
        if record is None:
            return False
        if verify and self.store.check_files(record.files, checksum=True):
            return False
        self._records[name] = record
        return True

    def _stored_record(self, name: str) -> PartRecord | None:
        rel = f"{self.prefix}/_parts/{name}.json"
        try:
            data = self.store._read_json(rel)
        except CorruptMetadata as exc:
            # Not committed yet (the manifest holds committed records), so safe to redo: remove it.
            log.warning("%s; the part will be made again", exc)
            if self.committed is None:
                self.store.fs.rm(self.store.abs(rel))
            return None
        if data is None:
            return None
        try:
            records.parse_part_record(data, self.prefix)
            return PartRecord.from_json(data)
        except records.RecordError as exc:
            log.warning("%s is not a valid part record (%s); the part will be made again", rel, exc)
            if self.committed is None:
                self.store.fs.rm(self.store.abs(rel))
            return None

    @contextmanager
    def claim(self, name: str, poll_s: float = 1.0) -> Iterator[PartRecord | None]:
        """Hold part `name` while this writer makes it, so that its in-part checkpoints belong to one
        writer. Yields None when this writer is to make the part, or the record another writer finished
        meanwhile (adopt it). A claim whose writer is gone (leases.py) is taken over.

        The holder is the oldest live claim (store time, then owner id); on object stores two claims in
        the same second may both proceed, which costs work but no bytes: committed files never change."""
        _check_name(name)
        placement = self.placement
        placement.lease.start()
        folder = f"{self.prefix}/_claims/{name}"
        mine = self.store.abs(f"{folder}/{placement.owner}.json")
        put_whole(self.store.fs, mine, canonical_json({"owner": placement.owner, "at": _now()}).encode())
        try:
            outcome, since = None, time.monotonic()
            while True:
                if self._stored_record(name) is not None and self.part_done(name):
                    outcome = self.record(name)
                    break
                holder = self._claim_holder(folder)
                if holder in (None, placement.owner):
                    break
                if time.monotonic() - since > 60:
                    log.info("%s part %s: waiting for writer %s, which is making it", self.stage, name, holder)
                    since = time.monotonic()
                time.sleep(poll_s)
            yield outcome
        finally:
            try:
                self.store.fs.rm(mine)
            except (FileNotFoundError, OSError):
                pass
            if self.committed is not None:  # a straggler of a committed version: no claim of it matters now
                self._remove_quietly(f"{self.prefix}/_claims")

    def _claim_holder(self, folder: str, others_only: bool = False) -> str | None:
        """The live writer that holds the claims in `folder` (with `others_only`: the oldest live claimant
        other than this writer)."""
        try:
            entries = self.store.fs.ls(self.store.abs(folder), detail=True)
        except FileNotFoundError:
            return None
        live = []
        for entry in entries:
            fname = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if not fname.endswith(".json") or fname.startswith("."):
                continue
            owner = fname[:-5]
            if not records.is_name(owner):  # not a claim this code writes: never a path to follow
                continue
            if owner != self.placement.owner and not owner_alive(self.store.fs, self.store.root, owner):
                try:
                    self.store.fs.rm(entry["name"])  # a claim file belongs to one owner: no live claim is hit
                except (FileNotFoundError, OSError):
                    pass
                continue
            if not (others_only and owner == self.placement.owner):
                live.append((_store_time(entry), owner))
        return min(live)[1] if live else None

    def _remove_quietly(self, rel: str) -> None:
        try:
            self.store.fs.rm(self.store.abs(rel), recursive=True)
        except (FileNotFoundError, OSError):
            pass

    def has_record(self, name: str) -> bool:
        return name in self._records

    def record(self, name: str) -> PartRecord:
        return self._records[name]

    def reusable_parts(self) -> dict[str, PartRecord]:
        """Parts that committed versions of this stage made with the same code and config,
        by source digest: incremental runs reference them instead of recomputing. A part whose files
        are missing or changed (an older version was deleted) is not reusable: it is made again.

        Its cost does not grow with parts times parts: each folder of each version is listed once, and
        every part's files are checked against those listings (sizes; the sha256 is checked when a file
        is read)."""
        found: dict[str, PartRecord] = {}
        listings: dict[str, dict[str, int | None]] = {}
        for version in self.store.versions(self.stage):
            for part in version.parts:
                if part.config_digest != self.config_digest or not part.source_digest or part.source_digest in found:
                    continue
                problems = self.store.check_files(part.files, listings=listings)
                if problems:
                    log.warning("%s part %s of %s cannot be reused (%s); it will be made again", self.stage,
                                part.name, version.ref, "; ".join(problems[:3]))
                    continue
                found[part.source_digest] = part
        return found

    def stored_parts(self) -> set[str]:
        """The names of the parts that have a record in this version's folder (one listing), or that this
        writer holds: a run checks only these with `part_done`, instead of asking for every part's record."""
        return {name[: -len(".json")] for name in self.store.list_sizes(f"{self.prefix}/_parts")
                if name.endswith(".json") and not name.startswith(".")} | set(self._records)

    # ----- writing parts
    def write_part(self, name: str, *, table: pa.Table | Iterable[pa.RecordBatch] | None = None,
                   samples: Iterable[dict] | None = None, rejects: list[dict] | pa.Table | None = None,
                   rows_in: int | Callable[[], int], source_digest: str | None = None,
                   metrics: dict | Callable[[], dict] | None = None,
                   extra_tables: dict[str, tuple[pa.Schema, pa.Table]] | None = None) -> PartRecord:
        """Write one part: its table, optional shard, rejects and any extra named tables.

        Counts must reconcile: rows_in = rows out (table rows) + rows rejected, unless the stage
        reports `rows_out` itself in metrics (stages whose output rows are not 1:1 with inputs).
        `table`, `rejects`, `rows_in` and `metrics` may be callables, read after `samples` has streamed
        into the shard (a stage that builds its index while writing pixels).
        """
        _check_name(name)
        finished = self._finished_by_another(name)
        if finished is not None:
            self.drop_checkpoints(name)
            return finished
        files: list[dict] = []
        rows_out = 0
        if samples is not None:
            info, n = self._write_shard(f"{self.prefix}/{shard_name(name)}", samples, name)
            files.append({"path": info.path, "kind": "shard", "rows": n, "bytes": info.bytes, "sha256": info.sha256})
        if callable(table):  # built while the samples streamed into the shard
            table = table()
        if callable(rejects):
            rejects = rejects()
        keys: list[str] = []   # the bounds of every keyed table written: the part's key range
        if table is not None:
            info, rows_out = self._write_parquet(f"{self.prefix}/parts/{name}.parquet", table, self.schema, name, keys)
            files.append({"path": info.path, "kind": "table", "rows": rows_out, "bytes": info.bytes,
                          "sha256": info.sha256})
        for kind, (schema, extra) in sorted((extra_tables or {}).items()):
            info, n = self._write_parquet(f"{self.prefix}/{kind}/{name}.parquet", extra, schema, name, keys)
            files.append({"path": info.path, "kind": kind, "rows": n, "bytes": info.bytes, "sha256": info.sha256})
        reject_table = _rejects_table(rejects)
        if reject_table.num_rows:
            info, _ = self._write_parquet(f"{self.prefix}/_rejects/{name}.parquet", reject_table, schemas.REJECTS, name,
                                          keys)
            files.append({"path": info.path, "kind": "rejects", "rows": reject_table.num_rows, "bytes": info.bytes,
                          "sha256": info.sha256})
        if callable(rows_in):
            rows_in = rows_in()
        metrics = dict((metrics() if callable(metrics) else metrics) or {})
        if "rows_out" in metrics:
            rows_out = int(metrics.pop("rows_out"))
        if rows_in != rows_out + reject_table.num_rows:
            raise StoreError(
                f"{self.stage} part {name}: counts do not reconcile: {rows_in} rows in != {rows_out} out + "
                f"{reject_table.num_rows} rejected. This is a bug in the stage: every input row must be "
                f"written or rejected.")
        record = PartRecord(name=name, files=files, rows_in=rows_in, rows_out=rows_out,
                            rows_rejected=reject_table.num_rows, source_digest=source_digest,
                            config_digest=self.config_digest, metrics=metrics,
                            key_range=[min(keys), max(keys)] if keys and None not in keys else None)
        placed = self._place_record(record)
        self.drop_checkpoints(name)  # the part is whole: its checkpoints are spent
        return placed

    # ----- in-part checkpoints
    def save_checkpoint(self, part: str, name: str, *, data: Any = None, table: pa.Table | None = None,
                        samples: Iterable[dict] | None = None) -> None:
        """Save a checkpoint inside part `part` (a stage that works through a long part in batches).

        Its table (Parquet) and samples (a tar) are written whole, then a record with their sizes and
        sha256 and the JSON `data`: the record is the checkpoint's commit point, so one cut short by a
        crash does not count. Saving `name` again replaces it (a batch redone after a crash). Checkpoints
        are invisible to readers (no manifest or glob of a version names them) and the writer removes them
        once the part is written (`write_part`) and at commit. Call it while holding the part's claim."""
        _check_name(part)
        _check_name(name)
        folder = f"{self.prefix}/{CHECKPOINTS}/{part}"
        files: dict[str, dict] = {}
        if table is not None:
            with self.placement.atomic_open(f"{folder}/{name}.parquet", replace=True) as sink:
                pq.write_table(table, sink)
            files["table"] = {"path": sink.info.path, "bytes": sink.info.bytes, "sha256": sink.info.sha256}
        if samples is not None:
            with self.placement.atomic_open(f"{folder}/{name}.tar", replace=True) as sink:
                write_tar(sink, samples)
            files["shard"] = {"path": sink.info.path, "bytes": sink.info.bytes, "sha256": sink.info.sha256}
        record = {"name": name, "data": data, "files": files}
        self.placement.put_bytes(f"{folder}/{name}{_CHECKPOINT_RECORD}", canonical_json(record).encode(),
                                 replace=True)

    def checkpoints(self, part: str) -> list[Checkpoint]:
        """The checkpoints saved in `part` by earlier (possibly killed) runs, by name; one whose record
        is missing or whose files do not match it is left out (its work is redone)."""
        folder = self.store.abs(f"{self.prefix}/{CHECKPOINTS}/{part}")
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in self.store.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []
        out = []
        for entry in names:
            if not entry.endswith(_CHECKPOINT_RECORD):
                continue
            try:
                record = json.loads(self.store.fs.cat_file(f"{folder}/{entry}"))
                checked = records.parse(records.CheckpointRecord, record)
                for f in checked.files.values():  # a checkpoint reads only its own folder
                    records.confined_path(f.path, f"{self.prefix}/{CHECKPOINTS}/{part}")
                problems = self.store.check_files(list(record["files"].values()), checksum=True)
            except (FileNotFoundError, IsADirectoryError, ValueError, UnicodeDecodeError) as exc:
                problems = [f"unreadable record: {exc}"]
            if problems:
                log.warning("%s part %s: checkpoint %s is not whole (%s); its work is redone", self.stage, part,
                            entry, "; ".join(problems))
                continue
            out.append(Checkpoint(record["name"], record["data"], record["files"], self.store))
        return out

    def drop_checkpoints(self, part: str) -> None:
        """Remove the checkpoints of `part` (done by `write_part` itself)."""
        try:
            self.store.fs.rm(self.store.abs(f"{self.prefix}/{CHECKPOINTS}/{part}"), recursive=True)
        except FileNotFoundError:  # none, or a concurrent run of this version removed them first
            pass

    def _finished_by_another(self, name: str) -> PartRecord | None:
        """The record of part `name` when another writer of this version finished it: adopt, never rewrite."""
        if name not in self._records and self._stored_record(name) is not None and self.part_done(name):
            log.info("%s part %s was finished by another run; using its files", self.stage, name)
            return self._records[name]
        return None

    def _place_record(self, record: PartRecord) -> PartRecord:
        try:
            self.placement.put_bytes(f"{self.prefix}/_parts/{record.name}.json",
                                     canonical_json(record.to_json()).encode())
        except CommittedFileConflict:  # the same files, recorded first by another writer (other metrics)
            finished = self._finished_by_another(record.name)
            if finished is None:
                raise
            return finished
        self.adopt_part(record)
        return record

    def write_files(self, name: str, files: dict[str, bytes | str], *, rows_in: int = 0,
                    metrics: dict | None = None, source_digest: str | None = None) -> PartRecord:
        """Write a part made of named files (a model's weights, config, tag list): each moved into place
        whole, recorded with its checksum. Values are bytes or local file paths."""
        _check_name(name)
        finished = self._finished_by_another(name)
        if finished is not None:
            return finished
        entries = []
        for fname, value in sorted(files.items()):
            if any(not seg or seg.startswith((".", "_")) for seg in fname.split("/")):
                raise StoreError(f"file name {fname!r} is invalid: relative path whose parts do not start "
                                 f"with '.' or '_'")
            rel = f"{self.prefix}/files/{fname}"
            with self.placement.atomic_open(rel, replace_if=self._unclaimed_leftover(name)) as sink:
                if isinstance(value, bytes):
                    sink.write(value)
                else:
                    with open(value, "rb") as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            sink.write(block)
            entries.append({"path": rel, "kind": "file", "name": fname, "rows": 0, "bytes": sink.info.bytes,
                            "sha256": sink.info.sha256})
        record = PartRecord(name=name, files=entries, rows_in=rows_in, rows_out=rows_in, rows_rejected=0,
                            source_digest=source_digest, config_digest=self.config_digest, metrics=dict(metrics or {}))
        return self._place_record(record)

    def adopt_part(self, record: PartRecord) -> None:
        """Take in a part that another worker wrote for this version (parallel runs)."""
        self._records[record.name] = record
        self.written_parts += 1

    def reuse_part(self, record: PartRecord) -> PartRecord:
        """Take in a part that an earlier version wrote (incremental runs): its files are linked into this
        version's folder (no bytes copied on a local store; a server-side copy on object stores), so the
        folder alone holds the whole version for outside readers. Raises FileNotFoundError when the
        earlier version lost a file, CommittedFileConflict when this folder holds other bytes under its name."""
        outcome = self.reuse_parts([record])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def reuse_parts(self, records: list[PartRecord]) -> list[PartRecord | Exception]:
        """`reuse_part` for many parts at once, in the order given: each part's record, or the error that
        kept it from being shared (FileNotFoundError, CommittedFileConflict); the part is then to be made.

        What it costs does not depend on the parts this version already holds beyond the links it makes:
        on a local store one hard link per file; on object stores one listing per target folder and the
        server-side copies, sent concurrently."""
        planned = []
        for record in records:
            files, links = [], []
            origin = record.shared_from
            for f in record.files:
                origin = origin or f["path"][: len(f["path"]) - len(_version_relative(f["path"], self.stage)) - 1]
                rel = f"{self.prefix}/{_version_relative(f['path'], self.stage)}"
                if rel != f["path"]:
                    links.append((f["path"], rel, f["bytes"], f["sha256"]))
                files.append(dict(f, path=rel))
            planned.append((record, files, origin, links))
        failed = retry_io(lambda: self.placement.link_many([link for *_, links in planned for link in links]),
                          f"linking {sum(len(p[3]) for p in planned)} files into {self.prefix}")
        out: list[PartRecord | Exception] = []
        for record, files, origin, links in planned:
            error = next((failed[rel] for _, rel, _, _ in links if rel in failed), None)
            if error is not None:
                out.append(error)
                continue
            record = PartRecord.from_json(dict(record.to_json(), files=files, shared_from=origin))
            self._records[record.name] = record
            self.reused_parts += 1
            out.append(record)
        return out

    def _unclaimed_leftover(self, name: str) -> Callable[[], bool]:
        """For a part file found in place with other bytes: whether it may be replaced. Only when neither
        a part record nor the manifest names it: the leftover of a run that died before recording it (this
        run holds the part's claim, and no other live writer claims it). A recorded or committed file is
        never replaced."""
        return lambda: (self._stored_record(name) is None and self.committed is None
                        and self._claim_holder(f"{self.prefix}/_claims/{name}", others_only=True) is None)

    def _write_parquet(self, rel: str, table, schema: pa.Schema, part: str, keys: list | None = None
                       ) -> tuple[FileInfo, int]:
        """Write one Parquet file of a part; `keys` (a list) gets the [min, max] of its `key` column added."""
        rows = 0
        with self.placement.atomic_open(rel, replace_if=self._unclaimed_leftover(part)) as sink:
            writer = pq.ParquetWriter(sink, schema, compression="zstd", write_statistics=True)
            try:
                batches = table.to_batches() if isinstance(table, pa.Table) else table
                for batch in batches:
                    if isinstance(batch, pa.Table):
                        batch = batch.cast(schema) if batch.schema != schema else batch
                        writer.write_table(batch)
                    else:
                        if batch.schema != schema:
                            batch = pa.Table.from_batches([batch]).cast(schema).combine_chunks().to_batches()[0]
                        writer.write_batch(batch)
                    rows += batch.num_rows
            finally:
                writer.close()
        if keys is not None and rows and "key" in schema.names:
            keys += _key_bounds(writer)
        return sink.info, rows

    def _write_shard(self, rel: str, samples: Iterable[dict], part: str) -> tuple[FileInfo, int]:
        with self.placement.atomic_open(rel, replace_if=self._unclaimed_leftover(part)) as sink:
            n = write_tar(sink, samples)
        return sink.info, n

    # ----- commit
    def commit(self, *, metrics: dict | None = None, part_order: list[str] | None = None,
               extra: dict | None = None) -> Version:
        """Write the manifest (the commit point) and move the `latest` ref. Idempotent."""
        existing = self.committed
        if existing is not None:
            for folder in ("_claims", CHECKPOINTS):  # what a writer killed after that commit left
                self._remove_quietly(f"{self.prefix}/{folder}")
            self.close()
            return existing
        names = part_order if part_order is not None else sorted(self._records)
        missing = [n for n in names if n not in self._records]
        if missing:
            raise StoreError(f"cannot commit {self.prefix}: parts {missing} were never written")
        parts = [self._records[n] for n in names]
        rows_in = sum(p.rows_in for p in parts)
        rows_out = sum(p.rows_out for p in parts)
        rejected = sum(p.rows_rejected for p in parts)
        manifest = {
            "format": FORMAT_VERSION,
            "stage": self.stage,
            "version": self.id,
            "parents": self.parents,
            "config": self.config,
            "config_digest": self.config_digest,
            "input_digest": self.input_digest,
            "code_version": self.code_version,
            "created": _now(),
            "duration_s": round(time.monotonic() - self._started, 3),   # of the run that committed
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_rejected": rejected,
            "parts_written": self.written_parts,
            "parts_reused": self.reused_parts,
            "schema": self.schema.to_string(show_schema_metadata=False),
            "schema_ipc": self.schema.serialize().to_pybytes().hex(),
            "metrics": metrics or {},
            "parts": [p.to_json() for p in parts],
            "files": [f for p in parts for f in p.files],
        }
        if extra:
            manifest.update(extra)
        body = _manifest_json(manifest)
        try:
            self.placement.put_bytes(f"{self.prefix}/{MANIFEST}", body.encode())
        except CommittedFileConflict:  # another run committed this version first: its manifest stands
            self.close()
            return self.store.find(self.stage, self.id)
        version = Version(self.store, json.loads(body))   # what a reader reads back, without reading it back
        for folder in ("_claims", CHECKPOINTS):  # claims and checkpoints only matter until the commit
            self._remove_quietly(f"{self.prefix}/{folder}")
        self.store._put_ref(self.stage, "latest", self.id, self.placement)   # committed just now: no need to read it back
        self.close()
        return version

    def close(self) -> None:
        if self._placement is not None:
            self._placement.cleanup()


def _key_bounds(writer: pq.ParquetWriter) -> list:
    """The smallest and largest `key` of a Parquet file just written, from its row groups' statistics (no pass
    over the keys); [None] when a row group has none (the part then records no key range)."""
    metadata = writer.writer.metadata
    bounds: list = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        if not group.num_rows:
            continue
        column = next((group.column(c) for c in range(group.num_columns) if group.column(c).path_in_schema == "key"),
                      None)
        stats = column.statistics if column is not None else None
        if stats is None or not stats.has_min_max or not isinstance(stats.min, str):
            return [None]
        bounds += [stats.min, stats.max]
    return bounds


def _manifest_json(manifest: dict) -> str:
    """A manifest as JSON: a line per field, and a line per part and per file. Each line comes from json's C
    encoder (`indent=` takes the pure-Python one: 3 s for a manifest of 10,000 parts on this machine)."""
    def encode(value) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    lines = []
    for key in sorted(manifest):
        value = manifest[key]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            text = "[\n  " + ",\n  ".join(encode(v) for v in value) + "\n ]"
        else:
            text = encode(value)
        lines.append(f" {encode(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}"


def _with_part(table: pa.Table, names: list[str]) -> pa.Table:
    return table.append_column("part", pa.array(names, pa.string()))


def _rejects_table(rejects) -> pa.Table:
    if rejects is None:
        return schemas.REJECTS.empty_table()
    if isinstance(rejects, pa.Table):
        return rejects.cast(schemas.REJECTS)
    cols = {name: [r.get(name) for r in rejects] for name in schemas.REJECTS.names}
    for r in rejects:
        if not r.get("key") or not r.get("reason"):
            raise StoreError(f"a reject row needs a key and a reason, got {r!r}")
    return pa.Table.from_pydict(cols, schema=schemas.REJECTS)


def _version_relative(path: str, stage: str) -> str:
    """`parts/x.parquet` from `<stage>/<version>/parts/x.parquet` (stage names may hold a '/')."""
    if not path.startswith(stage + "/"):
        raise StoreError(f"file {path!r} is not inside stage {stage!r}: a part can only be shared within its stage")
    return path[len(stage) + 1:].split("/", 1)[1]


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith((".", "_")):
        raise StoreError(f"part name {name!r} is invalid: no '/', must not start with '.' or '_'")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")



def check_stage_name(stage: str) -> None:
    if not stage or not all(_NAME.match(seg) for seg in stage.split("/")) or stage.count("/") > 1:
        raise StoreError(f"{stage!r} is not a stage name (e.g. images, models/ram): references stay inside the store")


def check_version_name(name: str) -> None:
    if not name or not _NAME.match(name) or ".." in name:
        raise StoreError(f"{name!r} is not a version id, prefix or ref name (letters, digits, '_', '-', '.'): "
                         f"references stay inside the store")

