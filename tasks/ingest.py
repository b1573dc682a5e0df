"""Ingest: validated pixels and normalised captions from a source into an `images` version.

Sources:
  * WebDataset tars as img2dataset writes them (`<key>.jpg|png|webp` + `.txt` + `.json`); one part per tar.
  * A folder of images with a captions file (JSONL: {"file", "caption"|"captions"}; CSV: file,caption[,caption...]);
    files are cut into parts at content-defined boundaries, so adding files changes only the parts they land in.

Every sample is either written (image bytes in a WebDataset shard + a row in the Parquet index) or
rejected with a reason; counts reconcile per part.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tarfile
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps

from storage import PartRecord, Store, VersionWriter, schemas
from storage.store import digest

from .config import IngestConfig, section_dict
from .stage import PartTask, StageResult, run_stage

STAGE = "images"
STAGE_VERSION = "ingest-1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
STORED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")

# We enforce our own pixel limit before decoding; PIL's global one would raise a warning or error first.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class SourceError(ValueError):
    """The source cannot be read at all (not a per-sample problem)."""


@dataclass
class RawSample:
    key: str
    source: str
    image: bytes | None
    image_ext: str | None
    captions: list[bytes | str] | None
    problem: tuple[str, str, str] | None = None   # (reason, detail, field) found while reading the source


# --------------------------------------------------------------------------- keys and captions
def make_key(text: str) -> str:
    """A store key from a source name: letters, digits, '_' and '-' only (no '.' or '/')."""
    key = _KEY_BAD.sub("_", text).strip("_")
    return key or "_" + hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


_CONTROL = {c for c in range(0x20) if c not in (0x09, 0x0A, 0x0D)} | {0x7F}


def normalise_caption(raw: bytes | str, max_chars: int) -> tuple[str | None, str | None]:
    """Return (caption, problem). Captions are UTF-8, NFC, without control characters, single-spaced,
    and cut at a word boundary past `max_chars`."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"caption-not-utf8: invalid byte at {exc.start}"
    if "\ufffd" in raw:
        return None, "caption-not-utf8: contains U+FFFD replacement characters"
    text = unicodedata.normalize("NFC", raw)
    # Control characters become spaces; invisible format characters (zero-width space, BOM) go.
    text = "".join(" " if (ord(ch) in _CONTROL or unicodedata.category(ch) in ("Cc", "Cs"))
                   else "" if unicodedata.category(ch) == "Cf" else ch for ch in text)
    text = " ".join(text.split())
    if not text:
        return None, "caption-empty"
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text, None


