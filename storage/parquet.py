"""Reading Parquet safely, and as fast as pyarrow reads it.

Every Parquet read in the project goes through these functions. pyarrow's threaded readers
(`use_threads=True`) let a pool thread drop the last reference to a buffer or file after the call has
returned; when that buffer or file belongs to Python (a `bytes` object, an fsspec file object) and it
happens while the interpreter exits, the pool thread cannot take the GIL and the process aborts with
"terminate called without an active exception" (exit 134) after its work is done (apache/arrow#34314;
the file-object variant hangs at exit instead, apache/arrow#50482). Measured here: `ram-engine`'s ingest
aborted at exit in 4 of 8 runs on a gzip-bomb source (tests/test_hostile.py::test_ingest_exits_cleanly_after_a_bomb).

So the rule is by who owns the bytes, not by threads:
  * what pyarrow owns is decoded with pyarrow's threads: a local path (pyarrow opens the file itself), a
    pyarrow native file, and `Owned` bytes: a file object's bytes read into memory that pyarrow allocated
    (`read_owned`), which no pool thread can hand back to Python;
  * anything else (a Python file object, `bytes`, a buffer over Python memory) is decoded on the calling
    thread, as before.
`benchmarks/storage.py` measures the store's reads against `pq.read_table` (the threaded reads cost the
single-threaded ones half of pyarrow's speed); `tests/test_storage.py::test_threaded_parquet_reads_exit_cleanly`
keeps the abort fixed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Owned:
    """Bytes in memory that pyarrow allocated (see `read_owned`): safe to decode with pyarrow's threads."""

    buffer: pa.Buffer

    @property
    def size(self) -> int:
        return self.buffer.size


def read_owned(fh, size_hint: int | None = None) -> Owned:
    """Every byte of a file object (fsspec, builtin), read into memory that pyarrow allocated: no Python
    object holds them, so a threaded decode may release them on any thread. `size_hint`: the expected size
    (a manifest's); more or fewer bytes are read as they come (the caller compares sizes)."""
    capacity = max(int(size_hint or 0), 0) + 1   # one byte more: a longer file is seen, not cut
    buf, n = pa.allocate_buffer(capacity), 0
    while True:
        if n == capacity:   # longer than expected: a bigger buffer, the bytes so far copied over
            capacity = max(capacity * 2, n + _CHUNK)
            bigger = pa.allocate_buffer(capacity)
            memoryview(bigger)[:n] = memoryview(buf)[:n]
            buf = bigger
        with memoryview(buf) as whole, whole[n:] as view:
            got = _readinto(fh, view)
        if not got:
            break
        n += got
    return Owned(buf.slice(0, n))


def _readinto(fh, view: memoryview) -> int:
    readinto = getattr(fh, "readinto", None)
    if readinto is not None:
        return readinto(view) or 0
    data = fh.read(len(view))
    view[: len(data)] = data
    return len(data)


def _source(source):
    """(what pyarrow reads, whether pyarrow owns it)."""
    if isinstance(source, Owned):
        return pa.BufferReader(source.buffer), True
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), True   # pyarrow opens and owns the file
    if isinstance(source, (pa.OSFile, pa.MemoryMappedFile)):
        return source, True
    return source, False


def read_parquet(source, columns: Sequence[str] | None = None) -> pa.Table:
    """The whole table (or `columns`) of a Parquet file: a local path, `Owned` bytes, a pyarrow file, a file
    object or a buffer reader. Threaded where pyarrow owns the bytes (module docstring)."""
    if isinstance(source, pq.ParquetFile):
        return source.read(columns=columns, use_threads=False)
    source, owned = _source(source)
    return pq.ParquetFile(source).read(columns=columns, use_threads=owned)


def iter_parquet_batches(source, columns: Sequence[str] | None = None, batch_size: int = 65536,
                         row_groups: Sequence[int] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet file (of `row_groups` only, if given), `batch_size` rows at a time (memory
    bounded by one batch and the pages it spans, beyond what the source holds). Threaded where pyarrow owns the
    bytes."""
    if isinstance(source, pq.ParquetFile):
        yield from source.iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups,
                                       use_threads=False)
        return
    source, owned = _source(source)
    yield from pq.ParquetFile(source).iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups,
                                                   use_threads=owned)
