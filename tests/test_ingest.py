"""Ingest: sources, validation, conversions, rejects, reconciliation, growth, CLI."""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import Store
from tasks.engine.config import IngestConfig
from tasks.stages.ingest import SourceError, normalise_caption, validate_image
from tests.fixtures import ingest

from tests.fixtures import image_bytes, write_folder_source


def png_bomb(width=20000, height=20000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (width // 8 + 1) * 64, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def cmyk_jpeg() -> bytes:
    return image_bytes(mode="CMYK", color=(0, 255, 255, 0), fmt="JPEG")


def png16() -> bytes:
    arr = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30)
    buf = io.BytesIO()
    Image.fromarray(arr, "I;16").save(buf, "PNG")
    return buf.getvalue()


def bad_corpus() -> dict:
    good = image_bytes()
    return {
        "good1.jpg": (good, "a red square on a table"),
        "good2.png": (image_bytes(fmt="PNG", color=(0, 0, 255)), ["a blue box", "a blue box", "  blue\tthing  "]),
        "zero.jpg": (b"", "empty file"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "text.jpg": (b"this is not an image at all", "text named jpg"),
        "bomb.png": (png_bomb(), "a bomb"),
        "nocaption.jpg": (image_bytes(color=(1, 2, 3)), None),
        "badutf8.jpg": (image_bytes(color=(3, 2, 1)), b"caf\xe9 \xff"),
        "cmyk.jpg": (cmyk_jpeg(), "a cmyk picture"),
        "deep.png": (png16(), "a sixteen bit picture"),
        "pal.png": (None, None),
    }


@pytest.fixture
def folder_source(tmp_path):
    items = bad_corpus()
    pal = Image.new("P", (32, 32))
    pal.putpalette([0, 0, 0, 255, 0, 0] * 128)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    items["pal.png"] = (buf.getvalue(), "a palette picture")
    return write_folder_source(tmp_path / "src", items)


def rejects_by_key(version):
    return {r["key"]: r for r in version.rejects().to_pylist()}


def test_folder_ingest_rejects_bad_samples_and_converts(tmp_path, folder_source):
    store = Store(str(tmp_path / "store"))
    result = ingest(store, IngestConfig(part_size=4), source=str(folder_source))
    v = result.version
    m = v.manifest
    assert m["rows_in"] == 11 and m["rows_in"] == m["rows_out"] + m["rows_rejected"]
    rejects = rejects_by_key(v)
    assert rejects["zero"]["reason"] == "empty-file"
    assert rejects["truncated"]["reason"] == "decode-error"
    assert rejects["text"]["reason"] == "not-an-image"
    assert rejects["bomb"]["reason"] == "decompression-bomb"
    assert rejects["nocaption"]["reason"] == "missing-caption"
    assert rejects["badutf8"]["reason"] == "caption-not-utf8"
    assert all(r["detail"] and r["source"] and r["field"] for r in rejects.values())
    rows = {r["key"]: r for r in v.read_table().to_pylist()}
    assert set(rows) == {"good1", "good2", "cmyk", "deep", "pal"}
    assert rows["good2"]["captions"] == ["a blue box", "blue thing"]
    samples = {s["__key__"]: s for s in v.iter_samples()}
    for key in ("cmyk", "deep", "pal"):
        ext = "jpg" if rows[key]["format"] == "jpeg" else rows[key]["format"]
        img = Image.open(io.BytesIO(samples[key][ext]))
        assert img.mode == "RGB", key
    # The stored bytes are what the index says they are.
    import hashlib
    assert hashlib.sha256(samples["good1"]["jpg"]).hexdigest() == rows["good1"]["sha256"]
    assert samples["good1"]["jpg"] == (folder_source / "good1.jpg").read_bytes()  # untouched when valid RGB


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (60, 30), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    out, problem = validate_image(buf.getvalue(), IngestConfig())
    assert problem is None and (out["width"], out["height"]) == (30, 60)
    assert "exif-orientation" in out["converted"]


@pytest.mark.parametrize("size,reason", [((1, 1), "too-small"), ((5000, 20), "bad-aspect-ratio")])
def test_dimension_bounds(size, reason):
    out, problem = validate_image(image_bytes(size=size, fmt="PNG"), IngestConfig())
    assert out is None and problem[0] == reason


def test_caption_normalisation():
    assert normalise_caption("  a\x00 dog\u200b \n runs\ufeff ".encode(), 100)[0] == "a dog runs"
    assert normalise_caption(b"\xff\xfe", 100)[1].startswith("caption-not-utf8")
    assert normalise_caption("   ", 100)[1] == "caption-empty"
    long = " ".join(["word"] * 1000)
    text, _ = normalise_caption(long, 50)
    assert len(text) <= 50 and text.endswith("word")


def write_tar_source(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_source_as_img2dataset_writes_it(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    write_tar_source(src / "00000.tar", [
        ("000000000", {"jpg": image_bytes(), "txt": b"a red square", "json": b'{"url": "x"}'}),
        ("000000001", {"png": image_bytes(fmt="PNG"), "json": b'{"caption": "from json"}'}),
        ("000000002", {"txt": b"no image here"}),
    ])
    write_tar_source(src / "00001.tar", [("000000003", {"webp": image_bytes(fmt="WEBP"), "txt": b"a webp"})])
    for shard in ("00000", "00001"):   # img2dataset writes its stats beside every shard: this is its output
        (src / f"{shard}_stats.json").write_text('{"count": 1}')
    store = Store(str(tmp_path / "store"))
    v = ingest(store, IngestConfig(image_format="keep"), source=str(src)).version
    # Keys are img2dataset's, behind the tag of the folder they came from (two of its runs never collide);
    # tars that are not img2dataset output keep their own keys (tests/test_hostile.py).
    tags = {r["key"].split("_", 1)[0] for r in v.read_table().to_pylist() + v.rejects().to_pylist()}
    assert len(tags) == 1 and all(p.name.startswith(f"part-{next(iter(tags))}-") for p in v.parts)
    rows = {r["key"].split("_", 1)[1]: r for r in v.read_table().to_pylist()}
    assert rows["000000000"]["captions"] == ["a red square"] and rows["000000001"]["captions"] == ["from json"]
    assert rows["000000003"]["format"] == "webp"
    assert {k.split("_", 1)[1]: r for k, r in rejects_by_key(v).items()}["000000002"]["reason"] == "missing-image"
    assert v.manifest["rows_in"] == 4 and len(v.parts) == 2


def test_truncated_tar_keeps_what_came_before(tmp_path):
    path = write_tar_source(tmp_path / "a.tar", [(f"{i:04d}", {"jpg": image_bytes(), "txt": b"a thing"})
                                                 for i in range(5)])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.45)])  # cut inside the 4th sample
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(path)).version
    assert v.manifest["rows_out"] >= 2
    assert "source-truncated" in {r["reason"] for r in v.rejects().to_pylist()}
    assert v.manifest["rows_in"] == v.manifest["rows_out"] + v.manifest["rows_rejected"]


