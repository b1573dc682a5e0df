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

A source is its content (docs/sources.md): part names, keys and rows are functions of the bytes and of paths relative
to the source, so a moved or copied source is the same data; tars are read by a full header walk
(storage.shards.TarWalker), and each part checks the bytes it reads against the sha256 it was planned with.
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
import stat
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
from storage.shards import TarDamage, TarEntry, TarWalker, split_member_name

from tasks.engine.config import IngestConfig
from tasks.engine.runner import Input, PartTask, Stage

STAGE_VERSION = "ingest-5"   # 3: every caption of a sample; 4: img2dataset formats and metadata, shards/; 5: parts,
# keys and `source` from content (a moved source is the same data), img2dataset runs namespaced per run, tar header walk
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
    offset: int | None = None                     # where its first member's header is in its tar (rejects say it)

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
# NFC reorders each run of combining marks by sorting it (quadratic in the run: a 1 MB caption of marks took
# minutes). Unicode's stream-safe text format (UAX #15) bounds a run at 30 marks; no real text needs more.
MAX_COMBINING_RUN = 30


def _longest_combining_run(text: str) -> tuple[int, int]:
    """(length, start) of the longest run of combining characters (linear; ASCII text has none)."""
    if text.isascii():
        return 0, 0
    best, best_at, run = 0, 0, 0
    combining = unicodedata.combining
    for i, ch in enumerate(text):
        if combining(ch):
            run += 1
            if run > best:
                best, best_at = run, i - run + 1
        else:
            run = 0
    return best, best_at


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
    run, at = _longest_combining_run(raw)
    if run > MAX_COMBINING_RUN:
        return None, (f"caption-combining-marks: a run of {run} combining marks from character {at} (over "
                      f"{MAX_COMBINING_RUN}, Unicode's stream-safe limit): normalising it costs time quadratic in the run")
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
_GLOB_MAGIC = re.compile(r"[*?\[]")


class SourceChanged(RuntimeError):
    """A source file is not what the ingest was planned from (replaced or removed since): the part fails, nothing
    is committed, and running the ingest again plans from the files as they are then."""


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


def _is_local(fs) -> bool:
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return proto in ("file", "local")


