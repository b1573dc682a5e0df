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
import os
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
from storage.fs import sha256_of
from storage.store import digest, shard_name

from .config import IngestConfig, section_dict
from .stage import PartTask, StageResult, run_stage

STAGE = "images"
STAGE_VERSION = "ingest-2"   # 2: img2dataset metadata columns, .txt member, shards/ folder
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
    meta: dict | None = None                      # img2dataset's metadata of the sample (url, sizes, exif, ...)


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


def validate_image(data: bytes, cfg: IngestConfig, original_size: tuple[int, int] | None = None
                   ) -> tuple[dict | None, tuple[str, str] | None]:
    """Decode and check one image. Returns ({bytes, format, width, height, converted}, None) or (None, (reason, detail)).

    `original_size` is the size before a downloader resized the image (img2dataset's original_width/height):
    the minimum side and the aspect ratio are judged on it, so a 1x1 image blown up to 256x256 is still too small.
    The pixel and side limits guard decoding, so they apply to the bytes at hand."""
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
    ow, oh = original_size if original_size and all(original_size) else (width, height)
    size_note = f"{ow}x{oh}" + (f" (original size; stored resized to {width}x{height})" if (ow, oh) != (width, height)
                                 else "")
    if min(ow, oh) < cfg.min_side:
        return None, ("too-small", f"{size_note}: a side is under min_side {cfg.min_side}")
    if max(width, height) > cfg.max_side:
        return None, ("too-large", f"{width}x{height}: a side is over max_side {cfg.max_side}")
    if max(ow, oh) / min(ow, oh) > cfg.max_aspect_ratio:
        return None, ("bad-aspect-ratio", f"{size_note}: aspect over max_aspect_ratio {cfg.max_aspect_ratio}")
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
    # One stored format per version (image_format) gives every sample the same WebDataset member name, which
    # webdataset's to_tuple and Hugging Face's webdataset loader need; "keep" stores each format as it came.
    wanted = stored_fmt if cfg.image_format == "keep" else cfg.image_format
    if (stored_fmt and stored_fmt == wanted and not any(c != "exif-ignored" for c in converted)
            and not getattr(img, "is_animated", False)):
        out = data
    else:
        if getattr(img, "is_animated", False):
            converted.append("first-frame")
        if cfg.image_format != "keep":
            stored_fmt = cfg.image_format
            if STORED_FORMATS.get(fmt or "") != stored_fmt:
                converted.append(f"reencoded-{stored_fmt}")
        else:
            stored_fmt = "jpeg" if fmt == "JPEG" else "png"
        buf = io.BytesIO()
        if stored_fmt == "jpeg":
            img.save(buf, "JPEG", quality=cfg.jpeg_quality)
        elif stored_fmt == "webp":
            img.save(buf, "WEBP", quality=cfg.jpeg_quality)
        else:
            img.save(buf, "PNG", optimize=False)
        out = buf.getvalue()
    return {"bytes": out, "format": stored_fmt, "width": img.size[0], "height": img.size[1],
            "converted": converted}, None


# --------------------------------------------------------------------------- sources
# img2dataset's own metadata fields (its per-sample .json, its per-shard .parquet); any other field is one of
# its --save_additional_columns and lands in the `extra` column.
I2D_FIELDS = {"key", "url", "caption", "status", "error_message", "width", "height", "original_width",
              "original_height", "exif", "sha256", "md5"}
_SHARD_ID = re.compile(r"^\d+$")


