"""An fsspec filesystem that injects faults into a local folder: failing writes and renames, a full
disk, reads that fail transiently. Register once; open a store at `faulty://<path>`."""
from __future__ import annotations

import errno
import threading

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FaultPlan:
    def __init__(self, fail_writes=0, fail_renames=0, fail_reads=0, disk_full_after_bytes=None,
                 path_filter=""):
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


PLAN = FaultPlan()


class _FullDiskWriter:
    def __init__(self, raw, plan: FaultPlan):
        self.raw, self.plan = raw, plan

    def write(self, data):
        with self.plan.lock:
            self.plan.written += len(data)
            full = self.plan.disk_full_after_bytes is not None and self.plan.written > self.plan.disk_full_after_bytes
        if full:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


class FaultyFileSystem(LocalFileSystem):
    protocol = "faulty"
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("faulty://"):
            path = path[len("faulty://"):]
        return LocalFileSystem._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode and PLAN.take("fail_writes", path):
            raise OSError(errno.EIO, f"injected write failure: {path}")
        if "r" in mode and PLAN.take("fail_reads", path):
            raise ConnectionError(f"injected transient read failure: {path}")
        handle = super()._open(path, mode=mode, **kwargs)
        if "w" in mode and PLAN.disk_full_after_bytes is not None:
            return _FullDiskWriter(handle, PLAN)
        return handle

    def mv(self, path1, path2, **kwargs):
        if PLAN.take("fail_renames", path2):
            raise OSError(errno.EIO, f"injected rename failure: {path2}")
        return super().mv(path1, path2, **kwargs)


def install(plan: FaultPlan) -> FaultPlan:
    global PLAN
    PLAN = plan
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
    return plan
