"""Store faults, on a local folder and on S3: transient faults are retried and the run succeeds with
the same bytes; persistent faults stop the stage with a clear error, nothing committed, nothing corrupt."""
from __future__ import annotations

import pytest

from tasks.engine.config import IngestConfig
from tests.fixtures import ingest
from tasks.engine.runner import StageError
from tests import faults
from tests.fixtures import image_bytes, write_folder_source


@pytest.fixture
def source(tmp_path):
    items = {f"img{i:03d}.jpg": (image_bytes(color=(i * 9, 40, 0)), f"a thing number {i}") for i in range(24)}
    return write_folder_source(tmp_path / "src", items)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr("storage.fs.time.sleep", lambda s: None)


def hashes(version):
    return sorted((f["path"], f["sha256"]) for f in version.files())


def reference(tmp_path, source):
    from storage import Store

    return ingest(Store(str(tmp_path / "ref")), IngestConfig(part_size=6), source=str(source)).version


def tmp_leftovers(store) -> list[str]:
    try:
        return [p for p in store.fs.find(store.abs("_tmp"))]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("plan", [
    dict(fail_writes=3), dict(fail_renames=3), dict(fail_reads=2, path_filter="_manifest"),
], ids=["writes", "renames", "manifest-reads"])
def test_transient_faults_are_retried(any_store, tmp_path, source, plan):
    want = reference(tmp_path, source)
    injected = faults.inject(any_store, faults.FaultPlan(**plan))
    got = ingest(any_store, IngestConfig(part_size=6), source=str(source)).version
    assert injected.injected, "the plan injected no fault"
    assert got.id == want.id and hashes(got) == hashes(want)
    assert got.verify() == [] and tmp_leftovers(any_store) == []


def test_transient_read_faults_are_retried(any_store, source):
    want = ingest(any_store, IngestConfig(part_size=6), source=str(source)).version.read_table()
    injected = faults.inject(any_store, faults.FaultPlan(fail_reads=3, path_filter=".parquet"))
    assert any_store.open("images", "latest").read_table().equals(want)
    assert len(injected.injected) == 3
    injected = faults.inject(any_store, faults.FaultPlan(fail_reads=2, path_filter="_refs"))
    assert any_store.open("images", "latest").id and len(injected.injected) == 2


def test_full_disk_stops_with_a_clear_error_and_commits_nothing(any_store, tmp_path, source):
    faults.inject(any_store, faults.FaultPlan(disk_full_after_bytes=20_000))
    with pytest.raises(StageError, match="No space left") as info:
        ingest(any_store, IngestConfig(part_size=6), source=str(source))
    assert "Nothing was committed" in str(info.value)
    assert any_store.versions("images") == []
    # Once there is space again, the rerun resumes and commits the same bytes as a clean run.
    faults.inject(any_store, faults.FaultPlan())
    got = ingest(any_store, IngestConfig(part_size=6), source=str(source))
    assert hashes(got.version) == hashes(reference(tmp_path, source))
    assert tmp_leftovers(any_store) == []


def test_persistent_write_failure_stops_the_stage(any_store, source):
    faults.inject(any_store, faults.FaultPlan(fail_writes=10_000))
    with pytest.raises(StageError, match="failed"):
        ingest(any_store, IngestConfig(part_size=6), source=str(source))
    faults.inject(any_store, faults.FaultPlan())
    assert any_store.versions("images") == []
