"""WebDataset shard I/O: deterministic tar writing, streaming reads through webdataset.

A sample is a dict: `__key__` plus one entry per extension (`jpg`, `png`, `txt`, `json`, ...).
Member order, mtimes and owners are fixed, so the same samples always give the same bytes
(a rerun after a crash must be byte-identical). Shards are POSIX (PAX) tars: a member name longer than
USTAR's 100 characters gets a PAX header, so any key works; shorter names give plain USTAR headers.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .parquet import read_parquet

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Bytes left after a tar's end-of-archive position: the zero blocks of one record (10 KiB) at most.
_MAX_TAR_TAIL = 64 * 1024
_EXT_ORDER = IMAGE_EXTS + ("txt", "json", "cls", "npy")


def _encode(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json" or isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return str(value).encode("utf-8")


def _member_order(sample: dict) -> list[str]:
    exts = [k for k in sample if not k.startswith("__")]
    return sorted(exts, key=lambda e: (_EXT_ORDER.index(e) if e in _EXT_ORDER else len(_EXT_ORDER), e))


def write_tar(fileobj, samples: Iterable[dict]) -> int:
    """Write samples into an uncompressed tar stream. Returns the number of samples."""
    count = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample.get("__key__")
            if not key or "." in key or "/" in key:
                raise ValueError(f"shard sample key {key!r} must be non-empty and contain no '.' or '/'")
            for ext in _member_order(sample):
                data = _encode(ext, sample[ext])
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def split_member_name(name: str) -> tuple[str, str]:
    """Which sample a tar member belongs to, and as what: the one WebDataset rule every reader uses.

    key = the member's path up to the first dot of its file name; ext = the rest, lower-cased
    ('' when the file name has no dot). `a/b/0001.seg.PNG` -> (`a/b/0001`, `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar(fs, paths: list[str], urls: list[str] | None = None) -> Iterator[dict]:
    """Stream the samples of tar shards, in order, as WebDataset samples (members grouped by key).

    Streams are opened through the store's own filesystem, so credentials and endpoints apply.
    Values are bytes; each sample has `__key__` and `__url__`. (Random-access tar reading is
    faster than a pipe-style stream here; `webdataset_pipeline` gives webdataset itself.)
    """
    urls = urls or paths
    local = isinstance(fs, LocalFileSystem)
    for path, url in zip(paths, urls):
        # a local file is read as Python opens it (no fsspec layer between tarfile and the bytes)
        with (open(path, "rb") if local else fs.open(path, "rb")) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            sample: dict = {}
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = tar.extractfile(info).read()
                tar.members = []  # keep memory flat on large shards
            if sample:
                yield sample


def image_member(sample: dict) -> bytes:
    """The encoded image of a WebDataset sample (its .jpg / .jpeg / .png / .webp member)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image member (.jpg/.jpeg/.png/.webp)")
    return sample[ext]


def decode_image(sample: dict):
    """The sample's image as an RGB PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(image_member(sample))).convert("RGB")


def webdataset_pipeline(urls: list[str], **kwargs):
    """A webdataset.WebDataset over shard URLs (deterministic order), for training pipelines."""
    import webdataset as wds

    return wds.WebDataset(urls, shardshuffle=False, empty_check=False, **kwargs)


def read_member(fs, path: str, member: str) -> bytes:
    """Read one member of a tar by name (random access for inspection; streaming reads use iter_tar)."""
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        extracted = tar.extractfile(member)
        if extracted is None:
            raise KeyError(f"{member} is not a file in {path}")
        return extracted.read()


# ---------------------------------------------------------------------------------------------
# Random access to one shard, and a shard paired with the label rows of its samples (training)

class ShardReadError(ValueError):
    """A shard or label table cannot be read; the message names the file and says what to do."""


class Member(NamedTuple):
    key: str
    ext: str
    info: tarfile.TarInfo


class TarShardReader:
    """A tar opened for random access: member headers scanned (pixel bytes seeked over), members read on
    demand. Truncation and damage are errors that name the shard, never a silently shorter shard."""

    def __init__(self, fs, path: str, name: str | None = None):
        self.name = name or path
        try:
            self.file = fs.open(path, "rb")
        except FileNotFoundError as e:
            raise ShardReadError(f"shard {self.name!r} does not exist ({e}); check the shard list "
                                 "or the dataset version it came from") from e
        except Exception as e:  # noqa: BLE001 - any backend error: name the shard
            raise ShardReadError(f"shard {self.name!r} cannot be opened: {type(e).__name__}: {e}") from e
        self.size = self.file.seek(0, 2)
        self.file.seek(0)
        try:
            self.tar = tarfile.open(fileobj=self.file, mode="r:")
        except tarfile.TarError as e:
            self.file.close()
            raise ShardReadError(f"shard {self.name!r} is not a readable uncompressed tar ({e}); "
                                 "the file is corrupt or truncated: rebuild it from its stage") from e

    def members(self) -> list[Member]:
        """Every file member, in tar order, with its key and extension (split_member_name)."""
        try:
            infos = [m for m in self.tar if m.isfile()]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardReadError(f"shard {self.name!r}: cannot read tar headers ({e}); "
                                 "the file is corrupt or truncated") from e
        # tarfile stops silently at a truncated header: everything after the end-of-archive
        # position must be the zero padding of the last record.
        end = self.tar.offset
        if infos:
            last = infos[-1]
            if last.offset_data + last.size > self.size:
                raise ShardReadError(f"shard {self.name!r} is truncated: member {last.name!r} needs "
                                     f"{last.offset_data + last.size} bytes, file has {self.size}")
        tail = self.size - end
        if tail < 2 * tarfile.BLOCKSIZE:
            # tar writers end an archive with two zero blocks; without them the file was cut
            # exactly at a member boundary and later members are lost
            raise ShardReadError(f"shard {self.name!r} is truncated: no end-of-archive marker after "
                                 f"offset {end} ({len(infos)} members readable)")
        if tail > _MAX_TAR_TAIL:
            raise ShardReadError(f"shard {self.name!r}: {tail} unreadable bytes after member headers "
                                 f"ended at offset {end} (corrupt or truncated header)")
        if tail > 0:
            self.file.seek(end)
            if self.file.read(tail).strip(b"\0"):
                raise ShardReadError(f"shard {self.name!r}: non-zero bytes after the last readable "
                                     f"member header at offset {end} (corrupt or truncated header)")
        return [Member(*split_member_name(m.name), m) for m in infos]

    def read(self, member: Member) -> bytes:
        info = member.info
        try:
            data = self.tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            raise ShardReadError(f"shard {self.name!r}: cannot read member {info.name!r}: {e}") from e
        if len(data) != info.size:
            raise ShardReadError(f"shard {self.name!r}: member {info.name!r} is truncated "
                                 f"({len(data)} of {info.size} bytes)")
        return data

    def close(self) -> None:
        self.tar.close()
        self.file.close()


@dataclass
class LabelledShard:
    """A tar shard and the label rows of its samples: one source of ram_model.data_stream.ShardStream.

    `labels` is a pyarrow Table, or the path(s) of Parquet files on `labels_fs` (default: `fs`).
    Picklable (DataLoader workers, DDP ranks): a filesystem, paths and at most one label table."""
    fs: Any
    path: str
    labels: Any
    name: str = ""
    labels_fs: Any = None
    _label_paths: list = field(init=False, repr=False)
    _here: tuple = field(init=False, repr=False, compare=False, default=(None, None, None))

    def _filesystems(self):
        """(shard fs, labels fs) usable in this process: a filesystem must not cross a fork (a DataLoader
        worker; s3fs refuses), so a forked process makes its own from the same options."""
        pid, fs, labels_fs = self._here
        if pid != os.getpid():
            fs = self.fs if pid is None else type(self.fs)(**self.fs.storage_options)
            labels_fs = self.labels_fs or self.fs
            labels_fs = fs if labels_fs is self.fs else (labels_fs if pid is None else
                                                         type(labels_fs)(**labels_fs.storage_options))
            self._here = (os.getpid(), fs, labels_fs)
        return self._here[1], self._here[2]

    def __getstate__(self):
        return self.__dict__ | {"_here": (None, None, None)}  # unpickled filesystems are the process's own

    def __post_init__(self):
        self._here = (os.getpid(), self.fs, self.labels_fs or self.fs)  # made here: usable here
        self.name = self.name or self.path
        self._label_paths = ([] if isinstance(self.labels, pa.Table) else
                             [self.labels] if isinstance(self.labels, str) else list(self.labels))
        if not isinstance(self.labels, pa.Table) and not self._label_paths:
            raise ShardReadError(f"no label parts given for shard {self.name!r}")

    def label_rows(self, columns: list[str]) -> pa.Table:
        """The label table with exactly `columns` (a missing column is an error naming it)."""
        if isinstance(self.labels, pa.Table):
            missing = [c for c in columns if c not in self.labels.column_names]
            if missing:
                raise ShardReadError(f"label table for shard {self.name!r} lacks column(s) {missing}; "
                                     f"it has {self.labels.column_names}")
            return self.labels.select(columns)
        parts = []
        for p in self._label_paths:
            try:
                with self._filesystems()[1].open(p, "rb") as f:
                    parts.append(read_parquet(f, columns=columns))
            except FileNotFoundError as e:
                raise ShardReadError(f"label part {p!r} (for shard {self.name!r}) does not exist") from e
            except (pa.ArrowException, OSError, KeyError) as e:
                raise ShardReadError(f"label part {p!r} (for shard {self.name!r}) cannot be read with "
                                     f"columns {columns}: {e}") from e
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def count_labels(self) -> int:
        """Label rows, from Parquet metadata (no rows read)."""
        if isinstance(self.labels, pa.Table):
            return self.labels.num_rows
        n = 0
        for p in self._label_paths:
            try:
                with self._filesystems()[1].open(p, "rb") as f:
                    n += pq.ParquetFile(f).metadata.num_rows
            except FileNotFoundError as e:
                raise ShardReadError(f"label part {p!r} does not exist") from e
        return n

    def open(self) -> TarShardReader:
        return TarShardReader(self._filesystems()[0], self.path, self.name)


def write_label_table(path: str, table: pa.Table) -> None:
    """Write a local label table that LabelledShard reads (a training job's train / held-out split)."""
    pq.write_table(table, path)
