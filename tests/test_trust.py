"""Trustworthy versions (issue 12): a committed file never changes, a stage never builds on a changed input,
a code change never reuses old outputs, a deleted version never breaks a newer one, writers' liveness works
on any host name and any number of hosts, damaged metadata is named and contained, no secrets on disk.
The whole loop raced by two processes is in test_reliability.py."""
from __future__ import annotations

import json
import os
import threading
import time

import pyarrow as pa
import pytest

from storage import Store, schemas
from storage.fs import CommittedFileConflict, Placement
from storage.leases import LEASE_DIR, WriterLease, lease_path, machine_identity, put_whole
from storage.store import CorruptFile, CorruptMetadata, StoreError
from tasks.engine.runner import PartTask, StageError, run_stage


def clean_table(i: int, n: int = 20) -> pa.Table:
    keys = [f"k{i:03d}_{j:04d}" for j in range(n)]
    return pa.Table.from_pydict({"key": keys, "tag_ids": [[j % 7, i] for j in range(n)],
                                 "removed_tag_ids": [[] for _ in keys], "removed_reasons": [[] for _ in keys]}
                                ).select(schemas.CLEAN.names).cast(schemas.CLEAN)


def make_version(store: Store, names=("a", "b"), digest_of=lambda n: f"src-{n}", config=None, rows=20):
    def process(w, task):
        samples = ({"__key__": f"s{task.name}_{j}", "png": bytes([j]) * 300} for j in range(rows))
        return w.write_part(task.name, table=clean_table(ord(task.name[0]), rows), samples=samples, rows_in=rows,
                            source_digest=task.source_digest)

    writer = store.begin("clean", code_version="t", config=config or {"n": len(names)}, parents=["generated/x"],
                         input_digest=",".join(names))
    return run_stage(writer, [PartTask(n, digest_of(n)) for n in names], process)


def hashes(version) -> list:
    return sorted((f["path"], f["bytes"], f["sha256"]) for f in version.files())


# ---------------------------------------------------------------- 1. committed files never change

def test_a_committed_file_is_never_overwritten(any_store):
    v = make_version(any_store).version
    before = hashes(v)
    rel = v.files("table")[0]["path"]
    placement = Placement(any_store.fs, any_store.root)
    try:
        with pytest.raises(CommittedFileConflict, match=rel):
            placement.put_bytes(rel, b"other bytes")
        placement.put_bytes(rel, any_store.fs.cat_file(any_store.abs(rel)))  # the same bytes: left alone
    finally:
        placement.cleanup()
    assert hashes(any_store.open("clean", v.id)) == before and v.verify() == []


def test_linking_a_reused_part_never_overwrites(any_store):
    """A reused part is linked straight to its final name (a server-side copy on S3): the same bytes already
    there are left alone, other bytes are refused and stay as they are."""
    v = make_version(any_store).version
    src = v.files("table")[0]
    placement = Placement(any_store.fs, any_store.root)
    try:
        placement.link_into_place(src["path"], "clean/other/parts/a.parquet", src["bytes"], src["sha256"])
        placement.link_into_place(src["path"], "clean/other/parts/a.parquet", src["bytes"], src["sha256"])
        placement.put_bytes("clean/other/parts/b.parquet", b"other bytes")
        with pytest.raises(CommittedFileConflict, match="clean/other/parts/b.parquet"):
            placement.link_into_place(src["path"], "clean/other/parts/b.parquet", src["bytes"], src["sha256"])
    finally:
        placement.cleanup()
    assert any_store.fs.cat_file(any_store.abs("clean/other/parts/b.parquet")) == b"other bytes"
    assert any_store.fs.cat_file(any_store.abs("clean/other/parts/a.parquet")) == \
        any_store.fs.cat_file(any_store.abs(src["path"]))
    assert v.verify() == []


def test_a_run_that_finds_a_part_finished_by_another_adopts_it(tmp_path):
    """The slower of two runs of one version makes a part with other bytes (e.g. from partial in-part
    checkpoints): the part the faster run recorded stands, byte for byte."""
    store = Store(str(tmp_path / "store"))
    first = store.begin("clean", code_version="t", config={"n": 1}, parents=["generated/x"])
    second = store.begin("clean", code_version="t", config={"n": 1}, parents=["generated/x"])
    made = first.write_part("a", table=clean_table(1, 90), rows_in=90, source_digest="s")
    again = second.write_part("a", table=clean_table(1, 20), rows_in=20, source_digest="s")
    assert again.files == made.files and again.rows_out == 90
    v = first.commit()
    assert second.commit().id == v.id and v.verify() == [] and v.manifest["rows_out"] == 90
    first.close(), second.close()


