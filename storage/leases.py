"""Who is writing: one lease per writer, renewed by a heartbeat, that any process on any host can judge.

A writer (one `Placement`) is named by a random owner id; its lease `_leases/<owner>.json` says where it
runs and until when it is alive. Liveness never parses a host name:

- on the same machine *and* the same PID namespace (host name, boot id and PID namespace all equal),
  the writer is alive exactly while its process (pid + start time) exists, so a crashed run's files
  are cleaned up at once;
- anywhere else (another host, a container sharing the host name, S3 without modification times),
  the writer is alive while its lease has not expired. A live writer renews it every TTL/3.

Leases are also what part claims point at: a claim names its owner, and a claim whose owner is dead
may be taken over (tasks/engine/runner.py: the part's in-part checkpoints then belong to the new owner).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

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
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{parent}/.{uuid.uuid4().hex}.partial"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # an object store PUT is atomic for readers


def lease_path(root: str, owner: str) -> str:
    return f"{root}/{LEASE_DIR}/{owner}.json"


def read_lease(fs, root: str, owner: str) -> dict | None:
    try:
        data = json.loads(fs.cat_file(lease_path(root, owner)))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):  # a damaged lease proves nothing: treat it as absent
        log.warning("lease %s is not valid JSON; treating its writer as gone", lease_path(root, owner))
        return None
    return data if isinstance(data, dict) else None


def lease_alive(lease: dict | None, now: float | None = None) -> bool:
    """Whether the writer holding `lease` may still be running (see the module doc)."""
    if not lease:
        return False
    me = machine_identity()
    same_machine = all(lease.get(k) == me[k] for k in ("host", "boot", "pidns")) and me["boot"] and me["pidns"]
    if same_machine:
        pid = lease.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return False
        return lease.get("start") is None or process_start(pid) == lease.get("start")
    try:
        return float(lease.get("expires", 0)) > (time.time() if now is None else now)
    except (TypeError, ValueError):
        return False


def owner_alive(fs, root: str, owner: str) -> bool:
    return lease_alive(read_lease(fs, root, owner))


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
                                                "expires": time.time() + lease_ttl_s()}).encode()

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
