"""Benchmark: per-tag K-Means++ outlier removal over synthetic crop embeddings.

Ours: embeddings streamed into the on-disk EmbeddingStore (one file per tag) and clustered one tag at
a time by tasks.stages.cluster.cluster_outliers (k-means++ seeding + float32 BLAS Lloyd iterations; scikit-learn MiniBatchKMeans
for very large tags). Baseline: the naive loop: every embedding in one in-memory array, scikit-learn
KMeans(init="k-means++") fitted on each tag's full array, distances from KMeans.transform.

Each side runs in its own child process so its peak memory (ru_maxrss) is its own. Both see the same
data (generated per tag from the tag's seed: a few tight clusters plus 10% scattered outliers), so the
flagged crops can be compared with each other and with the planted truth.

    python benchmarks/clean.py                # the full run: 1M x 512-d over 1,000 tags
    python benchmarks/clean.py --scale 0.05   # a quick check: 50k over 50 tags

The last line printed is the speed ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tag_sizes(n: int, tags: int) -> np.ndarray:
    """Long-tailed tag sizes summing to n (rank^-0.8, at least 5 crops a tag): some tags are huge."""
    w = 1.0 / np.arange(1, tags + 1) ** 0.8
    sizes = np.maximum(5, np.floor(w / w.sum() * n)).astype(np.int64)
    sizes[0] += n - sizes.sum()
    return sizes


def tag_data(tag: int, size: int, dim: int, frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + tag)
    centres = rng.standard_normal((4, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    n_out = int(round(size * frac))
    X = np.empty((size, dim), np.float32)
    X[: size - n_out] = centres[rng.integers(0, 4, size - n_out)]
    X[: size - n_out] += 0.03 * rng.standard_normal((size - n_out, dim), dtype=np.float32)
    X[size - n_out:] = rng.standard_normal((n_out, dim), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    truth = np.zeros(size, bool)
    truth[size - n_out:] = True
    return X, truth


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args, sizes, out: Path) -> dict:
    from tasks.stages.cluster import EmbeddingStore, cluster_outliers
    from tasks.engine.config import CleanSection
    store_dir = Path(args.workdir) / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = EmbeddingStore(store_dir, dim=args.dim)
    t0 = time.perf_counter()
    # parts arrive as batches that mix tags: write in batches of ~20k rows spanning several tags
    buf_t, buf_k, buf_x, rows = [], [], [], 0
    for t, s in enumerate(sizes):
        X, _ = tag_data(t, int(s), args.dim)
        buf_t.append(np.full(len(X), t))
        buf_k.extend(f"{t}:{i}" for i in range(len(X)))
        buf_x.append(X)
        rows += len(X)
        if rows >= 20_000 or t == len(sizes) - 1:
            store.add(np.concatenate(buf_t), buf_k, np.concatenate(buf_x))
            buf_t, buf_k, buf_x, rows = [], [], [], 0
    write_s = time.perf_counter() - t0
    cfg = CleanSection(k_max=args.k_max)
    t0 = time.perf_counter()
    table, m = cluster_outliers(store, cfg)
    cluster_s = time.perf_counter() - t0
    keys = table.column("crop_key").to_pylist()
    flags = np.asarray(table.column("outlier").to_numpy(zero_copy_only=False))
    # crop key "tag:i" -> global index in the (tag, i) order both sides use
    offsets = np.r_[0, np.cumsum(sizes)]
    idx = np.array([offsets[int(k.split(":")[0])] + int(k.split(":")[1]) for k in keys])
    np.save(out, np.sort(idx[flags]))
    shutil.rmtree(store_dir, ignore_errors=True)
    return {"write_s": write_s, "cluster_s": cluster_s, "peak_mb": peak_mb(), "outliers": int(flags.sum())}


def run_naive(args, sizes, out: Path) -> dict:
    from sklearn.cluster import KMeans
    t0 = time.perf_counter()
    n = int(sizes.sum())
    X = np.empty((n, args.dim), np.float32)
    tag_of = np.empty(n, np.int32)
    o = 0
    for t, s in enumerate(sizes):
        X[o: o + s], _ = tag_data(t, int(s), args.dim)
        tag_of[o: o + s] = t
        o += s
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    flagged = []
    order = np.argsort(tag_of, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(tag_of, minlength=len(sizes)))]
    for t in range(len(sizes)):
        idx = order[bounds[t]: bounds[t + 1]]
        Xt = X[idx]
        nt = len(Xt)
        k = max(1, min(args.k_max, nt // 50, nt))
        km = KMeans(n_clusters=k, init="k-means++", random_state=t).fit(Xt)
        d = km.transform(Xt)[np.arange(nt), km.labels_]
        m = int(round(0.1 * nt)) if nt >= 10 else 0
        flagged.append(idx[np.argsort(-d, kind="stable")[:m]])
    cluster_s = time.perf_counter() - t0
    np.save(out, np.sort(np.concatenate(flagged)))
    return {"gen_s": gen_s, "cluster_s": cluster_s, "peak_mb": peak_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="embeddings (before --scale)")
    ap.add_argument("--tags", type=int, default=1000, help="tags (before --scale)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0, help="scale --n and --tags for a quick run")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both sides")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--side", choices=["ours", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n, tags = int(args.n * args.scale), max(1, int(args.tags * args.scale))
    sizes = tag_sizes(n, tags)
    if args.side:
        res = (run_ours if args.side == "ours" else run_naive)(args, sizes, Path(args.out))
        print("RESULT " + json.dumps(res))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-clean-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    print(f"{n:,} embeddings x {args.dim} float32 over {tags:,} tags (sizes {sizes.min()}..{sizes.max()}, "
          f"median {int(np.median(sizes))}), k = min({args.k_max}, n // 50), 10% outliers per tag, "
          f"{args.threads} thread(s)", flush=True)
    results = {}
    for side in ("ours", "naive"):
        cmd = [sys.executable, __file__, "--side", side, "--out", str(work / f"{side}.npy"), "--n", str(args.n),
               "--tags", str(args.tags), "--dim", str(args.dim), "--k-max", str(args.k_max), "--scale", str(args.scale),
               "--workdir", str(work)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
        results[side] = json.loads(p.stdout.strip().splitlines()[-1][len("RESULT "):])
    ours, naive = results["ours"], results["naive"]
    a, b = np.load(work / "ours.npy"), np.load(work / "naive.npy")
    offsets = np.r_[0, np.cumsum(sizes)]
    truth = np.concatenate([np.arange(o + s - int(round(s * 0.1)), o + s) for o, s in zip(offsets[:-1], sizes) if s >= 10])
    inter = len(np.intersect1d(a, b))
    prec = lambda f: len(np.intersect1d(f, truth)) / max(1, len(f))  # noqa: E731
    print(f"ours  : write to store {ours['write_s']:.1f} s, cluster {ours['cluster_s']:.1f} s, "
          f"peak {ours['peak_mb']:.0f} MB, precision vs planted {prec(a):.3f}")
    print(f"naive : build in-memory array {naive['gen_s']:.1f} s, cluster {naive['cluster_s']:.1f} s, "
          f"peak {naive['peak_mb']:.0f} MB, precision vs planted {prec(b):.3f}")
    print(f"flagged crops: ours {len(a):,}, naive {len(b):,}, same crops {inter / max(1, len(b)):.3f}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"speed ratio (naive cluster time / ours): {naive['cluster_s'] / ours['cluster_s']:.2f}x")


if __name__ == "__main__":
    main()
