"""Part work on a Dask cluster that never hangs: a checked start, and a watch over every part.

`ClusterTaskRunner` is prefect-dask's `DaskTaskRunner` (a cluster at `dask_address`, or a LocalCluster) with
two additions:

* **a checked start.** When it first connects, before any part is submitted, it waits (at most
  `orchestration.cluster_timeout_s`) for a worker, registers `EnginePackagesPlugin` (every worker, present or
  joining later, resolves `flows`, `tasks`, `storage`, `ram_model`, `configs` to the engine's packages, never
  to a folder such as Dask's spill folder `storage/`), and asks this process and every worker (`Client.run`)
  whether those packages are the engine's. A worker that cannot import the engine, or a package that shadows
  one of them, stops the run at once with one line naming the worker and the path.
* **a watch over the parts** (`watch_parts`, used by `flows.runtime.prefect_executor`): while it waits for
  parts it follows the cluster. A worker that dies while running a part is logged (part, worker), and Dask
  runs the part again on another worker, up to `distributed.scheduler.allowed-failures` + 1 workers; then the
  run stops. A part that runs longer than `orchestration.part_timeout_s`, a scheduler that cannot be reached
  for `cluster_timeout_s`, or a cluster left with no worker for `cluster_timeout_s` stops the run with one
  line that names the part, the worker and the cause. Stopping cancels the stage's other parts; parts
  already written stay in the store, and the next run resumes from them.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Sequence

from prefect_dask import DaskTaskRunner

from tasks.engine.runner import StageError

from . import engine_imports

log = logging.getLogger("ram_engine")

POLL_S = 1.0


class ClusterError(StageError):
    """The cluster cannot run the stage's parts; the message names the part, the worker and the cause."""


def _ship_by_value() -> None:
    """Workers get `engine_imports` by value: its functions must run where the engine does not import."""
    import cloudpickle

    if engine_imports.__name__ not in cloudpickle.list_registry_pickle_by_value():
        cloudpickle.register_pickle_by_value(engine_imports)


def check_cluster(client, address: str, timeout_s: float) -> dict[str, dict]:
    """Before parts are submitted: a worker is there, the engine's packages resolve on every worker (and here).
    Raises ClusterError with one line; returns each worker's report."""
    local = engine_imports.import_problems()
    if local:
        raise ClusterError(f"this process ({engine_imports.sys.executable}): {local[0]}")
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except TimeoutError:
        raise ClusterError(f"no Dask worker joined the scheduler at {address} within {timeout_s:.0f} s "
                           f"(orchestration.cluster_timeout_s): start workers with `dask worker {address}`") from None
    _ship_by_value()
    client.register_plugin(engine_imports.EnginePackagesPlugin(), name=engine_imports.EnginePackagesPlugin.name)
    reports = client.run(engine_imports.check_here, on_error="return")
    bad = []
    for worker, report in sorted(reports.items()):
        if isinstance(report, BaseException):
            bad.append(f"worker {worker} cannot run the engine's import check ({type(report).__name__}: {report})")
        else:
            bad += [f"worker {worker}: {p}" for p in report["problems"]]
            if report["redirected"]:
                log.debug("worker %s: %s resolve to the engine's packages, not to folders on its path", worker,
                          ", ".join(report["redirected"]))
    if bad:
        more = f" (and {len(bad) - 1} more problem(s) on other workers)" if len(bad) > 1 else ""
        raise ClusterError(f"Dask cluster at {address}: {bad[0]}{more}")
    return reports


class ClusterTaskRunner(DaskTaskRunner):
    """prefect-dask's runner with the checked start and the time limits of the module docstring."""

    def __init__(self, *args, part_timeout_s: float = 3600, cluster_timeout_s: float = 120, **kwargs):
        super().__init__(*args, **kwargs)
        self.part_timeout_s = part_timeout_s
        self.cluster_timeout_s = cluster_timeout_s
        self.client_kwargs.setdefault("timeout", cluster_timeout_s)   # connecting to the scheduler
        self._checked = False

    @property
    def client(self):
        client = super().client
        if not self._checked:
            self._checked = True
            check_cluster(client, self.address or str(client.scheduler.address), self.cluster_timeout_s)
        return client

    def duplicate(self):
        return type(self)(address=self.address, cluster_class=self.cluster_class, cluster_kwargs=self.cluster_kwargs,
                          adapt_kwargs=self.adapt_kwargs, client_kwargs=self.client_kwargs,
                          performance_report_path=self.performance_report_path,
                          part_timeout_s=self.part_timeout_s, cluster_timeout_s=self.cluster_timeout_s)

    def __getstate__(self):
        # The runner travels in a flow run's context to workers: there it starts unconnected and unchecked.
        return self.__dict__ | {"_client": None, "_checked": False}


