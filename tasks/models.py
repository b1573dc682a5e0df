"""Models for the stages: build from config, load from the store, cache once per worker process.

A model is named in config as a store ref (`models/baseline@latest`), a local folder written by
`RAM.save_pretrained`, or an official RAM / RAM++ / Tag2Text `.pth` checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from storage import Store, StoreError, Version

log = logging.getLogger("ram_engine")
T = TypeVar("T")

_cache: dict[Any, Any] = {}
_cache_locks: dict[Any, threading.Lock] = {}
_cache_guard = threading.Lock()


def worker_cached(key: Any, factory: Callable[[], T]) -> T:
    """`factory()` once per process for `key`, then the same object: a model loads once per worker
    (thread pool, Dask or Ray worker process), not once per part. Thread-safe: concurrent callers with
    the same key wait for the first one; a factory that raises is retried by the next caller."""
    try:
        return _cache[key]
    except KeyError:
        pass
    with _cache_guard:
        lock = _cache_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _cache:
            _cache[key] = factory()
        return _cache[key]


def clear_worker_cache() -> None:
    """Drop every cached object in this process (tests, or to free a model's memory)."""
    with _cache_guard:
        _cache.clear()
        _cache_locks.clear()


def cache_dir() -> Path:
    return Path(os.environ.get("RAM_ENGINE_CACHE", Path.home() / ".cache" / "ram-engine"))


def resolve_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def model_version(store: Store, ref: str) -> Version | None:
    """A store ref `models/<name>[@version|ref]`, or None when `ref` is not one."""
    if not ref.startswith("models/"):
        return None
    if "@" in ref:
        stage, _, version = ref.partition("@")
    elif ref.count("/") == 2:  # a version ref as manifests write it: models/<name>/<version>
        stage, _, version = ref.rpartition("/")
    else:
        stage, version = ref, "latest"
    return store.open(stage, version)


def local_model_dir(version: Version) -> str:
    """The model files of a store version in the local cache (downloaded once, checked by size)."""
    return version.download(str(cache_dir() / "models" / version.stage.replace("/", "__") / version.id))


def load_model(store: Store, ref: str, device: str = "auto", tags_file: str | None = None,
               thresholds_file: str | None = None):
    """Load a RAM model named by a store ref, a save_pretrained folder or an official checkpoint; cached."""
    from ram_model.checkpoint import from_pretrained, load_official

    version = model_version(store, ref)
    key = f"{store.url}|{version.ref if version else os.path.abspath(ref)}|{device}"

    def factory():
        dev = resolve_device(device)
        if version is not None:
            model = from_pretrained(local_model_dir(version), map_location=dev)
        elif Path(ref).is_dir():
            model = from_pretrained(ref, map_location=dev)
        elif Path(ref).is_file():
            model = load_official(ref, tags=tags_file, thresholds=thresholds_file, map_location=dev)
        else:
            raise StoreError(f"model {ref!r} is neither a store ref (models/<name>[@version]), a folder written "
                             f"by save_pretrained, nor a checkpoint file; check generate.baseline / train.init")
        model.eval()
        log.info("loaded model %s on %s", ref, dev)
        return model

    return worker_cached(key, factory)


def model_digest(version: Version | None, ref: str) -> str:
    """What identifies a model input for version ids: its store version, or the file's size and mtime."""
    if version is not None:
        return version.ref
    p = Path(ref)
    if p.is_dir():
        parts = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in p.rglob("*") if f.is_file())
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
    if p.is_file():
        st = p.stat()
        return hashlib.sha256(f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return ref