def test_growing_source_adds_only_new_samples(tmp_path):
    items = {f"img{i:03d}.jpg": (image_bytes(color=(i, 0, 0)), f"thing {i}") for i in range(60)}
    src = write_folder_source(tmp_path / "src", items)
    store = Store(str(tmp_path / "store"))
    cfg = IngestConfig(part_size=10)
    first = ingest(store, cfg, source=str(src))
    assert ingest(store, cfg, source=str(src)).status == "reused"
    (src / "img999.jpg").write_bytes(image_bytes(color=(9, 9, 9)))  # new data lands; old files untouched
    with open(src / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "img999.jpg", "caption": "new thing"}) + "\n")
    grown = ingest(store, cfg, source=str(src))
    assert grown.version.id != first.version.id
    assert grown.parts_written == 1 and grown.parts_reused == len(first.version.parts) - 1
    assert grown.version.manifest["rows_out"] == 61
    assert grown.version.parents == []


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        ingest(Store(str(tmp_path)), IngestConfig(), source=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="captions"):
        ingest(Store(str(tmp_path)), IngestConfig(), source=str(tmp_path / "empty"))


def test_ingest_into_s3(s3_store_url, folder_source):
    url, options = s3_store_url
    store = Store(url, **options)
    v = ingest(store, IngestConfig(part_size=4), source=str(folder_source)).version
    assert v.manifest["rows_out"] == 5 and v.verify() == []
    assert len(list(v.iter_samples())) == 5