def _url(fs, path: str) -> str:
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _canonical(spec: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(fs, path, url) of a source however it is spelt (relative, absolute, file://): local paths are resolved,
    so the same files always get the same part names."""
    fs, path = source_fs(spec, options)
    if _is_local(fs):
        path = os.path.realpath(path)
        return fs, path, path
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return fs, path.rstrip("/"), f"{proto}://{path.rstrip('/')}"


def expand_sources(src: str | list[str], options: Mapping[str, Any] | None = None
                   ) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """Every source path named by `src`: one or several specs, each a path, a brace pattern or a glob; remote
    ones opened with `options` (ingest.source_options). A spec that exists as it is written is that path, glob
    and brace characters included (`shots[1]` is the folder `shots[1]`, never `shots1`)."""
    from braceexpand import braceexpand

    specs = [src] if isinstance(src, str) else list(src)
    if not specs:
        raise SourceError("no ingest source: ingest.source is an empty list")
    found: dict[str, tuple] = {}
    for spec in specs:
        matched = []
        fs, path = source_fs(spec, options)
        patterns = [spec] if fs.exists(path) else list(braceexpand(spec))
        for pattern in patterns:
            fs, path = source_fs(pattern, options)
            if fs.exists(path):
                matched.append(_canonical(pattern, options))
            elif _GLOB_MAGIC.search(path):
                matched += [_canonical(_url(fs, p), options) for p in sorted(fs.glob(path))]
            elif "{" in spec or len(specs) > 1:
                raise SourceError(f"ingest source {pattern} (from {spec}) does not exist")
        if not matched:
            raise SourceError(f"ingest source {spec} does not exist or matches nothing; set ingest.source to a tar, "
                              f"a folder of tars, an img2dataset output folder (webdataset, parquet or files format), "
                              f"an image folder with captions.jsonl / captions.csv, or a list or brace pattern of these")
        for entry in matched:
            found.setdefault(entry[2], entry)
    return [found[u] for u in sorted(found)]


def _os_metadata(name: str) -> bool:
    """macOS AppleDouble (`._x.jpg`, `__MACOSX/`), `.DS_Store` and other hidden files: never samples."""
    parts = name.split("/")
    return any(p == "__MACOSX" for p in parts[:-1]) or parts[-1].startswith(".")


@dataclass
class Listing:
    """What a source folder holds: its regular files (relative name -> size), and the entries that are never
    opened (relative name -> (reason, detail)): FIFOs, devices, sockets, broken links and links that leave the
    source. A FIFO or /dev/zero named .jpg would hang or fill memory; a link to a file outside the source
    would read what the source does not hold (a secret), so nothing of theirs is read, not even a byte."""

    files: dict[str, int] = field(default_factory=dict)
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)


def list_source(fs, root: str, recursive: bool = True) -> Listing:
    root = root.rstrip("/")
    out = Listing()
    if not _is_local(fs):   # object stores hold objects: no links, no devices
        found = fs.find(root, detail=True, maxdepth=None if recursive else 1)
        for path, info in found.items():
            if info.get("type") == "file" and path != root:
                out.files[path[len(root) + 1:]] = int(info.get("size") or 0)
        return out
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # A link to a folder is not walked (it could loop or leave the source); it is seen as an entry below.
        names = filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in names:
            path = os.path.join(dirpath, name)
            rel = path[len(root) + 1:]
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out.files[rel] = st.st_size
                continue
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                if target != real_root and not target.startswith(real_root + os.sep):
                    out.refused[rel] = ("symlink-outside-source", f"{shown(rel)} is a symbolic link to a path outside "
                                        f"the source; links that leave the source are never followed: copy the file in")
                    continue
                try:
                    target_st = os.stat(path)
                except OSError:
                    out.refused[rel] = ("file-not-regular", f"{shown(rel)} is a broken symbolic link")
                    continue
                if stat.S_ISREG(target_st.st_mode):
                    out.files[rel] = target_st.st_size
                    continue
                if stat.S_ISDIR(target_st.st_mode):
                    continue   # the folder it names is inside the source and walked there
                st = target_st
            kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                    else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file")
            out.refused[rel] = ("file-not-regular", f"{shown(rel)} is a {kind}, not a regular file: it is never opened")
        if not recursive:
            break
    return out


def _read_verified(fs, path: str, planned: str | None, limit: int) -> bytes | None:
    """A file's bytes (None when over `limit`: read no further into memory), checked against the sha256 it was
    planned with: the whole file is hashed as it is read, so a file replaced since planning fails the part."""
    h = hashlib.sha256()
    kept: list[bytes] = []
    size = 0
    try:
        with fs.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
                if size <= limit:
                    kept.append(chunk)
                else:
                    kept = []   # over the limit: hashed to the end, not kept
    except FileNotFoundError as exc:
        raise SourceChanged(f"source file {_url(fs, path)} was removed after the ingest was planned: run the ingest "
                            f"again (it plans from the files as they are then)") from exc
    if planned is not None and h.hexdigest() != planned:
        raise SourceChanged(f"source file {_url(fs, path)} changed after the ingest was planned (sha256 {planned[:12]}… "
                            f"planned, {h.hexdigest()[:12]}… read): nothing of it is kept; run the ingest again when the "
                            f"source is no longer being written")
    return None if size > limit else b"".join(kept)


class _VerifiedFile:
    """A source file read for one part, hashed as it is read (sequentially; a seek forward is read through, a
    seek back re-reads what is hashed already). `check()` reads the rest and compares the whole with the sha256
    the part was planned with, so what a part holds is always what its identity says."""

    def __init__(self, fh, url: str, planned: str | None):
        self.fh, self.url, self.planned = fh, url, planned
        self.h = hashlib.sha256()
        self.hashed = 0       # bytes [0, hashed) are in the digest
        self.pos = 0
        self.mode = "rb"
        self.size = fh.seek(0, 2)
        fh.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def _hash_to(self, end: int) -> None:
        self.fh.seek(self.hashed)
        while self.hashed < end:
            chunk = self.fh.read(min(1 << 20, end - self.hashed))
            if not chunk:
                break
            self.h.update(chunk)
            self.hashed += len(chunk)

    def read(self, n: int = -1) -> bytes:
        if self.pos > self.hashed:
            self._hash_to(self.pos)
        self.fh.seek(self.pos)
        data = self.fh.read() if n is None or n < 0 else self.fh.read(n)
        end = self.pos + len(data)
        if end > self.hashed >= self.pos:
            self.h.update(data[self.hashed - self.pos:])
            self.hashed = end
        self.pos = end
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def check(self) -> None:
        self._hash_to(self.size + 1)
        if self.planned is not None and self.h.hexdigest() != self.planned:
            raise SourceChanged(f"source file {self.url} changed after the ingest was planned (sha256 "
                                f"{self.planned[:12]}… planned, {self.h.hexdigest()[:12]}… read): the part is not "
                                f"written; run the ingest again when the source is no longer being written")

    def close(self) -> None:
        self.fh.close()

    @property
    def closed(self) -> bool:
        return self.fh.closed


@contextlib.contextmanager
def open_verified(url: str, planned: str | None, options: Mapping[str, Any] | None) -> Iterator[_VerifiedFile]:
    """A source file for one part: hashed as it is read and checked against its planned sha256 at the end."""
    try:
        fh = open_source(url, options)
    except FileNotFoundError as exc:
        raise SourceChanged(f"source file {url} was removed after the ingest was planned: run the ingest again (it "
                            f"plans from the files as they are then)") from exc
    verified = _VerifiedFile(fh, url, planned)
    try:
        yield verified
        verified.check()
    finally:
        fh.close()


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
    if any(is_tar(p) and not _os_metadata(p) for p in list_source(fs, path).files):
        return "webdataset"
    return "folder"


def _image_column(schema: pa.Schema) -> str | None:
    """The column that holds img2dataset's image bytes (named after its encode format)."""
    for name in ("jpg", "png", "webp", "jpeg"):
        if name in schema.names and (pa.types.is_binary(schema.field(name).type)
                                     or pa.types.is_large_binary(schema.field(name).type)):
            return name
    return None


def _tar_stem(name: str) -> str:
    lower = name.lower()
    return name[: len(name) - len(next(s for s in TAR_SUFFIXES if lower.endswith(s)))]


def _regular(fs, path: str) -> None:
    """A source the user named as one file must be a regular file (a FIFO would hang the planning)."""
    if _is_local(fs) and not stat.S_ISREG(os.stat(path).st_mode):
        raise SourceError(f"ingest source {path} is not a regular file (a FIFO, device or socket); name a file")


def _run_namespace(first_shard_sha: str) -> str:
    """An img2dataset run's tag, from its content: the sha256 of its first shard's metadata table (its URLs,
    statuses, hashes) or, without one, of the shard itself. Two runs never share it unless their first shards
    are the same bytes, and it does not change when the run is moved, copied or renamed."""
    return digest(["img2dataset-run", first_shard_sha], 8)


def _part_task(kind: str, name: str, files: dict[str, tuple[str, str]], **payload) -> PartTask:
    """A part over source files ({url: (name relative to its source or run, sha256)}): its identity is those names
    and bytes and what else the payload fixes (namespace, label), never where the files lie."""
    ident = [kind, sorted(files.values()), payload.get("namespace"), payload.get("label")]
    return PartTask(name=name, source_digest=digest(ident),
                    payload={"kind": kind, "sha": {u: s for u, (_, s) in files.items()}, "taken": {}} | payload)


def tar_tasks(fs, path: str) -> list[PartTask]:
    """One part per tar of a webdataset source: a tar, or a folder searched recursively (compressed tars
    included, OS metadata skipped, links out of the source and special files refused). A folder whose tars have
    img2dataset's per-shard metadata beside them (`<stem>.parquet`, `<stem>_stats.json`) is one img2dataset run:
    its sample numbers are namespaced by the run's content tag, so two runs never collide and a moved run keeps
    its keys; other tars keep their own keys."""
    if fs.isdir(path):
        root = path.rstrip("/")
        listing = list_source(fs, root)
        tars = sorted(rel for rel in listing.files if is_tar(rel) and not _os_metadata(rel))
    else:
        _regular(fs, path)
        root, base = path.rsplit("/", 1)
        listing = list_source(fs, root, recursive=False)
        tars = [base]
    refused = {rel: why for rel, why in listing.refused.items() if is_tar(rel) and not _os_metadata(rel)}
    if not tars and not refused:
        raise SourceError(f"no tar shards (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) found at {_url(fs, path)}")
    shas: dict[str, str] = {}

    def sha(rel: str) -> str:
        if rel not in shas:
            shas[rel] = sha256_of(fs, f"{root}/{rel}")[1]
        return shas[rel]

    def companions(rel: str) -> list[str]:
        stem = _tar_stem(rel)
        return [p for p in (f"{stem}.parquet", f"{stem}_stats.json") if p in listing.files]

    namespaces: dict[str, str | None] = {}   # folder -> its run's tag (None: not img2dataset output)
    for folder in sorted({t.rpartition("/")[0] for t in tars}):
        in_folder = sorted(t for t in listing.files if is_tar(t) and t.rpartition("/")[0] == folder
                           and not _os_metadata(t))
        if any(companions(t) for t in in_folder):
            first = in_folder[0]
            meta = f"{_tar_stem(first)}.parquet"
            namespaces[folder] = _run_namespace(sha(meta) if meta in listing.files else sha(first))
        else:
            namespaces[folder] = None
    tasks = []
    for rel in tars:
        folder, _, base = rel.rpartition("/")
        ns = namespaces[folder]
        # A run's shards are named within the run; other tars by their path in the source.
        ident_name = base if ns else rel
        files = {_url(fs, f"{root}/{p}"): ((p.rpartition("/")[2] if ns else p), sha(p)) for p in [rel] + companions(rel)}
        label = f"{ns}/{base}" if ns else rel
        tag = ns or digest([rel, sha(rel)], 8)
        sidecar = next((p for p in companions(rel) if p.endswith(".parquet")), None)
        tasks.append(_part_task("webdataset", f"part-{tag}-{make_key(_tar_stem(ident_name))}", files,
                                url=_url(fs, f"{root}/{rel}"), sidecar=_url(fs, f"{root}/{sidecar}") if sidecar else None,
                                namespace=ns, label=label))
    if refused:
        rows = [(rel, reason, detail) for rel, (reason, detail) in sorted(refused.items())]
        tasks.append(PartTask(name=f"part-{digest(rows, 8)}-refused-entries", source_digest=digest(["refused", rows]),
                              payload={"kind": "problems", "url": _url(fs, root), "rows": rows, "taken": {}}))
    return tasks


def i2d_tasks(fs, path: str, fmt: str) -> list[PartTask]:
    """One part per shard of img2dataset's parquet or files output (with its metadata .parquet and stats)."""
    if fs.isdir(path):
        folder = path.rstrip("/")
        chosen = None
    else:
        _regular(fs, path)
        folder, chosen = path.rsplit("/", 1)
    listing = list_source(fs, folder)
    if fmt == "parquet":
        shards = sorted(n[:-8] for n in listing.files if "/" not in n and n.endswith(".parquet")
                        and (_SHARD_ID.match(n[:-8]) or n == chosen))
    else:
        shards = sorted({n.split("/", 1)[0] for n in listing.files if "/" in n and _SHARD_ID.match(n.split("/", 1)[0])})
    shas: dict[str, str] = {}

    def sha(rel: str) -> str:
        if rel not in shas:
            shas[rel] = sha256_of(fs, f"{folder}/{rel}")[1]
        return shas[rel]

    def shard_files(stem: str) -> list[str]:
        if fmt == "parquet":
            data = [f"{stem}.parquet"]
        else:
            data = sorted(n for n in listing.files if n.startswith(stem + "/") and not _os_metadata(n[len(stem) + 1:]))
            data += [p for p in (f"{stem}.parquet",) if p in listing.files]
        return data + [p for p in (f"{stem}_stats.json",) if p in listing.files]

    if not shards:
        raise SourceError(f"no img2dataset {fmt} shards found at {_url(fs, path)}")
    first = shards[0]
    ns = _run_namespace(sha(f"{first}.parquet") if f"{first}.parquet" in listing.files
                        else digest([[p, sha(p)] for p in shard_files(first)]))
    tasks = []
    for stem in shards:
        if chosen is not None and f"{stem}.parquet" != chosen:
            continue
        files = {_url(fs, f"{folder}/{p}"): (p, sha(p)) for p in shard_files(stem)}
        sidecar = f"{stem}.parquet" if fmt == "files" and f"{stem}.parquet" in listing.files else None
        data = f"{stem}.parquet" if fmt == "parquet" else stem
        refused = sorted((rel, *why) for rel, why in listing.refused.items() if rel.startswith(stem + "/"))
        tasks.append(_part_task(fmt, f"part-{ns}-{make_key(stem)}", files, url=_url(fs, f"{folder}/{data}"),
                                sidecar=_url(fs, f"{folder}/{sidecar}") if sidecar else None, namespace=ns,
                                label=f"{ns}/{data}", refused=refused))
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


def _read_sidecar(task: dict, cfg: IngestConfig, columns: list[str] | None = None) -> dict[str, dict]:
    """img2dataset's per-shard metadata table, by key ({} without one): read whole (one row per sample of the
    shard, so as large as its sample count), up to ingest.max_metadata_bytes, checked against its planned sha256."""
    url = task.get("sidecar")
    if not url:
        return {}
    fs, path = source_fs(url, cfg.source_options)
    data = _read_verified(fs, path, task["sha"].get(url), cfg.max_metadata_bytes)
    if data is None:
        raise SourceError(f"img2dataset metadata table {url} is over ingest.max_metadata_bytes "
                          f"({cfg.max_metadata_bytes}); raise the limit if it is genuine")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        limit = cfg.max_caption_bytes + (1 << 20)   # a metadata cell is caption- or EXIF-sized
        for rg in range(pf.metadata.num_row_groups):
            group = pf.metadata.row_group(rg)
            for i in range(group.num_columns):
                if largest_page(pa.BufferReader(data), group.column(i)) > limit:
                    raise SourceError(f"img2dataset metadata table {url}: column {group.column(i).path_in_schema} of "
                                      f"row group {rg} has a page over {limit} bytes (ingest.max_caption_bytes + 1 MiB); "
                                      f"it is not decoded: re-fetch the shard or remove the table")
        rows = read_parquet(pf, columns=columns).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"img2dataset metadata table {url} cannot be read ({type(exc).__name__}: {exc}); re-fetch "
                          f"the shard or remove the table") from exc
    return {str(r.get("key")): r for r in rows if r.get("key") is not None}


def _failed_sample(key: str, row: dict, source: str) -> RawSample:
    """A sample img2dataset could not fetch: a reject with img2dataset's own error message."""
    return RawSample(make_key(key), f"{source}:{shown(key)}", None, None, None,
                     (f"img2dataset-{row['status']}".replace("_", "-"),
                      f"{row.get('error_message') or 'no message'} (url {row.get('url')})"[:300], "url"), meta=row)


def _unread_samples(sidecar: dict[str, dict], source: str, seen: set[str], shard: str) -> Iterator[RawSample]:
    """The metadata table's samples the shard did not give: the failed ones (img2dataset's own reason), and the
    ones it lists as fetched that the shard lacks (a lie, or a shard cut short: counted, never silent)."""
    for key, row in sidecar.items():
        if key in seen:
            continue
        if row.get("status") not in (None, "success"):
            yield _failed_sample(key, row, source)
        elif row.get("status") == "success":
            yield RawSample(make_key(key), f"{source}:{shown(key)}", None, None, None, (
                "source-missing-sample", f"img2dataset's metadata lists {shown(key)} as fetched (status success), but "
                                         f"{shard} holds no member of it: the shard was cut or rewritten", "image"),
                meta=row)


def _sidecar_keys(task: dict, cfg: IngestConfig) -> dict[str, str]:
    """The keys of the samples a metadata table lists but its shard may not hold (they are rejected, so they hold
    their key)."""
    rows = _read_sidecar(task, cfg, columns=["key", "status"])
    return {make_key(k): f"{task['label']}:{shown(k)}" for k, r in rows.items() if r.get("status") is not None}


@dataclass
class _Group:
    """The members of one tar sample read so far: only what ingest uses is kept (one image, captions)."""

    stem: str
    offset: int
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
    """The tar bytes of a (possibly compressed) tar file: the codec's own reader (seekable: backwards by reading
    again), which skips a huge member far faster than a tar stream reader does."""
    lower = url.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if lower.endswith((".tar.bz2", ".tbz2")):
        return bz2.BZ2File(fh, mode="rb")
    if lower.endswith((".tar.xz", ".txz")):
        return lzma.LZMAFile(fh, mode="rb")
    return contextlib.nullcontext(fh)


_CODEC_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def _member_kind(entry: TarEntry) -> str | None:
    """None for a member that belongs to no sample (a folder, OS metadata), else 'file', 'other' or 'no-ext'."""
    if entry.isdir() or _os_metadata(entry.name):
        return None
    if not split_member_name(entry.name)[1]:
        return "no-ext"
    return "file" if entry.isfile() else "other"


def walk_tar(fh, url: str, cfg: IngestConfig) -> Iterator[tuple[TarEntry | TarDamage, TarWalker]]:
    """The members and damage of a source tar (TarWalker over its decompressed bytes); a codec error (a gzip cut
    or corrupt) is damage too, at the offset reached, and ends the walk."""
    with _decompressed(fh, url) as raw:
        walker = TarWalker(raw, max_header_bytes=cfg.max_header_bytes,
                           size=None if _compressed(url) else fh.size)
        try:
            for event in walker:
                yield event, walker
        except _CODEC_ERRORS as exc:
            yield TarDamage("source-truncated" if isinstance(exc, EOFError) else "source-damaged", walker._pos,
                            f"the compressed stream breaks at tar byte {walker._pos}: {type(exc).__name__}: {exc}; "
                            f"re-fetch the shard", fatal=True), walker


def tar_sample_keys(task: dict, cfg: IngestConfig) -> dict[str, str]:
    """The keys of the samples a tar holds (read from its headers only), each with its first source."""
    keys: dict[str, str] = {}
    with open_verified(task["url"], None, cfg.source_options) as fh:
        for event, _ in walk_tar(fh, task["url"], cfg):
            if isinstance(event, TarEntry) and _member_kind(event) in ("file", "other"):
                stem, _ = split_member_name(event.name)
                keys.setdefault(make_key(stem), f"{task['label']}:{shown(stem)}")
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


def iter_tar_samples(task: dict, cfg: IngestConfig, counters: Counter) -> Iterator[RawSample]:
    """Group tar members into samples by key (member name up to the basename's first dot); then the samples
    img2dataset's metadata table (the task's `sidecar`) lists that the tar did not give.

    The tar is read by a full header walk (storage.shards.TarWalker): every member's start and end is known, so
    damage, a size that lies, a cut, trailing bytes and a second archive are found and counted (on the sample they
    touch, or as a `source-*` reject of the tar), each with its byte offset; no header field is trusted unbounded.
    img2dataset writes a sample's members next to each other, and such tars stream with one sample in memory. A tar
    grouped otherwise (`tar cf x.tar *.jpg *.txt`) still gives every sample once: samples missing members wait in
    a spool (bounded memory) and come out at the end. Only what ingest uses is read (one image, the .txt and .json),
    each member bounded by the config's byte limits; other members are skipped unread. OS metadata (`._x.jpg`,
    `__MACOSX/`) is skipped and counted in metrics. The bytes read are checked against the tar's planned sha256.
    """
    url, label = task["url"], task["label"]
    base_name = url.rsplit("/", 1)[-1]
    sidecar = _read_sidecar(task, cfg)
    seen: set[str] = set()              # stems read (their rows in the metadata table are not samples again)
    spool = _Spool(cfg.spool_bytes)
    current: _Group | None = None
    pending: dict[str, _Group] = {}     # samples that may get more members later, by stem
    out_of_order = False
    cut: TarDamage | None = None        # the damage that ended the walk

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
            captions, caption_problem = _metadata_captions(meta, f"{base_name} metadata row {shown(base)}", cfg)
        if image_ext is None and any(e for e in group.exts if e in IMAGE_EXTS) and not group.problem:
            problem = problem or ("member-not-a-file", f"the image member of {shown(group.stem)} is a link or "
                                                      f"device; links are never followed", "image")
        return RawSample(make_key(group.stem), f"{label}:{shown(group.stem)}", value.get(image_ext) if image_ext
                         else None, image_ext, captions, problem or group.problem or caption_problem, meta=meta,
                         offset=group.offset)

    def close(group: _Group) -> Iterator[RawSample]:
        if group.complete() and not out_of_order:
            yield sample(group)
        else:  # it may get its missing members later: wait, in the spool
            group.data = {e: (spool.put(v) if isinstance(v, bytes) else v) for e, v in group.data.items()}
            pending[group.stem] = group

    def add(group: _Group, entry: TarEntry, ext: str, walker: TarWalker) -> None:
        group.exts.append(ext)
        if not entry.isfile():
            return
        limit = cfg.max_image_bytes if ext in IMAGE_EXTS else cfg.max_caption_bytes if ext in CAPTION_EXTS else None
        if limit is None or ext in group.data or (ext in IMAGE_EXTS and any(
                e in group.data for e in IMAGE_EXTS[: IMAGE_EXTS.index(ext)])):
            return  # not used by ingest (or a preferred image is there already): skipped unread
        if entry.size > limit:
            group.problem = group.problem or (
                "member-too-large", f"{shown(entry.name)} is {entry.size} bytes, over ingest."
                f"{'max_image_bytes' if ext in IMAGE_EXTS else 'max_caption_bytes'} ({limit})", ext)
            return
        try:
            data = walker.read(entry)
        except _CODEC_ERRORS:
            return   # a compressed stream that breaks inside it: the walk reports where, on this sample
        if len(data) < entry.size:
            return   # the tar ends inside it: the walk reports the cut, on this sample
        if ext in IMAGE_EXTS:
            for other in [e for e in group.data if e in IMAGE_EXTS]:
                del group.data[other]   # a less preferred image read earlier
        group.data[ext] = spool.put(data) if group.stem in pending else data

    def group_of(entry: TarEntry) -> _Group | None:
        stem = split_member_name(entry.name)[0]
        return current if current is not None and current.stem == stem else pending.get(stem)

    def marker(damage: TarDamage) -> RawSample:
        return RawSample(make_key(f"{base_name}-{damage.reason}-{damage.offset}"), f"{label}@{damage.offset}", None,
                         None, None, (damage.reason, damage.detail, "tar"), offset=damage.offset)

    with open_verified(url, task["sha"].get(url), cfg.source_options) as fh:
        for event, walker in walk_tar(fh, url, cfg):
            if isinstance(event, TarDamage):
                group = group_of(event.suspect) if event.suspect is not None else None
                if group is not None:
                    # The damage touches this sample (a member cut short, or one whose size lies): it is rejected.
                    group.problem = (event.reason, event.detail, split_member_name(event.suspect.name)[1] or "tar")
                else:
                    yield marker(event)
                if event.fatal:
                    cut = event
                continue
            entry = event
            kind = _member_kind(entry)
            if kind is None:
                if not entry.isdir():
                    counters["ignored_os_metadata_members"] += 1
                continue
            if kind == "no-ext":
                yield RawSample(make_key(entry.name), f"{label}:{shown(entry.name)}", None, None, None,
                                ("member-without-extension", f"tar member '{shown(entry.name)}' has no extension, "
                                 f"so it belongs to no sample (a NUL byte in a name cuts it there)", "member"),
                                offset=entry.offset)
                continue
            stem, ext = split_member_name(entry.name)
            if current is not None and stem == current.stem:
                add(current, entry, ext, walker)
            elif stem in pending:
                out_of_order = True
                add(pending[stem], entry, ext, walker)
            else:
                if current is not None:
                    yield from close(current)
                current = _Group(stem, entry.offset)
                add(current, entry, ext, walker)
        if cut is not None:
            # The walk ended early: complete samples are kept; one missing members lost them to the cut.
            lost = ("source-truncated", f"the tar ends at byte {cut.offset} before the rest of this sample's "
                                        f"members: {cut.detail}", "members")
            for group in ([current] if current is not None else []) + list(pending.values()):
                yield sample(group, None if group.complete() or group.problem else lost)
        else:
            if current is not None:
                yield from close(current)
            for group in pending.values():
                yield sample(group)
        spool.close()
    yield from _unread_samples(sidecar, label, seen, base_name)


def _metadata_captions(value: Any, where: str, cfg: IngestConfig) -> tuple[list | None, tuple[str, str, str] | None]:
    """Captions of an img2dataset metadata row (its "caption"), each bounded by ingest.max_caption_bytes. A
    caption column that holds null is an empty caption (img2dataset writes an empty .txt for it), so a sample
    without a caption is `caption-empty` whichever output format carried it."""
    if not isinstance(value, dict):
        return None, None
    if "caption" in value and value["caption"] is None and value.get("captions") is None:
        return [""], None
    captions, bad = json_captions(value)
    if bad:
        return None, (bad[0], f"{where}: {bad[1]}", "caption")
    if captions and any(len(c.encode("utf-8", "surrogatepass")) > cfg.max_caption_bytes for c in captions):
        return None, ("member-too-large", f"{where}: a caption is over ingest.max_caption_bytes "
                                          f"({cfg.max_caption_bytes})", "caption")
    return captions, None


# --------------------------------------------------------------------------- img2dataset parquet and files output
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 64 bits")


def _thrift_skip(buf: bytes, pos: int, ttype: int, depth: int) -> int:
    if depth > 16:
        raise ValueError("thrift nesting too deep")
    if ttype in (1, 2):
        return pos
    if ttype == 3:
        return pos + 1
    if ttype in (4, 5, 6):
        return _varint(buf, pos)[1]
    if ttype == 7:
        return pos + 8
    if ttype == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if ttype in (9, 10):
        head = buf[pos]
        pos += 1
        size, elem = head >> 4, head & 0x0F
        if size == 15:
            size, pos = _varint(buf, pos)
        for _ in range(size):
            pos = _thrift_skip(buf, pos, 3 if elem in (1, 2) else elem, depth + 1)
        return pos
    if ttype == 11:
        size, pos = _varint(buf, pos)
        if size:
            kv = buf[pos]
            pos += 1
            for _ in range(size):
                pos = _thrift_skip(buf, pos, kv >> 4, depth + 1)
                pos = _thrift_skip(buf, pos, kv & 0x0F, depth + 1)
        return pos
    if ttype == 12:
        return _thrift_struct(buf, pos, depth + 1)[1]
    raise ValueError(f"unknown thrift type {ttype}")


def _thrift_struct(buf: bytes, pos: int, depth: int = 0) -> tuple[dict[int, int], int]:
    """A thrift compact-protocol struct: its top-level i32 fields, and where it ends."""
    fields, last = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return fields, pos
        ttype, delta = head & 0x0F, head >> 4
        if delta:
            fid = last + delta
        else:
            raw, pos = _varint(buf, pos)
            fid = (raw >> 1) ^ -(raw & 1)
        last = fid
        if ttype == 5 and depth == 0:
            raw, pos = _varint(buf, pos)
            fields[fid] = (raw >> 1) ^ -(raw & 1)
        else:
            pos = _thrift_skip(buf, pos, ttype, depth)


def largest_page(fh, chunk) -> int:
    """The largest uncompressed page of a Parquet column chunk, from its page headers (thrift PageHeader:
    2 = uncompressed_page_size, 3 = compressed_page_size): what decoding one of its values costs at least, known
    before anything is decompressed. A header that cannot be read counts as unbounded."""
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page and chunk.dictionary_page_offset else \
        chunk.data_page_offset
    end = start + chunk.total_compressed_size
    pos, largest = start, 0
    while pos < end:
        fh.seek(pos)
        head = fh.read(min(1 << 16, end - pos))
        try:
            fields, used = _thrift_struct(head, 0)
        except (IndexError, ValueError):
            return 2**63   # a header over 64 KiB or damaged: not read
        uncompressed, compressed = fields.get(2, -1), fields.get(3, -1)
        if uncompressed < 0 or compressed < 0:
            return 2**63
        largest = max(largest, uncompressed)
        pos += used + compressed
    return largest


def iter_i2d_parquet_samples(task: dict, cfg: IngestConfig) -> Iterator[RawSample]:
    """img2dataset's parquet output format: one row per sample, the image bytes in a column. Before a row group is
    decoded, its page headers are read: a group holding a page larger than the byte limits (one huge cell) is not
    decoded at all, and its rows are rejected by key; other groups are read in small batches, and an image over
    ingest.max_image_bytes costs its sample."""
    url, label = task["url"], task["label"]
    source = url.rsplit("/", 1)[-1]
    page_limit = max(cfg.max_image_bytes, cfg.max_caption_bytes) + (1 << 20)   # + room for a page's other values
    with open_verified(url, task["sha"].get(url), cfg.source_options) as fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{url} is not a readable Parquet file ({type(exc).__name__}: {exc}); re-fetch the "
                              f"shard") from exc
        column = _image_column(pf.schema_arrow)
        if column is None:
            raise SourceError(f"{url}: no image column (jpg / png / webp of binary type): is it img2dataset's "
                              f"parquet output format? Its columns are {pf.schema_arrow.names}")
        meta = pf.metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            pages = {group.column(i).path_in_schema: largest_page(fh, group.column(i)) for i in range(group.num_columns)}
            too_big = {c: n for c, n in pages.items() if n > page_limit}
            if too_big:
                col, size = max(too_big.items(), key=lambda kv: kv[1])
                shown_size = "an unreadable page header" if size >= 2**63 else f"a page of {size} bytes"
                detail = (f"{source} row group {rg}: column {col} has {shown_size}, over the read limit ({page_limit} "
                          f"bytes: ingest.max_image_bytes / max_caption_bytes); none of its {group.num_rows} rows is "
                          f"decoded (that would decompress the page whole)")
                keys = (None if "key" in too_big or "key" not in pages else
                        next(iter_parquet_batches(pf, columns=["key"], row_groups=[rg], batch_size=max(group.num_rows, 1)),
                             None))
                names = ([str(k) for k in keys.column(0).to_pylist()] if keys is not None
                         else [f"{source}-row-group-{rg}"])
                for name in names:
                    yield RawSample(make_key(name), f"{label}:{shown(name)}", None, None, None,
                                    ("member-too-large", detail, col))
                continue
            for batch in iter_parquet_batches(pf, row_groups=[rg], batch_size=32):
                for row in batch.to_pylist():
                    name = str(row.get("key"))
                    image = row.pop(column, None)
                    where = f"{label}:{shown(name)}"
                    if row.get("status") not in (None, "success"):
                        yield _failed_sample(name, row, label)
                        continue
                    if image is not None and len(image) > cfg.max_image_bytes:
                        yield RawSample(make_key(name), where, None, None, None, (
                            "member-too-large", f"{where}: the {column} cell is {len(image)} bytes, over "
                                                f"ingest.max_image_bytes ({cfg.max_image_bytes})", column), meta=row)
                        continue
                    captions, problem = _metadata_captions(row, where, cfg)
                    yield RawSample(make_key(name), where, image, column if image else None, captions, problem,
                                    meta=row)


