"""Store metadata, store URLs and access, configuration values and console text in hostile hands (issue #27,
items 4, 5 and 7): one seeded generator per class, each case run through `ram-engine` as a user runs it, each
asserting an answer in one line (no traceback) that names the file and the field.

Classes: manifests (JSON type swaps, paths out of the version), part records (the same, on resume), refs,
stray files in the store, parent walks (cycles, long chains), console text holding rich markup, S3 access
(no credentials, 403, no bucket), empty and unknown store URLs, configuration values (every numeric and
bool field), config files (FIFO, alias bombs, `~` and variables), leases by the store's clock, claims left
behind. RAM_ENGINE_FUZZ_CASES sets the cases per generator (default 12)."""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import Store
from storage.store import StoreError
from tests.test_trust import clean_table, make_version

CASES = int(os.environ.get("RAM_ENGINE_FUZZ_CASES", "12"))
SECRET = "outside-the-store-secret"


# --------------------------------------------------------------------------- running the CLI as a user does
@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


@pytest.fixture
def cli(monkeypatch, capsys):
    """`ram-engine ARGS` in this process (its `main`, the console script's entry point): exit code, output."""
    import flows.cli as cli_module

    def run(*args: str) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["ram-engine", "--engine", "local", *args])
        try:
            cli_module.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_one_line(result: Result, *names: str) -> str:
    """An error in one line: exit 2, no traceback, one `error:` line naming each of `names`, not a crash."""
    assert "Traceback" not in result.text, result.text
    lines = result.error_lines()
    assert result.code == 2 and len(lines) == 1, result.text
    assert "unexpected" not in lines[0], lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.text, result.text
    assert not any("unexpected" in line for line in result.error_lines()), result.text


# --------------------------------------------------------------------------- a small store, copied per case
@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("metadata") / "store"
    store = Store(str(root))
    make_version(store, names=("a", "b"), config={"v": 1})
    v2 = make_version(store, names=("a", "c"), config={"v": 1}).version
    store.set_ref("clean", "prod", v2.id)
    return root


@pytest.fixture
def store_copy(base_store, tmp_path) -> Store:
    shutil.copytree(base_store, tmp_path / "store", symlinks=True)
    outside = tmp_path / "outside.parquet"   # what an escaping path would lead to
    pq.write_table(pa.table({"key": [SECRET]}), outside)
    return Store(str(tmp_path / "store"))


def versions_on_disk(store: Store) -> list[str]:
    return sorted(p.name for p in Path(store.root, "clean").iterdir() if (p / "_manifest.json").exists())


# --------------------------------------------------------------------------- random metadata
JSON_VALUES = [None, True, False, 0, -1, 7, 2**70, 1.5, float("nan"), float("inf"), "", "x", "[/x]", "[bold]",
               [], [1, "a"], {}, {"path": 1}]


