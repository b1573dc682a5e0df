"""Ingest: validated pixels and normalised captions from a source into an `images` version.

Sources (one or several per ingest; each a path, a brace pattern or a glob):
  * WebDataset tars as img2dataset writes them (`<key>.jpg|png|webp` + `.txt` + `.json`); one part per tar.
  * img2dataset's other output formats: `parquet` (image bytes in a column) and `files`
    (`00000/<key>.jpg` + `.txt` + `.json`); its per-shard metadata (`00000.parquet`) fills the metadata
    columns, and the samples it failed to fetch are rejected with its own error message.
  * A folder of images with a captions file (JSONL: {"file", "caption"|"captions"}; CSV: file,caption[,caption...]);
    files are cut into parts at content-defined boundaries, so adding files changes only the parts they land in.

Every sample is either written (image bytes in a WebDataset shard + a row in the Parquet index) or
rejected with a reason; counts reconcile per part. Nothing a source holds is read past the config's
byte limits, Pillow only ever sees the formats we accept, and keys are unique within a version.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import tarfile
import unicodedata
import warnings
import zlib
from collections import Counter
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps

from storage import PartRecord, Store, VersionWriter, schemas
from storage.fs import sha256_of
from storage.parquet import iter_parquet_batches, read_parquet
from storage.store import digest, shard_name
from storage.shards import split_member_name

from tasks.engine.config import IngestConfig
from tasks.engine.runner import PartTask, Stage, StageResult, run

STAGE_VERSION = "ingest-4"   # 3: every caption of a sample; 4: img2dataset formats and metadata, shards/
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
CAPTION_EXTS = ("txt", "json")
# Pillow picks its decoder from the content: it is only ever offered these (an EPS file named .jpg must
# never reach Ghostscript). Multi-picture camera JPEGs (MPO) open through the JPEG plugin.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
STORED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Keys are file-name material downstream (crop keys add `_t<id>_<rank>`, webdataset extracts `<key>.<ext>`):
# longer ones keep a readable head and end in a digest of the whole source name, so they stay unique.
MAX_KEY_CHARS = 160
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")
# Rejects in these fields are not samples (a damaged tar's marker, a member that belongs to no sample, a
# captions row whose file is absent or unnameable): they claim no key. Every other sample read does.
UNCLAIMED_FIELDS = ("tar", "member", "file")

# We enforce our own pixel limit before decoding; PIL's global one would raise a warning or error first.
Image.MAX_IMAGE_PIXELS = None
Image.init()  # register every plugin, so that `formats=ACCEPTED_FORMATS` can name them (and only them)
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
    origin: str | None = None                     # where its captions come from ("captions.jsonl:12"), for rejects
    meta: dict | None = None                      # img2dataset's metadata of the sample (url, sizes, exif, ...)

    @property
    def claims_key(self) -> bool:
        return self.problem is None or self.problem[2] not in UNCLAIMED_FIELDS


# --------------------------------------------------------------------------- keys and captions
def make_key(text: str) -> str:
    """A store key from a source name: letters, digits, '_' and '-' only (no '.' or '/'), at most
    MAX_KEY_CHARS long (a longer one is cut and ends in a digest of the whole name)."""
    key = _KEY_BAD.sub("_", text).strip("_")
    name_digest = hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()
    if not key:
        return "_" + name_digest[:12]
    if len(key) > MAX_KEY_CHARS:
        key = key[: MAX_KEY_CHARS - 17].rstrip("_") + "_" + name_digest[:16]
    return key


def shown(name: str) -> str:
    """A source name as it can be stored and printed: undecodable bytes become \\udcXX escapes."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _has_lone_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"


def json_captions(meta: Any) -> tuple[list[str] | None, tuple[str, str] | None]:
    """Captions from a decoded JSON object (a tar's .json sidecar or a captions.jsonl row):
    its "caption" or "captions", a string or a list of strings. Returns (captions, (reason, detail))."""
    if not isinstance(meta, dict):
        return None, ("bad-caption-json", f"the JSON is a {_describe(meta)}, not an object")
    present = [n for n in ("caption", "captions") if meta.get(n) is not None]
    if not present:
        return None, None
    # The first field that holds something; an empty one is kept (the sample is rejected caption-empty).
    name = next((n for n in present if meta[n] not in ("", [])), present[0])
    value = meta[name]
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None, ("bad-caption-type", f'"{name}" is a {_describe(value)}; a caption is a string or a list '
                                          f"of strings")
    if any(_has_lone_surrogate(c) for c in captions):
        return None, ("caption-not-utf8", f'"{name}" holds a lone surrogate (an invalid byte, or a \\udXXX JSON '
                                          f"escape that is half a character)")
    return captions, None


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
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            fmt = img.format
            width, height = img.size
    except Exception as exc:  # PIL raises many types for non-images
        if sniff_format(data):
            return None, ("decode-error", f"{sniff_format(data)} header but the data does not decode "
                                          f"(truncated or corrupt): {type(exc).__name__}: {exc}"[:300])
        return None, ("not-an-image", f"no accepted image header ({data[:8]!r}); accepted: "
                                      f"{', '.join(ACCEPTED_FORMATS)}; is it HTML, text or another format?"[:300])
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
    if img.mode == "F":
        # A float image with NaN or infinity has no defined pixels there; scaling it would give black.
        arr = np.asarray(img)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            return None, ("invalid-pixels", f"float {fmt or 'image'} has {bad} of {arr.size} pixels NaN or infinite")
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


def is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _compressed(path: str) -> bool:
    return not path.lower().endswith(".tar")


