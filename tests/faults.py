"""Fault injection for any store: a proxy around its fsspec filesystem that makes writes, renames and
reads fail (transiently, a given number of times) or fills the disk. Wrap: `faults.inject(store, plan)`."""
from __future__ import annotations

import errno
import threading


class FaultPlan:
    def __init__(self, fail_writes=0, fail_renames=0, fail_reads=0, disk_full_after_bytes=None, path_filter=""):
        self.fail_writes, self.fail_renames, self.fail_reads = fail_writes, fail_renames, fail_reads
        self.disk_full_after_bytes = disk_full_after_bytes
        self.path_filter = path_filter   # only paths containing this are faulted
        self.written = 0
        self.injected: list[str] = []
        self.lock = threading.Lock()

    def take(self, kind: str, path: str) -> bool:
        if self.path_filter not in path:
            return False
        with self.lock:
            left = getattr(self, kind)
            if left > 0:
                setattr(self, kind, left - 1)
                self.injected.append(f"{kind}:{path}")
                return True
        return False


class _FullDiskWriter:
    def __init__(self, raw, plan: FaultPlan):
        self.raw, self.plan = raw, plan

    def write(self, data):
        with self.plan.lock:
            self.plan.written += len(data)
            full = self.plan.written > self.plan.disk_full_after_bytes
        if full:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __setattr__(self, name, value):
        # the writer's own fields stay here; anything else (the store sets `closed` on an abandoned S3 upload so
        # its garbage collection does not finish it) belongs to the wrapped file, as it would without the fault
        if name in ("raw", "plan"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.raw, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


class FaultProxy:
    """Forwards everything to the real filesystem except the faults the plan asks for."""

    def __init__(self, fs, plan: FaultPlan):
        self._fs, self.plan = fs, plan

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, mode="rb", **kwargs):
        writing = "w" in mode or "x" in mode   # "xb": S3's exclusive create
        if writing and self.plan.take("fail_writes", path):
            raise OSError(errno.EIO, f"injected write failure: {path}")
        if "r" in mode and self.plan.take("fail_reads", path):
            raise ConnectionError(f"injected transient read failure: {path}")
        handle = self._fs.open(path, mode, **kwargs)
        if writing and self.plan.disk_full_after_bytes is not None:
            return _FullDiskWriter(handle, self.plan)
        return handle

    def mv(self, path1, path2, **kwargs):
        if self.plan.take("fail_renames", path2):
            raise OSError(errno.EIO, f"injected rename failure: {path2}")
        return self._fs.mv(path1, path2, **kwargs)


def inject(store, plan: FaultPlan) -> FaultPlan:
    """Route the store's I/O through a FaultProxy following `plan` (replacing an earlier plan)."""
    real = store.fs._fs if isinstance(store.fs, FaultProxy) else store.fs
    store.fs = FaultProxy(real, plan)
    return plan
