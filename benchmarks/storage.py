"""Store throughput against raw pyarrow.parquet and raw tarfile, measured in one run.

    python benchmarks/storage.py [--rows 2000000] [--samples 4000] [--repeat 3]

Prints MB/s for each path and the ratio ours / raw (target >= 0.8); the last line is the smallest ratio.
The baselines do the same logical work without the store's guarantees: pq.write_table / pq.read_table
with the same compression, and tarfile writing / reading the same members.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from storage import Store, schemas  # noqa: E402
from storage.shards import write_tar  # noqa: E402


def make_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(0)
    keys = [f"{i:012d}" for i in range(rows)]
    tag_ids = pa.ListArray.from_arrays(np.arange(0, rows * 4 + 1, 4, dtype=np.int32),
                                       rng.integers(0, 4585, rows * 4, dtype=np.int32))
    empty_i = pa.ListArray.from_arrays(np.zeros(rows + 1, dtype=np.int32), pa.array([], pa.int32()))
    empty_s = pa.ListArray.from_arrays(np.zeros(rows + 1, dtype=np.int32), pa.array([], pa.string()))
    return pa.Table.from_arrays([pa.array(keys), tag_ids, empty_i, empty_s], schema=schemas.CLEAN)


def make_samples(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"__key__": f"{i:09d}", "jpg": rng.bytes(int(rng.integers(20_000, 60_000))), "txt": f"caption {i}"}
            for i in range(n)]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ram-bench-"))
    table = make_table(args.rows)
    samples = make_samples(args.samples)
    shard_mb = sum(len(s["jpg"]) + len(s["txt"]) for s in samples) / 1e6
    counter = [0]

    def ours_write_parquet():
        counter[0] += 1
        store = Store(str(work / f"store{counter[0]}"))
        w = store.begin("clean", code_version="bench", config={"i": counter[0]})
        w.write_part("part-0", table=table, rows_in=table.num_rows)
        return w.commit()

    def raw_write_parquet():
        pq.write_table(table, work / "raw.parquet", compression="zstd")

    version = ours_write_parquet()
    raw_write_parquet()
    mb = os.path.getsize(work / "raw.parquet") / 1e6

    def ours_read_parquet():
        n = sum(b.num_rows for b in version.iter_batches())
        assert n == table.num_rows

    def raw_read_parquet():
        t = pq.read_table(work / "raw.parquet")
        assert t.num_rows == table.num_rows

    def ours_write_shard():
        counter[0] += 1
        store = Store(str(work / f"store{counter[0]}"))
        w = store.begin("regions", code_version="bench", config={"i": counter[0]})
        w.write_part("part-0", samples=iter(samples), table=schemas.REGIONS.empty_table(), rows_in=0)
        return w.commit()

    def raw_write_shard():
        with tarfile.open(work / "raw.tar", "w") as tar:
            for s in samples:
                for ext in ("jpg", "txt"):
                    data = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    shard_version = ours_write_shard()
    raw_write_shard()

    def ours_read_shard():
        n = sum(1 for _ in shard_version.iter_samples())
        assert n == len(samples)

    def raw_read_shard():
        n = 0
        with tarfile.open(work / "raw.tar", "r") as tar:
            for member in tar:
                tar.extractfile(member).read()
                n += 1
        assert n == 2 * len(samples)

    results = []
    for name, ours, raw, size in [
        ("parquet write", ours_write_parquet, raw_write_parquet, mb),
        ("parquet read", ours_read_parquet, raw_read_parquet, mb),
        ("shard write", ours_write_shard, raw_write_shard, shard_mb),
        ("shard read", ours_read_shard, raw_read_shard, shard_mb),
    ]:
        t_raw, t_ours = best(raw, args.repeat), best(ours, args.repeat)
        ratio = t_raw / t_ours
        results.append(ratio)
        print(f"{name:14s} raw {size / t_raw:8.1f} MB/s   ours {size / t_ours:8.1f} MB/s   ratio {ratio:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"rows {args.rows}, samples {args.samples}; baselines: pyarrow.parquet (zstd), tarfile")
    print(f"min ratio {min(results):.2f}")


if __name__ == "__main__":
    main()
