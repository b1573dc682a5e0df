"""The filesystem layer under the store: fsspec URLs, atomic placement and hashing writes.

Everything the store writes goes through `atomic_open`: bytes land in a private temporary folder
first and are moved into place whole, so a reader never sees half a file.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

TMP_DIR = "_tmp"
# A temporary folder from another host is only considered abandoned after this long.
FOREIGN_TMP_TTL_S = 6 * 3600


log = logging.getLogger("ram_engine")

# Errors no retry can fix: a full disk, no permission, a read-only filesystem, a missing file.
PERSISTENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


class StoreIOError(RuntimeError):
    """A store operation failed after its retries; the message names the path."""


def is_transient(exc: BaseException) -> bool:
    """Whether an I/O error may pass on a retry (network blips, throttling, a flaky mount)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in PERSISTENT_ERRNOS:
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


def retry_io(fn, what: str, attempts: int = 4, base_delay: float = 0.2):
    """Call fn(), retrying transient I/O errors with exponential backoff; raise StoreIOError at the end."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StoreIOError(f"{what} failed {attempts} times: {type(exc).__name__}: {exc}") from exc
            log.warning("%s failed (%s: %s); retry %d of %d", what, type(exc).__name__, exc, attempt, attempts - 1)
            time.sleep(base_delay * 2 ** (attempt - 1))


@dataclass
class FileInfo:
    path: str       # store-relative, '/'-separated
    bytes: int
    sha256: str


def open_fs(url: str, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and the root path (without protocol) for a store URL."""
    fs, root = url_to_fs(url, **storage_options)
    return fs, root.rstrip("/")


class HashingWriter:
    """A write-only file wrapper that counts bytes and computes sha256 as data streams through."""

    def __init__(self, raw):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data) if not isinstance(data, bytes) else data
        self._raw.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        # pyarrow closes the sink it was given; the real close happens in atomic_open.
        self.closed = True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def _tmp_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner_alive(name: str) -> bool:
    """Whether the writer that owns temporary folder `name` may still be running."""
    host, _, rest = name.partition("-")
    try:
        pid = int(rest.split("-")[0])
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # cannot see other hosts' processes; age decides instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Placement:
    """Writes files into a temporary folder and moves each into place whole."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs = fs
        self.root = root
        self.owner = _tmp_owner()
        self.tmp_root = f"{root}/{TMP_DIR}/{self.owner}"

    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @contextmanager
    def atomic_open(self, rel: str, replace: bool = False) -> Iterator[HashingWriter]:
        """Yield a hashing writer; on success the file appears at `rel` whole, on error nowhere.

        A version's files are determined by its id, so when `rel` already holds exactly these bytes
        (another writer of the same version got there first) it is left alone; `replace` overwrites
        whatever is there (refs)."""
        tmp = f"{self.tmp_root}/{uuid.uuid4().hex}"
        final = self.abs(rel)
        self.fs.makedirs(self.tmp_root, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as raw:
                writer = HashingWriter(raw)
                yield writer
        except BaseException:
            self._remove_quietly(tmp)
            raise
        if not replace and self._holds(final, writer.size, writer.sha256):
            self._remove_quietly(tmp)
        else:
            self.move_into_place(tmp, final)
        writer.info = FileInfo(rel, writer.size, writer.sha256)  # type: ignore[attr-defined]

    def _holds(self, path: str, size: int, sha: str) -> bool:
        try:
            if self.fs.size(path) != size:
                return False
            return sha256_of(self.fs, path) == (size, sha)
        except (FileNotFoundError, OSError):
            return False

    def put_bytes(self, rel: str, data: bytes, replace: bool = False) -> FileInfo:
        def put() -> FileInfo:
            with self.atomic_open(rel, replace=replace) as w:
                w.write(data)
            return w.info  # type: ignore[attr-defined]

        return retry_io(put, f"writing {rel}")

    def move_into_place(self, tmp: str, final: str) -> None:
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            os.replace(tmp, final)  # atomic on one filesystem, replaces an identical racing copy
        else:
            self.fs.mv(tmp, final)

    def link_into_place(self, src_rel: str, rel: str, size: int, sha: str) -> None:
        """Make `rel` hold the bytes of the committed file `src_rel` (size and sha256 known): a hard link on
        a local store, a copy where links are refused (another device, a filesystem without them), a
        server-side copy on object stores. Whole or nowhere, like every placement."""
        final, src = self.abs(rel), self.abs(src_rel)
        if self._holds(final, size, sha):
            return
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.tmp_root, exist_ok=True)
            tmp = f"{self.tmp_root}/{uuid.uuid4().hex}"
            try:
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise
                self.fs.copy(src, tmp)   # EXDEV, EPERM, EMLINK: no link here, so a copy
            self.move_into_place(tmp, final)
        elif _is_object_store(self.fs):
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.copy(src, final)     # an object appears whole: no temporary name needed
        else:
            self.fs.makedirs(self.tmp_root, exist_ok=True)
            tmp = f"{self.tmp_root}/{uuid.uuid4().hex}"
            self.fs.copy(src, tmp)
            self.move_into_place(tmp, final)

    def cleanup(self) -> None:
        """Remove this writer's temporary folder."""
        self._remove_quietly(self.tmp_root)

    def remove_abandoned(self) -> list[str]:
        """Remove temporary folders of writers that are gone (crashed runs). Returns what was removed."""
        base = f"{self.root}/{TMP_DIR}"
        removed = []
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return removed
        now = time.time()
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name == self.owner:
                continue
            stale = not _owner_alive(name)
            mtime = _mtime(entry)
            if not stale and mtime is not None and now - mtime > FOREIGN_TMP_TTL_S:
                stale = True
            if stale:
                self._remove_quietly(entry["name"])
                removed.append(name)
        return removed

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except (FileNotFoundError, OSError):
            pass


_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "memory"}


def _is_object_store(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool(_OBJECT_STORES.intersection(protocols))


def _mtime(entry: dict) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = entry.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def sha256_of(fs, path: str, chunk: int = 1 << 20) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return size, h.hexdigest()
