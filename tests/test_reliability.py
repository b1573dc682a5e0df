"""Reliability: a crash loses nothing and duplicates nothing; two runs at once end consistent; the same
on S3 (moto on loopback). Store faults are in test_store_faults.py, hostile inputs in test_hostile.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.data_engine import data_engine_flow
from storage import Store

from tests.fixtures import demo_config

HERE = Path(__file__).parent
STORE_STAGES = ("images", "parsed", "models/baseline", "generated", "regions", "embeddings", "clean", "models/ram",
                "evaluate")
POINTS = ("before-part", "mid-file", "mid-part", "before-manifest")
# The default run kills one store once in every stage, covering every kill point (in loop order: each kill
# is in a later stage than the one before); the full matrix, each case from a fresh store, is `slow`.
DEFAULT_CASES = [("images", "mid-file"), ("parsed", "mid-part"), ("models/baseline", "before-part"),
                 ("generated", "mid-part"), ("regions", "mid-file"), ("embeddings", "before-manifest"),
                 ("clean", "mid-part"), ("models/ram", "before-manifest"), ("evaluate", "before-part")]
FULL_CASES = [(s, p) for s in STORE_STAGES for p in POINTS if (s, p) not in DEFAULT_CASES]


def hashes(store: Store) -> dict[str, list]:
    out = {}
    for stage in STORE_STAGES + ("labels",):
        versions = store.versions(stage)
        assert len(versions) <= 1, f"{stage} has {len(versions)} versions"
        if versions:
            out[stage] = (versions[0].id, sorted((f["path"], f["sha256"]) for f in versions[0].files()))
    return out


def leftovers(store: Store) -> list[str]:
    found = []
    for path in store.fs.find(store.root):
        rel = path[len(store.root) + 1:]
        if rel.startswith(("_tmp/", "_leases/")) or "/_progress/" in rel or "/_claims/" in rel:
            found.append(rel)
    return found


@pytest.fixture(scope="module")
def reference(demo_loop_session):
    """The session's uninterrupted loop: the bytes every interrupted-and-rerun run must reproduce."""
    return hashes(demo_loop_session.store)


