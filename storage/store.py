"""The versioned dataset store.

Layout under the store root (any fsspec URL):

    <stage>/<version>/_manifest.json          the commit point, written last
    <stage>/<version>/parts/<part>.parquet    a part's table (only tables: any Parquet reader can take the folder)
    <stage>/<version>/shards/<part>.tar       a part's WebDataset shard (optional)
    <stage>/<version>/_rejects/<part>.parquet a part's rejected rows
    <stage>/<version>/_parts/<part>.json      a part's completion record (for resume)
    _refs/<stage>/<name>.json                 named refs: latest, prod, ...
    _tmp/<host>-<pid>-<id>/                   writers' temporary files

Every version folder is self-contained: a part an earlier version made is hard-linked into the
new folder (copied where the filesystem has no links, server-side on object stores), so the
obvious glob of any outside reader (`<version>/parts/*.parquet`, `<version>/shards/*.tar`) sees the
whole version and nothing else. The manifest stays the commit point and lists every file.

A version id is derived from (stage, code version, resolved config, parent ids), so the same
inputs always land in the same folder: a rerun finds the committed manifest and does nothing,
and a crashed run finds its finished parts and skips them.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import schemas
from .fs import FileInfo, Placement, open_fs, retry_io, sha256_of
from .shards import iter_tar, read_member, webdataset_pipeline, write_tar

MANIFEST = "_manifest.json"
FORMAT_VERSION = 1
ID_LEN = 16


class StoreError(RuntimeError):
    """A user-facing store problem: the message says what, where and what to do."""


class VersionNotFound(StoreError):
    pass


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
    identifies an external input (the ingest source's content)."""
    ident = {"stage": stage, "code": code_version, "config": config, "parents": sorted(parents)}
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

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

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

    def _read_json(self, rel: str) -> dict | None:
        def read():
            with self.fs.open(self.abs(rel), "rb") as f:
                return f.read()

        try:
            data = retry_io(read, f"reading {rel}")
        except FileNotFoundError:
            return None
        return json.loads(data.decode("utf-8"))

    # ----- listing and opening
    def stages(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        if "models" in names:  # models/<name> are stages of their own
            names.remove("models")
            names += sorted(f"models/{e.rstrip('/').rsplit('/', 1)[-1]}"
                            for e in self.fs.ls(self.abs("models"), detail=False))
        return [n for n in names if not n.startswith("_") and self.versions(n)]

    def versions(self, stage: str) -> list["Version"]:
        """Committed versions of a stage, oldest first. A folder without a manifest is not a version."""
        try:
            entries = self.fs.ls(self.abs(stage), detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            vid = entry.rstrip("/").rsplit("/", 1)[-1]
            manifest = self._read_json(f"{stage}/{vid}/{MANIFEST}")
            if manifest is not None:
                found.append(Version(self, manifest))
        found.sort(key=lambda v: (v.manifest["created"], v.id))
        return found

    def open(self, stage: str, ref: str = "latest") -> "Version":
        """Open a committed version by full id, unique prefix, or ref name (`latest`, `prod`, ...)."""
        if "@" in stage and ref == "latest":
            stage, ref = stage.split("@", 1)
        manifest = self._read_json(f"{stage}/{ref}/{MANIFEST}") if ref else None
        if manifest is not None:
            return Version(self, manifest)
        target = self.get_ref(stage, ref)
        if target is not None:
            manifest = self._read_json(f"{stage}/{target}/{MANIFEST}")
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
        manifest = self._read_json(f"{stage}/{vid}/{MANIFEST}")
        return Version(self, manifest) if manifest is not None else None

    # ----- refs
    def set_ref(self, stage: str, name: str, vid: str) -> None:
        """Point a named ref at a committed version. Written whole by an atomic move: never torn."""
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"ref name {name!r} is invalid: use letters, digits, '-', '_'")
        if self.find(stage, vid) is None:
            raise VersionNotFound(f"cannot set ref '{name}': {stage}@{vid} is not committed")
        body = canonical_json({"stage": stage, "version": vid, "updated": _now()}).encode()
        placement = Placement(self.fs, self.root)
        try:
            placement.put_bytes(f"_refs/{stage}/{name}.json", body, replace=True)
        finally:
            placement.cleanup()

    def get_ref(self, stage: str, name: str) -> str | None:
        data = self._read_json(f"_refs/{stage}/{name}.json")
        return data["version"] if data else None

    def refs(self, stage: str) -> dict[str, str]:
        try:
            entries = self.fs.ls(self.abs(f"_refs/{stage}"), detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            name = entry.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                vid = self.get_ref(stage, name[:-5])
                if vid:
                    out[name[:-5]] = vid
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
        return [self.store.full_url(f["path"]) for f in self.files("shard")]

    def iter_batches(self, kind: str = "table", columns: list[str] | None = None,
                     batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Stream record batches part by part; memory stays bounded by one batch."""
        for f in self.files(kind):
            fh = retry_io(lambda: self.store.fs.open(self.store.abs(f["path"]), "rb"), f"opening {f['path']}")
            with fh:
                pf = pq.ParquetFile(fh)
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def iter_part_tables(self, kind: str = "table", columns: list[str] | None = None
                         ) -> Iterator[tuple[PartRecord, pa.Table]]:
        """Each part's table in turn (one part in memory at a time)."""
        for part in self.parts:
            for f in part.files:
                if f["kind"] == kind:
                    yield part, self.read_file(f["path"], columns=columns)

    def read_file(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        def read():
            with self.store.fs.open(self.store.abs(rel), "rb") as fh:
                return pq.read_table(fh, columns=columns)

        return retry_io(read, f"reading {rel}")

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
        return iter_tar(self.store.fs, [self.store.abs(f["path"]) for f in shards], self.shard_urls())

    def download(self, local_dir: str) -> str:
        """Copy this version's named files (kind `file`) into a local folder (cached: skipped when the
        checksums already match). Returns the folder."""
        import pathlib

        target = pathlib.Path(local_dir)
        target.mkdir(parents=True, exist_ok=True)
        for f in self.files("file"):
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
            try:
                size, sha = sha256_of(self.store.fs, self.store.abs(f["path"]))
            except FileNotFoundError:
                problems.append(f"{f['path']}: missing")
                continue
            if size != f["bytes"]:
                problems.append(f"{f['path']}: {size} bytes, manifest says {f['bytes']}")
            elif sha != f["sha256"]:
                problems.append(f"{f['path']}: sha256 {sha[:12]}… does not match the manifest's {f['sha256'][:12]}…")
        return problems


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
        self.config_digest = digest({"stage": stage, "code": code_version, "config": self.config})
        self.prefix = f"{stage}/{self.id}"
        self._records: dict[str, PartRecord] = {}
        self.reused_parts = 0
        self.written_parts = 0
        self._placement: Placement | None = None
        self._started = time.monotonic()

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
        data = self.store._read_json(f"{self.prefix}/_parts/{name}.json")
        if data is None:
            return False
        record = PartRecord.from_json(data)
        if verify:
            for f in record.files:
                try:
                    size, sha = sha256_of(self.store.fs, self.store.abs(f["path"]))
                except FileNotFoundError:
                    return False
                if size != f["bytes"] or sha != f["sha256"]:
                    return False
        self._records[name] = record
        return True

    def has_record(self, name: str) -> bool:
        return name in self._records

    def record(self, name: str) -> PartRecord:
        return self._records[name]

    def reusable_parts(self) -> dict[str, PartRecord]:
        """Parts that committed versions of this stage made with the same code and config,
        by source digest: incremental runs reference them instead of recomputing."""
        found: dict[str, PartRecord] = {}
        for version in self.store.versions(self.stage):
            for part in version.parts:
                if part.config_digest == self.config_digest and part.source_digest:
                    found.setdefault(part.source_digest, part)
        return found

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
        files: list[dict] = []
        rows_out = 0
        if samples is not None:
            info, n = self._write_shard(f"{self.prefix}/{shard_name(name)}", samples)
            files.append({"path": info.path, "kind": "shard", "rows": n, "bytes": info.bytes, "sha256": info.sha256})
        if callable(table):  # built while the samples streamed into the shard
            table = table()
        if callable(rejects):
            rejects = rejects()
        if table is not None:
            info, rows_out = self._write_parquet(f"{self.prefix}/parts/{name}.parquet", table, self.schema)
            files.append({"path": info.path, "kind": "table", "rows": rows_out, "bytes": info.bytes,
                          "sha256": info.sha256})
        for kind, (schema, extra) in sorted((extra_tables or {}).items()):
            info, n = self._write_parquet(f"{self.prefix}/{kind}/{name}.parquet", extra, schema)
            files.append({"path": info.path, "kind": kind, "rows": n, "bytes": info.bytes, "sha256": info.sha256})
        reject_table = _rejects_table(rejects)
        if reject_table.num_rows:
            info, _ = self._write_parquet(f"{self.prefix}/_rejects/{name}.parquet", reject_table, schemas.REJECTS)
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
                            config_digest=self.config_digest, metrics=metrics)
        self.placement.put_bytes(f"{self.prefix}/_parts/{name}.json", canonical_json(record.to_json()).encode())
        self.adopt_part(record)
        return record

    def write_files(self, name: str, files: dict[str, bytes | str], *, rows_in: int = 0,
                    metrics: dict | None = None, source_digest: str | None = None) -> PartRecord:
        """Write a part made of named files (a model's weights, config, tag list): each moved into place
        whole, recorded with its checksum. Values are bytes or local file paths."""
        _check_name(name)
        entries = []
        for fname, value in sorted(files.items()):
            if any(not seg or seg.startswith((".", "_")) for seg in fname.split("/")):
                raise StoreError(f"file name {fname!r} is invalid: relative path whose parts do not start "
                                 f"with '.' or '_'")
            rel = f"{self.prefix}/files/{fname}"
            with self.placement.atomic_open(rel) as sink:
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
        self.placement.put_bytes(f"{self.prefix}/_parts/{name}.json", canonical_json(record.to_json()).encode())
        self.adopt_part(record)
        return record

    def adopt_part(self, record: PartRecord) -> None:
        """Take in a part that another worker wrote for this version (parallel runs)."""
        self._records[record.name] = record
        self.written_parts += 1

    def reuse_part(self, record: PartRecord) -> PartRecord:
        """Take in a part that an earlier version wrote (incremental runs): its files are linked into this
        version's folder (no bytes copied on a local store; a server-side copy on object stores), so the
        folder alone holds the whole version for outside readers."""
        files = []
        origin = record.shared_from
        for f in record.files:
            origin = origin or f["path"][: len(f["path"]) - len(_version_relative(f["path"], self.stage)) - 1]
            rel = f"{self.prefix}/{_version_relative(f['path'], self.stage)}"
            if rel != f["path"]:
                retry_io(lambda: self.placement.link_into_place(f["path"], rel, f["bytes"], f["sha256"]),
                         f"linking {f['path']} into {self.prefix}")
            files.append(dict(f, path=rel))
        record = PartRecord.from_json(dict(record.to_json(), files=files, shared_from=origin))
        self._records[record.name] = record
        self.reused_parts += 1
        return record

    def _write_parquet(self, rel: str, table, schema: pa.Schema) -> tuple[FileInfo, int]:
        rows = 0
        with self.placement.atomic_open(rel) as sink:
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
        return sink.info, rows

    def _write_shard(self, rel: str, samples: Iterable[dict]) -> tuple[FileInfo, int]:
        with self.placement.atomic_open(rel) as sink:
            n = write_tar(sink, samples)
        return sink.info, n

    # ----- commit
    def commit(self, *, metrics: dict | None = None, part_order: list[str] | None = None,
               extra: dict | None = None) -> Version:
        """Write the manifest (the commit point) and move the `latest` ref. Idempotent."""
        existing = self.committed
        if existing is not None:
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
        self.placement.put_bytes(f"{self.prefix}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True,
                                                                         default=str).encode())
        version = self.store.find(self.stage, self.id)
        assert version is not None
        self.store.set_ref(self.stage, "latest", self.id)
        self.close()
        return version

    def close(self) -> None:
        if self._placement is not None:
            self._placement.cleanup()


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