def _canonical(spec: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(fs, path, url) of a source however it is spelt (relative, absolute, file://): local paths are resolved,
    so the same files always get the same part names."""
    fs, path = fsspec.core.url_to_fs(spec)
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    if proto in ("file", "local"):
        path = os.path.realpath(path)
        return fs, path, path
    return fs, path.rstrip("/"), f"{proto}://{path.rstrip('/')}"


def expand_sources(src: str | list[str]) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """Every source path named by `src`: one or several specs, each maybe a brace pattern or a glob."""
    from braceexpand import braceexpand

    specs = [src] if isinstance(src, str) else list(src)
    if not specs:
        raise SourceError("no ingest source: ingest.source is an empty list")
    found: dict[str, tuple] = {}
    for spec in specs:
        matched = []
        for pattern in braceexpand(spec):
            fs, path = fsspec.core.url_to_fs(pattern)
            if any(c in path for c in "*?["):
                matched += [_canonical(_url(fs, p)) for p in sorted(fs.glob(path))]
            elif fs.exists(path):
                matched.append(_canonical(pattern))
            elif "{" in spec or len(specs) > 1:
                raise SourceError(f"ingest source {pattern} (from {spec}) does not exist")
        if not matched:
            raise SourceError(f"ingest source {spec} does not exist or matches nothing; set ingest.source to a tar, "
                              f"an img2dataset output folder (webdataset, parquet or files format), an image "
                              f"folder with captions.jsonl / captions.csv, or a list or brace pattern of these")
        for entry in matched:
            found.setdefault(entry[2], entry)
    return [found[u] for u in sorted(found)]


def detect_format(fs, path: str) -> str:
    """What one source path holds: `webdataset` (a tar, or a folder of tars), `parquet` (img2dataset parquet
    output: image bytes in a column), `files` (img2dataset files output: 00000/<key>.jpg + .txt + .json) or
    `folder` (images with a captions file)."""
    if not fs.isdir(path):
        if path.endswith(".tar"):
            return "webdataset"
        if path.endswith(".parquet"):
            return "parquet"
        raise SourceError(f"ingest source {path} is neither a .tar, an img2dataset .parquet, nor a folder")
    names = {e.rstrip("/").rsplit("/", 1)[-1]: e for e in fs.ls(path, detail=False)}
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(_SHARD_ID.match(n) and fs.isdir(e) for n, e in names.items()):
        return "files"
    if any(n.endswith(".parquet") and _SHARD_ID.match(n[:-8]) for n in names):
        return "parquet"
    return "folder"


def _image_column(schema: pa.Schema) -> str | None:
    """The column that holds img2dataset's image bytes (named after its encode format)."""
    for name in ("jpg", "png", "webp", "jpeg"):
        if name in schema.names and (pa.types.is_binary(schema.field(name).type)
                                     or pa.types.is_large_binary(schema.field(name).type)):
            return name
    return None


def _content_digest(fs, paths: list[str], root: str) -> str:
    """A part's source identity: names (relative to its shard) and sha256 of every file it reads."""
    return digest([[p[len(root):], sha256_of(fs, p)[1]] for p in sorted(paths)])


def _url(fs, path: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _folder_tag(fs, folder: str) -> str:
    return digest(_url(fs, folder), 8)


def _part_name(fs, folder: str, stem: str) -> str:
    """Stable and distinct across sources: the shard's stem plus a digest of the folder it sits in."""
    return f"part-{_folder_tag(fs, folder)}-{make_key(stem)}"


def i2d_tasks(fs, path: str, fmt: str) -> list[PartTask]:
    """One part per img2dataset shard (its tar, parquet or files folder, with its metadata .parquet)."""
    if fs.isdir(path):
        folder, entries = path, sorted(e.rstrip("/") for e in fs.ls(path, detail=False))
    else:
        folder, entries = path.rsplit("/", 1)[0], [path]
    names = {e.rsplit("/", 1)[-1] for e in fs.ls(folder, detail=False)} if fs.isdir(path) else set()
    tasks = []
    for entry in entries:
        base = entry.rsplit("/", 1)[-1]
        if fmt == "webdataset" and base.endswith(".tar"):
            stem, data = base[:-4], entry
        elif fmt == "parquet" and base.endswith(".parquet") and (_SHARD_ID.match(base[:-8]) or not fs.isdir(path)):
            stem, data = base[:-8], entry
        elif fmt == "files" and _SHARD_ID.match(base) and fs.isdir(entry):
            stem, data = base, entry
        else:
            continue
        sidecar = f"{folder}/{stem}.parquet"
        if fmt == "parquet" or not (f"{stem}.parquet" in names or (not fs.isdir(path) and fs.exists(sidecar))):
            sidecar = None
        stats = f"{folder}/{stem}_stats.json"
        stats = stats if fs.exists(stats) else None
        files = [data] if fmt != "files" else [p for p in fs.find(data)]
        files += [p for p in (sidecar, stats) if p]
        tasks.append(PartTask(name=_part_name(fs, folder, stem),
                              source_digest=_content_digest(fs, files, folder + "/"),
                              payload=(fmt, _url(fs, data), _url(fs, sidecar) if sidecar else None,
                                       _folder_tag(fs, folder))))
    if not tasks:
        raise SourceError(f"no img2dataset {fmt} shards found at {_url(fs, path)}")
    return tasks


def _meta_fields(meta: dict) -> dict:
    """img2dataset's metadata for one sample as columns of the images table."""
    def as_int(v):
        try:
            return int(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    extra = {k: v for k, v in meta.items() if k not in I2D_FIELDS and k != "captions" and not k.startswith("__")}
    exif = meta.get("exif")
    return {"url": meta.get("url"), "original_width": as_int(meta.get("original_width")),
            "original_height": as_int(meta.get("original_height")),
            "exif": exif if isinstance(exif, str) or exif is None else json.dumps(exif, sort_keys=True),
            "source_sha256": meta.get("sha256"), "status": meta.get("status"),
            "extra": json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str) if extra else None}


def _read_sidecar(url: str | None) -> dict[str, dict]:
    """img2dataset's per-shard metadata table, by key ({} without one)."""
    if not url:
        return {}
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as fh:
        rows = pq.read_table(fh).to_pylist()
    return {str(r.get("key")): r for r in rows if r.get("key") is not None}


def _failed_samples(sidecar: dict[str, dict], source: str, seen: set[str]) -> Iterator[RawSample]:
    """Samples img2dataset could not fetch: a reject each, with img2dataset's own error message."""
    for key, row in sidecar.items():
        if key in seen or row.get("status") in (None, "success"):
            continue
        yield RawSample(make_key(key), f"{source}:{key}", None, None, None,
                        (f"img2dataset-{row['status']}".replace("_", "-"),
                         f"{row.get('error_message') or 'no message'} (url {row.get('url')})"[:300], "url"),
                        meta=row)


def _captions_of(members: dict[str, bytes], meta: dict | None) -> list[bytes | str] | None:
    if "txt" in members:
        return [members["txt"]]
    cap = (meta or {}).get("caption") or (meta or {}).get("captions")
    return [cap] if isinstance(cap, str) else list(cap) if isinstance(cap, list) and cap else None


def _member_meta(members: dict[str, bytes], sidecar: dict[str, dict], stem: str) -> dict | None:
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if isinstance(meta, dict):
                return meta
        except (UnicodeDecodeError, ValueError):
            pass
    return sidecar.get(stem)


def iter_tar_samples(url: str, sidecar_url: str | None = None) -> Iterator[RawSample]:
    """Group tar members by key (basename up to the first dot), img2dataset style; then the samples its
    metadata table marks failed."""
    source = url.rsplit("/", 1)[-1]
    sidecar = _read_sidecar(sidecar_url)
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, bytes] = {}

    def flush() -> RawSample | None:
        if current is None:
            return None
        key = make_key(current)
        seen.add(current.rsplit("/", 1)[-1])
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        meta = _member_meta(members, sidecar, current.rsplit("/", 1)[-1])
        return RawSample(key, f"{source}:{current}", members.get(image_ext) if image_ext else None, image_ext,
                         _captions_of(members, meta), meta=meta)

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
    yield from _failed_samples(sidecar, source, seen)


def iter_i2d_parquet_samples(url: str) -> Iterator[RawSample]:
    """img2dataset's parquet output format: one row per sample, the image bytes in a column."""
    import pyarrow.parquet as pq

    source = url.rsplit("/", 1)[-1]
    with fsspec.open(url, "rb") as fh:
        pf = pq.ParquetFile(fh)
        column = _image_column(pf.schema_arrow)
        if column is None:
            raise SourceError(f"{url}: no image column (jpg / png / webp of binary type): is it img2dataset's "
                              f"parquet output format? Its columns are {pf.schema_arrow.names}")
        failed: dict[str, dict] = {}
        for batch in pf.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                key = str(row.get("key"))
                image = row.pop(column, None)
                if row.get("status") not in (None, "success"):
                    failed[key] = row
                    continue
                yield RawSample(make_key(key), f"{source}:{key}", image, column if image else None,
                                _captions_of({}, row), meta=row)
    yield from _failed_samples(failed, source, set())


def iter_i2d_files_samples(url: str, sidecar_url: str | None) -> Iterator[RawSample]:
    """img2dataset's files output format: `<shard>/<key>.jpg` + `.txt` + `.json`."""
    fs, root = fsspec.core.url_to_fs(url)
    shard = root.rstrip("/").rsplit("/", 1)[-1]
    sidecar = _read_sidecar(sidecar_url)
    by_key: dict[str, dict[str, str]] = {}
    for path in sorted(fs.find(root)):
        base = path.rsplit("/", 1)[-1]
        if "." in base and not base.startswith("."):
            stem, ext = base.split(".", 1)
            by_key.setdefault(stem, {})[ext.lower()] = path
    for stem, files in by_key.items():
        members = {}
        for ext, path in files.items():
            with fs.open(path, "rb") as fh:
                members[ext] = fh.read()
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        meta = _member_meta(members, sidecar, stem)
        yield RawSample(make_key(stem), f"{shard}/{stem}", members.get(image_ext) if image_ext else None, image_ext,
                        _captions_of(members, meta), meta=meta)
    yield from _failed_samples(sidecar, shard, set(by_key))


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


def folder_tasks(fs, root: str, cfg: IngestConfig) -> list[PartTask]:
    root = root.rstrip("/")
    src = _url(fs, root)
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
        # The part's identity is its content (file names, image bytes, captions), whatever the folder is called.
        shas = [sha256_of(fs, f"{root}/{e['file']}")[1] if e["exists"] else None for e in entries]
        ident = digest([[e["file"], sha, [c.hex() for c in e["captions"] or []]] for e, sha in zip(entries, shas)])
        tasks.append(PartTask(name=_part_name(fs, root, digest(chunk[0], 12)), source_digest=ident,
                              payload=("folder", f"{proto}://{root}" if proto not in ("file", "local") else root,
                                       entries)))
    if problems:
        tasks.append(PartTask(name=_part_name(fs, root, "captions-file-rows"), source_digest=digest(problems),
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
    # img2dataset numbers keys per run (0000000, 0000001, ...): prefixed with the tag of the folder they came
    # from, keys of two runs never collide, and a key never changes when other sources join the ingest.
    namespace = task.payload[3] if kind in ("webdataset", "parquet", "files") else None
    if kind == "webdataset":
        samples = iter_tar_samples(task.payload[1], task.payload[2])
    elif kind == "parquet":
        samples = iter_i2d_parquet_samples(task.payload[1])
    elif kind == "files":
        samples = iter_i2d_files_samples(task.payload[1], task.payload[2])
    elif kind == "folder":
        samples = iter_folder_samples(task.payload[1], task.payload[2])
    else:  # rows of the captions file that could not be read at all
        rejects = [{"key": make_key(where), "reason": reason, "detail": detail, "source": where, "field": "captions"}
                   for where, reason, detail in task.payload[2]]
        return writer.write_part(task.name, table=schemas.IMAGES.empty_table(), rejects=rejects,
                                 rows_in=len(rejects), source_digest=task.source_digest,
                                 metrics={"rejected_by_reason": dict(Counter(r["reason"] for r in rejects))})
    shard_rel = shard_name(task.name)
    rows: list[dict] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    counters: Counter = Counter()
    rows_in = [0]

    def accepted() -> Iterator[dict]:
        for raw in samples:
            rows_in[0] += 1
            source_key = raw.key
            if namespace:
                raw.key = f"{namespace}_{raw.key}"

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
            meta = _meta_fields(raw.meta) if raw.meta else {}
            image, bad = validate_image(raw.image, cfg, (meta.get("original_width"), meta.get("original_height")))
            if bad:
                reject(bad[0], bad[1], "image")
                continue
            seen.add(raw.key)
            counters.update(image["converted"])
            counters[f"format_{image['format']}"] += 1
            ext = "jpg" if image["format"] == "jpeg" else image["format"]
            rows.append({"key": raw.key, "captions": caps, "width": image["width"], "height": image["height"],
                         "format": image["format"], "sha256": hashlib.sha256(image["bytes"]).hexdigest(),
                         "shard": shard_rel, "source": raw.source, "source_key": source_key, **meta})
            # `.txt` holds the first caption as img2dataset writes it, so `to_tuple("jpg", "txt")` works;
            # `.json` has every caption and the source's metadata.
            described = {k: v for k, v in meta.items() if v is not None}
            yield {"__key__": raw.key, ext: image["bytes"], "txt": caps[0],
                   "json": {"captions": caps, "source": raw.source, **described}}

    def table() -> pa.Table:
        return pa.Table.from_pylist(rows, schema=schemas.IMAGES)

    def metrics() -> dict:
        return {"converted": dict(counters), "rejected_by_reason": dict(Counter(r["reason"] for r in rejects))}

    return writer.write_part(task.name, samples=accepted(), table=table, rejects=lambda: rejects,
                             rows_in=lambda: rows_in[0], source_digest=task.source_digest, metrics=metrics)


def plan(src: str | list[str], cfg: IngestConfig) -> tuple[list[PartTask], list[dict]]:
    """The parts of one ingest over one or several sources, and what each source was (for the manifest)."""
    tasks: list[PartTask] = []
    described = []
    for fs, path, url in expand_sources(src):
        fmt = detect_format(fs, path) if cfg.format == "auto" else cfg.format
        tasks += folder_tasks(fs, path, cfg) if fmt == "folder" else i2d_tasks(fs, path, fmt)
        described.append({"source": url, "format": fmt})
    return tasks, described


def ingest(store: Store, cfg: IngestConfig, *, source: str | list[str] | None = None, executor=None,
           progress=None) -> StageResult:
    """Ingest one or several sources into a new (or the existing identical) `images` version."""
    src = source or cfg.source
    if not src:
        raise SourceError("no ingest source: pass SRC or set ingest.source in the config")
    tasks, described = plan(src, cfg)
    # The version is determined by the config and the sources' content (part names and content digests), not by
    # how the sources were spelt; parts made from unchanged input under the same config are shared with earlier
    # versions. The sources as given are recorded in the manifest.
    config = section_dict(cfg) | {"source": None}
    writer = store.begin(STAGE, code_version=STAGE_VERSION, config=config, parents=[],
                         input_digest=digest([[t.name, t.source_digest] for t in tasks]))
    return run_stage(writer, tasks, lambda w, t: ingest_part(w, t, cfg), executor=executor, progress=progress,
                     extra={"sources": described})