def test_claims_give_a_part_to_one_writer_the_other_waits_and_adopts(tmp_path):
    store = Store(str(tmp_path / "store"))
    a = store.begin("clean", code_version="t", config={}, parents=["generated/x"])
    b = store.begin("clean", code_version="t", config={}, parents=["generated/x"])
    seen = {}
    with a.claim("p") as finished_for_a:
        assert finished_for_a is None  # a makes the part

        def second():
            with b.claim("p", poll_s=0.05) as finished_for_b:
                seen["b"] = finished_for_b

        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive() and "b" not in seen  # b waits while a holds the claim
        record = a.write_part("p", table=clean_table(2), rows_in=20, source_digest="s")
    t.join(30)
    assert seen["b"] is not None and seen["b"].files == record.files  # b adopts a's part
    a.close(), b.close()


def test_a_dead_writers_claim_is_taken_over(tmp_path):
    store = Store(str(tmp_path / "store"))
    w = store.begin("clean", code_version="t", config={}, parents=["generated/x"])
    dead = "crashed-owner"
    put_whole(store.fs, lease_path(store.root, dead), json.dumps(
        machine_identity() | {"owner": dead, "pid": _dead_pid(), "start": "1", "expires": time.time() + 3600}).encode())
    put_whole(store.fs, store.abs(f"{w.prefix}/_claims/p/{dead}.json"), b'{"owner": "crashed-owner"}')
    with w.claim("p", poll_s=0.05) as finished:
        assert finished is None
    assert not store.fs.exists(store.abs(f"{w.prefix}/_claims/p/{dead}.json"))
    w.close()