def source_fs(url: str, options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a source URL. A remote source (s3://, gs://, …) is opened with
    ingest.source_options, its own fsspec storage options (endpoint, region, anonymous access), never the
    store's; a local path takes none."""
    local = fsspec.utils.get_protocol(url) in ("file", "local")
    return fsspec.core.url_to_fs(url, **({} if local else dict(options or {})))


def open_source(url: str, options: Mapping[str, Any] | None):
    fs, path = source_fs(url, options)
    return fs.open(path, "rb")


def _url(fs, path: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _canonical(spec: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(fs, path, url) of a source however it is spelt (relative, absolute, file://): local paths are resolved,
    so the same files always get the same part names."""
    fs, path = source_fs(spec, options)
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    if proto in ("file", "local"):
        path = os.path.realpath(path)
        return fs, path, path
    return fs, path.rstrip("/"), f"{proto}://{path.rstrip('/')}"


def expand_sources(src: str | list[str], options: Mapping[str, Any] | None = None
                   ) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """Every source path named by `src`: one or several specs, each maybe a brace pattern or a glob;
    remote ones opened with `options` (ingest.source_options)."""
    from braceexpand import braceexpand

    specs = [src] if isinstance(src, str) else list(src)
    if not specs:
        raise SourceError("no ingest source: ingest.source is an empty list")
    found: dict[str, tuple] = {}
    for spec in specs:
        matched = []
        for pattern in braceexpand(spec):
            fs, path = source_fs(pattern, options)
            if any(c in path for c in "*?["):
                matched += [_canonical(_url(fs, p), options) for p in sorted(fs.glob(path))]
            elif fs.exists(path):
                matched.append(_canonical(pattern, options))
            elif "{" in spec or len(specs) > 1:
                raise SourceError(f"ingest source {pattern} (from {spec}) does not exist")
        if not matched:
            raise SourceError(f"ingest source {spec} does not exist or matches nothing; set ingest.source to a tar, "
                              f"a folder of tars, an img2dataset output folder (webdataset, parquet or files format), "
                              f"an image folder with captions.jsonl / captions.csv, or a list or brace pattern of these")
        for entry in matched:
            found.setdefault(entry[2], entry)
    return [found[u] for u in sorted(found)]


def detect_format(fs, path: str) -> str:
    """What one source path holds: `webdataset` (a tar, or a folder with tars at any depth), `parquet`
    (img2dataset parquet output: image bytes in a column), `files` (img2dataset files output: 00000/<key>.jpg
    + .txt + .json) or `folder` (images with a captions file)."""
    if not fs.isdir(path):
        if is_tar(path):
            return "webdataset"
        if path.endswith(".parquet"):
            return "parquet"
        raise SourceError(f"ingest source {_url(fs, path)} is neither a tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz), "
                          f"an img2dataset .parquet, nor a folder")
    names = {e.rstrip("/").rsplit("/", 1)[-1]: e for e in fs.ls(path, detail=False)}
    if any(is_tar(n) for n in names):
        return "webdataset"
    if any(_SHARD_ID.match(n) and fs.isdir(e) for n, e in names.items()):
        return "files"
    if any(n.endswith(".parquet") and _SHARD_ID.match(n[:-8]) for n in names):
        return "parquet"
    root = path.rstrip("/")
    if any(is_tar(p) and not _os_metadata(p[len(root) + 1:]) for p in fs.find(root)):
        return "webdataset"
    return "folder"


def _image_column(schema: pa.Schema) -> str | None:
    """The column that holds img2dataset's image bytes (named after its encode format)."""
    for name in ("jpg", "png", "webp", "jpeg"):
        if name in schema.names and (pa.types.is_binary(schema.field(name).type)
                                     or pa.types.is_large_binary(schema.field(name).type)):
            return name
    return None


def _content_digest(fs, paths: list[str], root: str) -> str:
    """A part's source identity: names (relative to its source folder) and sha256 of every file it reads,
    so the same content gets the same identity wherever it lies and however it is spelt."""
    return digest([[p[len(root):], sha256_of(fs, p)[1]] for p in sorted(paths)])


def _folder_tag(fs, folder: str) -> str:
    return digest(_url(fs, folder), 8)


def _part_name(fs, folder: str, stem: str) -> str:
    """Stable and distinct across sources: the shard's stem plus a digest of the folder it sits in."""
    return f"part-{_folder_tag(fs, folder)}-{make_key(stem)}"


def _tar_stem(name: str) -> str:
    lower = name.lower()
    return name[: len(name) - len(next(s for s in TAR_SUFFIXES if lower.endswith(s)))]


def tar_tasks(fs, path: str) -> list[PartTask]:
    """One part per tar of a webdataset source: a tar, or a folder searched recursively (compressed tars
    included, OS metadata skipped). img2dataset's per-shard metadata (`<stem>.parquet`, `<stem>_stats.json`
    beside a tar) goes with it; a source that has it is img2dataset output, whose per-run sample numbers
    are namespaced by the source folder's tag (two runs never collide; other tars keep their own keys)."""
    if fs.isdir(path):
        root = path.rstrip("/")
        listing = set(fs.find(root))
        tars = sorted(p for p in listing if is_tar(p) and not _os_metadata(p[len(root) + 1:]))
    else:
        root, tars = path.rsplit("/", 1)[0], [path]
        listing = {p for p in (f"{_tar_stem(path)}.parquet", f"{_tar_stem(path)}_stats.json") if fs.exists(p)}
    if not tars:
        raise SourceError(f"no tar shards (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) found at {_url(fs, path)}")
    companions = {t: [p for p in (f"{_tar_stem(t)}.parquet", f"{_tar_stem(t)}_stats.json") if p in listing]
                  for t in tars}
    namespace = _folder_tag(fs, root) if any(companions.values()) else None
    tasks, names = [], set()
    for tar in tars:
        rel = tar[len(root) + 1:]
        name = _part_name(fs, root, _tar_stem(rel))
        if name in names:  # `a/x.tar` and `a_x.tar`, or `x.tar` and `x.tgz`: same stem
            name = f"{name}-{digest(rel, 8)}"
        names.add(name)
        sidecar = next((p for p in companions[tar] if p.endswith(".parquet")), None)
        tasks.append(PartTask(name=name, source_digest=_content_digest(fs, [tar] + companions[tar], root + "/"),
                              payload=("webdataset", _url(fs, tar), _url(fs, sidecar) if sidecar else None,
                                       namespace, {})))
    return tasks


def i2d_tasks(fs, path: str, fmt: str) -> list[PartTask]:
    """One part per shard of img2dataset's parquet or files output (with its metadata .parquet and stats)."""
    if fs.isdir(path):
        folder, entries = path.rstrip("/"), sorted(e.rstrip("/") for e in fs.ls(path, detail=False))
    else:
        folder, entries = path.rsplit("/", 1)[0], [path]
    names = {e.rsplit("/", 1)[-1] for e in fs.ls(folder, detail=False)}
    tasks = []
    for entry in entries:
        base = entry.rsplit("/", 1)[-1]
        if fmt == "parquet" and base.endswith(".parquet") and (_SHARD_ID.match(base[:-8]) or not fs.isdir(path)):
            stem, data = base[:-8], entry
        elif fmt == "files" and _SHARD_ID.match(base) and fs.isdir(entry):
            stem, data = base, entry
        else:
            continue
        sidecar = f"{folder}/{stem}.parquet" if fmt == "files" and f"{stem}.parquet" in names else None
        stats = f"{folder}/{stem}_stats.json" if f"{stem}_stats.json" in names else None
        files = [data] if fmt != "files" else [p for p in fs.find(data) if not _os_metadata(p[len(data) + 1:])]
        files += [p for p in (sidecar, stats) if p]
        tasks.append(PartTask(name=_part_name(fs, folder, stem),
                              source_digest=_content_digest(fs, files, folder + "/"),
                              payload=(fmt, _url(fs, data), _url(fs, sidecar) if sidecar else None,
                                       _folder_tag(fs, folder), {})))
    if not tasks:
        raise SourceError(f"no img2dataset {fmt} shards found at {_url(fs, path)}")
    return tasks


def _namespaced(namespace: str | None, key: str) -> str:
    return make_key(f"{namespace}_{key}") if namespace else key


def _meta_fields(meta: dict) -> dict:
    """img2dataset's metadata for one sample as columns of the images table."""
    def as_int(v):   # a side length: a positive int32, else unknown (a hostile .json must not break the part)
        try:
            n = int(v) if v is not None and not isinstance(v, bool) else None
        except (TypeError, ValueError, OverflowError):
            return None
        return n if n is not None and 0 < n < 2**31 else None

    extra = {k: v for k, v in meta.items() if k not in I2D_FIELDS and k != "captions" and not k.startswith("__")}
    exif = meta.get("exif")
    text = lambda v: v if isinstance(v, str) or v is None else json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    return {"url": text(meta.get("url")), "original_width": as_int(meta.get("original_width")),
            "original_height": as_int(meta.get("original_height")), "exif": text(exif),
            "source_sha256": text(meta.get("sha256")), "status": text(meta.get("status")),
            "extra": json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str) if extra else None}


def _read_sidecar(url: str | None, options: Mapping[str, Any] | None) -> dict[str, dict]:
    """img2dataset's per-shard metadata table, by key ({} without one). One row per sample of the shard,
    so it is as large as the shard's sample count, not as any member."""
    if not url:
        return {}
    with open_source(url, options) as fh:
        rows = read_parquet(fh).to_pylist()
    return {str(r.get("key")): r for r in rows if r.get("key") is not None}


def _failed_sample(key: str, row: dict, source: str) -> RawSample:
    """A sample img2dataset could not fetch: a reject with img2dataset's own error message."""
    return RawSample(make_key(key), f"{source}:{shown(key)}", None, None, None,
                     (f"img2dataset-{row['status']}".replace("_", "-"),
                      f"{row.get('error_message') or 'no message'} (url {row.get('url')})"[:300], "url"), meta=row)


def _failed_samples(sidecar: dict[str, dict], source: str, seen: set[str]) -> Iterator[RawSample]:
    for key, row in sidecar.items():
        if key not in seen and row.get("status") not in (None, "success"):
            yield _failed_sample(key, row, source)


def _sidecar_keys(url: str | None, source: str, options: Mapping[str, Any] | None) -> dict[str, str]:
    """The keys of the failed samples a metadata table lists (they are rejected, so they hold their key)."""
    if not url:
        return {}
    with open_source(url, options) as fh:
        rows = read_parquet(fh, columns=["key", "status"]).to_pylist()
    return {make_key(str(r["key"])): f"{source}:{shown(str(r['key']))}" for r in rows
            if r.get("key") is not None and r.get("status") not in (None, "success")}


def _os_metadata(name: str) -> bool:
    """macOS AppleDouble (`._x.jpg`, `__MACOSX/`), `.DS_Store` and other hidden files: never samples."""
    parts = name.split("/")
    return any(p == "__MACOSX" for p in parts[:-1]) or parts[-1].startswith(".")


@dataclass
class _Group:
    """The members of one tar sample read so far: only what ingest uses is kept (one image, captions)."""

    stem: str
    exts: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)      # ext -> bytes, or (offset, size) in the spool
    problem: tuple[str, str, str] | None = None

    def complete(self) -> bool:
        return any(e in self.data for e in IMAGE_EXTS) and any(e in self.data for e in CAPTION_EXTS)


class _Spool:
    """Members of samples still waiting for the rest of their members (an out-of-order tar): in memory up
    to `max_memory` bytes, then in a local temporary file, so memory stays bounded whatever the order."""

    def __init__(self, max_memory: int):
        self.file = tempfile.SpooledTemporaryFile(max_size=max_memory)
        self.end = 0

    def put(self, data: bytes) -> tuple[int, int]:
        self.file.seek(self.end)
        self.file.write(data)
        self.end += len(data)
        return self.end - len(data), len(data)

    def get(self, ref: tuple[int, int]) -> bytes:
        self.file.seek(ref[0])
        return self.file.read(ref[1])

    def close(self) -> None:
        self.file.close()


def _decompressed(fh, url: str):
    """The tar bytes of a (possibly compressed) tar file: the codec's own buffered reader, which skips
    a huge member far faster than tarfile's stream mode does."""
    lower = url.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if lower.endswith((".tar.bz2", ".tbz2")):
        return bz2.BZ2File(fh, mode="rb")
    if lower.endswith((".tar.xz", ".txz")):
        return lzma.LZMAFile(fh, mode="rb")
    return contextlib.nullcontext(fh)


def _member_kind(info: tarfile.TarInfo) -> str | None:
    """None for a member that belongs to no sample (a folder, OS metadata), else 'file', 'other' or
    'no-ext'."""
    if info.isdir() or _os_metadata(info.name):
        return None
    if not split_member_name(info.name)[1]:
        return "no-ext"
    return "file" if info.isfile() else "other"


def tar_sample_keys(url: str, options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The keys of the samples a tar holds (read from its headers only), each with its first source."""
    source = url.rsplit("/", 1)[-1]
    keys: dict[str, str] = {}
    try:
        with open_source(url, options) as fh, _decompressed(fh, url) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for info in tar:  # random access: member data is seeked over, not read (uncompressed tars)
                tar.members = []
                if _member_kind(info) in ("file", "other"):
                    stem, _ = split_member_name(info.name)
                    keys.setdefault(make_key(stem), f"{source}:{shown(stem)}")
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, gzip.BadGzipFile):
        pass  # a damaged tar: the part reports it; the keys before the damage are claimed
    return keys


def _sample_captions(meta: Any, txt: bytes | None, has_json: bool, bad: tuple[str, str] | None
                     ) -> tuple[list | None, tuple[str, str] | None]:
    """A sample's captions from its decoded .json (`meta`) and .txt: the json's "captions" list, else the
    .txt one caption a line, else the json's "caption". Returns (captions, (reason, detail) of the json)."""
    listed = meta.get("captions") if isinstance(meta, dict) else None
    if isinstance(listed, list) and listed and json_captions({"captions": listed})[1] is None:
        return list(listed), None
    if txt is not None:
        return txt_captions(txt), None
    if has_json:
        return json_captions(meta) if bad is None else (None, bad)
    return None, None


def txt_captions(data: bytes) -> list[bytes]:
    """A .txt member's captions, one a line; a blank one stays one (empty) caption, rejected as caption-empty."""
    lines = [line for line in data.splitlines() if line.strip()]
    return lines or [data]


def iter_tar_samples(url: str, cfg: IngestConfig, counters: Counter, sidecar_url: str | None = None
                     ) -> Iterator[RawSample]:
    """Group tar members into samples by key (member name up to the basename's first dot); then the samples
    img2dataset's metadata table (`sidecar_url`) marks failed, each a reject with its error message.

    img2dataset writes a sample's members next to each other, and such tars stream with one sample in
    memory. A tar grouped otherwise (`tar cf x.tar *.jpg *.txt`) still gives every sample once: samples
    missing members wait in a spool (bounded memory) and come out at the end. Only what ingest uses is
    read (one image, the .txt and .json), each member bounded by the config's byte limits; other members
    are skipped unread. OS metadata (`._x.jpg`, `__MACOSX/`) is skipped and counted in metrics.
    """
    source = url.rsplit("/", 1)[-1]
    sidecar = _read_sidecar(sidecar_url, cfg.source_options)
    seen: set[str] = set()              # stems read (their failed rows in the sidecar are not samples again)
    spool = _Spool(cfg.spool_bytes)
    current: _Group | None = None
    pending: dict[str, _Group] = {}     # samples that may get more members later, by stem
    out_of_order = False

    def sample(group: _Group, problem: tuple[str, str, str] | None = None) -> RawSample:
        value = {e: (spool.get(v) if isinstance(v, tuple) else v) for e, v in group.data.items()}
        image_ext = next((e for e in IMAGE_EXTS if e in value), None)
        base = group.stem.rsplit("/", 1)[-1]
        seen.add(base)
        captions, caption_problem = None, None
        # Every caption the sample gives: the sidecar's "captions" list, else the .txt one caption a line
        # (img2dataset writes one), else the sidecar's "caption", else the caption img2dataset's metadata
        # table recorded. The sidecar (or that table's row) is also the sample's metadata.
        meta, bad = None, None
        if "json" in value:
            try:
                meta = json.loads(value["json"].decode("utf-8", "surrogateescape"))
            except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
                bad = ("bad-caption-json", f"not valid JSON: {type(exc).__name__}: {exc}"[:300])
        captions, bad = _sample_captions(meta, value.get("txt"), "json" in value, bad)
        if bad:
            caption_problem = (bad[0], f"{shown(group.stem)}.json: {bad[1]}", "json")
        meta = meta if isinstance(meta, dict) else sidecar.get(base)
        if captions is None and caption_problem is None and "json" not in value and meta is not None:
            captions, bad = json_captions(meta)
            if bad:
                caption_problem = (bad[0], f"{source} metadata row {shown(base)}: {bad[1]}", "caption")
        if image_ext is None and any(e for e in group.exts if e in IMAGE_EXTS) and not group.problem:
            problem = problem or ("member-not-a-file", f"the image member of {shown(group.stem)} is a link or "
                                                      f"device; links are never followed", "image")
        return RawSample(make_key(group.stem), f"{source}:{shown(group.stem)}", value.get(image_ext) if image_ext
                         else None, image_ext, captions, problem or group.problem or caption_problem, meta=meta)

    def close(group: _Group) -> Iterator[RawSample]:
        if group.complete() and not out_of_order:
            yield sample(group)
        else:  # it may get its missing members later: wait, in the spool
            group.data = {e: (spool.put(v) if isinstance(v, bytes) else v) for e, v in group.data.items()}
            pending[group.stem] = group

    def add(group: _Group, info: tarfile.TarInfo, ext: str, tar: tarfile.TarFile) -> None:
        group.exts.append(ext)
        if not info.isfile():
            return
        limit = cfg.max_image_bytes if ext in IMAGE_EXTS else cfg.max_caption_bytes if ext in CAPTION_EXTS else None
        if limit is None or ext in group.data or (ext in IMAGE_EXTS and any(
                e in group.data for e in IMAGE_EXTS[: IMAGE_EXTS.index(ext)])):
            return  # not used by ingest (or a preferred image is there already): skipped unread
        if info.size > limit:
            group.problem = group.problem or (
                "member-too-large", f"{shown(info.name)} is {info.size} bytes, over ingest."
                f"{'max_image_bytes' if ext in IMAGE_EXTS else 'max_caption_bytes'} ({limit})", ext)
            return
        extracted = tar.extractfile(info)
        data = extracted.read(limit + 1) if extracted else b""
        if ext in IMAGE_EXTS:
            for other in [e for e in group.data if e in IMAGE_EXTS]:
                del group.data[other]   # a less preferred image read earlier
        group.data[ext] = spool.put(data) if group.stem in pending else data

    try:
        with open_source(url, cfg.source_options) as fh, _decompressed(fh, url) as raw, \
                tarfile.open(fileobj=raw, mode="r|") as tar:
            for info in tar:
                kind = _member_kind(info)
                if kind is None:
                    if not info.isdir():
                        counters["ignored_os_metadata_members"] += 1
                    continue
                if kind == "no-ext":
                    yield RawSample(make_key(info.name), f"{source}:{shown(info.name)}", None, None, None,
                                    ("member-without-extension", f"tar member '{shown(info.name)}' has no extension, "
                                     f"so it belongs to no sample (a NUL byte in a name cuts it there)", "member"))
                    continue
                stem, ext = split_member_name(info.name)
                if current is not None and stem == current.stem:
                    add(current, info, ext, tar)
                elif stem in pending:
                    out_of_order = True
                    add(pending[stem], info, ext, tar)
                else:
                    if current is not None:
                        yield from close(current)
                    current = _Group(stem)
                    add(current, info, ext, tar)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
        # A damaged tar: complete samples before the damage are kept; the one in progress is lost.
        cut = ("source-truncated", f"tar ends mid-sample: {type(exc).__name__}: {exc}", "tar")
        if current is not None:
            yield sample(current, cut)
        for group in pending.values():
            yield sample(group, None if group.complete() else cut)
        if current is None and not pending:
            yield RawSample(make_key(f"{source}-damaged"), source, None, None, None,
                            ("source-truncated", f"tar is damaged: {type(exc).__name__}: {exc}", "tar"))
        spool.close()
        yield from _failed_samples(sidecar, source, seen)
        return
    if current is not None:
        yield from close(current)
    for group in pending.values():
        yield sample(group)
    spool.close()
    if not _compressed(url) and not _tar_has_end_marker(url, cfg.source_options):
        # tarfile reads a cut-off archive as if it ended early: say so instead of leaving a silent gap.
        yield RawSample(make_key(f"{source}-tail"), source, None, None, None,
                        ("source-truncated", "the tar has no end-of-archive marker: it was cut off after the "
                                             "samples that were read; re-fetch the shard", "tar"))
    yield from _failed_samples(sidecar, source, seen)


def _bounded_captions(value: Any, where: str, cfg: IngestConfig) -> tuple[list | None, tuple[str, str, str] | None]:
    """Captions of an img2dataset metadata row (its "caption"), each bounded by ingest.max_caption_bytes."""
    if not isinstance(value, dict):
        return None, None
    captions, bad = json_captions(value)
    if bad:
        return None, (bad[0], f"{where}: {bad[1]}", "caption")
    if captions and any(len(c.encode("utf-8", "surrogatepass")) > cfg.max_caption_bytes for c in captions):
        return None, ("member-too-large", f"{where}: a caption is over ingest.max_caption_bytes "
                                          f"({cfg.max_caption_bytes})", "caption")
    return captions, None


def iter_i2d_parquet_samples(url: str, cfg: IngestConfig) -> Iterator[RawSample]:
    """img2dataset's parquet output format: one row per sample, the image bytes in a column. Rows are read
    in small batches; an image over ingest.max_image_bytes costs its sample."""
    source = url.rsplit("/", 1)[-1]
    with open_source(url, cfg.source_options) as fh:
        pf = pq.ParquetFile(fh)
        column = _image_column(pf.schema_arrow)
        if column is None:
            raise SourceError(f"{url}: no image column (jpg / png / webp of binary type): is it img2dataset's "
                              f"parquet output format? Its columns are {pf.schema_arrow.names}")
        for batch in iter_parquet_batches(pf, batch_size=32):
            for row in batch.to_pylist():
                name = str(row.get("key"))
                image = row.pop(column, None)
                if row.get("status") not in (None, "success"):
                    yield _failed_sample(name, row, source)
                    continue
                where = f"{source}:{shown(name)}"
                if image is not None and len(image) > cfg.max_image_bytes:
                    yield RawSample(make_key(name), where, None, None, None, (
                        "member-too-large", f"{where}: the {column} cell is {len(image)} bytes, over "
                                            f"ingest.max_image_bytes ({cfg.max_image_bytes})", column), meta=row)
                    continue
                captions, problem = _bounded_captions(row, where, cfg)
                yield RawSample(make_key(name), where, image, column if image else None, captions, problem, meta=row)


def _read_bounded(fs, path: str, limit: int) -> bytes | None:
    """A file's bytes, or None when it is over `limit` (read no further than limit + 1)."""
    with fs.open(path, "rb") as fh:
        data = fh.read(limit + 1)
    return None if len(data) > limit else data


def iter_i2d_files_samples(url: str, sidecar_url: str | None, cfg: IngestConfig) -> Iterator[RawSample]:
    """img2dataset's files output format: `<shard>/<key>.jpg` + `.txt` + `.json`, each read bounded by the
    config's byte limits; OS metadata is skipped."""
    fs, root = source_fs(url, cfg.source_options)
    root = root.rstrip("/")
    shard = root.rsplit("/", 1)[-1]
    sidecar = _read_sidecar(sidecar_url, cfg.source_options)
    by_key: dict[str, dict[str, str]] = {}
    for path in sorted(fs.find(root)):
        rel = path[len(root) + 1:]
        base = rel.rsplit("/", 1)[-1]
        if _os_metadata(rel) or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        by_key.setdefault(stem, {})[ext.lower()] = path
    for stem, files in by_key.items():
        where = f"{shard}/{shown(stem)}"
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        members: dict[str, bytes] = {}
        problem = None
        for ext in [e for e in (image_ext, "txt", "json") if e and e in files]:
            limit = cfg.max_image_bytes if ext == image_ext else cfg.max_caption_bytes
            data = _read_bounded(fs, files[ext], limit)
            if data is None:
                problem = problem or ("member-too-large", f"{where}.{ext} is over ingest."
                                      f"{'max_image_bytes' if ext == image_ext else 'max_caption_bytes'} ({limit})", ext)
                continue
            members[ext] = data
        meta, bad = None, None
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8", "surrogateescape"))
            except (ValueError, RecursionError) as exc:
                bad = ("bad-caption-json", f"not valid JSON: {type(exc).__name__}: {exc}"[:300])
        captions, bad = _sample_captions(meta, members.get("txt"), "json" in members, bad)
        if bad:
            problem = problem or (bad[0], f"{where}.json: {bad[1]}", "json")
        meta = meta if isinstance(meta, dict) else sidecar.get(stem)
        if captions is None and problem is None and "json" not in members:
            captions, bad = _bounded_captions(meta, f"{where} metadata", cfg)   # the metadata table's caption
            problem = bad
        yield RawSample(make_key(stem), where, members.get(image_ext) if image_ext else None, image_ext,
                        captions, problem, meta=meta)
    yield from _failed_samples(sidecar, shard, set(by_key))


def _tar_has_end_marker(url: str, options: Mapping[str, Any] | None) -> bool:
    """A whole tar ends with two zero blocks (1024 zero bytes)."""
    with open_source(url, options) as fh:
        size = fh.seek(0, 2)
        if size < 1024 or size % 512:
            return False
        fh.seek(size - 1024)
        return fh.read(1024) == bytes(1024)


def _bounded_lines(fh, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line with its newline or None when over `limit` bytes, count of '"' in it).
    Memory is bounded by `limit` whatever the file holds."""
    buf, lineno, skipping, quotes = b"", 0, False, 0
    while True:
        chunk = fh.read(1 << 16)
        buf += chunk
        pos = 0
        while (nl := buf.find(b"\n", pos)) >= 0:
            line, pos = buf[pos:nl + 1], nl + 1
            lineno += 1
            yield (lineno, None, quotes + line.count(b'"')) if skipping else (
                lineno, line if len(line) <= limit else None, line.count(b'"'))
            skipping, quotes = False, 0
        buf = buf[pos:]
        if len(buf) > limit:  # a line longer than the limit: count its quotes, keep none of it
            skipping, quotes, buf = True, quotes + buf.count(b'"'), b""
        if not chunk:
            if buf or skipping:
                lineno += 1
                yield (lineno, None if skipping else buf, quotes + buf.count(b'"'))
            return


@dataclass
class CaptionsFile:
    """What a captions file says: captions per file name, where each name's first row is, the first
    problem with a name's rows (it rejects that sample), and rows that name no file at all."""

    captions: dict[str, list[str]] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    sample_problems: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    row_problems: list[tuple[str, str, str]] = field(default_factory=list)    # (where, reason, detail)

    def add(self, name: str, where: str, captions: list, problem: tuple[str, str, str] | None) -> None:
        self.where.setdefault(name, where)
        self.captions.setdefault(name, []).extend(captions)
        if problem and name not in self.sample_problems:
            self.sample_problems[name] = (problem[0], f"{where}: {problem[1]}", problem[2])


def _csv_records(lines: Iterator[tuple[int, bytes | None, int]]) -> Iterator[tuple[int, int, bytes | None]]:
    """(first line, last line, record or None when too large): a quoted field may span lines."""
    start, parts, odd, too_big = None, [], 0, False
    for lineno, line, quotes in lines:
        start = start or lineno
        too_big = too_big or line is None
        if not too_big:
            parts.append(line)
        odd ^= quotes & 1
        if not odd:
            yield start, lineno, None if too_big else b"".join(parts)
            start, parts, too_big = None, [], False
    if start is not None:
        yield start, -1, None if too_big else b"".join(parts)   # -1: an unterminated quoted field


def read_captions_file(path: str, cfg: IngestConfig) -> CaptionsFile:
    """Read a captions.jsonl / captions.csv as a stream, each row bounded by ingest.max_caption_bytes.
    A bad row costs its own sample (or, when it names no file, itself), with the file and line."""
    out = CaptionsFile()
    fname = path.rsplit("/", 1)[-1]
    limit = cfg.max_caption_bytes
    with open_source(path, cfg.source_options) as fh:
        lines = _bounded_lines(fh, limit)
        if path.lower().endswith(".csv"):
            csv.field_size_limit(max(csv.field_size_limit(), limit))
            for first, last, record in _csv_records(lines):
                where = f"{fname}:{first}" if last in (first, -1) else f"{fname}:{first}-{last}"
                if last == -1:
                    out.row_problems.append((where, "bad-captions-row", "a quoted field is never closed"))
                    continue
                if record is None:
                    out.row_problems.append((where, "captions-row-too-large",
                                             f"the row is over ingest.max_caption_bytes ({limit}); it was skipped"))
                    continue
                if not record.strip():
                    continue
                try:  # parsed on latin-1 so bytes survive as they are; captions are decoded strictly below
                    row = next(csv.reader(io.StringIO(record.decode("latin-1"), newline="")))
                except (csv.Error, StopIteration) as exc:
                    out.row_problems.append((where, "bad-captions-row", f"not a CSV row: {exc}"))
                    continue
                if first == 1 and row and row[0].strip().lower() in ("file", "filename", "path", "image"):
                    continue
                if not row or not row[0].strip():
                    out.row_problems.append((where, "bad-captions-row", "CSV row has no file name in column 1"))
                    continue
                name = row[0].strip().encode("latin-1").decode("utf-8", "surrogateescape")
                try:
                    out.add(name, where, [c.encode("latin-1").decode("utf-8") for c in row[1:]], None)
                except UnicodeDecodeError as exc:
                    out.add(name, where, [], ("caption-not-utf8", f"invalid UTF-8 byte at {exc.start} of a "
                                                                  f"caption", "caption"))
        else:
            for lineno, line, _ in lines:
                where = f"{fname}:{lineno}"
                if line is None:
                    out.row_problems.append((where, "captions-row-too-large",
                                             f"the line is over ingest.max_caption_bytes ({limit}); it was skipped"))
                    continue
                if not line.strip():
                    continue
                try:
                    # surrogateescape keeps invalid bytes; json_captions rejects them, per image.
                    obj = json.loads(line.decode("utf-8", "surrogateescape"))
                except (ValueError, RecursionError) as exc:
                    out.row_problems.append((where, "bad-captions-row", f"invalid JSON: {type(exc).__name__}: "
                                                                        f"{exc}"[:300]))
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("file"), str) or not obj["file"]:
                    out.row_problems.append((where, "bad-captions-row",
                                             'a JSONL row is an object with "file" and "caption"/"captions"'))
                    continue
                caps, bad = json_captions(obj)
                out.add(obj["file"], where, caps or [], bad and (bad[0], bad[1], "caption"))
    return out


def _chunk_boundary(name: str, part_size: int) -> bool:
    h = int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
    return h % part_size == 0


def folder_key(name: str) -> str:
    """The key of a folder source's file: its path without the extension."""
    return make_key(name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name)


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
    listed = read_captions_file(captions_url, cfg)
    found = fs.find(root, detail=True)
    present = {p[len(root) + 1:]: info for p, info in found.items() if not _os_metadata(p[len(root) + 1:])}
    images = {f for f in present if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS}
    names = sorted(images | set(listed.captions), key=lambda n: n.encode("utf-8", "surrogateescape"))
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
            info = present.get(name, {})
            problem = listed.sample_problems.get(name)
            if name != shown(name):  # a file name that is not UTF-8: it can be neither stored nor matched
                problem = ("file-name-not-utf8", f"file name '{shown(name)}' is not valid UTF-8; rename it", "file")
            elif name in present and info.get("size", 0) > cfg.max_image_bytes:
                problem = ("file-too-large", f"{name} is {info['size']} bytes, over ingest.max_image_bytes "
                                             f"({cfg.max_image_bytes})", "image")
            # The part's identity is its content (file names, image bytes, captions), whatever the folder is called.
            sha = sha256_of(fs, f"{root}/{name}")[1] if name in present and problem is None else None
            entries.append({"file": shown(name), "exists": name in present, "size": info.get("size"),
                            "sha256": sha, "where": listed.where.get(name),
                            "captions": listed.captions.get(name), "problem": problem})
        tasks.append(PartTask(name=_part_name(fs, root, digest(shown(chunk[0]), 12)), source_digest=digest(entries),
                              payload=("folder", src, entries, {})))
    if listed.row_problems:
        tasks.append(PartTask(name=_part_name(fs, root, "captions-file-rows"), source_digest=digest(listed.row_problems),
                              payload=("problems", captions_url, listed.row_problems, {})))
    return tasks


def iter_folder_samples(root: str, entries: list[dict], cfg: IngestConfig) -> Iterator[RawSample]:
    for entry in entries:
        name = entry["file"]
        key = folder_key(name)
        source, origin = name, entry.get("where")
        captions = entry["captions"]
        if entry["problem"]:
            yield RawSample(key, source, None, None, captions, tuple(entry["problem"]), origin)
            continue
        if not entry["exists"]:
            yield RawSample(key, source, None, None, captions,
                            ("missing-image", f"{name} is listed in the captions file but not in the folder", "file"),
                            origin)
            continue
        with open_source(f"{root}/{name}", cfg.source_options) as fh:
            data = fh.read(cfg.max_image_bytes + 1)
        if len(data) > cfg.max_image_bytes:  # it grew since the listing
            yield RawSample(key, source, None, None, captions, (
                "file-too-large", f"{name} is over ingest.max_image_bytes ({cfg.max_image_bytes})", "image"), origin)
            continue
        yield RawSample(key, source, data, name.rsplit(".", 1)[-1].lower(), captions, origin=origin)


# --------------------------------------------------------------------------- unique keys across parts
def _part_keys(store: Store, record: PartRecord) -> dict[str, str]:
    """The sample keys an ingest part already holds (rows and rejected samples), with their sources."""
    keys: dict[str, str] = {}
    for f in record.files:
        if f["kind"] in ("table", "rejects"):
            columns = ["key", "source"] + (["field"] if f["kind"] == "rejects" else [])
            rows = store.read_parquet(f["path"], f, columns, where=f"part {record.name}",
                                      fix="rerun ingest").to_pylist()
            for row in rows:
                if row.get("field") not in UNCLAIMED_FIELDS:
                    keys.setdefault(row["key"], row["source"])
    return keys


def _i2d_keys(kind: str, url: str, sidecar_url: str | None, options: Mapping[str, Any] | None) -> dict[str, str]:
    """The keys of an img2dataset shard's samples, fetched or failed (its names only, no pixels read)."""
    source = url.rsplit("/", 1)[-1]
    if kind == "webdataset":
        keys = tar_sample_keys(url, options)
    elif kind == "parquet":
        with open_source(url, options) as fh:
            names = read_parquet(fh, columns=["key"]).column("key").to_pylist()
        keys = {make_key(str(k)): f"{source}:{shown(str(k))}" for k in names}
    else:  # files: <shard>/<key>.<ext>
        fs, root = source_fs(url, options)
        root = root.rstrip("/")
        keys = {}
        for path in sorted(fs.find(root)):
            rel = path[len(root) + 1:]
            base = rel.rsplit("/", 1)[-1]
            if not _os_metadata(rel) and "." in base:
                keys.setdefault(make_key(base.split(".", 1)[0]), f"{source}/{shown(base.split('.', 1)[0])}")
    for key, where in _sidecar_keys(sidecar_url if kind != "parquet" else None, source, options).items():
        keys.setdefault(key, where)
    return keys


def _task_keys(task: PartTask, options: Mapping[str, Any] | None) -> dict[str, str]:
    kind = task.payload[0]
    if kind in ("webdataset", "parquet", "files"):
        namespace = task.payload[3]
        return {_namespaced(namespace, k): where for k, where in _i2d_keys(kind, task.payload[1], task.payload[2],
                                                                                     options).items()}
    keys: dict[str, str] = {}
    for entry in task.payload[2]:
        if entry["exists"] and not (entry["problem"] and entry["problem"][2] in UNCLAIMED_FIELDS):
            keys.setdefault(folder_key(entry["file"]), entry["file"])
    return keys


def claim_keys(store: Store, tasks: list[PartTask], reusable: dict[str, PartRecord],
               source_options: Mapping[str, Any] | None = None) -> list[PartTask]:
    """Make keys unique within the version. Parts an earlier version already holds claim their keys
    first (an incremental ingest never changes what it extends), then new parts in order; a part gets
    the keys claimed before it in its payload (it rejects those samples, naming both sources) and in
    its source digest (so it is reused only with the same claims)."""
    claimed: dict[str, str] = {}
    planned: dict[str, PartTask] = {}
    samples = [t for t in tasks if t.payload[0] != "problems"]
    for task in samples:
        record = reusable.get(task.source_digest)
        if record is not None and record.name == task.name:
            keys = _part_keys(store, record)
            if not keys.keys() & claimed.keys():   # else it is made again below, with its clashes rejected
                claimed.update(keys)
                planned[task.name] = task
    new = [t for t in samples if t.name not in planned]
    for i, task in enumerate(new):
        if not claimed and i == len(new) - 1:
            break  # nothing before it to clash with, nothing after it to claim for: no header scan
        keys = _task_keys(task, source_options)
        taken = {k: claimed[k] for k in sorted(keys) if k in claimed}
        for key, source in keys.items():
            claimed.setdefault(key, source)
        if taken:
            task = replace(task, source_digest=digest([task.source_digest, taken]),
                           payload=task.payload[:-1] + (taken,))
        planned[task.name] = task
    return [planned.get(t.name, t) for t in tasks]


# --------------------------------------------------------------------------- the part worker
def iter_part_samples(task: PartTask, cfg: IngestConfig, counters: Counter) -> Iterator[RawSample] | None:
    """The raw samples of one planned part, as its source format reads them (None: a part of captions-file
    rows that name no readable sample). Also how `ram-engine init` looks at a few samples of a source."""
    kind = task.payload[0]
    if kind == "webdataset":
        return iter_tar_samples(task.payload[1], cfg, counters, task.payload[2])
    if kind == "parquet":
        return iter_i2d_parquet_samples(task.payload[1], cfg)
    if kind == "files":
        return iter_i2d_files_samples(task.payload[1], task.payload[2], cfg)
    if kind == "folder":
        return iter_folder_samples(task.payload[1], task.payload[2], cfg)
    return None


def ingest_part(writer: VersionWriter, task: PartTask, cfg: IngestConfig) -> PartRecord:
    kind, taken = task.payload[0], task.payload[-1]   # taken: keys earlier parts hold -> their source
    counters: Counter = Counter()
    # img2dataset numbers keys per run (0000000, 0000001, ...): prefixed with the tag of the folder they came
    # from, keys of two runs never collide, and a key never changes when other sources join the ingest.
    namespace = task.payload[3] if kind in ("webdataset", "parquet", "files") else None
    samples = iter_part_samples(task, cfg, counters)
    if samples is None:  # rows of the captions file that could not be read at all
        rejects = [{"key": make_key(where), "reason": reason, "detail": detail, "source": where, "field": "captions"}
                   for where, reason, detail in task.payload[2]]
        return writer.write_part(task.name, table=schemas.IMAGES.empty_table(), rejects=rejects,
                                 rows_in=len(rejects), source_digest=task.source_digest,
                                 metrics={"rejected_by_reason": dict(Counter(r["reason"] for r in rejects))})
    shard_rel = shard_name(task.name)   # relative to the version folder: true in every version it is linked into
    rows: list[dict] = []
    rejects: list[dict] = []
    seen: dict[str, str] = {}   # key -> source of the first sample with it in this part
    rows_in = [0]

    def accepted() -> Iterator[dict]:
        for raw in samples:
            rows_in[0] += 1
            source_key = raw.key
            raw.key = _namespaced(namespace, raw.key)

            def reject(reason: str, detail: str, field: str) -> None:
                source = f"{raw.source} ({raw.origin})" if raw.origin else raw.source
                rejects.append({"key": raw.key, "reason": reason, "detail": detail, "source": source,
                                "field": field})

            if raw.claims_key:  # the first sample with a key keeps it, whatever becomes of it
                first = taken.get(raw.key) or seen.get(raw.key)
                if first is not None:
                    where = "an earlier part" if raw.key in taken else "this part"
                    reject("duplicate-key", f"key {raw.key} is already taken by {first} ({where}); this sample "
                                            f"({raw.source}) is dropped", "key")
                    continue
                seen[raw.key] = raw.source
            if raw.problem:
                reject(*raw.problem)
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
        ignored = {k: v for k, v in counters.items() if k.startswith("ignored_")}
        converted = {k: v for k, v in counters.items() if k not in ignored}
        return {"converted": converted, "rejected_by_reason": dict(Counter(r["reason"] for r in rejects))} | ignored

    return writer.write_part(task.name, samples=accepted(), table=table, rejects=lambda: rejects,
                             rows_in=lambda: rows_in[0], source_digest=task.source_digest, metrics=metrics)


def plan(src: str | list[str], cfg: IngestConfig) -> tuple[list[PartTask], list[dict]]:
    """The parts of one ingest over one or several sources, and what each source was (for the manifest)."""
    tasks: list[PartTask] = []
    described = []
    for fs, path, url in expand_sources(src, cfg.source_options):
        fmt = detect_format(fs, path) if cfg.format == "auto" else cfg.format
        if fmt == "folder":
            tasks += folder_tasks(fs, path, cfg)
        elif fmt == "webdataset":
            tasks += tar_tasks(fs, path)
        else:
            tasks += i2d_tasks(fs, path, fmt)
        described.append({"source": url, "format": fmt})
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise SourceError(f"ingest sources overlap: parts {dupes[:5]} are named by more than one source; "
                          f"name each file once in ingest.source")
    return tasks, described


def ingest(store: Store, cfg: IngestConfig, *, source: str | list[str] | None = None, executor=None,
           progress=None) -> StageResult:
    """Ingest one or several sources into a new (or the existing identical) `images` version."""
    return run(STAGE, store, {"ingest": cfg}, {"source": source}, executor=executor, progress=progress)


def identify(run) -> None:
    """An ingest's identity is its sources' content: the parts (names and content digests) and the config,
    not how the sources were spelt; the sources as given are recorded in the manifest."""
    src = run.inputs["source"] or run.cfg.source
    if not src:
        raise SourceError("no ingest source: pass SRC or set ingest.source in the config")
    tasks, described = plan(src, run.cfg)
    # Nor by where they were read from: source_options (endpoints, maybe keys) never reach a manifest.
    run.config = {k: v for k, v in run.config.items() if k != "source_options"} | {"source": None}
    # Which parts earlier versions already hold depends on code and config only, not on this input.
    reusable = run.store.begin(run.output, code_version=run.stage.code_version(), config=run.config,
                               parents=[]).reusable_parts()
    # Parts made from unchanged input under the same config (and the same key claims) are shared with
    # earlier versions.
    run.state["tasks"] = claim_keys(run.store, tasks, reusable, run.cfg.source_options)
    run.input_digest = digest([[t.name, t.source_digest] for t in run.state["tasks"]])
    run.extra["sources"] = described


def split(run) -> list[PartTask]:
    # planned by `identify` (the parts are the identity); taken out of the state, which travels with every part
    return run.state.pop("tasks")


def process(run, writer, task) -> PartRecord:
    return ingest_part(writer, task, run.cfg)


STAGE = Stage(name="ingest", output="images", inputs=("source",), section="ingest", version=STAGE_VERSION,
              identify=identify, split=split, process=process)
