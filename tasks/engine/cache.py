"""Process-local caches: an object built once per worker process (a model, a parser), and the local cache
folder. Infrastructure: where a result is computed, never what it is, so no stage's identity covers it."""
from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

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


def clear_worker_cache() -> int:
    """Drop every cached object in this process (tests, or to free a model's memory); how many there were."""
    with _cache_guard:
        dropped = len(_cache)
        _cache.clear()
        _cache_locks.clear()
    gc.collect()    # a model in a reference cycle would otherwise keep its memory until a later collection
    return dropped


def cache_dir() -> Path:
    return Path(os.environ.get("RAM_ENGINE_CACHE", Path.home() / ".cache" / "ram-engine"))
