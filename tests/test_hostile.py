"""Hostile inputs: 30 kinds of bad image and caption. Each is used correctly or rejected with its
reason, nothing crashes, and counts reconcile in every stage of the loop."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.data_engine import data_engine_flow
from storage import Store
from tasks.config import load_config

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
        ("truncated.png", png[: len(png) // 2], RED_SQUARE, "decode-error"),
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
    ]


def write_source(root: Path) -> Path:
    root.mkdir(parents=True)
    lines = []
    for name, data, captions, _ in corpus():
        if data is not None:
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
        key = name.rsplit(".", 1)[0]
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


def test_counts_reconcile_in_every_stage(hostile_run):
    results, cfg = hostile_run
    for step, result in results.items():
        m = result.version.manifest
        assert m["rows_in"] == m["rows_out"] + m["rows_rejected"], step
    store = Store(cfg.store.url)
    assert results["ingest"].version.manifest["rows_in"] == len(corpus()) + 12
    assert store.open("clean").manifest["rows_in"] == results["generate"].version.manifest["rows_out"]
