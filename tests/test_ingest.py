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
