"""Where part work runs: Prefect task runners from config, a GPU slot limit, and a per-worker model cache.

`make_task_runner(cfg)` turns `orchestration.task_runner` into a Prefect task runner:

* `threads` (default): `ThreadPoolTaskRunner(max_workers)` in the flow's process.
* `dask`: `flows.cluster.ClusterTaskRunner` (prefect-dask's `DaskTaskRunner`, plus a checked start and a watch
  over the parts: a run never hangs on a dead worker or scheduler) on the cluster at `dask_address`, or on a
  `LocalCluster` of `max_workers` single-threaded worker processes when no address is given.
* `ray`: `RayTaskRunner` (prefect-ray, the optional `ray` extra) on `ray_address` or a local Ray.

Stage functions do not change: `flows/runtime.prefect_executor` submits one Prefect task per part to
whichever runner the flow runs with (`with_task_runner(flow, cfg)`).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import ExitStack, contextmanager
from typing import Iterator

from prefect import Flow

from tasks.engine.config import EngineConfig, OrchestrationConfig

log = logging.getLogger("ram_engine")

EXIT_GRACE_S = 20.0   # after SIGTERM, Prefect's own shutdown (reporting the crash) gets this long, then we exit


class RunnerConfigError(ValueError):
    """The configured task runner cannot be built here; the message says what to install or set."""


def _orchestration(cfg: EngineConfig | OrchestrationConfig) -> OrchestrationConfig:
    return cfg.orchestration if isinstance(cfg, EngineConfig) else cfg


def default_workers(cfg: OrchestrationConfig) -> int:
    return cfg.max_workers or os.cpu_count() or 1


def make_task_runner(cfg: EngineConfig | OrchestrationConfig):
    """The Prefect task runner `orchestration.task_runner` names (see the module docstring)."""
    oc = _orchestration(cfg)
    if oc.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=default_workers(oc))
    if oc.task_runner == "dask":
        try:
            import prefect_dask  # noqa: F401
        except ImportError as exc:
            raise RunnerConfigError(
                "orchestration.task_runner=dask needs prefect-dask: pip install 'ram-data-engine[dask]' "
                f"({exc})") from None
        from .cluster import ClusterTaskRunner  # DaskTaskRunner with a checked start and watched parts

        limits = {"part_timeout_s": oc.part_timeout_s, "cluster_timeout_s": oc.cluster_timeout_s}
        if oc.dask_address:
            return ClusterTaskRunner(address=oc.dask_address, **limits)
        # Processes, one thread each: stage code holds the GIL (PIL decode, tokenisers) and torch
        # sets its own threads per process.
        return ClusterTaskRunner(cluster_class="distributed.LocalCluster",
                                 cluster_kwargs={"n_workers": default_workers(oc), "threads_per_worker": 1,
                                                 "processes": True, "dashboard_address": None}, **limits)
    if oc.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RunnerConfigError(
                "orchestration.task_runner=ray needs prefect-ray, which is an optional extra: "
                f"pip install 'ram-data-engine[ray]' ({exc})") from None
        if oc.ray_address:
            return RayTaskRunner(address=oc.ray_address)
        return RayTaskRunner(init_kwargs={"num_cpus": default_workers(oc), "include_dashboard": False})
    raise RunnerConfigError(f"orchestration.task_runner: unknown runner {oc.task_runner!r} "
                            "(use threads, dask or ray)")


@contextmanager
def shared_cluster(cfg: EngineConfig) -> Iterator[EngineConfig]:
    """For a loop of stage subflows on Dask without an address: one LocalCluster for the whole loop (each
    subflow would otherwise start its own, and reload its models in new worker processes). Yields the
    config to run with: `dask_address` set to that cluster; any other config as it is."""
    oc = cfg.orchestration
    if oc.task_runner != "dask" or oc.dask_address:
        yield cfg
        return
    try:
        from distributed import LocalCluster
    except ImportError as exc:
        raise RunnerConfigError("orchestration.task_runner=dask needs prefect-dask: pip install "
                                f"'ram-data-engine[dask]' ({exc})") from None
    with LocalCluster(n_workers=default_workers(oc), threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        log.info("Dask: %d worker processes at %s", default_workers(oc), cluster.scheduler_address)
        yield cfg.model_copy(update={"orchestration": oc.model_copy(update={"dask_address":
                                                                            cluster.scheduler_address})})


def arm_prompt_exit(grace_s: float = EXIT_GRACE_S) -> None:
    """Make SIGTERM end this process within `grace_s`: Prefect turns SIGTERM into a crash of the flow run and
    reports it to its API, which can take minutes when the API or the cluster is gone (its retries). Chains the
    handler in place (Prefect's, inside a flow run) and starts a timer that exits the process when the grace runs
    out. Only the main thread can set handlers; elsewhere, and when armed already, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if getattr(current, "_ram_prompt_exit", False):
        return

    def on_sigterm(signum, frame):
        log.error("SIGTERM: the run stops (within %.0f s); parts already written are kept, and the next run "
                  "resumes from them", grace_s)
        timer = threading.Timer(grace_s, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()
        if callable(current):
            current(signum, frame)
        else:  # the default action (or ignored): as it would have been
            signal.signal(signum, current if current is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    on_sigterm._ram_prompt_exit = True
    signal.signal(signal.SIGTERM, on_sigterm)


def release_cached_models(cfg: EngineConfig | OrchestrationConfig) -> None:
    """Drop the models the part workers keep between stages (baseline, CLIP, detector) before a training step:
    training needs the memory (Swin-L weights, gradients and AdamW state), and the workers sit idle until it
    ends. The next run loads them again (once per worker). Ray's workers are pooled by Ray and cannot be
    addressed one by one, so there the cached models stay."""
    from tasks.engine.cache import clear_worker_cache

    dropped = clear_worker_cache()  # this process: the threads runner's workers and the CLI's own steps
    oc = _orchestration(cfg)
    if oc.task_runner == "dask" and oc.dask_address:
        from distributed import Client

        try:
            with Client(oc.dask_address, set_as_default=False, timeout=30) as client:
                per_worker = client.run(clear_worker_cache)
        except Exception as exc:  # freeing memory is a nicety: training goes on without it
            log.warning("could not release the cached models of the Dask workers at %s (%s: %s); training "
                        "goes on beside them", oc.dask_address, type(exc).__name__, exc)
            return
        dropped += sum(per_worker.values())
        log.info("released %d cached model(s) in this process and %d Dask worker(s) before training",
                 dropped, len(per_worker))
    elif dropped:
        log.info("released %d cached model(s) before training", dropped)


def with_task_runner(flow: Flow, cfg: EngineConfig | OrchestrationConfig) -> Flow:
    """A copy of `flow` that runs its tasks on the configured runner."""
    return flow.with_options(task_runner=make_task_runner(cfg))


# --------------------------------------------------------------------------- GPU slots
_local_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_local_slots_lock = threading.Lock()
_ensured_limits: set[tuple[str, int]] = set()


def _local_slot(name: str, limit: int) -> threading.BoundedSemaphore:
    with _local_slots_lock:
        return _local_slots.setdefault((name, limit), threading.BoundedSemaphore(limit))


def ensure_gpu_limit(name: str, limit: int) -> None:
    """Create (or resize) the Prefect global concurrency limit `name` on the current API."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with _local_slots_lock:  # one creator per process; other processes may race us: that is fine
        if (name, limit) in _ensured_limits:
            return
        with get_client(sync_client=True) as client:
            try:
                client.upsert_global_concurrency_limit_by_name(name, limit)
            except ObjectAlreadyExists:  # another worker created it between our read and create
                client.upsert_global_concurrency_limit_by_name(name, limit)
        _ensured_limits.add((name, limit))


def in_prefect_run() -> bool:
    """This code runs inside a Prefect flow or task run."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def prefect_api_available() -> bool:
    """A Prefect API is configured, or this code runs inside a flow or task run (whose API we share).
    Otherwise any Prefect API call (a slot, an event, an artifact) makes Prefect start a temporary server of its
    own that outlives a killed process and keeps its output pipes open, so work outside Prefect
    (`--engine local`, tests) must not call it."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url) or in_prefect_run()


@contextmanager
def gpu_slot(cfg: EngineConfig | OrchestrationConfig | None = None, *, timeout_seconds: float | None = None
             ) -> Iterator[str]:
    """Hold one GPU slot while the body runs: a Prefect global concurrency limit shared by every worker
    of the deployment (`orchestration.gpu_limit_name`, `gpu_concurrency_limit` slots), created when missing.

    Where no Prefect server can hold the limit (no API, an API without global concurrency limits), fall
    back to a slot local to this process and log a warning once: one GPU stage at a time per process.
    Yields "prefect" or "local", saying which kind of slot is held. A `timeout_seconds` that passes
    while waiting for a Prefect slot raises TimeoutError.
    """
    oc = _orchestration(cfg) if cfg is not None else OrchestrationConfig()
    name, limit = oc.gpu_limit_name, oc.gpu_concurrency_limit
    stack = ExitStack()
    try:
        if not prefect_api_available():
            raise RuntimeError("no Prefect API configured and not inside a flow run")
        from prefect.concurrency.sync import concurrency

        ensure_gpu_limit(name, limit)
        stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True))
        kind = "prefect"
    except TimeoutError:
        raise
    except Exception as exc:  # no server, or one that does not support the limit
        _warn_once(name, exc)
        stack.enter_context(_local_slot(name, limit))
        kind = "local"
    with stack:
        yield kind


_warned: set[str] = set()


def _warn_once(name: str, exc: BaseException) -> None:
    if name not in _warned:
        _warned.add(name)
        log.warning("GPU concurrency limit %r is not available from the Prefect API (%s: %s); GPU stages "
                    "are limited per process only", name, type(exc).__name__, exc)