def test_every_caption_of_a_sample_is_read(tmp_path):
    """Regression: a multi-caption sample used to arrive as one run-on caption (the whole .txt)."""
    src = tmp_path / "shards"
    src.mkdir()
    write_tar_source(src / "00000.tar", [
        # img2dataset's layout: one caption in .txt, the same in the sidecar's `caption`
        ("000000000", {"jpg": image_bytes(), "txt": b"a red ball on the sand",
                       "json": b'{"url": "x", "caption": "a red ball on the sand"}'}),
        # the demo's layout: one caption a line in .txt, the list in the sidecar's `captions`
        ("000000001", {"jpg": image_bytes(), "txt": b"a boat in the sea\nthe sand with a red flag\n",
                       "json": b'{"caption": "a boat in the sea", "captions": ["a boat in the sea", '
                               b'"the sand with a red flag"]}'}),
        # lines of .txt without a sidecar list (CRLF too)
        ("000000002", {"jpg": image_bytes(), "txt": b"first caption\r\n\r\nsecond caption"}),
        # a hostile sidecar list (not strings) falls back to the .txt lines
        ("000000003", {"jpg": image_bytes(), "txt": b"one\ntwo", "json": b'{"captions": [1, {"a": 2}]}'}),
        # the sidecar's list wins over a .txt that disagrees with it
        ("000000004", {"jpg": image_bytes(), "txt": b"stale", "json": b'{"captions": ["x y", "z w"]}'}),
        ("000000005", {"jpg": image_bytes(), "txt": b"  \n \n"}),
    ])
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(src)).version
    rows = {r["key"]: r["captions"] for r in v.read_table().to_pylist()}
    assert rows["000000000"] == ["a red ball on the sand"]
    assert rows["000000001"] == ["a boat in the sea", "the sand with a red flag"]
    assert rows["000000002"] == ["first caption", "second caption"]
    assert rows["000000003"] == ["one", "two"]
    assert rows["000000004"] == ["x y", "z w"]
    assert rejects_by_key(v)["000000005"]["reason"] == "caption-empty"


def test_demo_world_captions_arrive_one_by_one(tmp_path):
    from tasks.demo.world import generate_world

    world = generate_world(tmp_path / "world", 12, seed=3, fmt="webdataset", captions_per_image=(2, 3))
    truth = {}
    with open(world.ground_truth) as f:
        for line in f:
            row = json.loads(line)
            truth[row["key"]] = row["captions"]
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(world.source)).version
    # The world is img2dataset output, so keys carry its folder tag; its own keys are in source_key.
    rows = {r["source_key"]: r["captions"] for r in v.read_table().to_pylist()}
    assert rows.keys() == truth.keys()
    for key, caps in truth.items():
        assert len(rows[key]) == len(caps) >= 2
        assert [c.lower().rstrip(".") for c in rows[key]] == [c.lower().rstrip(".") for c in caps]


