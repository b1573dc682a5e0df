"""The filesystem layer under the store: fsspec URLs, atomic placement and hashing writes.

Everything the store writes goes through `atomic_open`: bytes land in a private temporary folder
first and are moved into place whole, so a reader never sees half a file. On S3 a new file is uploaded
straight to its name with an exclusive create: the object appears whole when the upload completes.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .leases import LEASE_DIR, WriterLease, new_owner, owner_alive

TMP_DIR = "_tmp"


log = logging.getLogger("ram_engine")

# Errors no retry can fix: a full disk, no permission, a read-only filesystem, a missing file.
PERSISTENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


class StoreIOError(RuntimeError):
    """A store operation failed after its retries; the message names the path."""


class StoreAccessError(StoreIOError):
    """The store cannot be used as configured (no credentials, access denied, no such bucket, a URL that names
    no filesystem); one line naming the URL and what to do."""


class CommittedFileConflict(RuntimeError):
    """A write would change a file that is already in place with other bytes: committed files never change."""


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


def check_url(url: str) -> str:
    """`url` when it names a store fsspec can open, else StoreAccessError saying what to give instead: an
    empty URL would make the store the current folder's root, an unknown scheme fails deep inside a run."""
    if not isinstance(url, str) or not url.strip():
        raise StoreAccessError(f"the store URL is empty ({url!r}): give a folder (./ram-data) or an object store "
                               f"URL (s3://bucket/prefix) in store.url or --store")
    *chained, last = url.split("::")   # fsspec chains: simplecache::s3://bucket/x
    scheme = last.split("://", 1)[0] if "://" in last else "file"
    known = set(fsspec.available_protocols())
    for name in [*chained, scheme]:
        if name not in known:
            raise StoreAccessError(f"the store URL {url!r} has an unknown scheme {name!r}: use a folder path or one "
                                   f"of s3://, gs://, az://, memory://, file:// (fsspec knows {len(known)} schemes)")
    if scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs") and not last.split("://", 1)[1].strip("/"):
        raise StoreAccessError(f"the store URL {url!r} names no bucket: give {scheme}://BUCKET/PREFIX")
    return url


