"""Reading Parquet from Python-side sources (bytes, fsspec file objects) safely.

Every Parquet read in the project goes through these two functions. They decode on the calling
thread: pyarrow's threaded readers (`pq.read_table`, `ParquetFile.read/iter_batches` with threads)
let a pool thread drop the last reference to a buffer or file that belongs to Python, after the
call has returned; when that happens while the interpreter exits, the pool thread cannot take the
GIL and the process aborts with "terminate called without an active exception" (exit 134) after its
work is done (apache/arrow#34314; the file-object variant hangs at exit instead, apache/arrow#50482).
Measured here: `ram-engine`'s ingest aborted at exit in 4 of 8 runs on a gzip-bomb source. Our
tables are small (one part at a time), so decoding on one thread costs nothing we could measure.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def _parquet_file(source) -> pq.ParquetFile:
    return source if isinstance(source, pq.ParquetFile) else pq.ParquetFile(source)


def read_parquet(source, columns: Sequence[str] | None = None) -> pa.Table:
    """The whole table (or `columns`) of a Parquet file: a path, a file object, a pyarrow buffer reader or an
    open `ParquetFile`."""
    return _parquet_file(source).read(columns=columns, use_threads=False)


def iter_parquet_batches(source, columns: Sequence[str] | None = None, batch_size: int = 65536,
                         row_groups: Sequence[int] | None = None) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet file (of `row_groups` only, if given), `batch_size` rows at a time (memory
    bounded by one batch and the pages it spans)."""
    yield from _parquet_file(source).iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups,
                                                  use_threads=False)