@pytest.mark.s3
def test_s3_sources_are_read_with_their_own_options(moto_server, tmp_path, monkeypatch):
    """Remote sources are opened with ingest.source_options (their own endpoint), never the store's and
    without AWS_ENDPOINT_URL: tars with an img2dataset metadata table (key claims read tar headers) and an
    image folder with captions.jsonl. The options never reach the manifest; `check` reads the source with
    them and names a source it cannot open."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.inspection.check import CheckReport, check_source
    from tasks.engine.config import EngineConfig

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="incoming-src")
    for shard in range(2):
        tar = write_tar_source(tmp_path / f"{shard:05d}.tar", [
            (f"{shard}{i:03d}", {"jpg": image_bytes(color=(shard * 60, i * 9, 0)), "txt": f"a red thing {i}".encode()})
            for i in range(4)])
        client.upload_file(str(tar), "incoming-src", f"i2d/{shard:05d}.tar")
        meta = pa.table({"key": [f"{shard}{i:03d}" for i in range(5)],
                         "status": ["success"] * 4 + ["failed_to_download"], "error_message": [None] * 4 + ["404"],
                         "url": [f"https://example.com/{i}" for i in range(5)]})
        buf = pa.BufferOutputStream()
        pq.write_table(meta, buf)
        client.put_object(Bucket="incoming-src", Key=f"i2d/{shard:05d}.parquet", Body=buf.getvalue().to_pybytes())
    for i in range(3):
        client.put_object(Bucket="incoming-src", Key=f"folder/img{i}.jpg", Body=image_bytes(color=(0, 0, 80 * i)))
    client.put_object(Bucket="incoming-src", Key="folder/captions.jsonl",
                      Body="".join(json.dumps({"file": f"img{i}.jpg", "caption": f"a blue thing {i}"}) + "\n"
                                   for i in range(3)).encode())

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_server}}
    cfg = IngestConfig(source=["s3://incoming-src/i2d", "s3://incoming-src/folder"], source_options=options)
    v = ingest(Store(str(tmp_path / "store")), cfg).version
    assert v.manifest["rows_out"] == 11 and v.manifest["rows_rejected"] == 2   # 2 × 4 fetched + 3; 2 failed
    assert {r["reason"] for r in v.rejects().to_pylist()} == {"img2dataset-failed-to-download"}
    assert moto_server not in json.dumps(v.manifest) and "testing" not in json.dumps(v.manifest["config"])
    # the same data read through other options (another endpoint spelling) is the same version
    again = IngestConfig(source=cfg.source, source_options=options | {"client_kwargs": {
        "endpoint_url": moto_server.replace("127.0.0.1", "localhost")}})
    assert ingest(Store(str(tmp_path / "store")), again).version.id == v.id

    report = CheckReport()
    check_source(EngineConfig(ingest=cfg), report)
    assert report.problems == [] and "found (2 paths)" in report.ok[0]
    closed = IngestConfig(source="s3://incoming-src/i2d", source_options=options | {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}, )
    report = CheckReport()
    check_source(EngineConfig(ingest=closed), report)
    assert [p.field for p in report.problems] == ["ingest.source"]
    assert "ingest.source_options" in report.problems[0].what


# ============================================================================ a source is its content
def i2d_run(folder: Path, shards: int = 2, per_shard: int = 3, *, seed: int = 0, lies: dict | None = None) -> Path:
    """img2dataset webdataset output: `0000k.tar` + its metadata table `0000k.parquet` + `0000k_stats.json`, keys
    numbered per run as img2dataset numbers them. `seed` makes the run's pixels and URLs its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        keys = [f"{shard:05d}{i:04d}" for i in range(per_shard)]
        write_tar_source(folder / f"{shard:05d}.tar", [
            (k, {"jpg": image_bytes(color=(seed * 40 % 256, shard * 50, i * 30)), "txt": f"a thing {seed} {k}".encode(),
                 "json": json.dumps({"url": f"https://example.com/{seed}/{k}.jpg"}).encode()})
            for i, k in enumerate(keys)])
        rows = {"key": keys, "status": ["success"] * per_shard, "url": [f"https://example.com/{seed}/{k}.jpg" for k in keys],
                "caption": [f"a thing {seed} {k}" for k in keys], "error_message": [None] * per_shard}
        for key, row in (lies or {}).get(shard, {}).items():   # rows the tar does not match
            for col in rows:
                rows[col].append(row.get(col, key if col == "key" else None))
        pq.write_table(pa.table(rows), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return folder


def plain_tars(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        write_tar_source(folder / f"{name}.tar", [(f"{name}-{i}", {"jpg": image_bytes(color=(n * 60, i * 40, 9)),
                                                                  "txt": f"a {name} thing {i}".encode()})
                                                  for i in range(3)])
    return folder


def parts_and_keys(version) -> tuple[list, list, list]:
    """(part names, the sha256 of every committed file per part, sorted keys of rows and rejects)."""
    parts = [p.name for p in version.parts]
    files = [sorted((f["kind"], f["sha256"]) for f in p.files) for p in version.parts]
    keys = sorted(version.read_table(columns=["key"]).column("key").to_pylist()
                  + [r["key"] for r in version.rejects().to_pylist()])
    return parts, files, keys


def test_a_moved_source_is_the_same_data(tmp_path):
    """Regression (#23): three tars copied to another folder were new data: 3 parts written, 0 reused, and
    img2dataset keys changed with the folder (d39ab144_000000000 vs fa7aecc5_000000000)."""
    import shutil

    src = tmp_path / "disk-a" / "incoming"
    i2d_run(src / "run", shards=2)
    plain_tars(src / "mine", ["x"])
    store = Store(str(tmp_path / "store"))
    first = ingest(store, IngestConfig(), source=str(src))
    moved = tmp_path / "disk-b" / "archive" / "renamed"
    shutil.move(str(src), str(moved))
    again = ingest(store, IngestConfig(), source=str(moved))
    assert again.version.id == first.version.id and again.status == "reused"
    assert parts_and_keys(again.version) == parts_and_keys(first.version)
    # The moved source grows: the old parts are shared as they are, only the new tar is read.
    plain_tars(moved / "mine", ["y"])
    grown = ingest(store, IngestConfig(), source=str(moved))
    assert (grown.parts_reused, grown.parts_written) == (3, 1)
    old_parts, _, old_keys = parts_and_keys(first.version)
    assert set(old_parts) < {p.name for p in grown.version.parts} and set(old_keys) < set(parts_and_keys(grown.version)[2])
    rows = {r["key"]: r for r in grown.version.read_table().to_pylist()}
    assert all(str(tmp_path) not in (r["source"] or "") for r in rows.values())   # no absolute location anywhere


def test_incremental_ingest_equals_whole_from_another_folder(tmp_path):
    """Tars 1+2, then +3, commit the very bytes that 1+2+3 at once commit in another store, read from a copy of the
    source in another folder: the same version id, part names, part files and keys."""
    import shutil

    src = tmp_path / "here"
    plain_tars(src, ["t1", "t2"])
    i2d_run(src / "run", shards=1, seed=4)
    store = Store(str(tmp_path / "store-a"))
    ingest(store, IngestConfig(), source=str(src))
    plain_tars(src, ["t3"])
    i2d_run(src / "run", shards=2, seed=4)   # the run gains a shard; its first shard is unchanged
    incremental = ingest(store, IngestConfig(), source=str(src))
    assert incremental.parts_reused == 3 and incremental.parts_written == 2
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, copy)
    whole = ingest(Store(str(tmp_path / "store-b")), IngestConfig(), source=str(copy))
    assert whole.version.id == incremental.version.id
    assert parts_and_keys(whole.version) == parts_and_keys(incremental.version)
    assert whole.version.read_table().to_pylist() == incremental.version.read_table().to_pylist()


@pytest.mark.s3
def test_a_source_copied_to_s3_is_the_same_data(moto_server, tmp_path, monkeypatch):
    """Local → S3: the same files in a bucket are the same version, parts and keys (an img2dataset run, plain tars
    and an image folder with captions)."""
    import boto3

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    src = tmp_path / "src"
    i2d_run(src / "run", shards=2, seed=1)
    plain_tars(src / "tars", ["a", "b"])
    write_folder_source(src / "folder", {f"img{i}.jpg": (image_bytes(color=(0, 0, 60 * i)), f"a blue thing {i}")
                                         for i in range(3)})
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="moved-src")
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(path), "moved-src", f"data/{path.relative_to(src)}")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_server}}
    store = Store(str(tmp_path / "store"))
    local = ingest(store, IngestConfig(source=[str(src / "run"), str(src / "tars"), str(src / "folder")]))
    remote = ingest(store, IngestConfig(source=["s3://moved-src/data/run", "s3://moved-src/data/tars",
                                                "s3://moved-src/data/folder"], source_options=options))
    assert remote.version.id == local.version.id and remote.status == "reused"
    fresh = ingest(Store(str(tmp_path / "store-2")), IngestConfig(source=["s3://moved-src/data/run", "s3://moved-src/data/tars",
                                                                       "s3://moved-src/data/folder"], source_options=options))
    assert parts_and_keys(fresh.version) == parts_and_keys(local.version)
    assert fresh.version.manifest["rows_out"] == 6 + 6 + 3


