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
from typing import Any, Generator, Iterable, Iterator, NamedTuple

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


# ---------------------------------------------------------------------------------------------
# A tar header walk for tars we did not write (ingest's sources): every member's start and end known,
# every header field bounded, damage found and located instead of ending the stream silently.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
# Types whose header is followed by `size` bytes of data (tarfile's rule: regular files, GNU sparse files and
# any type it does not know); links, devices, folders and FIFOs have none whatever their size field says.
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")
_MAX_RESYNCS = 64          # damaged places searched past in one tar; after that the rest is one reject
_SCAN_CHUNK = 1 << 20


@dataclass
class TarEntry:
    """One member of a source tar as its headers describe it: `offset` is where its first header starts
    (a PAX or GNU long-name header, if any), `data_offset` where its bytes start, in the uncompressed tar."""

    name: str              # decoded as UTF-8 (undecodable bytes kept as surrogate escapes)
    type: bytes            # the typeflag
    size: int
    offset: int
    data_offset: int
    linkname: str = ""

    def isfile(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == b"5"


@dataclass
class TarDamage:
    """Something wrong with the tar itself, at `offset` in the uncompressed tar. `suspect` is the member read
    just before it whose bytes cannot be trusted (its size field disagrees with where the next header is)."""

    reason: str            # source-damaged-header, source-size-mismatch, source-truncated, source-trailing-data,
                           # source-concatenated, source-header-too-large, source-not-a-tar
    offset: int
    detail: str
    suspect: TarEntry | None = None
    fatal: bool = False    # nothing after it was read


def _tar_number(field: bytes) -> int:
    """A numeric header field: octal (NUL/space padded) or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise ValueError(f"not an octal number: {bytes(field)!r}")
    return int(text, 8)


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _tar_number(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    signed = unsigned - sum(b for b in block[:148] + block[156:] if b > 127) * 256   # old writers sum signed chars
    return stored in (unsigned, signed)


def _looks_like_header(block: bytes) -> bool:
    return block[257:262] == b"ustar"


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, where: int) -> dict[str, str]:
    """PAX extended header records ("<len> <key>=<value>\\n"), each length checked against the data, so a
    lying length (40 digits) is an error, never a loop."""
    records, pos = {}, 0
    while pos < len(data):
        if data[pos:].strip(b"\0") == b"":
            break
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not data[pos:space].isdigit():
            raise ValueError(f"PAX record at byte {where + pos}: no decimal length")
        length = int(data[pos:space])
        if length <= space - pos + 1 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise ValueError(f"PAX record at byte {where + pos}: length {length} does not match the header's data")
        key, eq, value = data[space + 1:pos + length - 1].partition(b"=")
        if not eq:
            raise ValueError(f"PAX record at byte {where + pos}: no '='")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class TarWalker:
    """Walk the headers of a (decompressed) tar stream: yields a `TarEntry` per member and a `TarDamage` for
    every place the tar is not what a tar must be. `read(entry)` gives the bytes of the entry just yielded.

    `fh` is a seekable binary file (a codec's reader is: it seeks backwards by reading again); `size` is its
    length when known (an uncompressed file), else the end is found by reading. PAX and GNU long-name headers
    are read only up to `max_header_bytes`; a numeric field that is not a number, a size past the end, a zero
    block inside the archive, bytes after its end, a second archive after the first are all reported with the
    offset where they are. After a damaged header the walk goes on at the next valid header (searched from the
    start of the previous member's data, so a size field that lies is found too)."""

    def __init__(self, fh, *, max_header_bytes: int, size: int | None = None):
        self.fh = fh
        self.size = size
        self.max_header_bytes = max_header_bytes
        self.members = 0
        self._pos = 0           # where the stream is

    # ----- raw access
    def _read_at(self, pos: int, n: int) -> bytes:
        if pos != self._pos:
            self.fh.seek(pos)
        data = self.fh.read(n) if n > 0 else b""
        self._pos = pos + len(data)
        return data

    def _reach(self, pos: int) -> int:
        """Move to `pos`; returns how far the stream really goes (less at its end)."""
        if self.size is not None:
            self.fh.seek(min(pos, self.size))
            self._pos = min(pos, self.size)
        else:
            self._pos = self.fh.seek(pos)
        return self._pos

    def read(self, entry: TarEntry, limit: int | None = None) -> bytes:
        """The entry's bytes (at most `limit`); shorter than its size when the tar ends inside it."""
        n = entry.size if limit is None else min(entry.size, limit)
        return self._read_at(entry.data_offset, n)

    def _scan(self, start: int, stop: int | None = None) -> int | None:
        """The offset of the first valid header at or after `start` (block-aligned; before `stop`), or None.
        Memory: one chunk; the search for the magic runs in C."""
        pos = start
        while stop is None or pos < stop:
            chunk = self._read_at(pos, _SCAN_CHUNK + _BLOCK if stop is None else min(_SCAN_CHUNK, stop - pos) + _BLOCK)
            if len(chunk) < _BLOCK:
                return None
            at = chunk.find(b"ustar", 257)
            while 0 <= at < _SCAN_CHUNK + 257:
                head = at - 257
                if stop is not None and pos + head >= stop:
                    return None
                if head % _BLOCK == 0 and head + _BLOCK <= len(chunk) and _checksum_ok(chunk[head:head + _BLOCK]):
                    return pos + head
                at = chunk.find(b"ustar", at + 1)
            if len(chunk) < _SCAN_CHUNK + _BLOCK and stop is None:
                return None
            pos += _SCAN_CHUNK
        return None

    def _tail(self, end: int) -> Generator[TarDamage, None, int | None]:
        """After the end-of-archive marker at `end`: nothing but zeros (the record's padding), else a second
        archive (returns its offset to go on from) or trailing bytes (returns None)."""
        pos = end
        while True:
            chunk = self._read_at(pos, _SCAN_CHUNK)
            if not chunk:
                return
            stripped = chunk.lstrip(b"\0")
            if stripped:
                first = pos + len(chunk) - len(stripped)
                block_start = first - (first - end) % _BLOCK
                header = self._read_at(block_start, _BLOCK)
                if len(header) == _BLOCK and _checksum_ok(header):
                    yield TarDamage("source-concatenated", block_start,
                                    f"a second tar archive starts at byte {block_start}, after the first one's "
                                    f"end-of-archive marker at byte {end} (`cat a.tar b.tar`?); its members are "
                                    f"read too; rewrite the shard as one archive (`tar -A` or repack)")
                    return block_start
                rest = (self.size - first) if self.size is not None else None
                yield TarDamage("source-trailing-data", first,
                                f"non-zero bytes after the end-of-archive marker at byte {end}, from byte {first}"
                                + (f" ({rest} bytes)" if rest is not None else "")
                                + "; they are not read: the shard is damaged or was appended to")
                return
            pos += len(chunk)

    # ----- the walk
    def __iter__(self) -> Iterator[TarEntry | TarDamage]:
        pos, prev = 0, None
        long_name = long_link = None
        pax: dict[str, str] = {}
        first_header = None     # offset of the first header of the member being assembled (PAX, long name)
        resyncs = 0

        def resync(bad: int, why: str) -> Generator[TarDamage, None, int | None]:
            """Damage at `bad`: its events, then the offset of the next valid header to go on from (None: none)."""
            nonlocal resyncs
            resyncs += 1
            if resyncs > _MAX_RESYNCS:
                yield TarDamage("source-damaged-header", bad, f"{why}; more than {_MAX_RESYNCS} damaged places in "
                                                              f"this tar: nothing after byte {bad} is read", fatal=True)
                return
            start = prev.data_offset if prev is not None and prev.data_offset < bad else bad + _BLOCK
            found = self._scan(start)
            if found is not None and prev is not None and found < bad:
                yield TarDamage("source-size-mismatch", prev.offset,
                                f"member '{prev.name}' (header at byte {prev.offset}) says it holds {prev.size} "
                                f"bytes, but another header starts at byte {found}, inside them ({why} at byte "
                                f"{bad}): its size field lies; the walk goes on from byte {found}", suspect=prev)
            else:
                block = self._read_at(bad, _BLOCK)
                # A header that is damaged (its magic intact) or zeroed lost only its own member; bytes that are no
                # header at all may be the rest of the member before it, whose size field then fell short.
                suspect = None if _looks_like_header(block) or block == _ZERO_BLOCK or prev is None else prev
                tail = (f"the walk goes on at the next header, byte {found}" if found is not None
                        else "no valid header follows: nothing after it is read")
                yield TarDamage("source-damaged-header", bad, f"{why} at byte {bad}; {tail}"
                                + (f" (the member before it, '{suspect.name}', may be cut short)" if suspect else ""),
                                suspect=suspect, fatal=found is None)
            return found

        while True:
            block = self._read_at(pos, _BLOCK)
            if len(block) < _BLOCK:
                if pos == 0 and not block:
                    yield TarDamage("source-not-a-tar", 0, "the file is empty", fatal=True)
                elif len(block):
                    yield TarDamage("source-truncated", pos, f"the tar ends inside a header at byte {pos} "
                                                             f"({len(block)} of 512 bytes): it was cut off; re-fetch "
                                                             f"the shard", fatal=True)
                else:
                    yield TarDamage("source-truncated", pos, f"the tar ends at byte {pos} without an end-of-archive "
                                                             f"marker, after {self.members} members: it was cut off "
                                                             f"at a member boundary; re-fetch the shard", fatal=True)
                return
            if block == _ZERO_BLOCK:
                following = self._read_at(pos + _BLOCK, _BLOCK)
                if not following.strip(b"\0"):   # two zero blocks (or one, then the end): the end of the archive
                    again = yield from self._tail(pos + _BLOCK + len(following))
                    if again is None:
                        return
                    pos, prev = again, None
                    continue
                moved = yield from resync(pos, "a zero block inside the archive (a header was zeroed)")
                if moved is None:
                    return
                pos, prev, long_name, long_link, pax, first_header = moved, None, None, None, {}, None
                continue
            why = None
            if not _checksum_ok(block):
                why = "a header whose checksum does not match (damaged, or not a header)"
                if pos == 0 and not _looks_like_header(block):
                    yield TarDamage("source-not-a-tar", 0, "the file does not start with a tar header: it is not a "
                                                           "tar (or not the compression its name says)", fatal=True)
                    return
            else:
                try:
                    size = _tar_number(block[124:136])
                    if size < 0:
                        raise ValueError(f"negative size {size}")
                except ValueError as exc:
                    why = f"a header with an unreadable size field ({exc})"
            if why:
                moved = yield from resync(pos, why)
                if moved is None:
                    return
                pos, prev, long_name, long_link, pax, first_header = moved, None, None, None, {}, None
                continue
            typeflag = block[156:157]
            data_offset = pos + _BLOCK
            padded = -(-size // _BLOCK) * _BLOCK
            first_header = pos if first_header is None else first_header
            if typeflag in (b"L", b"K", b"x", b"g"):
                if size > self.max_header_bytes:
                    what = {b"L": "GNU long name", b"K": "GNU long link name", b"x": "PAX", b"g": "PAX global"}[typeflag]
                    yield TarDamage("source-header-too-large", pos,
                                    f"a {what} header at byte {pos} holds {size} bytes, over the limit "
                                    f"(ingest.max_header_bytes {self.max_header_bytes}); it is skipped unread and the "
                                    f"member after it keeps its short name")
                    data = None
                    if self._reach(data_offset + size) < data_offset + size:   # a size past the end: a lie or a cut
                        found = self._scan(data_offset)
                        if found is None:
                            yield TarDamage("source-truncated", pos, f"the tar ends inside the extended header at "
                                                                     f"byte {pos}: it was cut off", fatal=True)
                            return
                        pos, first_header = found, None
                        continue
                else:
                    data = self._read_at(data_offset, size)
                    if len(data) < size:
                        yield TarDamage("source-truncated", data_offset, f"the tar ends inside the extended header at "
                                                                         f"byte {pos}: it was cut off", fatal=True)
                        return
                if data is not None and typeflag == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif data is not None and typeflag == b"K":
                    long_link = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif data is not None:
                    try:
                        records = _pax_records(data, data_offset)
                        if "size" in records and (not records["size"].isdigit() or len(records["size"]) > 19):
                            raise ValueError(f"PAX size {records['size'][:40]!r} is not a size")
                    except ValueError as exc:
                        yield TarDamage("source-damaged-header", pos, f"a PAX header at byte {pos} cannot be read "
                                                                      f"({exc}); it is ignored")
                        records = {}
                    if typeflag == b"x":
                        pax.update(records)
                pos = data_offset + padded
                continue
            name = long_name if long_name is not None else pax.get("path")
            if name is None:
                name = _cstr(block[0:100])
                if block[257:263] == b"ustar\0" and block[345:346] != b"\0":   # POSIX: prefix/name
                    name = f"{_cstr(block[345:500])}/{name}"
            if "size" in pax:
                size = int(pax["size"])
                padded = -(-size // _BLOCK) * _BLOCK
            link = long_link if long_link is not None else pax.get("linkpath", _cstr(block[157:257]))
            entry = TarEntry(name, typeflag, size if typeflag not in _NO_DATA else 0, first_header, data_offset, link)
            long_name = long_link = None
            pax, first_header = {}, None
            self.members += 1
            yield entry
            if typeflag in _NO_DATA:
                pos, prev = data_offset, None
                continue
            end = data_offset + entry.size
            # A header inside a member's bytes means its size field claims the members after it (a lie that would
            # hand their bytes out as this member's). A member that is itself a tar legitimately holds headers.
            inner = None if name.lower().endswith(".tar") else self._scan(data_offset, end)
            if inner is not None:
                yield TarDamage("source-size-mismatch", entry.offset,
                                f"member '{name}' (header at byte {entry.offset}) says it holds {entry.size} bytes, "
                                f"but another header starts at byte {inner}, inside them: its size field lies; the "
                                f"walk goes on from there", suspect=entry)
                pos, prev = inner, None
                continue
            reached = self._reach(end)
            if reached < end:
                resyncs += 1
                found = self._scan(data_offset) if resyncs <= _MAX_RESYNCS else None
                if found is not None:
                    yield TarDamage("source-size-mismatch", entry.offset,
                                    f"member '{name}' (header at byte {entry.offset}) says it holds {entry.size} bytes, "
                                    f"past the end of the tar (byte {reached}), but another header starts at byte "
                                    f"{found}: its size field lies; the walk goes on from there", suspect=entry)
                    pos, prev = found, None
                    continue
                yield TarDamage("source-truncated", entry.offset,
                                f"the tar ends at byte {reached}, inside member '{name}' (header at byte {entry.offset}, "
                                f"{entry.size} bytes from byte {data_offset}): it was cut off; re-fetch the shard",
                                suspect=entry, fatal=True)
                return
            if padded > entry.size and self._read_at(end, padded - entry.size).strip(b"\0"):
                # Writers pad a member's bytes with zeros: data there means the size field is short of the real data.
                yield TarDamage("source-size-mismatch", entry.offset,
                                f"member '{name}' (header at byte {entry.offset}) says it holds {entry.size} bytes, but "
                                f"non-zero bytes follow them in its padding (from byte {end}): its size field is short "
                                f"of its data", suspect=entry)
            pos, prev = data_offset + padded, entry