def open_fs(url: str, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem and the root path (without protocol) for a store URL."""
    check_url(url)
    try:
        fs, root = url_to_fs(url, **storage_options)
    except ImportError as exc:
        raise StoreAccessError(f"the store URL {url!r} needs a package that is not installed ({exc}); install it "
                               f"(s3://: s3fs, gs://: gcsfs, az://: adlfs)") from None
    return fs, root.rstrip("/")


def ensure_folder(fs, path: str) -> None:
    """Make a folder where folders exist. Object stores have none (a key is a name), and asking s3fs for one
    creates a missing bucket: a typo in a bucket name must stop the run, never create a bucket."""
    if not _is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "NoAuthTokenError", "UnauthorizedSSOTokenError", "SSOTokenLoadError"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem", "RequestTimeTooSkewed"}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "")
    return ""


def access_problem(exc: BaseException, url: str) -> StoreAccessError | None:
    """The one-line error for an exception that says the store at `url` cannot be used as configured
    (credentials, permission, bucket), or None when it is another kind of failure."""
    if isinstance(exc, StoreAccessError):
        return exc
    bucket = url.split("://", 1)[1].split("/", 1)[0] if "://" in url else ""
    for e in _chain(exc):
        name, code = type(e).__name__, _error_code(e)
        if name in _NO_CREDENTIALS:
            return StoreAccessError(
                f"no credentials for the store {url} ({e}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                f"AWS_PROFILE) in the environment, or key/secret in store.storage_options")
        if code == "RequestTimeTooSkewed":
            return StoreAccessError(f"the store {url} refused this host's clock ({e}): set the clock right (NTP)")
        if code in _DENIED_CODES or (isinstance(e, PermissionError) and bucket):
            return StoreAccessError(
                f"access denied to the store {url} ({code or 403}: {e}): check the credentials and the bucket "
                f"policy (this run needs to list, read and write under the prefix)")
        if code == "NoSuchBucket" or (isinstance(e, FileNotFoundError) and "bucket does not exist" in str(e)):
            return StoreAccessError(
                f"the bucket {bucket or url!r} of the store {url} does not exist: create it (e.g. `aws s3 mb "
                f"s3://{bucket}`) or fix store.url / --store; ram-engine never creates a bucket")
    return None


class HashingWriter:
    """A write-only file wrapper that counts bytes and computes sha256 as data streams through.

    Small writes (a tar header, a Parquet page) are gathered into blocks of `BLOCK` bytes: one hash update
    and one write per block instead of one per call. `finish()` (the placement calls it) writes the rest."""

    BLOCK = 1 << 20

    def __init__(self, raw):
        self._raw = raw
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self._hashing: ThreadPoolExecutor | None = None   # started by the first whole block
        self._in_flight = None
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        n = len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes
        if self._pending or n < self.BLOCK:
            self._pending += data
            if len(self._pending) >= self.BLOCK:
                self._push()
        else:   # a large block: as it is, no copy
            self._hashed()
            self._hash.update(data)
            self._raw.write(data)
        self.size += n
        return n

    def _push(self) -> None:
        if not self._pending:
            return
        block, self._pending = self._pending, bytearray()
        # A whole block is hashed on a thread of its own while it is written and the next one is made (hashlib
        # lets go of the GIL): the hash costs no time on a second core. One block in flight at a time, in order.
        if self._hashing is None:
            self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        else:
            self._in_flight.result()
        self._in_flight = self._hashing.submit(self._hash.update, block)
        self._raw.write(block)

    def _hashed(self) -> None:
        if self._hashing is not None:
            self._in_flight.result()
            self._hashing.shutdown()
            self._hashing = None

    def finish(self) -> None:
        """Write out what is gathered (before the underlying file is closed)."""
        self._push()
        self._hashed()

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._push()
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
        self._push()
        self._hashed()
        return self._hash.hexdigest()


class Placement:
    """Writes files into a temporary folder and moves each into place whole."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs = fs
        self.root = root
        self.owner = new_owner()
        self.tmp_root = f"{root}/{TMP_DIR}/{self.owner}"
        self.lease = WriterLease(fs, root, self.owner)

    def __getstate__(self):
        raise TypeError("a Placement belongs to one process (its lease and temporary folder); make a new one")

    def abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @contextmanager
    def atomic_open(self, rel: str, replace: bool = False,
                    replace_if: Callable[[], bool] | None = None) -> Iterator[HashingWriter]:
        """Yield a hashing writer; on success the file appears at `rel` whole, on error nowhere.

        Without `replace`, a file already at `rel` is never changed: the same bytes (another writer of
        the same version got there first) are left alone, other bytes raise CommittedFileConflict.
        `replace` overwrites whatever is there (refs, in-part checkpoints); `replace_if`, asked only when
        other bytes are in place, may allow it (a part's files that no record or manifest names yet)."""
        final = self.abs(rel)
        if not replace and _has_exclusive_create(self.fs) and not self.fs.exists(final):
            with self._exclusive_open(rel, final) as writer:
                yield writer
            return
        tmp = f"{self.tmp_root}/{uuid.uuid4().hex}"
        self.lease.start()  # before the temporary folder exists: others judge the folder by the lease
        ensure_folder(self.fs, self.tmp_root)
        try:
            with self.fs.open(tmp, "wb") as raw:
                writer = HashingWriter(raw)
                yield writer
                writer.finish()
        except BaseException:
            self._remove_quietly(tmp)
            raise
        if replace:
            self.move_into_place(tmp, final)
        elif not self._place_new(tmp, final):
            if self._holds(final, writer.size, writer.sha256):
                self._remove_quietly(tmp)
            elif replace_if is not None and replace_if():
                self.move_into_place(tmp, final)
            else:
                self._remove_quietly(tmp)
                raise CommittedFileConflict(
                    f"{rel} is already in place with other bytes than this run made ({writer.size} bytes, sha256 "
                    f"{writer.sha256[:12]}…); it is left unchanged. Another run wrote it: use its result.")
        writer.info = FileInfo(rel, writer.size, writer.sha256)  # type: ignore[attr-defined]

    @contextmanager
    def _exclusive_open(self, rel: str, final: str) -> Iterator[HashingWriter]:
        """Bytes straight to the final name with an exclusive create (S3: If-None-Match: *): the object
        appears whole when its upload completes, and only if no object took the name meanwhile. No
        temporary object and no server-side copy, so a multi-GB file crosses the wire once and the server
        never holds a second copy. An abandoned upload stays invisible (a bucket lifecycle rule,
        AbortIncompleteMultipartUpload, removes its parts)."""
        ensure_folder(self.fs, final.rsplit("/", 1)[0])
        raw = self.fs.open(final, "xb")
        writer = HashingWriter(raw)
        try:
            yield writer
            writer.finish()
        except BaseException:
            raw.discard()   # never close(): closing completes the upload and would publish half a file
            raw.closed = True   # nor may the garbage collector close it
            raise
        try:
            raw.close()
        except FileExistsError:  # another writer placed this name while we uploaded
            if not self._holds(final, writer.size, writer.sha256):
                raise CommittedFileConflict(
                    f"{rel} was placed by another writer during this upload, with other bytes than this run made "
                    f"({writer.size} bytes, sha256 {writer.sha256[:12]}…); it is left unchanged. Use its result "
                    f"or run again.") from None
        writer.info = FileInfo(rel, writer.size, writer.sha256)  # type: ignore[attr-defined]

    def _place_new(self, tmp: str, final: str) -> bool:
        """Move tmp to final unless final exists; False when it did. Atomic on a local filesystem
        (a hard link fails on an existing name); check-then-move on object stores."""
        parent = final.rsplit("/", 1)[0]
        ensure_folder(self.fs, parent)
        if isinstance(self.fs, LocalFileSystem):
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this filesystem
                if os.path.exists(final):
                    return False
                os.replace(tmp, final)
                return True
            os.unlink(tmp)
            return True
        if self.fs.exists(final):
            return False
        self.fs.mv(tmp, final)
        return True

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
        ensure_folder(self.fs, parent)
        if isinstance(self.fs, LocalFileSystem):
            os.replace(tmp, final)  # atomic on one filesystem, replaces an identical racing copy
        else:
            self.fs.mv(tmp, final)

    def link_into_place(self, src_rel: str, rel: str, size: int, sha: str, parent_made: bool = False) -> None:
        """Make `rel` hold the bytes of the committed file `src_rel` (size and sha256 known): a hard link
        straight to the final name on a local store, a copy where links are refused (another device, a
        filesystem without them), a server-side copy on object stores. Like every placement it appears whole
        or nowhere and never changes a file in place: the same bytes already at `rel` are left alone, other
        bytes raise CommittedFileConflict. A missing `src_rel` raises FileNotFoundError."""
        final, src = self.abs(rel), self.abs(src_rel)
        if not parent_made:
            ensure_folder(self.fs, final.rsplit("/", 1)[0])
        tmp = None
        if isinstance(self.fs, LocalFileSystem):
            try:
                os.link(src, final)
                return
            except FileExistsError:
                placed = False
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise
                tmp = self._copy_to_tmp(src)   # EXDEV, EPERM, EMLINK: no link here, so a copy
                placed = self._place_new(tmp, final)
        elif _is_object_store(self.fs):
            placed = not self.fs.exists(final)
            if placed:
                self.fs.copy(src, final)   # server-side; an object appears whole
        else:
            tmp = self._copy_to_tmp(src)
            placed = self._place_new(tmp, final)
        if placed:
            return
        if tmp is not None:
            self._remove_quietly(tmp)
        if not self._holds(final, size, sha):
            raise CommittedFileConflict(
                f"{rel} is already in place with other bytes than {src_rel} ({size} bytes, sha256 {sha[:12]}…); "
                f"it is left unchanged. Another run wrote it: use its result.")

    def link_many(self, links: list[tuple[str, str, int, str]]) -> dict[str, Exception]:
        """`link_into_place` for many (src_rel, rel, size, sha256) at once; returns {rel: error} for those
        that could not be placed (FileNotFoundError: the source is gone; CommittedFileConflict: other bytes
        at `rel`). Other errors raise. On object stores: one listing per target folder says which names are
        taken, then the server-side copies of the rest go out concurrently and one more listing per folder
        says which landed; elsewhere one link (or copy) per file, each folder made once."""
        failed: dict[str, Exception] = {}
        if not links:
            return failed
        if not _is_object_store(self.fs):
            made: set[str] = set()
            for src_rel, rel, size, sha in links:
                parent = self.abs(rel).rsplit("/", 1)[0]
                if parent not in made:
                    self.fs.makedirs(parent, exist_ok=True)
                    made.add(parent)
                try:
                    self.link_into_place(src_rel, rel, size, sha, parent_made=True)
                except (FileNotFoundError, CommittedFileConflict) as exc:
                    failed[rel] = exc
            return failed

        def listed() -> dict[str, int | None]:
            found: dict[str, int | None] = {}
            for parent in {self.abs(rel).rsplit("/", 1)[0] for _, rel, _, _ in links}:
                try:
                    found.update({e["name"].rstrip("/"): e.get("size") for e in self.fs.ls(parent, detail=True)})
                except FileNotFoundError:
                    pass
            return found

        present = listed()
        todo = []
        for src_rel, rel, size, sha in links:
            final = self.abs(rel)
            if final not in present:
                todo.append((src_rel, rel))
            elif not (present[final] == size and self._holds(final, size, sha)):
                failed[rel] = CommittedFileConflict(
                    f"{rel} is already in place with other bytes than {src_rel} ({size} bytes, sha256 {sha[:12]}…); "
                    f"it is left unchanged. Another run wrote it: use its result.")
        if todo:
            # server-side, concurrent; a missing source is told by the listing below, not by an exception
            self.fs.copy([self.abs(s) for s, _ in todo], [self.abs(r) for _, r in todo], on_error="ignore")
            present = listed()
            for src_rel, rel in todo:
                if self.abs(rel) not in present:
                    failed[rel] = FileNotFoundError(f"{src_rel}: no such file to link into {rel}")
        return failed

    def _copy_to_tmp(self, src: str) -> str:
        self.lease.start()  # before the temporary folder exists: others judge the folder by the lease
        ensure_folder(self.fs, self.tmp_root)
        tmp = f"{self.tmp_root}/{uuid.uuid4().hex}"
        try:
            self.fs.copy(src, tmp)
        except BaseException:
            self._remove_quietly(tmp)
            raise
        return tmp

    def cleanup(self) -> None:
        """Remove this writer's temporary folder, then its lease."""
        self._remove_quietly(self.tmp_root)
        self.lease.stop()

    def remove_abandoned(self) -> list[str]:
        """Remove temporary folders and leases of writers that are gone (crashed runs, on this host or any
        other). Returns the owners removed."""
        removed = []
        for base, suffix in ((f"{self.root}/{TMP_DIR}", ""), (f"{self.root}/{LEASE_DIR}", ".json")):
            try:
                entries = self.fs.ls(base, detail=False)
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith(".") or not name.endswith(suffix):
                    continue
                owner = name[: len(name) - len(suffix)]
                if owner == self.owner or owner_alive(self.fs, self.root, owner):
                    continue
                self._remove_quietly(entry)
                removed.append(owner)
        return removed

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except (FileNotFoundError, OSError):
            pass


_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "memory"}


def _has_exclusive_create(fs) -> bool:
    """S3 and S3-compatible stores (MinIO, moto) refuse an upload onto an existing name when asked
    (If-None-Match: *); s3fs asks with mode "xb"."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool({"s3", "s3a"}.intersection(protocols))


def _is_object_store(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return bool(_OBJECT_STORES.intersection(protocols))


def sha256_of(fs, path: str, chunk: int = 1 << 20) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    # On object stores every read-ahead block is one ranged GET: few large ones, not a GET per 5 MB
    options = {"block_size": 64 << 20, "cache_type": "readahead"} if _is_object_store(fs) else {}
    with fs.open(path, "rb", **options) as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return size, h.hexdigest()
