"""WebDataset shard I/O: deterministic tar writing, streaming reads through webdataset.

A sample is a dict: `__key__` plus one entry per extension (`jpg`, `png`, `txt`, `json`, ...).
Member order, mtimes and owners are fixed, so the same samples always give the same bytes
(a rerun after a crash must be byte-identical). Shards are POSIX (PAX) tars: a member name longer than
USTAR's 100 characters gets a PAX header, so any key works; shorter names give plain USTAR headers.
"""
from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Iterable, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_EXT_ORDER = IMAGE_EXTS + ("txt", "json", "cls", "npy")


def _encode(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext == "json" or isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return str(value).encode("utf-8")


def _member_order(sample: dict) -> list[str]:
    exts = [k for k in sample if not k.startswith("__")]
    return sorted(exts, key=lambda e: (_EXT_ORDER.index(e) if e in _EXT_ORDER else len(_EXT_ORDER), e))


def write_tar(fileobj, samples: Iterable[dict]) -> int:
    """Write samples into an uncompressed tar stream. Returns the number of samples."""
    count = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample.get("__key__")
            if not key or "." in key or "/" in key:
                raise ValueError(f"shard sample key {key!r} must be non-empty and contain no '.' or '/'")
            for ext in _member_order(sample):
                data = _encode(ext, sample[ext])
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def split_member_name(name: str) -> tuple[str, str]:
    """Which sample a tar member belongs to, and as what: the one WebDataset rule every reader uses.

    key = the member's path up to the first dot of its file name; ext = the rest, lower-cased
    ('' when the file name has no dot). `a/b/0001.seg.PNG` -> (`a/b/0001`, `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar(fs, paths: list[str], urls: list[str] | None = None) -> Iterator[dict]:
    """Stream the samples of tar shards, in order, as WebDataset samples (members grouped by key).

    Streams are opened through the store's own filesystem, so credentials and endpoints apply.
    Values are bytes; each sample has `__key__` and `__url__`. (Random-access tar reading is
    faster than a pipe-style stream here; `webdataset_pipeline` gives webdataset itself.)
    """
    urls = urls or paths
    for path, url in zip(paths, urls):
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            sample: dict = {}
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                if not sample:
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = tar.extractfile(info).read()
                tar.members = []  # keep memory flat on large shards
            if sample:
                yield sample


def image_member(sample: dict) -> bytes:
    """The encoded image of a WebDataset sample (its .jpg / .jpeg / .png / .webp member)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image member (.jpg/.jpeg/.png/.webp)")
    return sample[ext]


def decode_image(sample: dict):
    """The sample's image as an RGB PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(image_member(sample))).convert("RGB")


def webdataset_pipeline(urls: list[str], **kwargs):
    """A webdataset.WebDataset over shard URLs (deterministic order), for training pipelines."""
    import webdataset as wds

    return wds.WebDataset(urls, shardshuffle=False, empty_check=False, **kwargs)


def read_member(fs, path: str, member: str) -> bytes:
    """Read one member of a tar by name (random access for inspection; streaming reads use iter_tar)."""
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        extracted = tar.extractfile(member)
        if extracted is None:
            raise KeyError(f"{member} is not a file in {path}")
        return extracted.read()