def iter_i2d_files_samples(task: dict, cfg: IngestConfig) -> Iterator[RawSample]:
    """img2dataset's files output format: `<shard>/<key>.jpg` + `.txt` + `.json`, each read bounded by the
    config's byte limits and checked against its planned sha256; OS metadata is skipped, special files and links
    out of the source are rejected unread."""
    url, label = task["url"], task["label"]
    fs, root = source_fs(url, cfg.source_options)
    root = root.rstrip("/")
    shard = root.rsplit("/", 1)[-1]
    sidecar = _read_sidecar(task, cfg)
    by_key: dict[str, dict[str, str]] = {}
    for rel in sorted(task["sha"]):
        if not rel.startswith(url.rstrip("/") + "/"):
            continue   # the metadata table and stats beside the shard
        name = rel[len(url.rstrip("/")) + 1:]
        base = name.rsplit("/", 1)[-1]
        if _os_metadata(name) or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        by_key.setdefault(stem, {})[ext.lower()] = rel
    refused = {}
    for name, reason, detail in task.get("refused", []):
        base = name.rsplit("/", 1)[-1]
        if "." in base and not _os_metadata(name):
            refused.setdefault(base.split(".", 1)[0], (reason, detail, "image"))
    for stem in sorted(by_key.keys() | refused.keys()):
        files = by_key.get(stem, {})
        where = f"{label}/{shown(stem)}"
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        members: dict[str, bytes] = {}
        problem = refused.get(stem)
        for ext in [e for e in (image_ext, "txt", "json") if e and e in files and problem is None]:
            limit = cfg.max_image_bytes if ext == image_ext else cfg.max_caption_bytes
            _, path = source_fs(files[ext], cfg.source_options)
            data = _read_verified(fs, path, task["sha"].get(files[ext]), limit)
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
            captions, problem = _metadata_captions(meta, f"{where} metadata", cfg)   # the metadata table's caption
        yield RawSample(make_key(stem), where, members.get(image_ext) if image_ext else None, image_ext,
                        captions, problem, meta=meta)
    yield from _unread_samples(sidecar, label, set(by_key) | set(refused), shard)


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
    if "://" not in captions_url:
        _regular(fs, captions_url)
    listed = read_captions_file(captions_url, cfg)
    listing = list_source(fs, root)
    present = {rel: size for rel, size in listing.files.items() if not _os_metadata(rel)}
    refused = {rel: why for rel, why in listing.refused.items() if not _os_metadata(rel)}
    images = {f for f in present.keys() | refused.keys() if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS}
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
            problem = listed.sample_problems.get(name)
            if name in refused:
                problem = (*refused[name], "image")
            elif name != shown(name):  # a file name that is not UTF-8: it can be neither stored nor matched
                problem = ("file-name-not-utf8", f"file name '{shown(name)}' is not valid UTF-8; rename it", "file")
            elif name in present and present[name] > cfg.max_image_bytes:
                problem = ("file-too-large", f"{name} is {present[name]} bytes, over ingest.max_image_bytes "
                                             f"({cfg.max_image_bytes})", "image")
            # The part's identity is its content (file names relative to the folder, image bytes, captions),
            # whatever the folder is called and wherever it lies; the worker checks the bytes it reads against it.
            sha = sha256_of(fs, f"{root}/{name}")[1] if name in present and problem is None else None
            entries.append({"file": shown(name), "exists": name in present or name in refused,
                            "size": present.get(name), "sha256": sha, "where": listed.where.get(name),
                            "captions": listed.captions.get(name), "problem": problem})
        tasks.append(PartTask(name=f"part-{digest(entries, 8)}-{digest(shown(chunk[0]), 12)}",
                              source_digest=digest(entries),
                              payload={"kind": "folder", "url": src, "entries": entries, "taken": {}}))
    if listed.row_problems:
        tasks.append(PartTask(name=f"part-{digest(listed.row_problems, 8)}-captions-file-rows",
                              source_digest=digest(listed.row_problems),
                              payload={"kind": "problems", "url": captions_url, "rows": listed.row_problems,
                                       "field": "captions", "taken": {}}))
    return tasks