# --------------------------------------------------------------------------- image validation
def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0) if hi > 0 else 0.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        norm = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(norm.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" or img.mode in ("LA", "RGBA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, LAB, HSV


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def sniff_format(data: bytes) -> str | None:
    """The image format the first bytes announce, whatever the file name says."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def validate_image(data: bytes, cfg: IngestConfig) -> tuple[dict | None, tuple[str, str] | None]:
    """Decode and check one image. Returns ({bytes, format, width, height, converted}, None) or (None, (reason, detail))."""
    if not data:
        return None, ("empty-file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            width, height = img.size
    except Exception as exc:  # PIL raises many types for non-images
        if sniff_format(data):
            return None, ("decode-error", f"{sniff_format(data)} header but the data does not decode "
                                          f"(truncated or corrupt): {type(exc).__name__}: {exc}"[:300])
        return None, ("not-an-image", f"no known image header ({data[:8]!r}); is it HTML or text?"[:300])
    if width * height > cfg.max_pixels:
        return None, ("decompression-bomb", f"{width}x{height} = {width * height} pixels > max_pixels {cfg.max_pixels}")
    if min(width, height) < cfg.min_side:
        return None, ("too-small", f"{width}x{height}: a side is under min_side {cfg.min_side}")
    if max(width, height) > cfg.max_side:
        return None, ("too-large", f"{width}x{height}: a side is over max_side {cfg.max_side}")
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return None, ("bad-aspect-ratio", f"{width}x{height}: aspect over max_aspect_ratio {cfg.max_aspect_ratio}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()  # full decode: truncated and corrupt data fail here
    except Exception as exc:
        return None, ("decode-error", f"{fmt or 'image'} does not decode: {type(exc).__name__}: {exc}"[:300])
    converted = []
    try:
        rotated = ImageOps.exif_transpose(img)
        if rotated is not img and rotated.size != img.size or rotated.tobytes() != img.tobytes():
            converted.append("exif-orientation")
        img = rotated
    except Exception:
        converted.append("exif-ignored")  # unreadable EXIF: pixels are fine, keep them unrotated
    if img.mode != "RGB":
        converted.append(f"mode-{img.mode}")
        img = _to_rgb(img)
    stored_fmt = STORED_FORMATS.get(fmt or "")
    if stored_fmt and not any(c != "exif-ignored" for c in converted) and not getattr(img, "is_animated", False):
        out = data
    else:
        if getattr(img, "is_animated", False):
            converted.append("first-frame")
        stored_fmt = "jpeg" if fmt == "JPEG" else "png"
        buf = io.BytesIO()
        if stored_fmt == "jpeg":
            img.save(buf, "JPEG", quality=cfg.jpeg_quality)
        else:
            img.save(buf, "PNG", optimize=False)
        out = buf.getvalue()
    return {"bytes": out, "format": stored_fmt, "width": img.size[0], "height": img.size[1],
            "converted": converted}, None


# --------------------------------------------------------------------------- sources
def detect_format(src: str, cfg: IngestConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    fs, path = fsspec.core.url_to_fs(src)
    if path.endswith(".tar") or "{" in path or "*" in path:
        return "webdataset"
    if not fs.exists(path):
        raise SourceError(f"ingest source {src} does not exist; set ingest.source to a tar, a folder of tars, "
                          f"or an image folder with captions.jsonl / captions.csv")
    if fs.isdir(path) and any(p.endswith(".tar") for p in fs.ls(path, detail=False)):
        return "webdataset"
    return "folder"


def list_tars(src: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(src)
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    if "{" in path or "*" in path:
        from braceexpand import braceexpand

        paths = sorted({p for pattern in braceexpand(path) for p in fs.glob(pattern)})
    elif fs.isdir(path):
        paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    else:
        paths = [path]
    if not paths:
        raise SourceError(f"no .tar shards found at {src}")
    return [p if proto in ("file", "local") else f"{proto}://{p}" for p in paths]


def _file_identity(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    return digest({"path": url, "size": info.get("size"), "mtime": str(info.get("mtime") or info.get("ETag") or
                                                                       info.get("LastModified") or "")})


def tar_tasks(src: str) -> list[PartTask]:
    tasks = []
    for url in list_tars(src):
        stem = url.rstrip("/").rsplit("/", 1)[-1][:-4]
        tasks.append(PartTask(name=f"part-{make_key(stem)}", source_digest=_file_identity(url), payload=("tar", url)))
    return tasks


def iter_tar_samples(url: str) -> Iterator[RawSample]:
    """Group tar members by key (basename up to the first dot), img2dataset style."""
    source = url.rsplit("/", 1)[-1]
    current: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> RawSample | None:
        if current is None:
            return None
        key = make_key(current)
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        captions: list[bytes | str] | None = None
        if "txt" in members:
            captions = [members["txt"]]
        elif "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
                cap = meta.get("caption") or meta.get("captions")
                captions = [cap] if isinstance(cap, str) else list(cap) if cap else None
            except (UnicodeDecodeError, ValueError, AttributeError):
                captions = None
        return RawSample(key, f"{source}:{current}", members.get(image_ext) if image_ext else None, image_ext, captions)

    try:
        with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                stem = info.name[: len(info.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower()
                if stem != current:
                    sample = flush()
                    if sample:
                        yield sample
                    current, members = stem, {}
                extracted = tar.extractfile(info)
                members[ext] = extracted.read() if extracted else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        # A damaged tar: the samples before the damage were yielded; the one in progress is lost.
        sample = flush()
        if sample:
            sample.problem = ("source-truncated", f"tar ends mid-sample: {type(exc).__name__}: {exc}", "tar")
            yield sample
        else:
            yield RawSample(make_key(f"{source}-damaged"), source, None, None, None,
                            ("source-truncated", f"tar is damaged: {type(exc).__name__}: {exc}", "tar"))
        return
    sample = flush()
    if sample:
        yield sample
    if not _tar_has_end_marker(url):
        # tarfile reads a cut-off archive as if it ended early: say so instead of leaving a silent gap.
        yield RawSample(make_key(f"{source}-tail"), source, None, None, None,
                        ("source-truncated", "the tar has no end-of-archive marker: it was cut off after the "
                                             "samples that were read; re-fetch the shard", "tar"))


def _tar_has_end_marker(url: str) -> bool:
    """A whole tar ends with two zero blocks (1024 zero bytes)."""
    with fsspec.open(url, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 1024 or size % 512:
            return False
        fh.seek(size - 1024)
        return fh.read(1024) == bytes(1024)


def read_captions_file(path: str) -> tuple[dict[str, list[bytes]], list[tuple[str, str, str]]]:
    """Captions per file name, plus rows that could not be read: (where, reason, detail)."""
    captions: dict[str, list[bytes]] = {}
    problems = []
    is_csv = path.lower().endswith(".csv")
    with fsspec.open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path.rsplit('/', 1)[-1]}:{lineno}"
        if is_csv:
            # Parse on latin-1 so bytes survive as they are; captions are decoded (strictly) later.
            row = next(csv.reader([raw.decode("latin-1")]))
            if lineno == 1 and row and row[0].strip().lower() in ("file", "filename", "path", "image"):
                continue
            if len(row) < 1 or not row[0].strip():
                problems.append((where, "bad-captions-row", "CSV row has no file name in column 1"))
                continue
            name = row[0].strip().encode("latin-1").decode("utf-8", "replace")
            captions.setdefault(name, []).extend(c.encode("latin-1") for c in row[1:])
        else:
            try:
                # surrogateescape keeps invalid bytes; the caption is rejected for them later, per image.
                obj = json.loads(raw.decode("utf-8", "surrogateescape"))
            except ValueError as exc:
                problems.append((where, "bad-captions-row", f"invalid JSON: {exc}"))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
                problems.append((where, "bad-captions-row", 'a JSONL row needs "file" and "caption"/"captions"'))
                continue
            caps = obj.get("captions", obj.get("caption"))
            caps = [caps] if isinstance(caps, str) else [c for c in (caps or []) if isinstance(c, str)]
            captions.setdefault(obj["file"], []).extend(c.encode("utf-8", "surrogateescape") for c in caps)
    return captions, problems


def _chunk_boundary(name: str, part_size: int) -> bool:
    h = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return h % part_size == 0


def folder_tasks(src: str, cfg: IngestConfig) -> list[PartTask]:
    fs, root = fsspec.core.url_to_fs(src)
    root = root.rstrip("/")
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    captions_path = cfg.captions_file
    if captions_path is None:
        for candidate in ("captions.jsonl", "captions.csv"):
            if fs.exists(f"{root}/{candidate}"):
                captions_path = f"{root}/{candidate}"
                break
    if captions_path is None:
        raise SourceError(f"image folder {src} has no captions.jsonl or captions.csv; set ingest.captions_file")
    captions_url = captions_path if "://" in captions_path or proto in ("file", "local") else f"{proto}://{captions_path}"
    captions, problems = read_captions_file(captions_url)
    present = {p[len(root) + 1:] for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith(".")}
    images = {f for f in present if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS}
    names = sorted(images | set(captions))
    # Content-defined parts: a boundary after each name whose hash hits; capped at 4x part_size.
    chunks: list[list[str]] = [[]]
    for name in names:
        chunks[-1].append(name)
        if _chunk_boundary(name, cfg.part_size) or len(chunks[-1]) >= 4 * cfg.part_size:
            chunks.append([])
    chunks = [c for c in chunks if c]
    tasks = []
    for chunk in chunks:
        entries = []
        for name in chunk:
            entries.append({"file": name, "exists": name in present, "captions": captions.get(name)})
        infos = [fs.info(f"{root}/{e['file']}") if e["exists"] else {} for e in entries]
        ident = digest([[e["file"], i.get("size"), str(i.get("mtime", "")), [c.hex() for c in e["captions"] or []]]
                        for e, i in zip(entries, infos)])
        tasks.append(PartTask(name=f"part-{digest(chunk[0], 12)}", source_digest=ident,
                              payload=("folder", f"{proto}://{root}" if proto not in ("file", "local") else root,
                                       entries)))
    if problems:
        tasks.append(PartTask(name="part-captions-file-rows", source_digest=digest(problems),
                              payload=("problems", captions_url, problems)))
    return tasks


def iter_folder_samples(root: str, entries: list[dict]) -> Iterator[RawSample]:
    for entry in entries:
        name = entry["file"]
        key = make_key(name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name)
        if not entry["exists"]:
            yield RawSample(key, name, None, None, entry["captions"],
                            ("missing-image", f"{name} is listed in the captions file but not in the folder", "image"))
            continue
        with fsspec.open(f"{root}/{name}", "rb") as fh:
            data = fh.read()
        yield RawSample(key, name, data, name.rsplit(".", 1)[-1].lower(), entry["captions"])


# --------------------------------------------------------------------------- the part worker
def ingest_part(writer: VersionWriter, task: PartTask, cfg: IngestConfig) -> PartRecord:
    kind = task.payload[0]
    if kind == "tar":
        samples = iter_tar_samples(task.payload[1])
    elif kind == "folder":
        samples = iter_folder_samples(task.payload[1], task.payload[2])
    else:  # rows of the captions file that could not be read at all
        rejects = [{"key": make_key(where), "reason": reason, "detail": detail, "source": where, "field": "captions"}
                   for where, reason, detail in task.payload[2]]
        return writer.write_part(task.name, table=schemas.IMAGES.empty_table(), rejects=rejects,
                                 rows_in=len(rejects), source_digest=task.source_digest,
                                 metrics={"rejected_by_reason": dict(Counter(r["reason"] for r in rejects))})
    shard_rel = f"{writer.prefix}/parts/{task.name}.tar"
    rows: list[dict] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    counters: Counter = Counter()
    rows_in = [0]

    def accepted() -> Iterator[dict]:
        for raw in samples:
            rows_in[0] += 1

            def reject(reason: str, detail: str, field: str) -> None:
                rejects.append({"key": raw.key, "reason": reason, "detail": detail, "source": raw.source,
                                "field": field})

            if raw.problem:
                reject(*raw.problem)
                continue
            if raw.key in seen:
                reject("duplicate-key", f"key {raw.key} appears more than once in this part", "key")
                continue
            if raw.image is None:
                reject("missing-image", "no image member for this key", "image")
                continue
            if not raw.captions:
                reject("missing-caption", "no caption for this image", "caption")
                continue
            caps, problem = [], None
            for c in raw.captions[: cfg.max_captions]:
                text, problem_c = normalise_caption(c, cfg.max_caption_chars)
                if text is not None and text not in caps:
                    caps.append(text)
                problem = problem or problem_c
            if not caps:
                reason, _, detail = (problem or "caption-empty").partition(": ")
                reject(reason, detail or "every caption is empty after normalisation", "caption")
                continue
            image, bad = validate_image(raw.image, cfg)
            if bad:
                reject(bad[0], bad[1], "image")
                continue
            seen.add(raw.key)
            counters.update(image["converted"])
            counters[f"format_{image['format']}"] += 1
            ext = "jpg" if image["format"] == "jpeg" else image["format"]
            rows.append({"key": raw.key, "captions": caps, "width": image["width"], "height": image["height"],
                         "format": image["format"], "sha256": hashlib.sha256(image["bytes"]).hexdigest(),
                         "shard": shard_rel, "source": raw.source})
            yield {"__key__": raw.key, ext: image["bytes"], "json": {"captions": caps, "source": raw.source}}

    def table() -> pa.Table:
        return pa.Table.from_pylist(rows, schema=schemas.IMAGES)

    def metrics() -> dict:
        return {"converted": dict(counters), "rejected_by_reason": dict(Counter(r["reason"] for r in rejects))}

    return writer.write_part(task.name, samples=accepted(), table=table, rejects=lambda: rejects,
                             rows_in=lambda: rows_in[0], source_digest=task.source_digest, metrics=metrics)


def ingest(store: Store, cfg: IngestConfig, *, source: str | None = None, executor=None, progress=None) -> StageResult:
    """Ingest a source into a new (or the existing identical) `images` version."""
    src = source or cfg.source
    if not src:
        raise SourceError("no ingest source: pass SRC or set ingest.source in the config")
    fmt = detect_format(src, cfg)
    tasks = tar_tasks(src) if fmt == "webdataset" else folder_tasks(src, cfg)
    config = section_dict(cfg) | {"source": src, "format": fmt}
    # The version is determined by the config and the exact source content (part digests); parts made
    # from unchanged input under the same config are shared with earlier versions.
    writer = store.begin(STAGE, code_version=STAGE_VERSION, config=config, parents=[],
                         input_digest=digest([t.source_digest for t in tasks]))
    return run_stage(writer, tasks, lambda w, t: ingest_part(w, t, cfg), executor=executor, progress=progress)
