"""What an increment costs in store requests: adding one part to a version of N parts must not list or `info`
a folder once per part (that was O(parts²): 4 million fsspec `info` calls at 1,000 parts, issue #23).

No timings: the tests count the calls a filesystem receives (local: fsspec calls; S3: the requests s3fs sends)
and compare an increment over N parts with one over 2N parts. `benchmarks/scale.py` measures the seconds."""
from __future__ import annotations

import collections
import dataclasses
import functools

import pyarrow as pa
import pytest

from storage import Store
from tasks.engine.runner import PartTask, run_stage

SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("n", pa.int32())])
FS_CALLS = ("ls", "info", "exists", "isdir", "isfile", "size", "open", "cat_file", "find", "glob", "copy", "makedirs")


def _process(writer, task):
    i = task.payload
    table = pa.table({"key": [f"k{i:05d}-{j}" for j in range(3)], "n": [i] * 3}, schema=SCHEMA)
    return writer.write_part(task.name, table=table, samples=[{"__key__": f"k{i:05d}-0", "txt": "x"}], rows_in=3,
                             source_digest=task.source_digest)


def _version(store: Store, n: int, tag: str):
    tasks = [PartTask(f"part-{i:05d}", f"src-{i}", i) for i in range(n)]
    writer = store.begin("count", code_version="t", config={}, input_digest=f"{tag}-{n}", schema=SCHEMA)
    return run_stage(writer, tasks, _process)


@pytest.fixture
def counted(monkeypatch):
    """count(store) -> a Counter of the calls (local) or requests (S3) the store's filesystem gets from now on
    (fsspec shares one filesystem object between stores: each call of count starts the one counter again)."""
    seen: collections.Counter = collections.Counter()
    patched: set[int] = set()

    def count(store: Store) -> collections.Counter:
        seen.clear()
        fs = store.fs
        if "s3" not in fs.protocol:   # a local store lists a folder with os.scandir: counted as one `ls`
            def list_sizes(folder, _fn=store.list_sizes):
                seen["ls"] += 1
                return _fn(folder)

            monkeypatch.setattr(store, "list_sizes", list_sizes)
        if id(fs) in patched:
            return seen
        patched.add(id(fs))
        if "s3" in fs.protocol:
            call = fs._call_s3

            async def call_s3(method, *args, **kwargs):
                seen[getattr(method, "__name__", method)] += 1
                return await call(method, *args, **kwargs)

            monkeypatch.setattr(fs, "_call_s3", call_s3)
            return seen
        depth = [0]
        for name in FS_CALLS:
            def wrapped(*args, _name=name, _fn=getattr(fs, name), **kwargs):
                seen[_name] += depth[0] == 0   # the store's calls, not those a listing makes inside (an info per entry)
                depth[0] += 1
                try:
                    return _fn(*args, **kwargs)
                finally:
                    depth[0] -= 1

            monkeypatch.setattr(fs, name, functools.wraps(getattr(fs, name))(wrapped))
        return seen

    return count


def _increment_calls(store_at, counted, n: int) -> collections.Counter:
    store = store_at(n)
    _version(store, n, "first")
    calls = counted(store)
    result = _version(store, n + 1, "more")
    calls = collections.Counter(calls)
    assert (result.parts_reused, result.parts_written) == (n, 1)
    assert result.version.read_table().num_rows == 3 * (n + 1)
    return calls


def test_an_increment_lists_each_folder_once_whatever_the_parts(any_store, counted):
    base = any_store.url

    def store_at(n: int) -> Store:
        return Store(f"{base}/n{n}", **any_store.storage_options)

    small, large = (_increment_calls(store_at, counted, n) for n in (6, 12))
    if "s3" in any_store.fs.protocol:
        # Requests that read or list: the same for 6 and 12 earlier parts. Copies: one per reused file (a version
        # folder holds every file of its version), sent together; each asks for its source's size (head_object).
        reads = ("list_objects_v2", "get_object")
        assert {m: small[m] for m in reads} == {m: large[m] for m in reads}, (small, large)
        assert large["copy_object"] - small["copy_object"] == 2 * 6, (small, large)   # (+1: the ref, moved into place)
        assert large["head_object"] - small["head_object"] <= 2 * 6, (small, large)
    else:
        # Local links are os.link calls: the filesystem calls do not depend on the number of parts at all.
        assert small == large, (small, large)


def _resume_calls(store: Store, counted, finished: int) -> collections.Counter:
    tasks = [PartTask(f"part-{i:05d}", f"src-{i}", i) for i in range(finished + 2)]
    writer = store.begin("count", code_version="t", config={"finished": finished}, schema=SCHEMA)
    for task in tasks[:finished]:
        _process(writer, task)
    writer.close()
    calls = counted(store)
    again = store.begin("count", code_version="t", config={"finished": finished}, schema=SCHEMA)
    result = run_stage(again, tasks, _process)
    assert (result.parts_resumed, result.parts_written) == (finished, 2)
    return collections.Counter(calls)


def test_resuming_checks_each_finished_part_without_listing_its_folder(any_store, counted):
    small, large = (_resume_calls(Store(f"{any_store.url}/n{n}", **any_store.storage_options), counted, n)
                    for n in (4, 8))
    # each finished part is read once to check its sha256 (open / get_object); the folders are listed as often
    listing = "list_objects_v2" if "s3" in any_store.fs.protocol else "ls"
    assert small[listing] == large[listing], (small, large)


def test_check_files_reads_what_it_checks(tmp_path, counted):
    store = Store(str(tmp_path / "store"))
    version = _version(store, 10, "x").version
    one_part = version.parts[3].files
    calls = counted(store)
    assert store.check_files(one_part) == []
    assert calls["ls"] == 0 and calls["info"] == len(one_part)   # one part: its files, not its folders
    calls.clear()
    assert store.check_files(version.files()) == []
    assert calls["ls"] == 2 and calls["info"] == 0                # a whole version: one listing per folder
    calls.clear()
    assert version.verify() == []
    assert calls["ls"] == 0 and calls["open"] == len(version.files())   # each file read once, no listing


def test_which_parts_hold_keys_reads_only_the_parts_whose_key_range_holds_them(tmp_path, counted):
    # What ingest needs to keep keys unique without holding every key of the store in memory (docs/scale.md).
    store = Store(str(tmp_path / "store"))
    version = _version(store, 10, "x").version
    assert [p.key_range for p in version.parts[:2]] == [["k00000-0", "k00000-2"], ["k00001-0", "k00001-2"]]
    assert Store.overlapping_key_ranges(version.parts) == set()
    calls = counted(store)
    found = store.rows_with_keys(version.parts, ["k00003-1", "k00007-2", "k00007-9", "zzz"],
                                 {"table": ["n"], "rejects": ["reason"]})
    assert found["table"].to_pylist() == [{"key": "k00003-1", "n": 3, "part": "part-00003"},
                                          {"key": "k00007-2", "n": 7, "part": "part-00007"}]
    assert found["rejects"].num_rows == 0
    assert calls["open"] == 2   # the two parts whose range holds a wanted key; not the other eight

    stray = _process(store.begin("count", code_version="t", config={"stray": 1}, schema=SCHEMA),
                     PartTask("stray", "s", 5))   # keys k00005-0..2: inside part 5's range
    old = dataclasses.replace(version.parts[0], key_range=None)   # written before key ranges were kept
    assert Store.overlapping_key_ranges([*version.parts[1:], stray, old]) == {"part-00005", "stray", "part-00000"}