def iter_folder_samples(task: dict, cfg: IngestConfig) -> Iterator[RawSample]:
    fs, root = source_fs(task["url"], cfg.source_options)
    root = root.rstrip("/")
    for entry in task["entries"]:
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
        data = _read_verified(fs, f"{root}/{name}", entry["sha256"], cfg.max_image_bytes)
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


def _i2d_keys(task: dict, cfg: IngestConfig) -> dict[str, str]:
    """The keys of an img2dataset shard's samples, fetched or failed (its names only, no pixels read)."""
    kind, url, label = task["kind"], task["url"], task["label"]
    keys: dict[str, str] = {}
    if kind == "webdataset":
        keys = tar_sample_keys(task, cfg)
    elif kind == "parquet":
        for sample in _parquet_key_samples(task, cfg):
            keys.setdefault(sample[0], sample[1])
    else:  # files: <shard>/<key>.<ext>
        prefix = url.rstrip("/") + "/"
        names = [u[len(prefix):] for u in task["sha"] if u.startswith(prefix)] + [n for n, *_ in task.get("refused", [])]
        for name in sorted(names):
            base = name.rsplit("/", 1)[-1]
            if not _os_metadata(name) and "." in base:
                keys.setdefault(make_key(base.split(".", 1)[0]), f"{label}/{shown(base.split('.', 1)[0])}")
    for key, where in (_sidecar_keys(task, cfg) if kind != "parquet" else {}).items():
        keys.setdefault(key, where)
    return keys


