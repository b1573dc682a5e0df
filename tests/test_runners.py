"""Task runners from config: Dask processes and threads give the same version; GPU slots; per-worker cache."""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from prefect import flow, task

from flows.runners import RunnerConfigError, gpu_slot, make_task_runner, release_cached_models, with_task_runner
from tasks.engine.cache import clear_worker_cache, worker_cached
from tasks.engine.config import ConfigError, EngineConfig, load_config

from tests.fixtures import image_bytes, write_folder_source


@pytest.fixture(scope="module")
def dask_cluster():
    """One LocalCluster of 2 single-threaded worker processes for the module (what
    `orchestration.task_runner=dask` starts when no address is set), reached through `dask_address`."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def generated_source(root: Path, n: int = 24) -> Path:
    items = {f"img{i:03d}.jpg": (image_bytes(size=(32 + i, 24 + i % 7), color=(i * 9 % 256, 40, 200 - i)),
                                 f"picture number {i} of a small coloured square") for i in range(n)}
    items["broken.jpg"] = (b"not an image", "a broken one")
    return write_folder_source(root, items)


def manifest_files(version) -> list[tuple[str, str, int]]:
    return sorted((f["path"], f["sha256"], f["rows"]) for f in version.manifest["files"])


def test_dask_processes_and_threads_write_the_same_version(prefect_api, dask_cluster, tmp_path):
    from flows.ingest import ingest_flow

    src = generated_source(tmp_path / "src")
    common = [f"ingest.source={src}", "ingest.part_size=4", "orchestration.max_workers=2"]
    cfg_threads = load_config(None, common + [f"store.url={tmp_path / 'threads'}"])
    cfg_dask = load_config(None, common + [f"store.url={tmp_path / 'dask'}", "orchestration.task_runner=dask",
                                           f"orchestration.dask_address={dask_cluster}"])

    t0 = time.perf_counter()
    threads = with_task_runner(ingest_flow, cfg_threads)(cfg_threads)
    t1 = time.perf_counter()
    dask = with_task_runner(ingest_flow, cfg_dask)(cfg_dask)
    t2 = time.perf_counter()
    print(f"threads {t1 - t0:.1f}s, dask LocalCluster(2 processes) {t2 - t1:.1f}s")

    assert threads.parts_written > 2, "the source must span several parts for the runners to matter"
    assert dask.parts_written == threads.parts_written
    assert dask.version.id == threads.version.id
    assert manifest_files(dask.version) == manifest_files(threads.version)
    m = dask.version.manifest
    assert m["rows_out"] == 24 and m["rows_rejected"] == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is None,
                    reason="prefect-ray is the optional extra: pip install 'ram-data-engine[ray]'")
def test_ray_writes_the_same_version_as_threads(prefect_api, tmp_path):
    """Only where the optional `ray` extra is installed (a local Ray starts in ~10 s)."""
    from flows.ingest import ingest_flow

    src = generated_source(tmp_path / "src", n=9)
    common = [f"ingest.source={src}", "ingest.part_size=3", "orchestration.max_workers=2"]
    results = {}
    for runner in ("threads", "ray"):
        cfg = load_config(None, common + [f"store.url={tmp_path / runner}", f"orchestration.task_runner={runner}"])
        results[runner] = with_task_runner(ingest_flow, cfg)(cfg)
    assert results["ray"].parts_written == results["threads"].parts_written > 1
    assert results["ray"].version.id == results["threads"].version.id
    assert manifest_files(results["ray"].version) == manifest_files(results["threads"].version)


def test_runner_choice_from_config():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = make_task_runner(EngineConfig())
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == (os.cpu_count() or 1)
    local = make_task_runner(load_config(None, ["orchestration.task_runner=dask", "orchestration.max_workers=3"]))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1
    assert local.cluster_kwargs["processes"] is True
    remote = make_task_runner(load_config(None, ["orchestration.task_runner=dask",
                                                 "orchestration.dask_address=tcp://10.0.0.5:8786"]))
    assert remote.address == "tcp://10.0.0.5:8786"


def test_ray_without_prefect_ray_names_the_extra():
    try:
        import prefect_ray  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("prefect-ray is installed here; the missing-extra message cannot be observed")
    with pytest.raises(RunnerConfigError, match=r"pip install 'ram-data-engine\[ray\]'"):
        make_task_runner(load_config(None, ["orchestration.task_runner=ray"]))


def test_unknown_runner_is_a_config_error():
    with pytest.raises(ConfigError, match="orchestration.task_runner"):
        load_config(None, ["orchestration.task_runner=spark"])


# --------------------------------------------------------------------------- per-worker cache
def _load_model(log: str):
    # Record which process built the "model"; slow enough that concurrent callers overlap.
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.2)
    return {"pid": os.getpid(), "weights": list(range(10))}


@task
def use_model(i: int, log: str) -> tuple[int, int]:
    model = worker_cached(("tiny-model", log), lambda: _load_model(log))
    return os.getpid(), id(model)


@flow
def many_parts(n: int, log: str) -> list[tuple[int, int]]:
    futures = [use_model.submit(i, log) for i in range(n)]
    return [f.result() for f in futures]


def test_worker_cache_loads_once_per_thread_pool_process(prefect_api, tmp_path):
    cfg = load_config(None, ["orchestration.max_workers=4"])
    results = with_task_runner(many_parts, cfg)(12, str(tmp_path / "factory.log"))
    assert len(results) == 12
    assert {pid for pid, _ in results} == {os.getpid()}
    assert len({obj for _, obj in results}) == 1
    assert (tmp_path / "factory.log").read_text().split() == [str(os.getpid())]


def test_worker_cache_loads_once_per_dask_worker_process(prefect_api, dask_cluster, tmp_path):
    log = str(tmp_path / "factory.log")
    cfg = load_config(None, ["orchestration.task_runner=dask", f"orchestration.dask_address={dask_cluster}"])
    results = with_task_runner(many_parts, cfg)(16, log)
    pids = [pid for pid, _ in results]
    assert os.getpid() not in pids, "tasks must run in the Dask worker processes"
    built = Path(log).read_text().split()
    assert sorted(built) == sorted({str(p) for p in pids}), "one factory call per worker process that ran tasks"
    assert len(set(built)) == len(built)
    assert len({obj for pid, obj in results if pid == pids[0]}) == 1


def cached_objects() -> int:
    """How many objects this process caches (run on each Dask worker: it imports the cache there, so no copy of
    this process's cache travels with it)."""
    from tasks.engine.cache import _cache

    return len(_cache)


def test_cached_models_are_released_in_every_dask_worker_before_training(prefect_api, dask_cluster, tmp_path, caplog, monkeypatch):
    """The workers' cached models (loaded by part tasks) are dropped in every worker process, and in this one."""
    from distributed import Client

    from tasks.engine.cache import _cache

    cfg = load_config(None, ["orchestration.task_runner=dask", f"orchestration.dask_address={dask_cluster}"])
    with_task_runner(many_parts, cfg)(8, str(tmp_path / "factory.log"))
    worker_cached("in-this-process", lambda: object())
    with Client(dask_cluster, set_as_default=False) as client:
        before = client.run(cached_objects)
        assert sum(before.values()) >= 1, before
        release_cached_models(cfg)
        assert set(client.run(cached_objects).values()) == {0}
    assert not _cache
    # a cluster gone away (the connection refused at once, not after the 30 s a real attempt waits): a
    # warning naming it, and training goes on
    def refused(address, **kw):
        raise OSError(f"Timed out trying to connect to {address}")

    monkeypatch.setattr("distributed.Client", refused)
    gone = load_config(None, ["orchestration.task_runner=dask", "orchestration.dask_address=tcp://127.0.0.1:9"])
    with caplog.at_level(logging.WARNING, logger="ram_engine"):
        release_cached_models(gone)
    assert "could not release the cached models of the Dask workers at tcp://127.0.0.1:9" in caplog.text


def test_worker_cache_retries_a_failed_factory():
    clear_worker_cache()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("weights not there yet")
        return "model"

    with pytest.raises(OSError):
        worker_cached("flaky", flaky)
    assert worker_cached("flaky", flaky) == "model" and worker_cached("flaky", flaky) == "model"
    assert len(calls) == 2


def test_worker_cache_is_thread_safe():
    clear_worker_cache()
    calls = []

    def slow():
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return object()

    got = []
    threads = [threading.Thread(target=lambda: got.append(worker_cached("k", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(g) for g in got}) == 1


# --------------------------------------------------------------------------- GPU slots
def test_gpu_slot_uses_a_prefect_limit_and_serialises(prefect_api):
    from prefect.client.orchestration import get_client

    cfg = load_config(None, ["orchestration.gpu_limit_name=ram-gpu-test", "orchestration.gpu_concurrency_limit=1"])
    inside, overlaps, kinds = [0], [], []
    lock = threading.Lock()

    def stage():
        with gpu_slot(cfg, timeout_seconds=30) as kind:
            with lock:
                inside[0] += 1
                overlaps.append(inside[0])
                kinds.append(kind)
            time.sleep(0.3)
            with lock:
                inside[0] -= 1

    workers = [threading.Thread(target=stage) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert kinds == ["prefect"] * 3
    assert max(overlaps) == 1, "two GPU stages held the slot at once"
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("ram-gpu-test")
    assert limit.limit == 1 and limit.active_slots == 0


def test_gpu_slot_falls_back_without_a_server(monkeypatch, caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.runners as runners

    monkeypatch.setattr(runners, "_warned", set())
    with temporary_settings({PREFECT_API_URL: None}):  # no API, no flow run: never start a server for a slot
        with caplog.at_level("WARNING", logger="ram_engine"):
            with gpu_slot(load_config(None, ["orchestration.gpu_limit_name=ram-gpu-offline"])) as kind:
                assert kind == "local"
    assert "ram-gpu-offline" in caplog.text and "limited per process" in caplog.text