def json_paths(value, prefix=()):
    """Every (path, value) inside a JSON document."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, prefix + (i,))


def set_at(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def type_swap(doc: dict, rng: random.Random) -> tuple[dict, str]:
    """`doc` with one value replaced by a value of another JSON type (or a key removed)."""
    doc = json.loads(json.dumps(doc))
    path, old = rng.choice([(p, v) for p, v in json_paths(doc) if p])
    if rng.random() < 0.15 and isinstance(path[-1], str):
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return doc, f"removed {'.'.join(map(str, path))}"
    new = rng.choice([v for v in JSON_VALUES if type(v) is not type(old)])
    set_at(doc, path, new)
    return doc, f"{'.'.join(map(str, path))}: {old!r:.40} -> {new!r}"


def escapes(stage: str, vid: str, other: str, outside: Path, name: str) -> list[str]:
    """Paths that leave a version folder, each a way people (or a bug) write them."""
    depth = len(Path(outside).parent.parts) + 4
    return [str(outside), f"{'../' * depth}{str(outside).lstrip('/')}", "../outside.parquet",
            f"{stage}/../../outside.parquet", f"{stage}/{vid}/../../../outside.parquet",
            f"file://{outside}", f"s3://another-bucket/{stage}/{vid}/parts/{name}", f"{stage}/{other}/parts/{name}",
            f"{stage}/{vid}//parts/{name}", f"{stage}/{vid}/./parts/{name}", f"{stage}\\{vid}\\..\\..\\outside.parquet",
            f"C:/{stage}/{vid}/parts/{name}", f"/{stage}/{vid}/parts/{name}", ""]


def manifest_path(store: Store, vid: str) -> Path:
    return Path(store.root, "clean", vid, "_manifest.json")


@pytest.mark.parametrize("seed", range(CASES))
def test_random_manifests_are_refused_in_one_line_or_read_whole(store_copy, cli, seed):
    """A manifest with one random JSON type swap: `ls` lists the rest, `verify` names the file, `show` either
    shows a manifest that is still valid or says in one line which file and field is wrong."""
    rng = random.Random(seed)
    vid = rng.choice(versions_on_disk(store_copy))
    path = manifest_path(store_copy, vid)
    doc, change = type_swap(json.loads(path.read_text()), rng)
    path.write_text(json.dumps(doc))
    try:
        store_copy.read_manifest("clean", vid)
        valid = True
    except StoreError:
        valid = False
    url = store_copy.url
    listed = cli("--store", url, "ls")
    assert_no_traceback(listed)
    assert listed.code == 0, (change, listed.text)
    checked = cli("--store", url, "verify")
    assert_no_traceback(checked)
    shown = cli("--store", url, "show", f"clean@{vid}")
    if valid:
        assert shown.code == 0, (change, shown.text)
    else:
        assert checked.code == 1 and f"clean/{vid}/_manifest.json" in checked.err, (change, checked.text)
        line = assert_one_line(shown, f"clean/{vid}/_manifest.json")
        assert ": " in line.split("_manifest.json", 1)[1], line   # ... then the field


@pytest.mark.parametrize("seed", range(CASES))
def test_manifest_paths_that_leave_the_version_are_refused(store_copy, cli, seed):
    """`parts[].files[].path` (and `files[]`) leading out of the version, with a valid size and sha256 of what
    lies there: nothing outside is shown, `verify` fails naming the manifest."""
    rng = random.Random(1000 + seed)
    vid, other = rng.sample(versions_on_disk(store_copy), 2)
    path = manifest_path(store_copy, vid)
    doc = json.loads(path.read_text())
    outside = Path(store_copy.root).parent / "outside.parquet"
    data = outside.read_bytes()
    import hashlib

    i = rng.randrange(len(doc["parts"]))
    j = next(k for k, f in enumerate(doc["parts"][i]["files"]) if f["kind"] == "table")
    entry = doc["parts"][i]["files"][j]
    escape = rng.choice(escapes("clean", vid, other, outside, entry["path"].rsplit("/", 1)[-1]))
    new = dict(entry, path=escape, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    doc["files"] = [new if f["path"] == entry["path"] else f for f in doc["files"]]
    doc["parts"][i]["files"][j] = new
    path.write_text(json.dumps(doc))
    url = store_copy.url
    shown = cli("--store", url, "show", f"clean@{vid}")
    assert SECRET not in shown.text
    assert_one_line(shown, f"clean/{vid}/_manifest.json", f"parts.{i}.files.{j}.path")
    checked = cli("--store", url, "verify")
    assert_no_traceback(checked)
    assert checked.code == 1 and f"clean/{vid}/_manifest.json" in checked.err and SECRET not in checked.text
    with pytest.raises(StoreError, match="_manifest.json"):
        store_copy.open("clean", vid).read_table()


@pytest.mark.parametrize("seed", range(CASES))
def test_random_part_records_are_made_again_never_followed(tmp_path, seed):
    """A part record left by a run that died (random type swaps, or files leading out of the version with the
    size and sha256 of what lies there): the next run makes the part again; the committed version holds only
    its own files."""
    import hashlib

    rng = random.Random(2000 + seed)
    store = Store(str(tmp_path / "store"))
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"key": [SECRET]}), outside)
    w = store.begin("clean", code_version="t", config={"n": 2}, parents=["generated/x"], input_digest="a,b")
    w.write_part("a", table=clean_table(ord("a")), rows_in=20, source_digest="src-a",
                 samples=({"__key__": f"sa_{j}", "png": bytes([j]) * 300} for j in range(20)))
    record_path = Path(store.root, w.prefix, "_parts", "a.json")
    record = json.loads(record_path.read_text())
    if rng.random() < 0.5:
        record, change = type_swap(record, rng)
    else:
        data = outside.read_bytes()
        j = rng.randrange(len(record["files"]))
        escape = rng.choice(escapes("clean", w.id, "other", outside, "a.parquet"))
        record["files"][j] = dict(record["files"][j], path=escape, bytes=len(data),
                                  sha256=hashlib.sha256(data).hexdigest())
        change = f"files.{j}.path -> {escape}"
    record_path.write_text(json.dumps(record))
    w.close()
    result = make_version(store, names=("a", "b"), config={"n": 2})
    v = result.version
    assert v.id == w.id, change
    assert v.verify() == [] and v.manifest["rows_out"] == 40, change
    assert all(f["path"].startswith(f"clean/{v.id}/") for f in v.files()), change
    assert SECRET not in v.read_table()["key"].to_pylist()


def ref_damage(rng: random.Random, vid: str) -> tuple[str, bytes | None]:
    """A damaged ref: (what, its bytes, or None for a directory in its place)."""
    good = {"stage": "clean", "version": vid, "updated": "2026-01-01T00:00:00+00:00"}
    kind = rng.choice(["swap", "escape", "directory", "json", "stage"])
    if kind == "swap":
        doc, change = type_swap(good, rng)
        return change, json.dumps(doc).encode()
    if kind == "escape":
        bad = rng.choice(["../x", "../../etc", "a/b", "", ".", "..", "/abs", "[/x]", "x" * 300 + "/y"])
        return f"version {bad!r}", json.dumps(dict(good, version=bad)).encode()
    if kind == "stage":
        return "stage images", json.dumps(dict(good, stage="images")).encode()
    if kind == "json":
        return "not JSON", rng.choice([b"", b"{", b"\xff\xfe", b"[1, 2]", b"null", b'"clean"'])
    return "a directory", None


@pytest.mark.parametrize("seed", range(CASES))
def test_random_refs_are_named_and_the_store_stays_usable(store_copy, cli, seed):
    rng = random.Random(3000 + seed)
    name = rng.choice(["latest", "prod"])
    vid = versions_on_disk(store_copy)[0]
    change, data = ref_damage(rng, vid)
    path = Path(store_copy.root, "_refs", "clean", f"{name}.json")
    path.unlink()
    if data is None:
        (path / "inner").mkdir(parents=True)
    else:
        path.write_bytes(data)
    url = store_copy.url
    listed = cli("--store", url, "ls")
    assert_no_traceback(listed)
    assert listed.code == 0 and all(v in listed.out for v in versions_on_disk(store_copy)), (change, listed.text)
    try:
        store_copy.get_ref("clean", name)
        valid = True
    except StoreError:
        valid = False
    checked = cli("--store", url, "verify")
    assert_no_traceback(checked)
    if not valid:
        assert checked.code == 1 and f"_refs/clean/{name}.json" in checked.err, (change, checked.text)
    latest = cli("--store", url, "show", "clean", "--rows", "0")   # `latest` falls back to the newest version
    assert latest.code == 0, (change, latest.text)
    by_name = cli("--store", url, "show", f"clean@{name}", "--rows", "0")
    if not valid and name != "latest":
        assert_one_line(by_name, f"_refs/clean/{name}.json")
    else:
        assert by_name.code == 0, (change, by_name.text)


STRAY = ["README.md", "clean/NOTES.txt", "models", "_refs/clean/notes.txt", "clean/.DS_Store", "notes",
         "_refs/README"]


@pytest.mark.parametrize("seed", range(min(CASES, 6)))
def test_stray_files_in_the_store_are_ignored_with_a_warning(store_copy, cli, seed, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="ram_engine")
    rng = random.Random(4000 + seed)
    stray = rng.sample(STRAY, 3)
    for rel in stray:
        target = Path(store_copy.root, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_text("a note someone left here [/x]\n")
    for command in (["ls"], ["verify"], ["show", "clean"], ["lineage", "clean"]):
        result = cli("--store", store_copy.url, *command)
        assert_no_traceback(result)
        assert result.code == 0, (command, result.text)
    for rel in set(stray) & {"README.md", "clean/NOTES.txt", "models", "notes"}:   # where folders belong
        assert any("ignoring" in r.getMessage() and rel in r.getMessage() for r in caplog.records), rel
    assert sorted(v.id for v in store_copy.versions("clean")) == versions_on_disk(store_copy)


def chain_manifest(template: dict, vid: str, parents: list[str], created: str) -> dict:
    return dict(template, version=vid, parents=parents, parts=[], files=[], rows_in=0, rows_out=0, rows_rejected=0,
                created=created)


def test_parent_walks_are_bounded_and_cycle_safe(store_copy, cli):
    """Manifests edited into a parent cycle and into a chain longer than any stack: `lineage` and `show` name
    each version once and stop, in one process without a recursion error."""
    from tasks.shared.lineage import MAX_LINEAGE_DEPTH, lineage

    template = json.loads(manifest_path(store_copy, versions_on_disk(store_copy)[0]).read_text())
    n = 1500
    for i in range(n):
        parents = [f"clean/chain{i + 1:05d}"] if i + 1 < n else ["clean/chain00000"]   # the last closes a cycle
        doc = chain_manifest(template, f"chain{i:05d}", parents, f"2026-01-01T00:00:{i % 60:02d}+00:00")
        folder = Path(store_copy.root, "clean", f"chain{i:05d}")
        folder.mkdir()
        (folder / "_manifest.json").write_text(json.dumps(doc))
    for vid, parents in (("selfloop", ["clean/selfloop", "clean/chain00003"]), ("cyclea", ["clean/cycleb"]),
                         ("cycleb", ["clean/cyclea"])):
        folder = Path(store_copy.root, "clean", vid)
        folder.mkdir()
        (folder / "_manifest.json").write_text(json.dumps(chain_manifest(template, vid, parents,
                                                                         "2026-01-02T00:00:00+00:00")))
    walked = list(lineage(store_copy, store_copy.open("clean", "chain00000")))
    refs = [ref for _, v, ref in walked if v is not None]
    assert len(refs) == len(set(refs)) == MAX_LINEAGE_DEPTH + 1
    assert "deeper lineage not shown" in walked[-1][2]
    for target in ("clean@chain00000", "clean@selfloop", "clean@cyclea"):
        for command in (["lineage", target], ["show", target]):
            result = cli("--store", store_copy.url, *command)
            assert_no_traceback(result)
            assert result.code == 0, (command, result.text[-500:])
    cycle = cli("--store", store_copy.url, "lineage", "clean@cyclea")
    assert cycle.out.count("clean/cyclea") == 2 and "shown above" in cycle.out   # once walked, once named


# --------------------------------------------------------------------------- console text
MARKUP = ["[/x]", "[/]", "[bold]", "[red]x[/red]", "[link=file:///etc]", "[", "]", "[[/x]]", "[/bold red]",
          ":smile:", "[b]unclosed"]


def markup_text(rng: random.Random) -> str:
    return "".join(rng.choice(MARKUP + ["key", "_", "-", "7"]) for _ in range(rng.randint(1, 3)))


@pytest.mark.parametrize("seed", range(CASES))
def test_user_text_with_markup_is_printed_as_it_is(tmp_path, cli, seed):
    """Keys, reject details, reasons, metric names, refs given on the command line and override names holding
    rich markup: printed as they are, never read as markup (which crashed on `[/x]`)."""
    rng = random.Random(5000 + seed)
    store = Store(str(tmp_path / "store"))
    key, detail, reason, metric = (markup_text(rng) for _ in range(4))
    w = store.begin("clean", code_version="t", config={"seed": seed}, parents=[])
    table = pa.Table.from_pydict({"key": [key], "tag_ids": [[1]], "removed_tag_ids": [[]], "removed_reasons": [[]]}
                                 ).cast(pa.schema([f for f in clean_table(0).schema]))
    w.write_part("p", table=table, rows_in=2,
                 rejects=[{"key": key + "-r", "reason": reason, "detail": detail, "field": "caption"}])
    v = w.commit(metrics={metric: 3, "by_reason": {reason: 1}})
    shown = cli("--store", store.url, "show", f"clean@{v.id}")
    assert shown.code == 0, shown.text
    for text in (key + "-r", detail, reason):   # the rejects' line prints them as they are
        assert text in shown.out, (text, shown.out)
    listed = cli("--store", store.url, "ls")
    assert listed.code == 0 and v.id in listed.out
    missing = markup_text(rng)
    assert_one_line(cli("--store", store.url, "show", f"clean@{missing}"))
    assert_one_line(cli("--store", store.url, "--set", f"{missing}=1", "ls"))


# --------------------------------------------------------------------------- store URLs and S3 access
@pytest.mark.parametrize("url, says", [("", "empty"), ("   ", "empty"), ("foo://bucket/x", "unknown scheme"),
                                       ("s3://", "no bucket"), ("nosuchproto::x", "unknown scheme")])
def test_empty_and_unknown_store_urls_are_one_line(cli, tmp_path, monkeypatch, url, says):
    monkeypatch.chdir(tmp_path)
    for command in (["ls"], ["ingest", str(tmp_path)]):
        line = assert_one_line(cli("--store", url, *command), "store.url", says)
        assert "Traceback" not in line
    assert not (tmp_path / "ram-data").exists()   # an empty URL never became ./ram-data


def _s3_options(endpoint: str) -> str:
    return json.dumps({"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True,
                       "use_listings_cache": False})


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    from tests.fixtures import image_bytes, write_folder_source

    return write_folder_source(tmp_path / "src", {f"i{i}.jpg": (image_bytes(color=(i * 40, 9, 9)), f"a cat {i}")
                                                  for i in range(3)})


def _boto(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def test_s3_without_credentials_is_one_line(moto_server, cli, monkeypatch, tiny_source, tmp_path):
    _boto(moto_server).create_bucket(Bucket="nocreds")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")   # never ask an instance metadata service
    opts = ["--store", "s3://nocreds/store", "--set", f"store.storage_options={_s3_options(moto_server)}"]
    for command in (["ls"], ["ingest", str(tiny_source)]):
        assert_one_line(cli(*opts, *command), "no credentials", "s3://nocreds/store", "AWS_ACCESS_KEY_ID")


def test_s3_access_denied_is_one_line(moto_server, cli, tiny_source):
    client = _boto(moto_server)
    client.create_bucket(Bucket="denied")
    client.put_bucket_policy(Bucket="denied", Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": ["arn:aws:s3:::denied", "arn:aws:s3:::denied/*"]}]}))
    opts = ["--store", "s3://denied/store", "--set", f"store.storage_options={_s3_options(moto_server)}"]
    try:
        for command in (["ls"], ["ingest", str(tiny_source)], ["verify"]):
            assert_one_line(cli(*opts, *command), "access denied", "s3://denied/store")
    finally:
        client.delete_bucket_policy(Bucket="denied")


def test_ingest_into_a_missing_bucket_is_an_error_and_creates_nothing(moto_server, cli, tiny_source):
    client = _boto(moto_server)
    opts = ["--store", "s3://no-such-bucket-here/store", "--set", f"store.storage_options={_s3_options(moto_server)}"]
    assert_one_line(cli(*opts, "ingest", str(tiny_source)), "no-such-bucket-here", "does not exist")
    assert "no-such-bucket-here" not in [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert_one_line(cli(*opts, "ls"), "s3://no-such-bucket-here/store")


# --------------------------------------------------------------------------- configuration values
def scalar_fields():
    """(dotted name, kinds) of every numeric and bool field of the config, nested models included."""
    from tasks.engine.config import EngineConfig, _kinds, _model_of

    def walk(model, prefix):
        for name, info in model.model_fields.items():
            nested = _model_of(info.annotation)
            if nested is not None:
                yield from walk(nested, f"{prefix}{name}.")
                continue
            kinds = _kinds(info.annotation)
            if object not in kinds and kinds & {int, float, bool}:
                yield f"{prefix}{name}", kinds

    return list(walk(EngineConfig, ""))


def invalid_values(kinds: set, rng: random.Random) -> list[str]:
    """YAML texts (as `--set` takes them) that a field of these kinds must refuse."""
    if bool in kinds and not kinds & {int, float}:
        pool = ["1", "0", "2.5", "'true'", "'no'", "[]", "{}"]
    elif float in kinds:
        pool = [".inf", "-.inf", ".nan", "true", "false", "'1.5'", "1e999", "[]"]
    else:
        pool = ["true", "false", "1.5", "'7'", "2e30", str(2**64), f"-{2**70}", ".inf", ".nan", "[]"]
    return rng.sample(pool, 3)


def test_every_numeric_and_bool_field_is_generated():
    fields = dict(scalar_fields())
    assert len(fields) > 60
    for name in ("ingest.min_side", "train.lr", "ingest.max_image_bytes", "ground.detector.box_threshold",
                 "clean.embedder.batch_size", "train.caption_loss", "model.with_caption"):
        assert name in fields


@pytest.mark.parametrize("seed", range(CASES))
def test_random_config_values_are_refused_naming_the_field(seed):
    from tasks.engine.config import ConfigError, load_config

    rng = random.Random(6000 + seed)
    for field, kinds in scalar_fields():
        for raw in invalid_values(kinds, rng):
            with pytest.raises(ConfigError) as info:
                load_config(None, [f"{field}={raw}"])
            message = str(info.value)
            assert "\n" not in message and field in message, (field, raw, message)


@pytest.mark.parametrize("seed", range(min(CASES, 4)))
def test_random_config_values_through_the_cli(cli, tmp_path, seed):
    rng = random.Random(7000 + seed)
    field, kinds = rng.choice(scalar_fields())
    raw = invalid_values(kinds, rng)[0]
    assert_one_line(cli("--store", str(tmp_path / "store"), "--set", f"{field}={raw}", "ls"), field)


def test_byte_limits_have_upper_bounds_and_yaml_exponents_are_numbers():
    from tasks.engine.config import ConfigError, load_config

    for raw in ("1e19", "1.0e19", str(2**40)):
        with pytest.raises(ConfigError, match="ingest.max_image_bytes"):
            load_config(None, [f"ingest.max_image_bytes={raw}"])
    assert load_config(None, ["ingest.max_image_bytes=1e8"]).ingest.max_image_bytes == 10**8


# --------------------------------------------------------------------------- config files and paths
def test_home_and_variables_are_expanded_in_config_paths(tmp_path, monkeypatch):
    from tasks.engine.config import ConfigError, load_config

    home = tmp_path / "home"
    (home / "cfgs").mkdir(parents=True)
    (home / "cfgs" / "c.yaml").write_text("store:\n  url: ~/stores/a\ningest:\n  source: ${DATA_ROOT}/src\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    cfg = load_config("~/cfgs/c.yaml")
    assert cfg.store.url == str(home / "stores" / "a") and cfg.ingest.source == str(tmp_path / "data" / "src")
    assert load_config(None, ["store.url=~/s"]).store.url == str(home / "s")
    monkeypatch.delenv("DATA_ROOT")
    with pytest.raises(ConfigError, match=r"ingest.source.*\$DATA_ROOT.*not set"):
        load_config(str(home / "cfgs" / "c.yaml"))


def test_a_fifo_config_is_refused_without_blocking(tmp_path):
    from tasks.engine.config import ConfigError, load_config

    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    # a writer, so that a reader that opens the FIFO gets a config (and an old loader does not block)
    writer = threading.Thread(target=lambda: fifo.open("w").write("train:\n  steps: 3\n"), daemon=True)
    writer.start()
    try:
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(str(fifo))
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # a reader: the writer's open returns, it writes, closes
        writer.join(30)
        os.close(fd)


@pytest.mark.parametrize("levels, fan", [(6, 9), (3, 120)])
def test_yaml_alias_bombs_are_refused(tmp_path, levels, fan):
    """A billion-laughs mapping where any mapping is valid (ingest.source_options): the loader shares the
    aliased objects, so the bomb goes off later, when the config is dumped (a version id, a worker's job)."""
    from tasks.engine.config import ConfigError, load_config

    lines = ["ingest:", "  source_options:", "    a0: &a0 {x: lol}"]
    for i in range(1, levels + 1):
        lines.append(f"    a{i}: &a{i} {{{', '.join(f'k{j}: *a{i - 1}' for j in range(fan))}}}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="alias"):
        load_config(str(path))


def test_an_oversized_config_is_refused(tmp_path):
    from tasks.engine.config import MAX_CONFIG_BYTES, ConfigError, load_config

    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="bytes"):
        load_config(str(path))


# --------------------------------------------------------------------------- leases and claims
def _lease(store: Store, owner: str, **fields) -> str:
    from storage.leases import lease_path, put_whole

    path = lease_path(store.root, owner)
    put_whole(store.fs, path, json.dumps({"owner": owner, "host": "other-host", "boot": "b", "pidns": "p",
                                          "pid": 7} | fields).encode())
    return path


def test_leases_are_judged_by_the_stores_clock_not_the_writers(tmp_path):
    """A writer whose clock runs a day ahead died ten minutes ago: its lease says it lives until tomorrow, yet
    the store's clock says it was last renewed ten minutes ago, past its TTL. A writer whose clock runs a day
    behind renewed a moment ago: alive, though its lease 'expired' yesterday."""
    from storage.leases import owner_alive

    store = Store(str(tmp_path / "store"))
    now = time.time()
    ahead = _lease(store, "ahead", expires=now + 86400 + 300, ttl=300)
    os.utime(ahead, (now - 600, now - 600))
    _lease(store, "behind", expires=now - 86400 + 300, ttl=300)
    assert not owner_alive(store.fs, store.root, "ahead")
    assert owner_alive(store.fs, store.root, "behind")


@pytest.mark.parametrize("seed", range(min(CASES, 6)))
def test_random_leases_are_validated_before_use(tmp_path, seed):
    from storage.leases import owner_alive

    rng = random.Random(8000 + seed)
    store = Store(str(tmp_path / "store"))
    good = {"owner": "w", "host": "other-host", "boot": "b", "pidns": "p", "pid": 7, "expires": time.time() + 3600,
            "ttl": 300}
    doc, change = type_swap(good, rng)
    path = _lease(store, "w")
    Path(path).write_text(json.dumps(doc))
    alive = owner_alive(store.fs, store.root, "w")   # never raises: a damaged lease proves nothing
    assert isinstance(alive, bool), change


def test_three_writers_at_once_leave_no_claims(tmp_path):
    """Three runs of one version at once (threads, each its own writer): one commits, the others adopt; no
    `_claims` (nor `_progress`) folder is left in the committed version."""
    root = str(tmp_path / "store")
    errors = []

    def run():
        try:
            make_version(Store(root), names=tuple("abcdef"), config={"n": 6})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    (version,) = Store(root).versions("clean")
    left = [str(p.relative_to(root)) for p in Path(root, version.stage, version.id).rglob("*")
            if p.name in ("_claims", "_progress")]
    assert left == [] and version.verify() == []
