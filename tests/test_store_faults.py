"""Store faults: transient faults are retried and the run succeeds with the same bytes; persistent
faults stop the stage with a clear error, nothing committed and nothing corrupt."""
from __future__ import annotations

import pytest

from storage import Store
from tasks.config import IngestConfig
from tasks.ingest import ingest
from tasks.stage import StageError
from tests import faults
from tests.fixtures import image_bytes, write_folder_source


@pytest.fixture
def source(tmp_path):
    items = {f"img{i:03d}.jpg": (image_bytes(color=(i * 9, 40, 0)), f"a thing number {i}") for i in range(24)}
    return write_folder_source(tmp_path / "src", items)


def hashes(version):
    return sorted((f["path"], f["sha256"]) for f in version.files())


def reference(tmp_path, source):
    return ingest(Store(str(tmp_path / "ref")), IngestConfig(part_size=6), source=str(source)).version


@pytest.mark.parametrize("plan", [
    dict(fail_writes=3), dict(fail_renames=3), dict(fail_reads=2, path_filter="_manifest"),
], ids=["writes", "renames", "manifest-reads"])
def test_transient_faults_are_retried(tmp_path, source, plan, monkeypatch):
    monkeypatch.setattr("storage.fs.time.sleep", lambda s: None)
    want = reference(tmp_path, source)
    injected = faults.install(faults.FaultPlan(**plan))
    store = Store(f"faulty://{tmp_path / 'store'}")
    got = ingest(store, IngestConfig(part_size=6), source=str(source)).version
    assert injected.injected, "the plan injected no fault"
    assert got.id == want.id and hashes(got) == hashes(want)
    assert got.verify() == []


def test_transient_read_faults_are_retried(tmp_path, source, monkeypatch):
    monkeypatch.setattr("storage.fs.time.sleep", lambda s: None)
    faults.install(faults.FaultPlan())
    store = Store(f"faulty://{tmp_path / 'store'}")
    want = ingest(store, IngestConfig(part_size=6), source=str(source)).version.read_table()
    injected = faults.install(faults.FaultPlan(fail_reads=3, path_filter=".parquet"))
    fresh = Store(f"faulty://{tmp_path / 'store'}")
    assert fresh.open("images", "latest").read_table().equals(want)
    assert len(injected.injected) == 3
    injected = faults.install(faults.FaultPlan(fail_reads=2, path_filter="_refs"))
    assert fresh.open("images", "latest").id and len(injected.injected) == 2


def test_full_disk_stops_with_a_clear_error_and_commits_nothing(tmp_path, source):
    faults.install(faults.FaultPlan(disk_full_after_bytes=20_000))
    store = Store(f"faulty://{tmp_path / 'store'}")
    with pytest.raises(StageError, match="No space left") as info:
        ingest(store, IngestConfig(part_size=6), source=str(source))
    assert "Nothing was committed" in str(info.value)
    assert store.versions("images") == []
    # After space is freed, the rerun resumes and commits the same bytes as a clean run.
    faults.install(faults.FaultPlan())
    got = ingest(store, IngestConfig(part_size=6), source=str(source))
    assert hashes(got.version) == hashes(reference(tmp_path, source))
    assert not list((tmp_path / "store" / "_tmp").rglob("*"))


def test_persistent_write_failure_stops_the_stage(tmp_path, source, monkeypatch):
    monkeypatch.setattr("storage.fs.time.sleep", lambda s: None)
    faults.install(faults.FaultPlan(fail_writes=10_000))
    store = Store(f"faulty://{tmp_path / 'store'}")
    with pytest.raises(StageError, match="failed"):
        ingest(store, IngestConfig(part_size=6), source=str(source))
    faults.install(faults.FaultPlan())
    assert store.versions("images") == []