def _parquet_key_samples(task: dict, cfg: IngestConfig) -> Iterator[tuple[str, str]]:
    """(key, source) of every row of an img2dataset parquet shard, as its sample reader names them."""
    url, label = task["url"], task["label"]
    source = url.rsplit("/", 1)[-1]
    page_limit = max(cfg.max_image_bytes, cfg.max_caption_bytes) + (1 << 20)
    with open_verified(url, None, cfg.source_options) as fh:
        pf = pq.ParquetFile(fh)
        for rg in range(pf.metadata.num_row_groups):
            group = pf.metadata.row_group(rg)
            key_col = next((group.column(i) for i in range(group.num_columns)
                            if group.column(i).path_in_schema == "key"), None)
            if key_col is None or largest_page(fh, key_col) > page_limit:
                name = f"{source}-row-group-{rg}"
                yield make_key(name), f"{label}:{name}"
                continue
            for batch in iter_parquet_batches(pf, columns=["key"], row_groups=[rg]):
                for k in batch.column(0).to_pylist():
                    yield make_key(str(k)), f"{label}:{shown(str(k))}"


def _task_keys(task: PartTask, cfg: IngestConfig) -> dict[str, str]:
    payload = task.payload
    if payload["kind"] in ("webdataset", "parquet", "files"):
        return {_namespaced(payload["namespace"], k): where for k, where in _i2d_keys(payload, cfg).items()}
    keys: dict[str, str] = {}
    for entry in payload["entries"]:
        if entry["exists"] and not (entry["problem"] and entry["problem"][2] in UNCLAIMED_FIELDS):
            keys.setdefault(folder_key(entry["file"]), entry["file"])
    return keys