def run_child(cfg, stage: str, point: str, cache: Path, **env_extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), RAM_ENGINE_CACHE=str(cache), RAM_ENGINE_THREADS="1",
               **env_extra)
    return subprocess.Popen([sys.executable, str(HERE / "crash_proc.py"), cfg.model_dump_json(), stage, point],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_child(cfg, stage: str, point: str, cache: Path) -> None:
    """A loop in a child process that SIGKILLs itself at `point` of `stage`; no partial version is visible."""
    proc = run_child(cfg, stage, point, cache)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, f"the child was to die at {stage}/{point}: rc {proc.returncode}\n{err[-3000:]}"
    store = Store(cfg.store.url, **cfg.store.storage_options)
    assert store.versions(stage) == [], f"a partial version is visible after a kill at {stage}/{point}"


def rerun(cfg, cache: Path, monkeypatch) -> Store:
    monkeypatch.setenv("RAM_ENGINE_CACHE", str(cache))
    monkeypatch.setenv("RAM_ENGINE_THREADS", "1")
    data_engine_flow.fn(cfg)
    return Store(cfg.store.url, **cfg.store.storage_options)


def crash_and_rerun(demo, store_url, options, stage, point, tmp_path, monkeypatch):
    cfg = demo_config(demo, store_url, options)
    kill_child(cfg, stage, point, tmp_path / "cache")
    return rerun(cfg, tmp_path / "cache", monkeypatch)


def test_sigkill_in_every_stage_then_rerun_is_byte_identical(demo_world, reference, tmp_path, monkeypatch):
    """One store, killed once inside every stage, each time at another point (DEFAULT_CASES, in loop
    order): each run resumes what the killed one left and dies in the next stage; the last rerun ends
    with the bytes of an uninterrupted run and no leftovers. Each kill from a fresh store is `slow`."""
    cfg = demo_config(demo_world, str(tmp_path / "store"))
    store = Store(cfg.store.url)
    for i, (stage, point) in enumerate(DEFAULT_CASES):
        kill_child(cfg, stage, point, tmp_path / "cache")
        assert all(len(store.versions(done)) == 1 for done, _ in DEFAULT_CASES[:i]), \
            f"the run killed at {stage}/{point} did not commit the stages before it"
    store = rerun(cfg, tmp_path / "cache", monkeypatch)
    assert hashes(store) == reference
    assert leftovers(store) == []


@pytest.mark.slow
@pytest.mark.parametrize("stage,point", DEFAULT_CASES + FULL_CASES)
def test_sigkill_matrix(demo_world, reference, stage, point, tmp_path, monkeypatch):
    """Every (stage, kill point), each from a fresh store."""
    store = crash_and_rerun(demo_world, str(tmp_path / "store"), None, stage, point, tmp_path, monkeypatch)
    assert hashes(store) == reference
    assert leftovers(store) == []


def run_concurrently(cfg, cache: Path) -> list[dict]:
    procs = [run_child(cfg, "none", "none", cache) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def check_consistent(store: Store, reference) -> None:
    assert hashes(store) == reference  # one version per stage, the same bytes as a lone run
    for stage in STORE_STAGES + ("labels",):
        for version in store.versions(stage):
            assert version.verify() == [], f"{version.ref} does not match its manifest"
    for stage in STORE_STAGES:
        assert store.get_ref(stage, "latest") == store.open(stage).id
    assert leftovers(store) == []


def inside(store: Store, stage: str) -> bool:
    """Whether a run is inside `stage`: a part recorded or an in-part checkpoint made, nothing committed."""
    pattern = [f"{store.root}/{stage}/*/_parts/*.json", f"{store.root}/{stage}/*/_progress/*/*.checkpoint.json"]
    return not store.versions(stage) and any(store.fs.glob(p) for p in pattern)


def run_staggered(cfg, stage: str, cache: Path, pause_s: float = 6.0) -> list[dict]:
    """The second loop starts while the first is inside `stage` (it pauses there after every part and
    in-part checkpoint): the second finds half-made parts and in-part checkpoints of a live writer."""
    import time

    store = Store(cfg.store.url, **cfg.store.storage_options)
    # The pause outlasts the second run's start-up, so that it reaches `stage` while the first is inside.
    first = run_child(cfg, stage, "slow", cache, RAM_TEST_PAUSE_S=str(pause_s))
    deadline = time.monotonic() + 900
    while not inside(store, stage) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the first run ended before it was inside {stage}: {first.stderr.read()[-3000:]}"
    second = run_child(cfg, "none", "none", cache)
    outs = []
    for p in (first, second):
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_a_loop_started_while_another_grounds_adopts_its_parts(demo_world, reference, tmp_path):
    """Issue 12: the second run must not rebuild a ground part from the first run's in-part checkpoints
    and overwrite the committed files: it waits for the part, adopts it, and every version verifies."""
    cfg = demo_config(demo_world, str(tmp_path / "store"))
    a, b = run_staggered(cfg, "regions", tmp_path / "cache")
    assert a == b
    check_consistent(Store(cfg.store.url), reference)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["images", "generated", "clean"])
def test_loops_started_at_every_stage_of_another_stay_consistent(demo_world, reference, stage, tmp_path):
    cfg = demo_config(demo_world, str(tmp_path / "store"))
    a, b = run_staggered(cfg, stage, tmp_path / "cache")
    assert a == b
    check_consistent(Store(cfg.store.url), reference)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(2))
def test_two_loops_at_once_end_with_one_consistent_set(demo_world, reference, round_, tmp_path):
    """Both loops started together, repeated (the default run has the staggered case above)."""
    cfg = demo_config(demo_world, str(tmp_path / "store"))
    a, b = run_concurrently(cfg, tmp_path / "cache")
    assert a == b
    check_consistent(Store(cfg.store.url), reference)


@pytest.mark.s3
def test_s3_crash_then_rerun_and_concurrent_loops(demo_world, reference, s3_store_url, tmp_path, monkeypatch):
    url, options = s3_store_url
    store = crash_and_rerun(demo_world, url + "/crash", options, "generated", "mid-part", tmp_path, monkeypatch)
    assert hashes(store) == reference and leftovers(store) == []
    cfg = demo_config(demo_world, url + "/race", options)
    a, b = run_concurrently(cfg, tmp_path / "cache2")
    assert a == b
    assert hashes(Store(cfg.store.url, **options)) == reference