class _Watch:
    """What the watch knows about the parts of one stage on the cluster."""

    def __init__(self, runner: ClusterTaskRunner, stage: str, futures: Sequence, names: Sequence[str]):
        self.runner, self.stage = runner, stage
        self.client = runner.client
        self.address = runner.address or str(self.client.scheduler.address)
        self.futures = list(futures)
        self.by_key = {f.wrapped_future.key: name for f, name in zip(futures, names)}
        self.running: dict[Any, tuple[str, float]] = {}    # key -> (worker, since)
        self.last_worker: dict[Any, str] = {}
        self.deaths: dict[Any, int] = {}
        now = time.monotonic()
        self.seen_scheduler = self.seen_worker = now
        self.events_since = time.time()

    def fail(self, message: str) -> ClusterError:
        try:  # the stage stops: the cluster need not run its other parts
            self.client.cancel([f.wrapped_future for f in self.futures], force=True)
        except Exception as exc:  # a scheduler that is gone cannot cancel anything
            log.debug("cancelling the stage's parts: %s", exc)
        return ClusterError(f"{self.stage}: {message}. Nothing was committed; parts already written are kept, and "
                            f"running the stage again resumes from them.")

    def part(self, key) -> str:
        return f"part {self.by_key.get(key, key)}"

    def check(self) -> None:
        now = time.monotonic()
        limit = self.runner.cluster_timeout_s
        pending = [f.wrapped_future.key for f in self.futures if not f.wrapped_future.done()]
        if not pending:
            return
        first = pending[0]
        if self.client.status != "running":
            if now - self.seen_scheduler > limit:
                raise self.fail(f"{self.part(first)} (last on worker {self.last_worker.get(first, 'none yet')}): the "
                                f"Dask scheduler at {self.address} is unreachable ({self.client.status}) for "
                                f"{now - self.seen_scheduler:.0f} s (orchestration.cluster_timeout_s {limit:.0f})")
            return
        try:
            processing = self.client.processing()
            self._read_events()
        except Exception as exc:  # the scheduler went away between the status check and the call
            log.debug("cluster watch: %s", exc)
            return
        self.seen_scheduler = now
        if processing:
            self.seen_worker = now
        elif now - self.seen_worker > limit:
            raise self.fail(f"{self.part(first)} (last on worker {self.last_worker.get(first, 'none yet')}): no Dask "
                            f"worker at {self.address} for {now - self.seen_worker:.0f} s "
                            f"(orchestration.cluster_timeout_s {limit:.0f}); the workers died or left: see their logs")
        for worker, keys in processing.items():
            for key in keys:
                if key not in self.by_key:
                    continue
                self.last_worker[key] = worker
                if self.running.get(key, (None,))[0] != worker:
                    self.running[key] = (worker, now)
                elif now - self.running[key][1] > self.runner.part_timeout_s:
                    raise self.fail(f"{self.part(key)} on worker {worker} ran for {now - self.running[key][1]:.0f} s, "
                                    f"over orchestration.part_timeout_s ({self.runner.part_timeout_s:.0f} s)")

    def _read_events(self) -> None:
        for stamp, event in self.client.get_events("all"):
            if stamp <= self.events_since or not isinstance(event, dict) or event.get("action") != "remove-worker":
                continue
            self.events_since = stamp
            if event.get("expected"):
                continue
            for key in event.get("processing-tasks", ()):
                if key in self.by_key:
                    self.deaths[key] = self.deaths.get(key, 0) + 1
                    self.running.pop(key, None)
                    log.warning("%s: %s: worker %s died while running it; Dask runs it again on another worker "
                                "(worker death %d for this part)", self.stage, self.part(key), event.get("worker"),
                                self.deaths[key])

    def result(self, future) -> Any:
        from distributed.scheduler import KilledWorker

        key = future.wrapped_future.key
        while not future.wrapped_future.done():
            try:
                future.wrapped_future.result(timeout=POLL_S)
            except Exception:  # TimeoutError while it runs; its own error is read below, through Prefect
                pass
            if not future.wrapped_future.done():
                self.check()
        try:
            return future.result()
        except KilledWorker as exc:
            raise self.fail(f"{self.part(key)}: every worker that ran it died ({exc.allowed_failures + 1} workers, "
                            f"the last {exc.last_worker.address}): the part itself may kill its worker (memory, a "
                            f"crash in native code); see the workers' logs") from None
        except Exception as exc:
            status = future.wrapped_future.status
            if status in ("cancelled", "lost") or type(exc).__name__ in ("CancelledError", "FutureCancelledError"):
                raise self.fail(f"{self.part(key)} (last on worker {self.last_worker.get(key, 'none yet')}): the "
                                f"Dask scheduler at {self.address} lost it ({status}: {type(exc).__name__}: {exc})"
                                ) from None
            raise


def watch_parts(runner: ClusterTaskRunner, stage: str, futures: Sequence, names: Sequence[str]) -> Iterator:
    """The results of `futures` (Prefect futures on the Dask runner, one per part `names`), in order, watched
    as the module docstring says."""
    watch = _Watch(runner, stage, futures, names)
    for future in futures:
        yield watch.result(future)
