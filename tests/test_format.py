"""The bytes the store writes are part of what a version is: `storage.FORMAT_VERSION` is in every version id, and
no stage's code identity covers `storage/` (tests/test_identity.py). These golden digests are what keeps that
honest: a change to `storage/` that changes written bytes (Parquet settings, the schema's metadata, the tar
layout, the rejects table) fails here until FORMAT_VERSION moves and the digests below are recorded again; any
other edit to `storage/` recomputes nothing.

Parquet files are compared with pyarrow's `created_by` string taken out (it names pyarrow's version, not our
format): an upgrade of pyarrow that writes the same data pages keeps the digest.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from storage import Store
from storage.schemas import REGIONS

# FORMAT_VERSION -> the digests of the part below, by file kind. Record a new entry when the format moves.
GOLDEN = {
    1: {"table": "8e655e4ba8a42bef6c5be2ba825f44e4a4cfa2cafc042e4ea153ffeccd3c8444",
        "rejects": "8f8a62f9d239090efc626774762b41bd7397cae82a566cdebff4e4ddbbb54a5b",
        "shard": "c7db81d07230a6de95c700809eee4abd19718d03ab90816ed9913797426a899c"},
}


def _part(tmp_path):
    store = Store(str(tmp_path / "store"))
    writer = store.begin("regions", code_version="golden", config={"golden": 1})
    table = pa.table({"key": ["k0", "k1", "k1"], "tag_id": [3, 7, 8], "tag": ["cat", "red", "ball"],
                      "box": [[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4], None], "score": [0.9, 0.5, None],
                      "crop_key": ["k0_3_0", "k1_7_0", "k1_8_0"], "shard": ["shards/p.tar"] * 3}).cast(REGIONS)
    samples = [{"__key__": ck, "jpg": bytes(range(i, i + 40))} for i, ck in enumerate(table["crop_key"].to_pylist())]
    rejects = [{"key": "k2", "reason": "unreadable", "detail": "bad bytes at 12", "source": "p", "field": "image"}]
    record = writer.write_part("p", table=table, samples=samples, rejects=rejects, rows_in=4, source_digest="s")
    return store, record


def format_digest(data: bytes, kind: str) -> str:
    if kind != "shard":   # Parquet: pyarrow's version string out
        created_by = pq.ParquetFile(pa.BufferReader(data)).metadata.created_by.encode()
        data = data.replace(created_by, b"")
    return hashlib.sha256(data).hexdigest()


def test_written_bytes_are_the_format_version_s(tmp_path):
    store, record = _part(tmp_path)
    got = {f["kind"]: format_digest(store.fs.cat_file(store.abs(f["path"])), f["kind"]) for f in record.files}
    want = GOLDEN.get(storage.FORMAT_VERSION)
    assert want is not None, f"storage.FORMAT_VERSION {storage.FORMAT_VERSION} has no golden digests: record {got}"
    assert got == want, (
        f"the store writes other bytes than FORMAT_VERSION {storage.FORMAT_VERSION} promises: {got} != {want}. "
        "If the change is meant, move storage.store.FORMAT_VERSION (every version id moves with it, so no "
        "version of the old format is handed out as one of the new) and record these digests under it.")


def test_the_golden_check_sees_a_change_of_bytes(tmp_path, monkeypatch):
    """The check is not blind: writing Parquet with another compression changes the digest."""
    import storage.store as store_module

    store, record = _part(tmp_path)
    table = next(f for f in record.files if f["kind"] == "table")
    before = format_digest(store.fs.cat_file(store.abs(table["path"])), "table")
    real = pq.ParquetWriter

    class Snappy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **(k | {"compression": "snappy"}))

    monkeypatch.setattr(store_module.pq, "ParquetWriter", Snappy)
    store2, record2 = _part(tmp_path / "again")
    table2 = next(f for f in record2.files if f["kind"] == "table")
    assert format_digest(store2.fs.cat_file(store2.abs(table2["path"])), "table") != before


@pytest.mark.parametrize("kind", ["table", "rejects", "shard"])
def test_golden_digests_are_recorded_for_every_file_kind(kind):
    assert kind in GOLDEN[storage.FORMAT_VERSION]
