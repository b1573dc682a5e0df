"""Who is writing: one lease per writer, renewed by a heartbeat, that any process on any host can judge.

A writer (one `Placement`) is named by a random owner id; its lease `_leases/<owner>.json` says where it
runs and until when it is alive. Liveness never parses a host name:

- on the same machine *and* the same PID namespace (host name, boot id and PID namespace all equal),
  the writer is alive exactly while its process (pid + start time) exists, so a crashed run's files
  are cleaned up at once;
- anywhere else (another host, a container sharing the host name), the writer is alive while its lease
  was renewed less than its TTL ago. A live writer renews it every TTL/3.

"Ago" is judged by the store's clock, never the writer's: the lease file's modification time as the store
reports it, against the store's now (this host's clock plus an offset measured by touching a probe file in
the store). A writer whose clock runs a day ahead (or behind) is judged like any other. Only a store that
reports no modification times falls back to the `expires` the writer wrote.

Leases are also what part claims point at: a claim names its owner, and a claim whose owner is dead
may be taken over (tasks/engine/runner.py: the part's in-part checkpoints then belong to the new owner).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid

from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from . import records

LEASE_DIR = "_leases"
log = logging.getLogger("ram_engine")


def lease_ttl_s() -> float:
    """How long a lease lives without renewal (RAM_ENGINE_LEASE_TTL_S, default 5 minutes)."""
    return float(os.environ.get("RAM_ENGINE_LEASE_TTL_S", "300"))


def new_owner() -> str:
    # The host name is only a hint for people reading the store; liveness is decided by the lease.
    host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_identity() -> dict:
    """What makes two processes able to see each other's pids: same host, same boot, same PID namespace."""
    pidns = None
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return {"host": socket.gethostname(), "boot": _read_text("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), so a reused pid is not taken for the old one."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of proc(5); the name before ')' may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def put_whole(fs, path: str, data: bytes) -> None:
    """Write a small file that readers see whole: a sibling temporary + rename locally, one PUT elsewhere."""
    from .fs import ensure_folder  # (fs.py imports this module)

    parent = path.rsplit("/", 1)[0]
    if not isinstance(fs, LocalFileSystem):
        ensure_folder(fs, parent)
        fs.pipe_file(path, data)  # an object store PUT is atomic for readers
        return
    for attempt in range(10):  # the folder may be removed under us (a committed version's claims go)
        tmp = f"{parent}/.{uuid.uuid4().hex}.partial"
        try:
            fs.makedirs(parent, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        except FileNotFoundError:
            if attempt == 9:
                raise


def lease_path(root: str, owner: str) -> str:
    return f"{root}/{LEASE_DIR}/{owner}.json"


def store_time(entry: dict) -> float:
    """A listing entry's modification time as the store's clock gives it (0 when it gives none)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = entry.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return 0.0


_CLOCK_OFFSETS: dict[tuple[int, str], tuple[float, float]] = {}   # (fs, root) -> (offset s, measured at)
CLOCK_RECHECK_S = 60.0


def store_now(fs, root: str) -> float:
    """Now by the store's clock: this host's clock plus the store's offset from it, measured by writing a
    probe file and reading the modification time the store gave it (cached a minute per store). A store
    that cannot be written or gives no times: this host's clock."""
    key = (id(fs), root)
    cached = _CLOCK_OFFSETS.get(key)
    if cached is not None and time.monotonic() - cached[1] < CLOCK_RECHECK_S:
        return time.time() + cached[0]
    probe = f"{root}/{LEASE_DIR}/.clock-{uuid.uuid4().hex}"
    offset = 0.0
    try:
        before = time.time()
        put_whole(fs, probe, b"")
        after = time.time()
        stamped = store_time(fs.info(probe))
        if stamped:
            offset = stamped - (before + after) / 2
    except Exception as exc:  # noqa: BLE001 - a read-only store or one without times: judge by this host's clock
        log.debug("cannot measure the clock of %s (%s); using this host's", root, exc)
    finally:
        try:
            fs.rm(probe)
        except Exception:  # noqa: BLE001 - never written, or already gone
            pass
    _CLOCK_OFFSETS[key] = (offset, time.monotonic())
    return time.time() + offset


def read_lease(fs, root: str, owner: str) -> dict | None:
    """The lease of `owner`, validated (storage/records.py), with `_renewed`: its file's modification time
    by the store's clock (0 when the store gives none). None when absent or damaged."""
    path = lease_path(root, owner)
    try:
        data = json.loads(fs.cat_file(path))
        renewed = store_time(fs.info(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, IsADirectoryError):  # a damaged lease proves nothing: absent
        log.warning("lease %s is not valid JSON; treating its writer as gone", path)
        return None
    try:
        records.parse(records.Lease, data)
    except (records.RecordError, ValidationError) as exc:
        log.warning("lease %s is not a valid lease (%s); treating its writer as gone", path, exc)
        return None
    return data | {"_renewed": renewed}


def lease_alive(lease: dict | None, now: float | None = None) -> bool:
    """Whether the writer holding `lease` may still be running (see the module doc). `now` is the store's
    clock (store_now), compared with the lease's `_renewed` (read_lease); without a renewal time, with the
    writer's own `expires`."""
    if not lease:
        return False
    me = machine_identity()
    same_machine = all(lease.get(k) == me[k] for k in ("host", "boot", "pidns")) and me["boot"] and me["pidns"]
    if same_machine:
        pid = lease.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return False
        return lease.get("start") is None or process_start(pid) == lease.get("start")
    now = time.time() if now is None else now
    renewed, ttl = lease.get("_renewed"), lease.get("ttl") or lease_ttl_s()
    if renewed:  # the store's clock on both sides: the writer's clock plays no part
        return now - renewed < ttl
    expires = lease.get("expires")
    return isinstance(expires, (int, float)) and expires > now


def owner_alive(fs, root: str, owner: str) -> bool:
    lease = read_lease(fs, root, owner)
    return lease is not None and lease_alive(lease, store_now(fs, root) if lease.get("_renewed") else None)


class WriterLease:
    """The lease of one writer: written before any of its temporary files, renewed by a daemon thread
    while the writer lives, removed after its temporary files."""

    def __init__(self, fs, root: str, owner: str):
        self.fs, self.root, self.owner = fs, root, owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        pid = os.getpid()
        return json.dumps(machine_identity() | {"owner": self.owner, "pid": pid, "start": process_start(pid),
                                                "expires": time.time() + lease_ttl_s(), "ttl": lease_ttl_s()}
                          ).encode()

    def start(self) -> None:
        if self._thread is not None:
            return
        put_whole(self.fs, lease_path(self.root, self.owner), self.body())
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.owner}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(lease_ttl_s() / 3):
            try:
                put_whole(self.fs, lease_path(self.root, self.owner), self.body())
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; the TTL leaves room
                log.warning("renewing lease %s failed: %s: %s", self.owner, type(exc).__name__, exc)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        try:
            self.fs.rm(lease_path(self.root, self.owner))
        except (FileNotFoundError, OSError):
            pass
