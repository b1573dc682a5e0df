"""Hostile inputs: bad images and captions through the whole loop (each used correctly or rejected
with its reason, nothing crashes, counts reconcile in every stage), then one test per class of
hostile source: name limits, container bombs, bad fields, silent losses, untrusted decoders,
contradictory configuration and duplicate keys across parts."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.data_engine import data_engine_flow
from storage import Store
from storage.shards import write_tar
from tasks.engine.config import ConfigError, IngestConfig, load_config
from tasks.stages.ground import crop_key
from tasks.stages.ingest import MAX_KEY_CHARS, folder_key, make_key, validate_image
from tests.fixtures import ingest

RED_SQUARE = "a red square on the grass"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def scene(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), (40, 160, 40), np.uint8)
    x, y = rng.integers(5, size[0] - 40), rng.integers(5, size[1] - 40)
    arr[y:y + 30, x:x + 30] = (220, 30, 30)
    return Image.fromarray(arr)


def png_bomb(width=20000, height=20000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


# A PostScript program named .jpg: Pillow would hand it to Ghostscript where `gs` exists.
EPS_PROGRAM = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n"


def float_tiff(value: float, size=(64, 48)) -> bytes:
    return encode(Image.fromarray(np.full((size[1], size[0]), value, np.float32), "F"), "TIFF")


def corpus() -> list[tuple[str, bytes | None, object, str]]:
    """(file name, image bytes or None when absent, captions, expected: 'used' or the reject reason)."""
    good = encode(scene(0), "JPEG")
    png = encode(scene(1), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(scene(2, (120, 60)), "JPEG", exif=exif)
    corrupt_exif = good[:2] + b"\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff\xff\xff" + good[2:]
    pal = Image.new("P", (64, 64))
    pal.putpalette([0, 0, 0, 200, 30, 30] * 128)
    frames = [scene(i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    deep = Image.fromarray((np.arange(80 * 96, dtype=np.uint16).reshape(80, 96) * 7), "I;16")
    return [
        ("ok1.jpg", good, RED_SQUARE, "used"),
        ("ok2.png", png, ["a red box on grass", "a square"], "used"),
        ("zero.jpg", b"", RED_SQUARE, "empty-file"),
        ("truncated.jpg", good[: len(good) // 2], RED_SQUARE, "decode-error"),
        ("truncated-png.png", png[: len(png) // 2], RED_SQUARE, "decode-error"),  # own key: not a duplicate
        ("wrongext.jpg", png, RED_SQUARE, "used"),                      # a PNG named .jpg decodes as PNG
        ("page.jpg", b"<!DOCTYPE html><html><body>404</body></html>", RED_SQUARE, "not-an-image"),
        ("random.png", bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)), RED_SQUARE,
         "not-an-image"),
        ("bomb.png", png_bomb(), RED_SQUARE, "decompression-bomb"),
        ("tiny.png", encode(Image.new("RGB", (1, 1)), "PNG"), RED_SQUARE, "too-small"),
        ("long.png", encode(Image.new("L", (100000, 1)), "PNG"), RED_SQUARE, "too-small"),
        ("wide.png", encode(Image.new("RGB", (4000, 40)), "PNG"), RED_SQUARE, "bad-aspect-ratio"),
        ("cmyk.jpg", encode(scene(3).convert("CMYK"), "JPEG"), RED_SQUARE, "used"),
        ("deep.png", encode(deep, "PNG"), RED_SQUARE, "used"),
        ("palette.png", encode(pal, "PNG", transparency=0), RED_SQUARE, "used"),
        ("rgba.png", encode(scene(4).convert("RGBA"), "PNG"), RED_SQUARE, "used"),
        ("gray.jpg", encode(scene(5).convert("L"), "JPEG"), RED_SQUARE, "used"),
        ("animated.gif", gif.getvalue(), RED_SQUARE, "used"),
        ("rotated.jpg", rotated, RED_SQUARE, "used"),
        ("badexif.jpg", corrupt_exif, RED_SQUARE, "used"),
        ("photo.webp", encode(scene(6), "WEBP"), RED_SQUARE, "used"),
        ("photo.bmp", encode(scene(7), "BMP"), RED_SQUARE, "used"),
        ("photo.tiff", encode(scene(8), "TIFF"), RED_SQUARE, "used"),
        ("absent.jpg", None, RED_SQUARE, "missing-image"),
        ("nocaption.jpg", encode(scene(9), "JPEG"), None, "missing-caption"),
        ("emptycap.jpg", encode(scene(10), "JPEG"), "", "caption-empty"),
        ("spaces.jpg", encode(scene(11), "JPEG"), " \t\n ", "caption-empty"),
        ("badutf8.jpg", encode(scene(12), "JPEG"), b"caf\xe9 \xff\xfe", "caption-not-utf8"),
        ("huge.jpg", encode(scene(13), "JPEG"), "a red square " * 80_000, "used"),   # ~1 MB, cut
        ("control.jpg", encode(scene(14), "JPEG"), "a red\x00 square\x07 on the\x1b grass", "used"),
        ("mixed.jpg", encode(scene(15), "JPEG"), ["a red square on the grass", "красный квадрат на траве"], "used"),
        ("dup.jpg", encode(scene(16), "JPEG"), RED_SQUARE, "used"),
        ("dup.png", encode(scene(17), "PNG"), RED_SQUARE, "duplicate-key"),       # the same key as dup.jpg
        # Keys over USTAR's 100 characters: the crop key (`_t<id>_<rank>`) must pass ground too.
        ("k" * 94 + ".jpg", encode(scene(18), "JPEG"), RED_SQUARE, "used"),
        ("l" * 200 + ".jpg", encode(scene(19), "JPEG"), RED_SQUARE, "used"),
        ("/".join(["nested-folder-level"] * 6) + "/deep.jpg", encode(scene(20), "JPEG"), RED_SQUARE, "used"),
        ("floatnan.tif", float_tiff(np.nan), RED_SQUARE, "invalid-pixels"),
        ("program.jpg", EPS_PROGRAM, RED_SQUARE, "not-an-image"),
    ]


def write_source(root: Path) -> Path:
    root.mkdir(parents=True)
    lines = []
    for name, data, captions, _ in corpus():
        if data is not None:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        if captions is None:
            continue
        if isinstance(captions, bytes):
            lines.append(b'{"file": "' + name.encode() + b'", "caption": "' + captions + b'"}')
        else:
            field = "captions" if isinstance(captions, list) else "caption"
            lines.append(json.dumps({"file": name, field: captions}).encode())
    for i in range(12):  # ordinary samples, so the tiny models have something to learn from
        (root / f"plain{i:02d}.jpg").write_bytes(encode(scene(100 + i), "JPEG"))
        lines.append(json.dumps({"file": f"plain{i:02d}.jpg", "caption": RED_SQUARE}).encode())
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    from ram_model.detector import build_tiny_detector

    root = tmp_path_factory.mktemp("hostile")
    source = write_source(root / "source")
    build_tiny_detector(["square", "box"], seed=0, image_size=128).save(root / "detector")
    (root / "tags.txt").write_text("square\nbox\nred\ngrass\nphoto")
    cfg = load_config(None, [f"store.url={root / 'store'}", f"ingest.source={source}",
                             f"parse.labels={root / 'tags.txt'}", f"ground.detector.model={root / 'detector'}",
                             "ground.detector.box_threshold=0.05", "ground.detector.text_threshold=0.05",
                             "train.steps=2", "generate.baseline_steps=null", "train.batch_size=4", "train.warmup_steps=1", "train.init=null",
                             "train.holdout_fraction=0.2", "generate.max_length=8", "clean.min_crops=2"])
    import os

    os.environ["RAM_ENGINE_CACHE"] = str(root / "cache")
    return data_engine_flow.fn(cfg), cfg


def test_at_least_25_kinds():
    assert len(corpus()) >= 25


def test_each_input_is_used_or_rejected_with_its_reason(hostile_run):
    results, cfg = hostile_run
    images = results["ingest"].version
    used = {r["key"]: r for r in images.read_table().to_pylist()}
    rejects = {r["key"]: r for r in images.rejects().to_pylist()}
    for name, _, _, expected in corpus():
        key = folder_key(name)
        if expected == "used":
            assert key in used, f"{name} should be used; rejected: {rejects.get(key)}"
        else:
            assert key in rejects and rejects[key]["reason"] == expected, \
                f"{name}: expected {expected}, got {rejects.get(key) or 'used'}"
            assert rejects[key]["detail"] and rejects[key]["field"], name
    cut = used["huge"]["captions"][0]
    assert len(cut) <= 1000 and ("a red square " * 80_000)[len(cut)] == " "  # cut at a word boundary
    assert "\x00" not in used["control"]["captions"][0] and "\x07" not in used["control"]["captions"][0]
    assert (used["rotated"]["width"], used["rotated"]["height"]) == (60, 120)  # EXIF orientation applied
    samples = {s["__key__"]: s for s in images.iter_samples()}
    for key in ("cmyk", "deep", "palette", "rgba", "gray", "animated", "photo"):
        data = next(v for k, v in samples[key].items() if k in ("jpg", "png", "webp"))
        assert Image.open(io.BytesIO(data)).mode == "RGB", key
    # The non-Latin caption is rejected by the parse stage with its reason; its Latin sibling is parsed.
    parsed_rejects = {(r["key"], r["field"]): r["reason"] for r in results["parse"].version.rejects().to_pylist()}
    assert parsed_rejects.get(("mixed", "captions[1]")) == "non-latin-script"
    # Long keys went through every stage: bounded, and their crops (key + `_t<id>_<rank>`) were written.
    long_keys = {folder_key(name) for name, *_ in corpus() if len(folder_key(name)) >= 94}
    assert len(long_keys) == 3 and all(len(k) <= MAX_KEY_CHARS for k in long_keys)
    for stage in ("parse", "generate"):
        assert long_keys <= set(results[stage].version.read_table(columns=["key"]).column("key").to_pylist()), stage
    crop_keys = {s["__key__"] for s in Store(cfg.store.url).open("regions").iter_samples()}
    assert any(len(k) > 100 for k in crop_keys), "no crop of a long key was written"


def test_counts_reconcile_in_every_stage(hostile_run):
    results, cfg = hostile_run
    for step, result in results.items():
        m = result.version.manifest
        assert m["rows_in"] == m["rows_out"] + m["rows_rejected"], step
    store = Store(cfg.store.url)
    assert results["ingest"].version.manifest["rows_in"] == len(corpus()) + 12
    assert store.open("clean").manifest["rows_in"] == results["generate"].version.manifest["rows_out"]


# ============================================================================ hostile sources, by class
# Each class below used to cost more than one sample (a part, the whole ingest, memory, or samples
# lost without a count); each test holds the filed examples and cases of our own.
def tar_with(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    """A tar holding exactly these members, in this order (a sample's members need not be adjacent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def ingest_source(tmp_path: Path, source: Path, store: str = "store", **cfg):
    return ingest(Store(str(tmp_path / store)), IngestConfig(**cfg), source=str(source)).version


def reconciles(version) -> bool:
    m = version.manifest
    return m["rows_in"] == m["rows_out"] + m["rows_rejected"]


def keys_of(version) -> list[str]:
    return version.read_table(columns=["key"]).column("key").to_pylist()


def rejects_of(version) -> dict[str, dict]:
    return {r["key"]: r for r in version.rejects().to_pylist()}


JPEG = encode(scene(50), "JPEG")


# ---- 1. name limits ---------------------------------------------------------------------------------
def test_keys_of_any_length_work_and_outside_readers_see_them_whole(tmp_path):
    import webdataset as wds

    names = ["a" * 94, "b" * 120, "c" * 400, "c" * 399 + "d",                    # c*: same head, distinct keys
             "/".join(["folder"] * 30) + "/img", "ünïcödé-" + "x" * 100]
    members = [(f"{n}.{ext}", data) for n in names for ext, data in (("jpg", JPEG), ("txt", RED_SQUARE.encode()))]
    v = ingest_source(tmp_path, tar_with(tmp_path / "src" / "long.tar", members))
    keys = keys_of(v)
    assert len(keys) == len(names) == len(set(keys)) and v.manifest["rows_rejected"] == 0
    assert all(len(k) <= MAX_KEY_CHARS for k in keys) and "a" * 94 in keys and "b" * 120 in keys
    assert make_key("c" * 400) != make_key("c" * 399 + "d")       # cut keys end in a digest of the whole name
    # The crop keys ground derives (`<key>_t<id>_<rank>`) pass the shard writer; outside readers see
    # every member name whole (PAX headers), and webdataset groups them back into samples.
    crops = [{"__key__": crop_key(k, 4585, 12), "jpg": JPEG} for k in keys]
    shard = tmp_path / "crops.tar"
    with open(shard, "wb") as fh:
        write_tar(fh, crops)
    with tarfile.open(shard) as tar:
        assert sorted(tar.getnames()) == sorted(f"{c['__key__']}.jpg" for c in crops)
    seen = [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]
    assert sorted(seen) == sorted(c["__key__"] for c in crops)
    assert max(len(k) for k in seen) > 100
    with open(v.store.abs(v.files("shard")[0]["path"]), "rb") as fh, tarfile.open(fileobj=fh) as tar:
        assert {n.rsplit(".", 1)[0] for n in tar.getnames()} == set(keys)


def test_short_keys_keep_their_exact_shard_bytes():
    """PAX headers appear only where USTAR cannot hold the name: old shards stay byte-identical."""
    ustar, pax = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=ustar, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("k.txt")
        info.size, info.mode = 1, 0o444
        tar.addfile(info, io.BytesIO(b"x"))
    write_tar(pax, [{"__key__": "k", "txt": b"x"}])
    assert pax.getvalue() == ustar.getvalue()


# ---- 2. container bombs -------------------------------------------------------------------------------
def gz_bomb(path: Path, member_bytes: int, extra: list[tuple[str, bytes]] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bomb.jpg")
        info.size = member_bytes
        with open("/dev/zero", "rb") as zeros:   # `member_bytes` zeros streamed, never all in memory
            tar.addfile(info, zeros)
        for name, data in [("bomb.txt", RED_SQUARE.encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_container_bombs_cost_one_sample_and_bounded_memory(tmp_path):
    import tracemalloc

    src = tmp_path / "src"
    gz_bomb(src / "bomb.tar.gz", 48 * 2**20, extra=[("ok.jpg", JPEG), ("ok.txt", RED_SQUARE.encode())])
    tar_with(src / "sub" / "dir" / "nested.tar", [("n.jpg", JPEG), ("n.txt", RED_SQUARE.encode()),
                                                  ("bigcap.jpg", JPEG), ("bigcap.txt", b"word " * 300_000)])
    tar_with(src / "z.tgz", [("t.jpg", JPEG), ("t.txt", b"from a tgz")], mode="w:gz")
    tar_with(src / "y.tar.xz", [("x.jpg", JPEG), ("x.txt", b"from an xz tar")], mode="w:xz")
    tar_with(src / "w.tar.bz2", [("w.jpg", JPEG), ("w.txt", b"from a bz2 tar")], mode="w:bz2")
    # An ordinary ingest first, untraced: alone, this test otherwise counts the first ingest's imports and caches
    # (35 MB measured), which have nothing to do with the bomb.
    tar_with(tmp_path / "warm" / "a.tar", [("a.jpg", JPEG), ("a.txt", RED_SQUARE.encode())])
    ingest_source(tmp_path, tmp_path / "warm", store="warm-store")
    tracemalloc.start()
    v = ingest_source(tmp_path, src, max_image_bytes=2**20, max_caption_bytes=2**20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak traced memory {peak} bytes for a 48 MiB member"
    assert sorted(keys_of(v)) == ["n", "ok", "t", "w", "x"]     # compressed and nested tars are read
    rejects = rejects_of(v)
    assert rejects["bomb"]["reason"] == "member-too-large" and "max_image_bytes" in rejects["bomb"]["detail"]
    assert rejects["bigcap"]["reason"] == "member-too-large" and "max_caption_bytes" in rejects["bigcap"]["detail"]
    assert reconciles(v) and v.manifest["rows_in"] == 7


@pytest.mark.slow
def test_ingest_exits_cleanly_after_a_bomb(tmp_path):
    # Reading Parquet with pyarrow's threaded readers let a pool thread free a Python-owned buffer after the read
    # returned: the finished process then aborted at exit (134, "terminate called without an active exception")
    # in 4 of 8 runs on this source. A scheduler sees a failed job. Every run must exit 0.
    import subprocess
    import sys

    gz_bomb(tmp_path / "src" / "bomb.tar.gz", 32 * 2**20, extra=[("ok.jpg", JPEG), ("ok.txt", RED_SQUARE.encode())])
    code = ("import sys\nfrom storage import Store\nfrom tasks.engine.config import IngestConfig\nfrom tasks.engine.runner import run\n"
            "from tasks.stages.ingest import STAGE\n"
            "v = run(STAGE, Store(sys.argv[2]), {'ingest': IngestConfig()}, {'source': sys.argv[1]}).version\n"
            "print(v.manifest['rows_out'], *sorted(r['reason'] for r in v.rejects().to_pylist()))\n")
    root = Path(__file__).resolve().parents[1]
    for i in range(8):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / f"store{i}")],
                              capture_output=True, text=True, cwd=root, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert (proc.returncode, proc.stdout.split()) == (0, ["1", "not-an-image"]), f"run {i}: {proc.returncode} {proc.stderr[-500:]}"


def test_oversized_folder_files_and_caption_rows_are_rejected_unread(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.jpg").write_bytes(JPEG)
    (src / "huge.jpg").write_bytes(JPEG + bytes(3 * 2**20))
    (src / "captions.jsonl").write_text("\n".join(
        [json.dumps({"file": "ok.jpg", "caption": RED_SQUARE}), json.dumps({"file": "huge.jpg", "caption": "x"}),
         json.dumps({"file": "gone.jpg", "caption": "y" * 3 * 2**20})]) + "\n")
    v = ingest_source(tmp_path, src, max_image_bytes=2**20, max_caption_bytes=2**20)
    rejects = rejects_of(v)
    assert keys_of(v) == ["ok"] and rejects["huge"]["reason"] == "file-too-large"
    assert rejects["captions_jsonl_3"]["reason"] == "captions-row-too-large"
    assert reconciles(v)


# ---- 3. one bad field costs one sample ------------------------------------------------------------
@pytest.mark.parametrize("caption,reason", [
    (7, "bad-caption-type"), ([1, 2], "bad-caption-type"), ({"en": "a dog"}, "bad-caption-type"),
    (["a dog", None], "bad-caption-type"), (True, "bad-caption-type"), ("caf\ud800", "caption-not-utf8")])
def test_a_bad_caption_field_costs_its_sample(tmp_path, caption, reason):
    """In a tar's JSON sidecar and in captions.jsonl alike: the sample is rejected with file, line and
    field; every other sample is used."""
    sidecar = json.dumps({"caption": caption}).encode()
    tar = tar_with(tmp_path / "tar" / "00000.tar", [("good.jpg", JPEG), ("good.json", b'{"caption": "a dog"}'),
                                                    ("bad.jpg", JPEG), ("bad.json", sidecar)])
    v = ingest_source(tmp_path, tar, store="s1")
    assert keys_of(v) == ["good"] and rejects_of(v)["bad"]["reason"] == reason
    assert rejects_of(v)["bad"]["field"] == "json" and "bad.json" in rejects_of(v)["bad"]["detail"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(JPEG)
    (folder / "bad.jpg").write_bytes(JPEG)
    (folder / "captions.jsonl").write_text(json.dumps({"file": "good.jpg", "caption": "a dog"}) + "\n"
                                           + json.dumps({"file": "bad.jpg", "caption": caption}) + "\n")
    v = ingest_source(tmp_path, folder, store="s2")
    bad = rejects_of(v)["bad"]
    assert keys_of(v) == ["good"] and bad["reason"] == reason and bad["field"] == "caption"
    assert "captions.jsonl:2" in bad["detail"] and reconciles(v)


def test_json_nested_past_the_parser_costs_one_sample(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    tar = tar_with(tmp_path / "tar" / "0.tar", [("good.jpg", JPEG), ("good.txt", b"a dog"),
                                                ("deep.jpg", JPEG), ("deep.json", deep)])
    v = ingest_source(tmp_path, tar, store="s1")
    assert keys_of(v) == ["good"] and rejects_of(v)["deep"]["reason"] == "bad-caption-json"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(JPEG)
    (folder / "captions.jsonl").write_bytes(json.dumps({"file": "good.jpg", "caption": "a dog"}).encode()
                                            + b"\n" + deep + b"\n")
    v = ingest_source(tmp_path, folder, store="s2")
    assert keys_of(v) == ["good"] and rejects_of(v)["captions_jsonl_2"]["reason"] == "bad-captions-row"
    assert reconciles(v)


def test_folder_source_names_and_csv_rows_cost_only_themselves(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (src / name).write_bytes(JPEG)
    os.makedirs(os.fsencode(src / "sub"), exist_ok=True)
    with open(os.fsencode(src) + b"/sub/caf\xe9.jpg", "wb") as fh:   # a Latin-1 file name: not UTF-8
        fh.write(JPEG)
    long_caption = "a long caption " * 14_000                          # 210 KB: over csv's 128 KiB default
    with open(src / "captions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "caption"])
        w.writerow(["a.jpg", "a red square\non two lines, \"quoted\""])   # a quoted multi-line caption
        w.writerow(["b.jpg", long_caption])
        w.writerow(["c.jpg", "a third caption", "and a second one"])
        fh.write('d.jpg,"never closed\n')
    v = ingest_source(tmp_path, src)
    rows = {r["key"]: r for r in v.read_table().to_pylist()}
    assert rows["a"]["captions"] == ['a red square on two lines, "quoted"']     # not cut at its first line
    assert rows["b"]["captions"][0].startswith("a long caption") and len(rows["b"]["captions"][0]) <= 1000
    assert rows["c"]["captions"] == ["a third caption", "and a second one"]
    rejects = rejects_of(v)
    latin = next(r for r in rejects.values() if r["reason"] == "file-name-not-utf8")
    assert "caf\\udce9.jpg" in latin["detail"] and latin["field"] == "file"
    assert any(r["reason"] == "bad-captions-row" and "captions.csv:6" in r["source"] for r in rejects.values())
    assert rejects["d"]["reason"] == "missing-caption"
    assert reconciles(v)


# ---- 4. silent losses -----------------------------------------------------------------------------
def test_tar_layouts_lose_no_sample_and_count_each_once(tmp_path):
    n = 6
    by_ext = ([(f"{i}.jpg", JPEG) for i in range(n)] + [(f"{i}.txt", f"caption {i}".encode()) for i in range(n)]
              + [(f"{i}.json", b'{"url": "x"}') for i in range(n)])                # tar cf x.tar *.jpg *.txt *.json
    apple = [m for i in range(n) for m in ((f"._{i}.jpg", b"\x00\x05\x16\x07AppleDouble"), (f"{i}.jpg", JPEG),
                                           (f"._{i}.txt", b"\x00\x05\x16\x07"), (f"{i}.txt", b"a thing"))]
    apple += [("__MACOSX/._stray.jpg", b"x"), (".DS_Store", b"x")]
    cases = {"by-extension": (by_ext, n, 0), "appledouble": (apple, n, 0),
             "no-extension": ([("0.jpg", JPEG), ("0.txt", b"a"), ("README", b"x"), ("trailing.", b"y")], 1, 2)}
    for name, (members, out, rejected) in cases.items():
        for spool in (0, 2**20):           # spilled to disk at once, or held in memory
            v = ingest_source(tmp_path, tar_with(tmp_path / name / "x.tar", members), store=f"{name}{spool}",
                              spool_bytes=spool)
            m = v.manifest
            assert (m["rows_out"], m["rows_rejected"], m["rows_in"]) == (out, rejected, out + rejected), name
            assert len(set(keys_of(v))) == out, name
    rows = {r["key"]: r for r in v.read_table().to_pylist()}
    assert set(rows) == {"0"}
    assert {r["reason"] for r in rejects_of(v).values()} == {"member-without-extension"}


def test_a_nul_in_a_member_name_is_counted_not_lost(tmp_path):
    path = tar_with(tmp_path / "src" / "x.tar", [("good.jpg", JPEG), ("good.txt", b"a"), ("cutXjpg.jpg", JPEG)])
    data = bytearray(path.read_bytes())
    at = data.find(b"cutXjpg.jpg")
    data[at + 3] = 0                                           # the name now reads "cut" (NUL-cut)
    header = data[at:at + 512]
    header[148:156] = b" " * 8
    header[148:155] = f"{sum(header):06o}\0".encode()          # a valid checksum for the edited header
    data[at:at + 512] = header
    path.write_bytes(bytes(data))
    v = ingest_source(tmp_path, path)
    assert keys_of(v) == ["good"] and v.manifest["rows_in"] == 2 and reconciles(v)
    assert rejects_of(v)["cut"]["reason"] == "member-without-extension"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["flipped-header-byte", "size-lie", "cat", "gzip-cut-at-header", "trailing-bytes",
                                    "pax-size-40-digits"])
def test_the_filed_tar_damage_is_counted_with_its_offset(tmp_path, damage):
    """Regression (#27): a tar read as a stream ended silently at damage. One flipped header byte in a 6-sample tar
    gave "rows in 3 = out 3"; a size field that lies, `cat a.tar b.tar`, a gzip cut at a header boundary and
    trailing bytes all "reconciled"; a PAX `size=` of 40 digits looped."""
    samples = gen_samples(random.Random(7), 6, "k")
    data, members = tar_of(samples)
    name, must_out = "x.tar", 5
    if damage == "flipped-header-byte":
        data[members[6].offset + 3] ^= 0x20                      # a byte of k003.jpg's name
    elif damage == "size-lie":
        set_header(data, members[4].offset, size=members[4].size + 1024)   # k002.jpg claims k002.txt
    elif damage == "cat":
        data += tar_of(gen_samples(random.Random(8), 2, "c"))[0]
        must_out = 8
    elif damage == "gzip-cut-at-header":
        cut = members[8].offset                                  # k004.jpg's header: the tar loses k004 and k005
        data = bytearray(gzip.compress(bytes(data[:cut])) + gzip.compress(bytes(data[cut:]))[:20])
        name, must_out = "x.tar.gz", 4
    elif damage == "trailing-bytes":
        data += b"GARBAGE" * 100
        must_out = 6
    else:
        record = " size=" + "9" * 40 + "\n"
        data[members[2].offset:members[2].offset] = extended_header(
            b"x", f"{len(record) + len(str(len(record) + 2))}{record}".encode())
        must_out = 6
    path = tmp_path / "src" / name
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    v = ingest_source(tmp_path, path)
    m, rejects = v.manifest, v.rejects().to_pylist()
    assert reconciles(v) and m["rows_out"] == must_out, (m["rows_in"], m["rows_out"], rejects)
    assert any(r["reason"].startswith("source-") and "byte" in r["detail"] for r in rejects), rejects
    assert {k for k, *_ in samples[:must_out if damage != "cat" else 6]} <= set(keys_of(v)) | set(rejects_of(v))


# ---- 5. decoders reached by untrusted bytes ---------------------------------------------------------
def test_only_accepted_formats_reach_a_decoder(tmp_path, monkeypatch):
    """An EPS program named .jpg never reaches Ghostscript (a stub `gs` proves it), and a float TIFF
    of NaNs is rejected instead of becoming a black image."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-was-run"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ico, ppm = io.BytesIO(), io.BytesIO()
    scene(1).save(ico, "ICO")
    scene(2).save(ppm, "PPM")
    cfg = IngestConfig()
    for data in (EPS_PROGRAM, b"\xc5\xd0\xd3\xc6" + EPS_PROGRAM, ico.getvalue(), ppm.getvalue()):
        out, problem = validate_image(data, cfg)
        assert out is None and problem[0] == "not-an-image", problem
    assert not marker.exists()
    for value in (np.nan, np.inf):
        out, problem = validate_image(float_tiff(value), cfg)
        assert out is None and problem[0] == "invalid-pixels"
    out, problem = validate_image(float_tiff(0.5), cfg)                 # finite floats are still used
    assert problem is None and out["width"] == 64


# ---- 6. contradictory or hostile configuration ------------------------------------------------------
@pytest.mark.parametrize("overrides,field", [
    (["ingest.min_side=2000", "ingest.max_side=1000"], "ingest.min_side"),
    (["ingest.min_side=100", "ingest.max_pixels=5000"], "ingest.max_pixels"),
    (["generate.min_length=40", "generate.max_length=10"], "generate.min_length"),
    (["ground.detector.shortest_edge=900", "ground.detector.longest_edge=800"], "ground.detector.shortest_edge"),
    (["ingest.max_image_bytes=10"], "ingest.max_image_bytes"),
    (["ingest.min_side=[1,"], "ingest.min_side")])
def test_contradictory_config_is_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert "\n" not in str(exc.value) and field in str(exc.value)


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    bad = {"a-directory": None, "open.yaml": b"ingest: {min_side: [1, 2\n", "latin1.yaml": b"ingest: {source: caf\xe9}\n",
           "list.yaml": b"- 1\n- 2\n", "tabs.yaml": b"ingest:\n\tsource: x\n"}
    for name, content in bad.items():
        path = tmp_path / name
        path.mkdir() if content is None else path.write_bytes(content)
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value), name


# ---- 7. duplicate keys across parts -----------------------------------------------------------------
def sample_tar(path: Path, keys: list[str], caption: str) -> Path:
    return tar_with(path, [m for k in keys for m in ((f"{k}.jpg", JPEG), (f"{k}.txt", caption.encode()))])


def test_duplicate_keys_across_parts_are_rejected_naming_both_sources(tmp_path):
    src = tmp_path / "src"
    sample_tar(src / "a.tar", [f"{i:04d}" for i in range(6)], "from a")
    sample_tar(src / "b.tar", [f"{i:04d}" for i in range(3, 9)], "from b")
    runs = [ingest_source(tmp_path, src, store=f"store{i}") for i in range(2)]
    for v in runs:
        rows = {r["key"]: r for r in v.read_table().to_pylist()}
        assert len(rows) == len(keys_of(v)) == 9 and reconciles(v)
        assert rows["0004"]["captions"] == ["from a"] and rows["0008"]["captions"] == ["from b"]
        dup = rejects_of(v)["0004"]
        assert dup["reason"] == "duplicate-key" and "a.tar:0004" in dup["detail"] and dup["source"] == "b.tar:0004"
    assert runs[0].id == runs[1].id and runs[0].rejects().to_pylist() == runs[1].rejects().to_pylist()


def test_incremental_ingest_keeps_the_keys_it_extends(tmp_path):
    """New data that sorts before the old and reuses its keys is what gets rejected; the old parts
    are referenced as they are."""
    src = tmp_path / "src"
    sample_tar(src / "b.tar", ["k1", "k2"], "old")
    store = Store(str(tmp_path / "store"))
    first = ingest(store, IngestConfig(), source=str(src))
    sample_tar(src / "a.tar", ["k2", "k3"], "new")
    grown = ingest(store, IngestConfig(), source=str(src))
    assert grown.parts_reused == 1 and grown.parts_written == 1
    rows = {r["key"]: r["captions"] for r in grown.version.read_table().to_pylist()}
    assert rows == {"k1": ["old"], "k2": ["old"], "k3": ["new"]}
    dup = rejects_of(grown.version)["k2"]
    assert dup["reason"] == "duplicate-key" and "b.tar:k2" in dup["detail"] and reconciles(grown.version)
    assert ingest(store, IngestConfig(), source=str(src)).status == "reused"
    assert first.version.read_table().to_pylist() == [r for r in grown.version.read_table().to_pylist()
                                                     if r["source"].startswith("b.tar")]


def test_folder_keys_are_unique_across_parts_and_missing_files_take_none(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("x.jpg", "x.png", "y.png", "z.jpg"):
        (src / name).write_bytes(JPEG)
    (src / "captions.jsonl").write_text("".join(json.dumps({"file": n, "caption": f"a {n}"}) + "\n"
                                                for n in ("x.jpg", "x.png", "y.jpg", "y.png", "z.jpg")))
    v = ingest_source(tmp_path, src, part_size=1)               # part_size 1: every file is a part of its own
    assert len(v.parts) == 5 and reconciles(v)
    rows = {r["key"]: r["captions"] for r in v.read_table().to_pylist()}
    assert rows == {"x": ["a x.jpg"], "y": ["a y.png"], "z": ["a z.jpg"]}
    rejects = v.rejects().to_pylist()
    assert sorted((r["key"], r["reason"]) for r in rejects) == [("x", "duplicate-key"), ("y", "missing-image")]
    assert next(r for r in rejects if r["reason"] == "duplicate-key")["source"].startswith("x.png")


# ============================================================================ generated hostile sources, by class
# Each generator makes seeded, reproducible cases of one class of #27 (tar damage, names, links and special files,
# img2dataset metadata lies), so a new pass meets the class, not the filed case. Every case must reconcile
# (rows in = out + rejected), account for every sample it held (used, or rejected saying where), and end in time.


def gen_samples(rng: random.Random, n: int, prefix: str) -> list[tuple[str, bytes, bytes]]:
    return [(f"{prefix}{i:03d}", encode(scene(rng.randrange(10**6), (64, 48)), "JPEG"),
             f"a red square {prefix} {i} {rng.randrange(10**6)}".encode()) for i in range(n)]


def tar_of(samples: list[tuple[str, bytes, bytes]]) -> tuple[bytearray, list[tarfile.TarInfo]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, jpg, txt in samples:
            for ext, data in (("jpg", jpg), ("txt", txt)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        members = tar.getmembers()
    return bytearray(buf.getvalue()), members


def set_header(data: bytearray, offset: int, **fields) -> None:
    """Rewrite numeric fields of the header at `offset` and give it a valid checksum (a lie, not damage)."""
    spans = {"size": (124, 136)}
    for name, value in fields.items():
        lo, hi = spans[name]
        data[offset + lo:offset + hi] = f"{value:0{hi - lo - 1}o}".encode()[-(hi - lo - 1):] + b"\0"
    data[offset + 148:offset + 156] = b" " * 8
    data[offset + 148:offset + 155] = f"{sum(data[offset:offset + 512]):06o}\0".encode()


def extended_header(kind: bytes, payload: bytes) -> bytes:
    info = tarfile.TarInfo("././@LongLink" if kind == b"L" else "./PaxHeaders/x")
    info.type, info.size = kind, len(payload)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)


DAMAGE = ("flip-header", "size-lie", "zeroed-header", "truncate", "trailing", "concat", "gzip-cut", "pax-size-bomb",
          "longname-bomb")


def damaged_tar(seed: int) -> tuple[str, bytes, list, set[str], dict]:
    """(damage kind, tar bytes, original samples, keys that must be used or rejected, what else is expected)."""
    rng = random.Random(seed)
    kind = DAMAGE[seed % len(DAMAGE)]
    samples = gen_samples(rng, rng.randrange(3, 8), f"s{seed}-")
    data, members = tar_of(samples)
    must = {k for k, *_ in samples}
    expect = {"source_reject": True, "exact": True}
    # (a size lie on the last member only swallows the end-of-archive zeros: harmless, and no tar can tell)
    victim = rng.randrange(len(members) - (kind == "size-lie"))
    at = members[victim].offset
    if kind == "flip-header":
        data[at + rng.randrange(512)] ^= rng.randrange(1, 256)
    elif kind == "size-lie":
        size = members[victim].size
        set_header(data, at, size=size + 512 * rng.randrange(1, 4) if rng.random() < 0.5 or size < 2
                   else rng.randrange(1, size))
    elif kind == "zeroed-header":
        data[at:at + 512] = bytes(512)
    elif kind == "truncate":
        cut = rng.randrange(512, members[-1].offset_data + members[-1].size)
        must = {k for k, *_ in samples if any(m.offset < cut and m.name.startswith(k + ".") for m in members)}
        data = data[:cut]
    elif kind == "trailing":
        data += bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randrange(0, 3000))
    elif kind == "concat":
        more = gen_samples(rng, 3, f"c{seed}-")
        data += tar_of(more)[0]
        samples, must = samples + more, must | {k for k, *_ in more}
    elif kind == "gzip-cut":
        packed = gzip.compress(bytes(data), compresslevel=1)
        data = bytearray(packed[:rng.randrange(20, len(packed) - 8)])
        must, expect = set(), {"source_reject": True, "exact": True, "gzip": True}
    elif kind == "pax-size-bomb":
        digits = "9" * 40
        record = f" size={digits}\n"
        length = len(record) + len(str(len(record) + 2))
        data[at:at] = extended_header(b"x", f"{length}{record}".encode())
    elif kind == "longname-bomb":
        header = bytearray(extended_header(b"L", b"x" * 10))
        set_header(header, 0, size=512 * 2**20)              # says 512 MiB of name; holds 10 bytes
        data[at:at] = header
    return kind, bytes(data), samples, must, expect


@pytest.mark.timeout(240)
def test_generated_tar_damage_is_found_located_and_counted(tmp_path):
    """Random damage to tar headers at random offsets, size fields that lie, cuts (plain and gzip), trailing bytes,
    concatenated archives, a PAX size of 40 digits, a GNU long name of 512 MiB: no hang, bounded memory, counts
    reconcile, every sample the tar held is used (with its own bytes) or rejected saying the byte where."""
    for seed in range(27):
        kind, data, samples, must, expect = damaged_tar(seed)
        name = "x.tar.gz" if expect.get("gzip") else "x.tar"
        path = tmp_path / f"case{seed}" / name
        path.parent.mkdir()
        path.write_bytes(data)
        v = ingest_source(tmp_path, path, store=f"store{seed}", image_format="keep")
        what = f"seed {seed} ({kind})"
        assert reconciles(v), what
        rows = {r["key"]: r for r in v.read_table().to_pylist()}
        rejects = v.rejects().to_pylist()
        rejected = {r["key"] for r in rejects}
        assert must <= rows.keys() | rejected, f"{what}: lost {sorted(must - rows.keys() - rejected)}"
        assert all("byte" in r["detail"] for r in rejects), f"{what}: a reject without its offset: {rejects}"
        if expect["source_reject"]:
            assert any(r["reason"].startswith("source-") for r in rejects), f"{what}: damage not reported: {rejects}"
        originals = {k: (hashlib.sha256(jpg).hexdigest(), txt.decode()) for k, jpg, txt in samples}
        for key, row in rows.items():   # nothing a damaged header misplaced reaches the output
            assert (row["sha256"], row["captions"][0]) == originals[key], f"{what}: {key} holds other bytes"


def glob_name(rng: random.Random) -> str:
    pieces = ["[1]", "*", "?", "{a,b}", "[!x]", "ü", "日本", "\u200b", "\x01", "\x7f", " ", "-", "é", "\t", "e\u0301",
              "..", "~", "$HOME", "'", '"', "\\", "%s", "\ufeff"]
    return "".join(rng.choice(pieces) + rng.choice("abcxyz") for _ in range(rng.randrange(1, 5)))


@pytest.mark.timeout(180)
def test_generated_names_with_glob_magic_unicode_and_control_characters(tmp_path):
    """Random file and folder names (glob and brace magic, unicode, control characters): a source is exactly the
    folder or tar named, each file one sample, used or rejected, keys unique; a sibling the name would match as a
    pattern is never read."""
    from tasks.stages.ingest import folder_key

    for seed in range(6):
        rng = random.Random(1000 + seed)
        folder_name = glob_name(rng) + "[0]"
        root = tmp_path / f"c{seed}"
        src, decoy = root / folder_name, root / (folder_name.replace("[0]", "0"))
        src.mkdir(parents=True)
        decoy.mkdir()
        (decoy / "decoy.jpg").write_bytes(JPEG)
        (decoy / "captions.jsonl").write_text(json.dumps({"file": "decoy.jpg", "caption": RED_SQUARE}) + "\n")
        names = sorted({glob_name(rng) + rng.choice([".jpg", ".png", ".JPG"]) for _ in range(8)})
        lines = []
        for i, name in enumerate(names):
            (src / name).write_bytes(encode(scene(i), "PNG" if name.endswith("png") else "JPEG"))
            lines.append(json.dumps({"file": name, "caption": f"{RED_SQUARE} {i}"}))
        (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
        v = ingest_source(tmp_path, src, store=f"f{seed}")
        assert reconciles(v) and v.manifest["rows_in"] == len(names), seed
        keys = set(keys_of(v)) | set(rejects_of(v))
        assert {folder_key(n) for n in names} <= keys and "decoy" not in keys, seed
        assert len(keys_of(v)) == len(set(keys_of(v)))
        # the same names as members of a tar whose own name has magic in it
        tar = tar_with(root / (glob_name(rng) + "[1].tar"), [m for i, n in enumerate(names) for m in
                                                              ((n, encode(scene(i), "JPEG")),
                                                               (n.rsplit(".", 1)[0] + ".txt", RED_SQUARE.encode()))])
        v = ingest_source(tmp_path, tar, store=f"t{seed}")
        assert reconciles(v) and v.manifest["rows_in"] >= 1, seed


LINK_KINDS = ("regular", "fifo", "link-devzero", "link-secret", "link-inside", "link-broken", "link-dir-loop",
              "link-dir-outside", "nested-regular")


@pytest.mark.timeout(180)
def test_generated_link_and_special_file_layouts(tmp_path):
    """Random layouts of regular files, FIFOs, links to /dev/zero, to a secret outside the source, inside it,
    broken, and folder links (loops, outside): planning never blocks, nothing outside the source is read (not a
    byte of the secret reaches any table), every entry is used or rejected with its reason."""
    secret_dir = tmp_path / "private"
    secret_dir.mkdir()
    (secret_dir / "token.jpg").write_bytes(b"SECRET-TOKEN-" + JPEG)
    expected_reason = {"fifo": "file-not-regular", "link-devzero": "symlink-outside-source",
                       "link-secret": "symlink-outside-source", "link-broken": "file-not-regular"}
    for seed in range(8):
        rng = random.Random(2000 + seed)
        src = tmp_path / f"src{seed}"
        (src / "sub").mkdir(parents=True)
        (src / "base.jpg").write_bytes(encode(scene(seed), "JPEG"))
        layout = {f"e{i}": rng.choice(LINK_KINDS) for i in range(8)}
        lines = [json.dumps({"file": "base.jpg", "caption": RED_SQUARE})]
        for name, kind in layout.items():
            path = src / f"{name}.jpg"
            if kind == "regular":
                path.write_bytes(encode(scene(rng.randrange(999)), "JPEG"))
            elif kind == "nested-regular":
                path = src / "sub" / f"{name}.jpg"
                path.write_bytes(encode(scene(rng.randrange(999)), "JPEG"))
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "link-devzero":
                os.symlink("/dev/zero", path)
            elif kind == "link-secret":
                os.symlink(secret_dir / "token.jpg", path)
            elif kind == "link-inside":
                os.symlink(src / "base.jpg", path)
            elif kind == "link-broken":
                os.symlink(src / "gone.jpg", path)
            elif kind == "link-dir-loop":
                os.symlink(src, src / name)
                continue
            else:
                os.symlink(secret_dir, src / name)
                continue
            rel = path.relative_to(src).as_posix()
            lines.append(json.dumps({"file": rel, "caption": f"{RED_SQUARE} {name}"}))
        (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
        v = ingest_source(tmp_path, src, store=f"store{seed}")
        assert reconciles(v), seed
        used, rejects = set(keys_of(v)), rejects_of(v)
        for name, kind in layout.items():
            key = f"sub_{name}" if kind == "nested-regular" else name
            if kind in ("regular", "nested-regular", "link-inside"):
                assert key in used, (seed, name, kind, rejects.get(key))
            elif kind in expected_reason:
                assert rejects[key]["reason"] == expected_reason[kind], (seed, name, kind)
            else:
                assert not any(k.startswith(name) for k in used | rejects.keys()), (seed, name, kind)
        tables = json.dumps(v.rejects().to_pylist()) + json.dumps(v.read_table().to_pylist()) + json.dumps(v.manifest)
        assert "SECRET" not in tables and "token" not in tables, seed
    # tars behind links and FIFOs are refused the same way, unread
    tars = tmp_path / "tars"
    sample_tar(tars / "ok.tar", ["k1"], "fine")
    os.mkfifo(tars / "pipe.tar")
    os.symlink("/dev/zero", tars / "zero.tar")
    v = ingest_source(tmp_path, tars, store="tars")
    assert keys_of(v) == ["k1"] and sorted(r["reason"] for r in v.rejects().to_pylist()) == [
        "file-not-regular", "symlink-outside-source"] and reconciles(v)


def metadata_lies(seed: int, root: Path) -> tuple[Path, dict[str, str]]:
    """An img2dataset run whose metadata table disagrees with its tar at random: fetched samples the tar lacks,
    failed ones it holds, rows listed twice, null captions. Returns the run and what each key must end as
    ('used' or a reject reason)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(3000 + seed)
    run = root / f"run{seed}"
    run.mkdir(parents=True)
    members, rows, expect = [], [], {}
    for i in range(rng.randrange(4, 10)):
        key = f"00000{i:04d}"
        in_tar, status = rng.random() < 0.7, rng.choice(["success", "success", "failed_to_download"])
        caption = rng.choice([f"a red square {i}", None, ""])
        if in_tar:
            members += [(f"{key}.jpg", encode(scene(i), "JPEG")), (f"{key}.txt", (caption or "").encode())]
            expect[key] = "used" if caption else "caption-empty"
        else:
            expect[key] = "source-missing-sample" if status == "success" else "img2dataset-failed-to-download"
        for _ in range(rng.choice([1, 1, 2])):                 # a row listed twice
            rows.append({"key": key, "status": status, "caption": caption, "url": f"https://x/{i}",
                         "error_message": None if status == "success" else "404"})
    tar_with(run / "00000.tar", members or [("README", b"empty")])
    if not members:
        expect["README"] = "member-without-extension"
    pq.write_table(pa.Table.from_pylist(rows), run / "00000.parquet")
    (run / "00000_stats.json").write_text(json.dumps({"count": rng.randrange(100), "successes": rng.randrange(100)}))
    return run, expect


@pytest.mark.timeout(180)
def test_generated_img2dataset_metadata_lies(tmp_path):
    """img2dataset metadata that lies about its tar: every key of the tar or of the table ends exactly once, as a
    used row or a reject with its reason; nothing silent."""
    for seed in range(10):
        run, expect = metadata_lies(seed, tmp_path)
        v = ingest_source(tmp_path, run, store=f"store{seed}")
        assert reconciles(v), seed
        ended = {r["source_key"]: "used" for r in v.read_table().to_pylist()}
        for r in v.rejects().to_pylist():
            key = r["key"].split("_", 1)[1] if "_" in r["key"] else r["key"]
            assert key not in ended, (seed, key, "twice")
            ended[key] = r["reason"]
        assert ended == expect, seed


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_huge_parquet_cell_is_rejected_before_it_is_decoded(tmp_path):
    """Regression (#27): a tiny img2dataset parquet shard holding one huge image cell peaked at 4x the cell before
    the cell was rejected. Its row group's page headers say the size: the rows are rejected undecoded (child
    processes' peak RSS: this shard against an ordinary one)."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    cell = 96 * 2**20
    for name, image in (("bomb", bytes(cell)), ("plain", JPEG)):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(pa.table({"key": ["000000000"], "jpg": [image], "caption": [RED_SQUARE], "status": ["success"]}),
                       folder / "00000.parquet", compression="zstd")
        pq.write_table(pa.table({"key": ["000000001"], "jpg": [JPEG], "caption": [RED_SQUARE], "status": ["success"]}),
                       folder / "00001.parquet")
    assert (tmp_path / "bomb" / "00000.parquet").stat().st_size < 2**20
    # VmHWM, the child's own peak (ru_maxrss would start from this process's size at the fork)
    code = ("import sys\nfrom storage import Store\nfrom tasks.engine.config import IngestConfig\n"
            "from tasks.engine.runner import run\nfrom tasks.stages.ingest import STAGE\n"
            "v = run(STAGE, Store(sys.argv[2]), {'ingest': IngestConfig()}, {'source': sys.argv[1]}).version\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
            "print(hwm, v.manifest['rows_out'],"
            " *sorted(r['reason'] for r in v.rejects().to_pylist()))\n")
    root = Path(__file__).resolve().parents[1]
    peaks = {}
    for name in ("plain", "bomb"):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / name), str(tmp_path / f"store-{name}")],
                              capture_output=True, text=True, cwd=root, env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = proc.stdout.split()
        peaks[name] = int(out[0]) * 1024
        assert out[1:] == (["2"] if name == "plain" else ["1", "member-too-large"]), out
    assert peaks["bomb"] - peaks["plain"] < 48 * 2**20, f"peak RSS {peaks}: the {cell}-byte cell was decoded"


def test_a_metadata_table_with_a_huge_cell_is_refused_undecoded(tmp_path):
    """img2dataset's metadata table is read whole, so its page headers are checked first: a cell far over the
    caption limit (an EXIF bomb) stops the ingest with a message naming the table, before anything is decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.engine.runner import StageError
    from tasks.stages.ingest import SourceError

    run = tmp_path / "run"
    sample_tar(run / "00000.tar", ["000000000"], "a red square")
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"], "exif": ["x" * (8 * 2**20)]}),
                   run / "00000.parquet", compression="zstd")
    assert (run / "00000.parquet").stat().st_size < 2**20
    with pytest.raises((SourceError, StageError), match=r"00000\.parquet: column exif of row group 0 has a page over"):
        ingest_source(tmp_path, run, max_caption_bytes=2**20)
