"""Version layouts for outside readers, measured on a 10-increment ingest in one run.

    python benchmarks/layout.py [--increments 10] [--rows 2000] [--image-kb 8]

Each increment adds one part (a Parquet table of `rows` rows and a shard of `rows` images of `image-kb`) to
the `images` stage, and commits a version holding every part so far. Layouts:

  shared     the baseline (the store before this layout): a version references earlier versions' files
             in their folders; only our API (or a reader given the manifest's file list) sees it whole
  filelist   shared files, plus a published list per version (same bytes as shared; readers need the list)
  copies     self-contained folders by copying: what a filesystem without hard links costs
  hardlinks  ours: self-contained folders, earlier parts hard-linked (server-side copies on object stores)
  delta      Delta Lake (deltalake, if installed): tables only, snapshots share files; shards cannot live in it

For each: bytes on disk (each inode once), total commit time, and the time to count the latest version's
rows the reader's obvious way (DuckDB over the folder glob; over the file list for shared / filelist;
DeltaTable for delta). The last line is ours / the shared baseline for bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from storage import Store, schemas  # noqa: E402
from storage.store import PartRecord, VersionWriter  # noqa: E402
from tasks.engine.runner import PartTask, run_stage  # noqa: E402


def part_table(i: int, rows: int) -> pa.Table:
    keys = [f"{i:04d}_{j:07d}" for j in range(rows)]
    cols = {"key": keys, "captions": [[f"a thing number {j}"] for j in range(rows)], "width": [256] * rows,
            "height": [256] * rows, "format": ["jpeg"] * rows, "sha256": ["0" * 64] * rows,
            "shard": [f"shards/part-{i:04d}.tar"] * rows, "source": [f"src-{i}"] * rows}
    return pa.Table.from_pydict({f.name: cols.get(f.name, [None] * rows) for f in schemas.IMAGES},
                                schema=schemas.IMAGES)


def part_samples(i: int, rows: int, image_kb: int):
    rng = np.random.default_rng(i)
    for j in range(rows):
        yield {"__key__": f"{i:04d}_{j:07d}", "jpg": rng.bytes(image_kb * 1024), "txt": f"a thing number {j}"}


def disk_bytes(root: Path) -> int:
    seen, total = set(), 0
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def ingest_increments(root: Path, increments: int, rows: int, image_kb: int, reuse=None) -> tuple[float, object]:
    store = Store(str(root))
    commit_s = 0.0
    version = None

    def process(w, t):
        i = t.payload
        return w.write_part(t.name, table=part_table(i, rows), samples=part_samples(i, rows, image_kb),
                            rows_in=rows, source_digest=t.source_digest)

    for k in range(1, increments + 1):
        tasks = [PartTask(f"part-{i:04d}", f"d{i}", i) for i in range(k)]
        t0 = time.perf_counter()
        # the runner shares reused parts through `reuse_parts` (one batch)
        with mock.patch.object(VersionWriter, "reuse_parts", reuse) if reuse else contextlib.nullcontext():
            version = run_stage(store.begin("images", code_version="bench", config={}, input_digest=str(k)),
                                tasks, process).version
        commit_s += time.perf_counter() - t0
    return commit_s, version


def shared_reuse(self, records: list[PartRecord]) -> list[PartRecord]:
    """The baseline: reference the earlier version's files where they are."""
    for record in records:
        self._records[record.name] = record
        self.reused_parts += 1
    return list(records)


def duckdb_count(files) -> tuple[int, float]:
    import duckdb

    t0 = time.perf_counter()
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()[0][0]
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--increments", type=int, default=10)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--image-kb", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="layout-bench-"))
    results = {}
    expected = args.increments * args.rows
    try:
        # shared (baseline) and filelist
        commit_s, v = ingest_increments(work / "shared", args.increments, args.rows, args.image_kb, shared_reuse)
        files = [str(work / "shared" / f["path"]) for f in v.files("table")]
        glob_rows, _ = duckdb_count(f"{work / 'shared' / v.ref}/parts/*.parquet")
        n, read_s = duckdb_count(files)
        results["shared"] = (disk_bytes(work / "shared"), commit_s, read_s, n, glob_rows)
        listing = work / "shared" / v.ref / "_files.json"
        listing.write_text(json.dumps(files))
        n, read_s = duckdb_count(json.loads(listing.read_text()))
        results["filelist"] = (disk_bytes(work / "shared"), commit_s, read_s, n, glob_rows)
        # copies: the same code where the filesystem refuses hard links
        real_link = os.link

        def no_link(*a, **k):
            raise OSError(errno.EPERM, "links refused (benchmark)")

        os.link = no_link
        try:
            commit_s, v = ingest_increments(work / "copies", args.increments, args.rows, args.image_kb)
        finally:
            os.link = real_link
        n, read_s = duckdb_count(f"{work / 'copies' / v.ref}/parts/*.parquet")
        results["copies"] = (disk_bytes(work / "copies"), commit_s, read_s, n, n)
        # ours
        commit_s, v = ingest_increments(work / "hardlinks", args.increments, args.rows, args.image_kb)
        n, read_s = duckdb_count(f"{work / 'hardlinks' / v.ref}/parts/*.parquet")
        results["hardlinks"] = (disk_bytes(work / "hardlinks"), commit_s, read_s, n, n)
        # Delta Lake: the tables only (a snapshot per increment), when deltalake is installed
        try:
            import deltalake
        except ImportError:
            print("delta: skipped (pip install deltalake to include it)")
        else:
            path = work / "delta"
            commit_s = 0.0
            for i in range(args.increments):
                t0 = time.perf_counter()
                deltalake.write_deltalake(str(path), part_table(i, args.rows), mode="append")
                commit_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            n = deltalake.DeltaTable(str(path)).to_pyarrow_table(columns=["key"]).num_rows
            read_s = time.perf_counter() - t0
            results["delta (tables only)"] = (disk_bytes(path), commit_s, read_s, n, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.increments} increments x {args.rows} rows, {args.image_kb} KB images; latest version = "
          f"{expected} rows")
    print(f"{'layout':22s} {'bytes on disk':>14s} {'commit s':>9s} {'read s':>7s} {'rows read':>9s} "
          f"{'rows by folder glob':>19s}")
    for name, (size, commit_s, read_s, n, glob_rows) in results.items():
        print(f"{name:22s} {size:14,d} {commit_s:9.2f} {read_s:7.3f} {n:9d} {str(glob_rows):>19s}")
    ours, base = results["hardlinks"], results["shared"]
    print(f"hardlinks / shared: bytes {ours[0] / base[0]:.3f}, commit time {ours[1] / base[1]:.2f}; "
          f"copies / shared bytes {results['copies'][0] / base[0]:.2f}")


if __name__ == "__main__":
    main()