def test_img2dataset_runs_in_one_parent_folder_never_collide(tmp_path):
    """Regression (#27): a parent folder of two runs gave both runs the same keys and rejected the whole second
    run as duplicate-key; the `source` column was the same string for rows of both runs."""
    parent = tmp_path / "downloads"
    i2d_run(parent / "laion-part1", seed=1)
    i2d_run(parent / "laion-part2", seed=2)
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(parent)).version
    rows = v.read_table().to_pylist()
    assert v.manifest["rows_out"] == 12 and v.manifest["rows_rejected"] == 0
    assert len({r["key"] for r in rows}) == 12 and len({r["source"] for r in rows}) == 12
    tags = {r["key"].split("_", 1)[0] for r in rows}
    assert len(tags) == 2 and {r["source"].split("/", 1)[0] for r in rows} == tags   # the source names the run
    # Each run keeps its keys whether it is ingested alone or beside the other.
    alone = ingest(Store(str(tmp_path / "store-1")), IngestConfig(), source=str(parent / "laion-part1")).version
    assert set(keys_of_table(alone)) < {r["key"] for r in rows}


def keys_of_table(version) -> list[str]:
    return version.read_table(columns=["key"]).column("key").to_pylist()


def test_img2dataset_metadata_that_lists_a_sample_the_tar_lacks_is_counted(tmp_path):
    """Regression (#27): a sample the metadata lists as `success` but the tar lacks reconciled silently."""
    run = i2d_run(tmp_path / "run", shards=1, lies={0: {"000000099": {"status": "success", "url": "https://x/99"},
                                                        "000000098": {"status": "failed_to_download",
                                                                      "error_message": "404"}}})
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(run)).version
    rejects = {r["key"].split("_", 1)[1]: r for r in v.rejects().to_pylist()}
    assert rejects["000000099"]["reason"] == "source-missing-sample" and "00000.tar" in rejects["000000099"]["detail"]
    assert rejects["000000098"]["reason"] == "img2dataset-failed-to-download"
    assert v.manifest["rows_in"] == 5 and v.manifest["rows_out"] == 3