def claim_keys(store: Store, tasks: list[PartTask], reusable: dict[str, PartRecord], cfg: IngestConfig
               ) -> list[PartTask]:
    """Make keys unique within the version. Parts an earlier version already holds claim their keys
    first (an incremental ingest never changes what it extends), then new parts in order; a part gets
    the keys claimed before it in its payload (it rejects those samples, naming both sources) and in
    its source digest (so it is reused only with the same claims).

    Without every key in memory: reused parts can only clash where their recorded key ranges meet
    (`Store.overlapping_key_ranges`), so only those parts' keys are read; a new part asks which of its keys
    the other reused parts hold (`Store.rows_with_keys` reads only the parts whose range holds one). Memory
    and reads follow the new parts, not the store (docs/scale.md: 152 s and 1.5 GB at 10,000 parts before)."""
    samples = [t for t in tasks if t.payload["kind"] != "problems"]
    reused = [(t, reusable[t.source_digest]) for t in samples
              if t.source_digest in reusable and reusable[t.source_digest].name == t.name]
    suspects = store.overlapping_key_ranges([r for _, r in reused])
    claimed: dict[str, str] = {}   # keys of the reused parts whose ranges meet, then of the new parts
    planned: dict[str, PartTask] = {}
    kept: list[PartRecord] = []    # reused parts whose keys are their own: not read
    for task, record in reused:
        if record.name in suspects:
            keys = _part_keys(store, record)
            if keys.keys() & claimed.keys():
                continue   # made again below, with its clashes rejected
            claimed.update(keys)
        else:
            kept.append(record)
        planned[task.name] = task
    new = [t for t in samples if t.name not in planned]
    for i, task in enumerate(new):
        if not claimed and not kept and i == len(new) - 1:
            break  # nothing before it to clash with, nothing after it to claim for: no header scan
        keys = _task_keys(task, cfg)
        held = store.rows_with_keys(kept, keys, {"table": ["source"], "rejects": ["source", "field"]}) if kept else {}
        earlier: dict[str, str] = {}
        for table in held.values():
            for row in table.to_pylist():
                if row.get("field") not in UNCLAIMED_FIELDS:
                    earlier.setdefault(row["key"], row["source"])
        taken = {k: earlier.get(k, claimed.get(k)) for k in sorted(keys) if k in earlier or k in claimed}
        for key, source in keys.items():
            claimed.setdefault(key, source)
        if taken:
            task = replace(task, source_digest=digest([task.source_digest, taken]), payload=task.payload | {"taken": taken})
        planned[task.name] = task
    return [planned.get(t.name, t) for t in tasks]


