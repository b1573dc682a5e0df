"""The cluster step on an increment: refit every tag (`clean.refit: always`, the baseline) against applying the
kept per-tag models to the new crops (`clean.refit: growth`), through the real stage on a local store.

A synthetic `embeddings` version of P parts (C crops each, T tags, D dims) is clustered; then one part lands
and both policies run on the grown version. Printed: seconds and embeddings bytes read per policy, and the
ratio. At RAM's scale (14M images x ~5 crops x 512 floats, ~140 GB of embeddings) refitting reads everything
on every increment; applying reads the increment.

    python benchmarks/cluster_refit.py [--parts 40] [--crops 2000] [--tags 50] [--dim 256]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import Store  # noqa: E402
from storage.schemas import EMBEDDINGS  # noqa: E402
from tasks.engine.config import CleanSection  # noqa: E402
from tasks.engine.runner import PartTask, run, run_stage  # noqa: E402
from tasks.stages import cluster  # noqa: E402


def part_table(name: str, crops: int, tags: int, dim: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    tag_ids = rng.integers(0, tags, crops).astype(np.int32)
    centres = np.random.default_rng(0).standard_normal((tags, 4, dim)).astype(np.float32)
    emb = centres[tag_ids, rng.integers(0, 4, crops)] + 0.3 * rng.standard_normal((crops, dim)).astype(np.float32)
    flat = pa.array(emb.reshape(-1), pa.float32())
    return pa.table({"key": [f"{name}-{i // 3}" for i in range(crops)], "tag_id": tag_ids,
                     "crop_key": [f"{name}-c{i}" for i in range(crops)],
                     "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, crops * dim + 1, dim, dtype=np.int32)),
                                                           flat),
                     "baseline_score": pa.nulls(crops, pa.float32())}).cast(EMBEDDINGS)


def embeddings(store: Store, parts: dict[str, pa.Table]):
    writer = store.begin("embeddings", code_version="bench", config={}, input_digest=",".join(parts))
    return run_stage(writer, [PartTask(n, n) for n in parts],
                     lambda w, t: w.write_part(t.name, table=parts[t.name], rows_in=parts[t.name].num_rows,
                                               source_digest=t.source_digest)).version


def timed_cluster(store: Store, emb, refit: str) -> tuple[float, int]:
    """Seconds and embeddings bytes read by the cluster step over `emb`."""
    read = []
    real = type(emb).read_file

    def counting(version, rel, columns=None):
        if version.stage == "embeddings":
            read.append(next(f["bytes"] for f in version.files() if f["path"].endswith(rel.split("/")[-1])))
        return real(version, rel, columns)

    type(emb).read_file = counting
    try:
        t0 = time.perf_counter()
        run(cluster.STAGE, store, {"clean": CleanSection(refit=refit, refit_growth=0.25)}, {"embeddings": emb})
        return time.perf_counter() - t0, sum(read)
    finally:
        type(emb).read_file = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=40)
    ap.add_argument("--crops", type=int, default=2000)
    ap.add_argument("--tags", type=int, default=50)
    ap.add_argument("--dim", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        parts = {f"p{i:05d}": part_table(f"p{i:05d}", args.crops, args.tags, args.dim, i) for i in range(args.parts)}
        grown = parts | {"new": part_table("new", args.crops, args.tags, args.dim, 10_000)}
        results = {}
        for refit in ("always", "growth"):
            store = Store(str(Path(tmp) / refit))
            before = embeddings(store, parts)
            first_s, _ = timed_cluster(store, before, refit)
            results[refit] = timed_cluster(store, embeddings(store, grown), refit) + (first_s,)
        crops = args.parts * args.crops
        print(f"{args.parts} parts x {args.crops} crops ({crops:,} crops, {args.tags} tags, {args.dim}-d) "
              f"+ 1 part of {args.crops}")
        print(f"{'policy':<30} {'first fit s':>12} {'increment s':>12} {'MB read':>9}")
        for refit, label in (("always", "refit every tag (baseline)"), ("growth", "apply kept models (ours)")):
            seconds, read, first = results[refit]
            print(f"{label:<30} {first:>12.2f} {seconds:>12.2f} {read / 2**20:>9.1f}")
        (a_s, a_b, _), (g_s, g_b, _) = results["always"], results["growth"]
        print(f"increment: growth takes {g_s / a_s:.3f}x the time and reads {g_b / a_b:.3f}x the bytes of refit")


if __name__ == "__main__":
    main()