def test_a_stage_stops_on_an_input_that_does_not_match_its_manifest(any_store):
    v = make_version(any_store).version
    shard, table = v.files("shard")[0]["path"], v.files("table")[1]["path"]
    data = any_store.fs.cat_file(any_store.abs(shard))
    any_store.fs.pipe_file(any_store.abs(shard), data[: len(data) // 4])  # truncated, as a rewrite would
    with pytest.raises(CorruptFile, match=shard):
        list(v.iter_part_samples(v.parts[0]))
    flipped = bytearray(any_store.fs.cat_file(any_store.abs(table)))
    flipped[len(flipped) // 2] ^= 1
    any_store.fs.pipe_file(any_store.abs(table), bytes(flipped))  # same size, other bytes
    with pytest.raises(CorruptFile, match=table):
        v.read_file(table)

    def process(w, task):
        rows = v.read_file(task.payload).num_rows
        return w.write_part(task.name, table=clean_table(0, rows), rows_in=rows, source_digest=task.source_digest)

    writer = any_store.begin("clean", code_version="t", config={"downstream": 1}, parents=[v])
    with pytest.raises(StageError, match=table):
        run_stage(writer, [PartTask("b", "d", table)], process)
    assert any_store.versions("clean") == [v]


# 2. code versions: tests/test_identity.py


# ---------------------------------------------------------------- 3. deleted versions

def test_a_deleted_version_never_breaks_a_newer_one(any_store):
    v1 = make_version(any_store, names=("a", "b"), config={"run": 1}).version
    # the same config, more input: parts a and b are linked from v1 into v2's folder, not recomputed
    v2 = make_version(any_store, names=("a", "b", "c"), config={"run": 1}).version
    assert v2.manifest["parts_reused"] == 2
    any_store.fs.rm(any_store.abs(f"clean/{v1.id}"), recursive=True)  # a user deletes the older version
    assert v2.verify() == []                    # v2's folder holds every file of v2: nothing of it was lost
    any_store.fs.rm(any_store.abs(v2.files("table")[0]["path"]))      # ... and then one of v2's files
    r3 = make_version(any_store, names=("a", "b", "c", "d"), config={"run": 1})
    assert r3.version.verify() == []  # nothing references the deleted files
    assert r3.parts_reused == 2 and r3.parts_written == 2  # b, c (from v2) reused; a made again, d new
    assert any_store.check_files(v2.files()) and not any_store.check_files(r3.version.files())


def test_delete_keeps_the_files_newer_versions_reuse(any_store):
    from typer.testing import CliRunner

    from flows.cli import app

    v1 = make_version(any_store, names=("a", "b"), config={"run": 1}).version
    v2 = make_version(any_store, names=("a", "c"), config={"run": 1}).version
    assert v2.manifest["parts_reused"] == 1  # part a is linked into v2's folder: v2 lists none of v1's files
    if any_store.url.startswith("s3://"):
        removed, kept = any_store.delete_version("clean", v1.id)
        assert (removed, kept) == (6, 0)  # a's and b's files, both part records; v2 keeps its own link of a
    else:
        result = CliRunner().invoke(app, ["--store", any_store.url, "delete", f"clean@{v1.id}"])
        assert result.exit_code == 0 and "6 files removed, 0 kept" in result.output
    assert [v.id for v in any_store.versions("clean")] == [v2.id]
    assert v2.verify() == [] and any_store.open("clean").id == v2.id
    r3 = make_version(any_store, names=("a", "b", "c"), config={"run": 1})
    assert r3.parts_reused == 2 and r3.version.verify() == []


def test_check_files_names_missing_and_resized_files(any_store):
    v = make_version(any_store).version
    table, shard = v.files("table")[0], v.files("shard")[1]
    any_store.fs.rm(any_store.abs(table["path"]))
    any_store.fs.pipe_file(any_store.abs(shard["path"]), b"x")
    problems = any_store.check_files(v.files())
    assert problems == [f"{table['path']}: missing", f"{shard['path']}: 1 bytes, manifest says {shard['bytes']}"]


# ---------------------------------------------------------------- 4. writers' identity

def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tmp_owners(store: Store) -> set[str]:
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.abs("_tmp"), detail=False)}
    except FileNotFoundError:
        return set()


def _foreign_writer(store: Store, owner: str, **lease) -> None:
    put_whole(store.fs, lease_path(store.root, owner), json.dumps({"owner": owner} | lease).encode())
    store.fs.makedirs(store.abs(f"_tmp/{owner}"), exist_ok=True)
    store.fs.pipe_file(store.abs(f"_tmp/{owner}/abc"), b"half a file")


def test_a_live_writer_on_a_host_named_with_dashes_keeps_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr("storage.leases.socket.gethostname", lambda: "ram-worker-1")
    store = Store(str(tmp_path / "store"))
    live = Placement(store.fs, store.root)
    with live.atomic_open("x/file.bin") as sink:  # mid-write: its temporary file exists
        sink.write(b"data")
        assert live.owner.startswith("ram-worker-1-")
        assert Placement(store.fs, store.root).remove_abandoned() == []
        assert live.owner in _tmp_owners(store)
    live.cleanup()
    assert _tmp_owners(store) == set() and not store.fs.exists(lease_path(store.root, live.owner))


def test_liveness_across_hosts_and_pid_namespaces(any_store, monkeypatch):
    import storage.leases as leases

    me = machine_identity()
    far = time.time() + 3600
    _foreign_writer(any_store, "other-host-live", host="ram-worker-2", boot="b", pidns="pid:[1]", pid=7,
                    expires=far)
    # renewed longer ago than its TTL by the store's clock (the store's clock is moved on below: S3 times
    # have one-second steps)
    _foreign_writer(any_store, "other-host-gone", host="ram-worker-2", boot="b", pidns="pid:[1]", pid=7,
                    expires=far, ttl=1)
    real_now = leases.store_now
    monkeypatch.setattr(leases, "store_now", lambda fs, root: real_now(fs, root) + 5)
    # a container with the same host name (another PID namespace): its pid means nothing here
    _foreign_writer(any_store, "same-name-container", host=me["host"], boot=me["boot"], pidns="pid:[4026531836x]",
                    pid=_dead_pid(), expires=far)
    # this machine, a process that died (SIGKILL): gone at once, lease time left or not
    _foreign_writer(any_store, "killed-here", **me, pid=_dead_pid(), start="1", expires=far)
    any_store.fs.makedirs(any_store.abs("_tmp/no-lease-at-all"), exist_ok=True)
    any_store.fs.pipe_file(any_store.abs("_tmp/no-lease-at-all/x"), b"x")
    removed = Placement(any_store.fs, any_store.root).remove_abandoned()
    assert set(removed) >= {"other-host-gone", "killed-here", "no-lease-at-all"}
    assert _tmp_owners(any_store) == {"other-host-live", "same-name-container"}
    leases = {p.rsplit("/", 1)[-1] for p in any_store.fs.ls(any_store.abs(LEASE_DIR), detail=False)}
    assert leases == {"other-host-live.json", "same-name-container.json"}


def test_a_lease_is_renewed_while_its_writer_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("RAM_ENGINE_LEASE_TTL_S", "0.3")
    store = Store(str(tmp_path / "store"))
    lease = WriterLease(store.fs, store.root, "w1")
    lease.start()
    try:
        first = json.loads(store.fs.cat_file(lease_path(store.root, "w1")))["expires"]
        deadline = time.monotonic() + 30
        while json.loads(store.fs.cat_file(lease_path(store.root, "w1")))["expires"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
    finally:
        lease.stop()
    assert not store.fs.exists(lease_path(store.root, "w1"))


def test_training_cache_is_per_store_and_its_lock_outlives_the_job(tmp_path, monkeypatch):
    from tasks.stages.train import _exclusive, train_work_dir

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    assert train_work_dir(a, "ram", "v1") != train_work_dir(b, "ram", "v1")
    work = train_work_dir(a, "ram", "v1")
    lock = work.with_name(work.name + ".lock")
    inside, events = [], []

    def trainer(name, hold):
        with _exclusive(lock):
            inside.append(name)
            events.append(("in", name, len(inside)))
            work.mkdir(parents=True, exist_ok=True)
            hold.wait(10)
            import shutil

            shutil.rmtree(work, ignore_errors=True)  # the finishing trainer removes the job folder
            inside.remove(name)

    holds = [threading.Event() for _ in range(3)]
    threads = [threading.Thread(target=trainer, args=(f"t{i}", holds[i])) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for h in holds:
        h.set()
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert [e[2] for e in events] == [1, 1, 1]  # never two trainers in one folder
    assert lock.exists()


# ---------------------------------------------------------------- 5. damaged metadata

DAMAGE = {
    "invalid": ("manifest", b"{not json"),
    "truncated": ("manifest", None),
    "empty-object": ("manifest", b"{}"),
    "garbage-ref": ("ref", b"\x00\xff garbage"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_metadata_is_named_and_the_rest_of_the_store_works(tmp_path, kind):
    from typer.testing import CliRunner

    from flows.cli import app

    store = Store(str(tmp_path / "store"))
    good = make_version(store, names=("a",), config={"v": 1}).version
    bad = make_version(store, names=("b",), config={"v": 2}).version
    what, data = DAMAGE[kind]
    rel = f"clean/{bad.id}/_manifest.json" if what == "manifest" else "_refs/clean/latest.json"
    path = store.abs(rel)
    store.fs.pipe_file(path, data if data is not None else store.fs.cat_file(path)[:100])
    runner = CliRunner()
    listed = runner.invoke(app, ["--store", store.url, "ls"])
    assert listed.exit_code == 0 and good.id in listed.output
    assert [v.id for v in store.versions("clean")] == ([good.id] if what == "manifest" else [good.id, bad.id])
    assert store.open("clean").id in (good.id, bad.id)  # `latest` still opens
    checked = runner.invoke(app, ["--store", store.url, "verify"])
    assert checked.exit_code == 1 and rel in checked.output.replace("\n", "")
    if what == "manifest":
        with pytest.raises(CorruptMetadata, match=rel):
            store.open("clean", bad.id)
    # a new run on the store works
    assert make_version(store, names=("c",), config={"v": 3}).version.verify() == []


def test_a_torn_part_record_is_made_again(tmp_path):
    store = Store(str(tmp_path / "store"))
    w = store.begin("clean", code_version="t", config={"n": 2}, parents=["generated/x"])
    # what a run that died before its record left: the part's files, and a torn record
    w.write_part("a", table=clean_table(ord("a")), rows_in=20, source_digest="src-a",
                 samples=({"__key__": f"sa_{j}", "png": bytes([j]) * 300} for j in range(20)))
    rel = store.abs(f"{w.prefix}/_parts/a.json")
    store.fs.pipe_file(rel, store.fs.cat_file(rel)[:40])  # torn
    w.close()
    v = make_version(store, names=("a", "b"), config={"n": 2}).version
    assert v.verify() == [] and v.manifest["rows_out"] == 40


@pytest.mark.parametrize("target", ["images@../../other/v", "../x@latest", "images@..", "images@a/b"])
def test_references_stay_inside_the_store(tmp_path, target):
    store = Store(str(tmp_path / "store"))
    stage, _, ref = target.partition("@")
    with pytest.raises(StoreError, match="inside the store"):
        store.open(stage, ref)


def test_a_manifest_listing_files_outside_its_stage_is_refused(tmp_path):
    store = Store(str(tmp_path / "store"))
    v = make_version(store).version
    m = dict(v.manifest)
    m["files"] = m["files"] + [{"path": "clean/../../../etc/passwd", "kind": "table", "bytes": 1, "sha256": "x"}]
    store.fs.pipe_file(store.abs(f"clean/{v.id}/_manifest.json"), json.dumps(m).encode())
    with pytest.raises(CorruptMetadata, match="outside"):
        store.open("clean", v.id)


# ---------------------------------------------------------------- 6. CLI errors and Prefect

def test_a_stage_error_prints_its_message_not_a_traceback(monkeypatch, capsys):
    import flows.cli as cli

    def failing():
        raise StageError("regions: part p0 stopped: regions@abc: parts/p0.tar is 51200 bytes")

    monkeypatch.setattr(cli, "app", failing)
    monkeypatch.setattr(cli.state, "debug", False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "parts/p0.tar is 51200 bytes" in err and "Traceback" not in err
    assert "--debug" in err
    monkeypatch.setattr(cli.state, "debug", True)
    with pytest.raises(StageError):
        cli.main()


def test_the_engine_turns_prefect_analytics_off(monkeypatch):
    from flows.temp_server import quiet_prefect

    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    quiet_prefect()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


@pytest.mark.slow
def test_a_killed_run_leaves_no_prefect_server(tmp_path):
    """SIGKILL the process that started the temporary Prefect server: the server stops too."""
    import signal
    import subprocess
    import sys

    script = ("import time\nfrom prefect.settings import PREFECT_API_URL\nfrom flows.temp_server import ensure_server\n"
              "url = ensure_server(timeout_s=300)\nassert PREFECT_API_URL.value() == url\n"
              "print(url, flush=True)\ntime.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(os.path.dirname(os.path.dirname(__file__))))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    url = parent.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), parent.stderr.read()
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == parent.pid]
    assert len(children) == 1
    server = children[0]
    environ = open(f"/proc/{server}/environ", "rb").read().split(b"\0")
    assert b"PREFECT_SERVER_ANALYTICS_ENABLED=false" in environ
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{server}") and _ppid(server) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{server}") or _state(server) == "Z", "the Prefect server outlived its run"
    assert "telemetry" not in parent.stderr.read().lower()


@pytest.mark.slow
def test_two_runs_sharing_a_prefect_home_without_a_server_both_run(tmp_path):
    """Two `--engine prefect` runs at once on one PREFECT_HOME and no server: each starts a temporary server
    on the same SQLite database. Before, both migrated the new database at once and the second server died
    ("table artifact has no column named ..."); servers now start one at a time."""
    import subprocess
    import sys

    script = ("from flows.temp_server import ensure_server\nprint('server', ensure_server(timeout_s=300), flush=True)\n"
              "from prefect import flow\n@flow\ndef add_one(x):\n    return x + 1\nprint('flow', add_one(1), flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL",)}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(os.path.dirname(os.path.dirname(__file__))))
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0 and "flow 2" in output, output[-2000:]


def _ppid(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _state(pid: int) -> str | None:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_prefect_console_errors_are_short_unless_debug(monkeypatch):
    import io
    import logging

    import flows.cli as cli

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(cli.ShortErrors())
    logger = logging.getLogger("test-short-errors")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for debug in (False, True):
            monkeypatch.setattr(cli.state, "debug", debug)
            try:
                raise StageError("clean: part p1 stopped: the reason")
            except StageError:
                logger.exception("Task run failed with exception")
            assert ("Traceback" in stream.getvalue()) is debug
    finally:
        logger.removeHandler(handler)


def test_code_versions_survive_cpythons_spurious_ast_error(monkeypatch):
    """CPython 3.11 can fail a sound ast.parse while another thread parses ("AST constructor recursion depth
    mismatch"): the code version retries it, and any other SystemError still surfaces."""
    import ast

    from tasks.engine import identity as cv

    real_parse, calls = ast.parse, []

    def flaky(source, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=132, after=150)")
        return real_parse(source, *args, **kwargs)

    monkeypatch.setattr(cv.ast, "parse", flaky)
    assert isinstance(cv.parse_source("x = 1\n"), ast.Module) and len(calls) == 2

    def broken(source, *args, **kwargs):
        raise SystemError("something else")

    monkeypatch.setattr(cv.ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        cv.parse_source("x = 1\n")