# --------------------------------------------------------------------------- the part worker
def iter_part_samples(task: PartTask, cfg: IngestConfig, counters: Counter) -> Iterator[RawSample] | None:
    """The raw samples of one planned part, as its source format reads them (None: a part of captions-file
    rows or refused entries that name no readable sample). Also how `ram-engine init` looks at a few samples."""
    payload = task.payload
    kind = payload["kind"]
    if kind == "webdataset":
        return iter_tar_samples(payload, cfg, counters)
    if kind == "parquet":
        return iter_i2d_parquet_samples(payload, cfg)
    if kind == "files":
        return iter_i2d_files_samples(payload, cfg)
    if kind == "folder":
        return iter_folder_samples(payload, cfg)
    return None


def ingest_part(writer: VersionWriter, task: PartTask, cfg: IngestConfig) -> PartRecord:
    payload = task.payload
    taken = payload["taken"]   # keys earlier parts hold -> their source
    counters: Counter = Counter()
    # img2dataset numbers keys per run (0000000, 0000001, ...): prefixed with its run's content tag, keys of two
    # runs never collide, and a key changes neither when other sources join the ingest nor when the run moves.
    namespace = payload.get("namespace")
    samples = iter_part_samples(task, cfg, counters)
    if samples is None:  # rows of the captions file that could not be read at all, entries of the source never opened
        rejects = [{"key": make_key(where), "reason": reason, "detail": detail, "source": where,
                    "field": payload.get("field", "file")} for where, reason, detail in payload["rows"]]
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
                if raw.offset is not None and f"byte {raw.offset}" not in detail:
                    detail = f"{detail} [tar member header at byte {raw.offset}]"
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
    by_name: dict[str, list[PartTask]] = {}
    for task in tasks:
        by_name.setdefault(task.name, []).append(task)
    dupes = {n: ts for n, ts in by_name.items() if len(ts) > 1}
    if dupes:
        name, same = next(iter(sorted(dupes.items())))
        urls = sorted({t.payload.get("url", "") for t in same})
        raise SourceError(f"ingest sources overlap: part {name} comes from more than one source ({', '.join(urls)}): "
                          f"the same content named twice (a part's name is its content); name each file once in "
                          f"ingest.source")
    return tasks, described


def split(run) -> list[PartTask]:
    """The parts are the identity: planned from the sources' content (names and content digests), not from how
    the sources were spelt; the sources as given are recorded in the manifest. Parts an earlier version already
    holds (`run.reusable`) keep their keys."""
    src = run.inputs["source"] or run.cfg.source
    if not src:
        raise SourceError("no ingest source: pass SRC or set ingest.source in the config")
    tasks, described = plan(src, run.cfg)
    run.extra["sources"] = described
    return claim_keys(run.store, tasks, run.reusable, run.cfg)


def process(run, writer, task) -> PartRecord:
    return ingest_part(writer, task, run.cfg)


# Where the sources are (source, captions_file) and how they are reached (source_options: endpoints, maybe
# keys) are not identity and never reach a manifest's config: the content of what was read is.
IDENTITY_FIELDS = tuple(f"ingest.{n}" for n in IngestConfig.model_fields
                        if n not in ("source", "source_options", "captions_file"))

STAGE = Stage(name="ingest", output="images", inputs=(Input("source", "source"),), section="ingest",
              reads=IDENTITY_FIELDS, version=STAGE_VERSION, split=split, process=process)