def test_a_null_caption_is_one_reason_in_every_img2dataset_format(tmp_path):
    """Regression (#27): img2dataset's null caption was `caption-empty` from webdataset (an empty .txt) and
    `missing-caption` from its parquet output (a null cell)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wds = tmp_path / "wds"
    wds.mkdir()
    write_tar_source(wds / "00000.tar", [("000000000", {"jpg": image_bytes(), "txt": b"", "json": b'{"caption": null}'}),
                                         ("000000001", {"jpg": image_bytes(), "txt": b"a red square"})])
    (wds / "00000_stats.json").write_text("{}")
    par = tmp_path / "par"
    par.mkdir()
    pq.write_table(pa.table({"key": ["000000000", "000000001"], "jpg": [image_bytes(), image_bytes()],
                             "caption": [None, "a red square"], "status": ["success", "success"]}), par / "00000.parquet")
    files = tmp_path / "files" / "00000"
    files.mkdir(parents=True)
    (files / "000000000.jpg").write_bytes(image_bytes())
    (files / "000000000.txt").write_bytes(b"")
    (files / "000000001.jpg").write_bytes(image_bytes())
    (files / "000000001.txt").write_bytes(b"a red square")
    reasons = {}
    for name in ("wds", "par", "files"):
        v = ingest(Store(str(tmp_path / f"store-{name}")), IngestConfig(), source=str(tmp_path / name)).version
        reasons[name] = {r["key"].split("_", 1)[1]: r["reason"] for r in v.rejects().to_pylist()}
    assert reasons == {n: {"000000000": "caption-empty"} for n in reasons}


def test_ingest_answering_with_an_earlier_version_moves_latest(tmp_path):
    """Regression (#27): a tar added, then removed: the ingest found its earlier version committed and printed
    'reused', but `latest` stayed on the bigger version, so `run --from parse` worked on the wrong data."""
    src = plain_tars(tmp_path / "src", ["a", "b"])
    store = Store(str(tmp_path / "store"))
    first = ingest(store, IngestConfig(), source=str(src)).version
    plain_tars(src, ["c"])
    assert ingest(store, IngestConfig(), source=str(src)).version.id != first.id
    (src / "c.tar").unlink()
    again = ingest(store, IngestConfig(), source=str(src))
    assert again.status == "reused" and again.version.id == first.id
    assert store.open("images").id == first.id


def test_glob_magic_in_a_source_name_is_taken_literally(tmp_path):
    """Regression (#27): `shots[1]` was read as a glob and ingested `shots1`."""
    write_folder_source(tmp_path / "shots[1]", {"mine.jpg": (image_bytes(), "a red square")})
    write_folder_source(tmp_path / "shots1", {"other.jpg": (image_bytes(), "a red square")})
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(tmp_path / "shots[1]")).version
    assert keys_of_table(v) == ["mine"]
    # a pattern that names nothing as written is still a glob
    both = ingest(Store(str(tmp_path / "store2")), IngestConfig(), source=str(tmp_path / "shots*")).version
    assert sorted(keys_of_table(both)) == ["mine", "other"]


@pytest.mark.timeout(60)
def test_folder_entries_are_regular_files_inside_the_source(tmp_path):
    """Regression (#27): a FIFO or a link to /dev/zero named .jpg hung the planning; a link named .jpg to a file
    outside the source (a secret) was followed and its first bytes reached the rejects table."""
    import os

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-TOKEN-0123456789")
    src = write_folder_source(tmp_path / "src", {"good.jpg": (image_bytes(), "a red square"),
                                                 "fifo.jpg": (None, "a pipe"), "zero.jpg": (None, "endless zeros"),
                                                 "leak.jpg": (None, "a secret"), "alias.jpg": (None, "a link inside"),
                                                 "broken.jpg": (None, "a broken link")})
    os.mkfifo(src / "fifo.jpg")
    os.symlink("/dev/zero", src / "zero.jpg")
    os.symlink(secret, src / "leak.jpg")
    os.symlink(src / "good.jpg", src / "alias.jpg")
    os.symlink(src / "nowhere.jpg", src / "broken.jpg")
    os.symlink(src, src / "loop")                                   # a folder link back to the source
    v = ingest(Store(str(tmp_path / "store")), IngestConfig(), source=str(src)).version
    assert sorted(keys_of_table(v)) == ["alias", "good"]
    rejects = {r["key"]: r for r in v.rejects().to_pylist()}
    assert {k: r["reason"] for k, r in rejects.items()} == {
        "fifo": "file-not-regular", "zero": "symlink-outside-source", "leak": "symlink-outside-source",
        "broken": "file-not-regular"}
    everything = json.dumps(v.manifest) + json.dumps(v.rejects().to_pylist()) + json.dumps(v.read_table().to_pylist())
    assert "SECRET" not in everything and v.manifest["rows_in"] == v.manifest["rows_out"] + v.manifest["rows_rejected"]


@pytest.mark.parametrize("change", ["replaced", "removed"])
@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_a_source_file_changed_after_planning_fails_the_part_and_a_rerun_plans_again(tmp_path, monkeypatch, change,
                                                                                     layout):
    """Regression (#27): a file replaced between planning and reading landed in a version whose id was computed
    from the original bytes; a file removed mid-run crashed."""
    from tasks.engine.runner import StageError
    import tasks.stages.ingest as ingest_module

    if layout == "folder":
        src = write_folder_source(tmp_path / "src", {"a.jpg": (image_bytes(color=(1, 2, 3)), "a thing"),
                                                     "b.jpg": (image_bytes(color=(4, 5, 6)), "b thing")})
        victim = src / "a.jpg"
    else:
        src = plain_tars(tmp_path / "src", ["a"])
        victim = src / "a.tar"
    new_bytes = image_bytes(color=(250, 250, 0)) if layout == "folder" else None
    real = ingest_module.ingest_part

    def racing(writer, task, cfg):   # the source changes after planning, before the part reads it
        if victim.exists():
            if change == "removed":
                victim.unlink()
            elif layout == "folder":
                victim.write_bytes(new_bytes)
            else:
                write_tar_source(victim, [("a-0", {"jpg": image_bytes(color=(9, 9, 9)), "txt": b"rewritten"})])
        return real(writer, task, cfg)

    monkeypatch.setattr(ingest_module, "ingest_part", racing)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StageError, match="after the ingest was planned") as exc:
        ingest(store, IngestConfig(), source=str(src))
    assert "run the ingest again" in str(exc.value) and str(victim) in str(exc.value)
    monkeypatch.setattr(ingest_module, "ingest_part", real)
    if layout == "tar" and change == "removed":
        return   # nothing left to ingest
    v = ingest(store, IngestConfig(), source=str(src)).version
    if layout == "folder" and change == "replaced":
        import hashlib
        stored = {s["__key__"]: s["jpg"] for s in v.iter_samples()}
        assert hashlib.sha256(stored["a"]).hexdigest() == hashlib.sha256(new_bytes).hexdigest()
    assert v.manifest["rows_in"] == v.manifest["rows_out"] + v.manifest["rows_rejected"]


def test_caption_normalisation_cost_is_bounded():
    """Regression (#27): a 1 MB caption of combining marks (under the 4 MiB limit) made NFC quadratic (killed at
    240 s). A run longer than Unicode's stream-safe limit is rejected, in linear time. (In a child process: NFC
    runs in C, where no timeout signal reaches it; the bound only stops a hang.)"""
    import subprocess
    import sys

    code = ("from tasks.stages.ingest import normalise_caption\n"
            "print(repr(normalise_caption('a' + '\\u0301\\u0316' * 500_000, 1000)))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("normalising a 1 MB caption of combining marks did not end in 120 s")
    text, problem = eval(proc.stdout)
    assert text is None and problem.startswith("caption-combining-marks") and "character 1" in problem
    assert normalise_caption("cafe\u0301 ", 100)[0] == "café"           # ordinary marks are composed as before
    assert normalise_caption("z" + "\u0301" * 30, 100)[1] is None
