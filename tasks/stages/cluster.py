"""Step `cluster`: the per-tag clustering of every crop, a decision over all crops, as a version of its own.

Clean removes a tag when all its crops are outliers of their tag's K-Means++ clusters: which crops those are
depends on every crop of the tag, across parts and across data that arrived earlier. Held as state inside
clean, that decision made a clean version depend on the order data arrived in (an incremental run reused
parts clustered over less data). Here it is a version: what its inputs make it, clean's input (read whole,
so every clean part follows it).

Refit policy (`clean.refit`, part of the identity):
- `always` (default): every tag is clustered again over all its crops. The version is a function of the
  embeddings alone: an incremental run and a whole run over the same data give the same bytes.
- `growth`: a tag is fitted again only when its crops grew by more than `clean.refit_growth` since its fit;
  otherwise its centroids and outlier cut-off (kept in the `centroids` table) are applied to its new crops
  only, and earlier crops keep their results. Only new embeddings parts are read (plus every part for the
  tags that are fitted again). The previous clusters version is then an input (`previous`): the version
  depends on that history, by declaration. At RAM's scale (14M images x ~5 crops x 512 floats, ~140 GB of
  embeddings) this is the difference between reading the increment and reading everything
  (benchmarks/cluster_refit.py).

Clustering itself streams: embeddings go to an on-disk `EmbeddingStore` (one float32 file per tag), and
tags are clustered one at a time: memory holds one tag's array, not the dataset.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.schemas import CENTROIDS, CLUSTERS

from tasks.engine.config import CleanSection
from tasks.engine.runner import Input, PartTask, Stage, part_digest

CROP_RESULTS = pa.schema([
    pa.field("tag_id", pa.int32()), pa.field("crop_key", pa.string()), pa.field("cluster", pa.int32()),
    pa.field("distance", pa.float32()), pa.field("outlier", pa.bool_())])


# ---------------------------------------------------------------- embeddings on disk

class EmbeddingStore:
    """Per-tag append-only embedding files: `<dir>/<tag_id>.f32` (float32 rows) and `<tag_id>.keys`
    (one crop key per line, same order). Add part by part, read back one tag at a time."""

    def __init__(self, folder: str | Path, dim: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        dim_file = self.folder / "_dim"
        if dim_file.exists():
            stored = int(dim_file.read_text())
            if dim is not None and dim != stored:
                raise ValueError(f"embedding store {self.folder} holds dim {stored}, not {dim}")
            dim = stored
        elif dim is not None:
            dim_file.write_text(str(dim))
        self.dim = dim

    def add(self, tag_ids: Sequence[int], crop_keys: Sequence[str], embeddings: np.ndarray) -> None:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or len(emb) != len(tag_ids) or len(crop_keys) != len(tag_ids):
            raise ValueError(f"EmbeddingStore.add: {len(tag_ids)} tag ids, {len(crop_keys)} keys, embeddings {emb.shape}")
        if self.dim is None:
            self.dim = emb.shape[1]
            (self.folder / "_dim").write_text(str(self.dim))
        elif emb.shape[1] != self.dim:
            raise ValueError(f"EmbeddingStore.add: embeddings of dim {emb.shape[1]}, store holds {self.dim}")
        tids = np.asarray(tag_ids)
        order = np.argsort(tids, kind="stable")
        bounds = np.flatnonzero(np.diff(tids[order])) + 1
        for grp in np.split(order, bounds):
            if len(grp) == 0:
                continue
            t = int(tids[grp[0]])
            with open(self.folder / f"{t}.f32", "ab") as f:
                emb[grp].tofile(f)
            with open(self.folder / f"{t}.keys", "a") as f:
                f.write("".join(crop_keys[i] + "\n" for i in grp))

    def tags(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob("*.f32"))

    def count(self, tag_id: int) -> int:
        return os.path.getsize(self.folder / f"{tag_id}.f32") // (4 * self.dim)

    def load(self, tag_id: int) -> tuple[list[str], np.ndarray]:
        emb = np.fromfile(self.folder / f"{tag_id}.f32", dtype=np.float32).reshape(-1, self.dim)
        keys = (self.folder / f"{tag_id}.keys").read_text().splitlines()
        if len(keys) != len(emb):
            raise ValueError(f"embedding store {self.folder}: tag {tag_id} has {len(emb)} rows but {len(keys)} keys "
                             "(an interrupted write?); rebuild the store")
        return keys, emb

    def __iter__(self) -> Iterator[tuple[int, list[str], np.ndarray]]:
        for t in self.tags():
            keys, emb = self.load(t)
            yield t, keys, emb


# ---------------------------------------------------------------- clustering

def _sq_dist(X: np.ndarray, xx: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Squared distances [n, k] via |x|^2 - 2 x.c + |c|^2 (one BLAS matmul)."""
    return xx[:, None] - 2.0 * (X @ C.T) + np.einsum("ij,ij->i", C, C)[None, :]


def kmeans_pp_seeds(X: np.ndarray, k: int, rng: np.random.Generator, xx: np.ndarray | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; scikit-learn's variant): each new centre is the best
    of 2 + ln k candidates drawn with probability proportional to the squared distance to the nearest centre."""
    n = len(X)
    xx = np.einsum("ij,ij->i", X, X) if xx is None else xx
    trials = 2 + int(np.log(k))
    first = int(rng.integers(n))
    idx = [first]
    d2 = np.maximum(_sq_dist(X, xx, X[first:first + 1])[:, 0], 0.0)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: repeat one
            idx.append(first)
            continue
        cand = np.minimum(np.searchsorted(np.cumsum(d2), rng.random(trials) * total), n - 1)
        dc = np.maximum(_sq_dist(X, xx, X[cand]).T, 0.0)          # [trials, n]
        new = np.minimum(d2[None, :], dc)
        best = int(new.sum(axis=1).argmin())
        d2 = new[best]
        idx.append(int(cand[best]))
    return X[idx].copy()


def _lloyd(X: np.ndarray, C: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """Lloyd iterations in float32 with BLAS distances until the centres move less than `tol` (squared,
    summed; scikit-learn's criterion) or labels stop changing. Returns the centres."""
    xx = np.einsum("ij,ij->i", X, X)
    ar = np.arange(len(X))
    labels = None
    for _ in range(max_iter):
        new = _sq_dist(X, xx, C).argmin(axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=len(C))
        onehot = np.zeros((len(C), len(X)), dtype=np.float32)
        onehot[labels, ar] = 1.0
        nz = counts > 0  # an empty cluster keeps its old centre
        newC = C.copy()
        newC[nz] = (onehot @ X)[nz] / counts[nz, None]
        shift = float(((newC - C) ** 2).sum())
        C = newC
        if shift <= tol:
            break
    return C


def cluster_tag(X: np.ndarray, cfg: CleanSection, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """K-Means++ on one tag's embeddings: (cluster per row, distance of each row to its own centroid)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = len(X)
    k = cfg.clusters_for(n)
    if k == 1:  # one cluster: the centroid is the mean, no iterations needed
        d = np.linalg.norm(X - X.mean(axis=0, keepdims=True), axis=1)
        return np.zeros(n, np.int32), d.astype(np.float32)
    if n > cfg.minibatch_threshold:
        from sklearn.cluster import MiniBatchKMeans  # imported here: the fast path does not need sklearn
        km = MiniBatchKMeans(n_clusters=k, init="k-means++", n_init=1, batch_size=cfg.minibatch_size,
                             random_state=seed, max_iter=cfg.max_iter).fit(X)
        labels, C = km.labels_, km.cluster_centers_.astype(np.float32)
        d = np.linalg.norm(X - C[labels], axis=1)
        return labels.astype(np.int32), d.astype(np.float32)
    if cfg.algorithm == "sklearn":
        from sklearn.cluster import KMeans
        km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=cfg.max_iter, random_state=seed).fit(X)
        labels = km.labels_
        d = np.linalg.norm(X - km.cluster_centers_[labels].astype(np.float32), axis=1)
        return labels.astype(np.int32), d.astype(np.float32)
    rng = np.random.default_rng(seed)
    # centres are fitted on a random sample of a large tag (k <= k_max centres need few thousand points);
    # every crop is then assigned and measured against them in one pass
    F = X if n <= cfg.fit_sample else X[np.sort(rng.choice(n, cfg.fit_sample, replace=False))]
    S = F if len(F) <= cfg.seed_sample else F[rng.choice(len(F), cfg.seed_sample, replace=False)]
    C = kmeans_pp_seeds(S, k, rng)
    tol = cfg.tol * float(F.var(axis=0).mean())  # scikit-learn's tolerance: relative to the data's variance
    C = _lloyd(F, C, cfg.max_iter, tol)
    d2 = _sq_dist(X, np.einsum("ij,ij->i", X, X), C)
    labels = d2.argmin(axis=1)
    d2 = np.maximum(d2[np.arange(n), labels], 0.0)
    return labels.astype(np.int32), np.sqrt(d2).astype(np.float32)


def outlier_mask(distances: np.ndarray, fraction: float, min_crops: int) -> np.ndarray:
    """The farthest round(fraction * n) rows; none when the tag has fewer than `min_crops` crops."""
    n = len(distances)
    mask = np.zeros(n, bool)
    m = int(round(fraction * n))
    if n >= min_crops and m > 0:
        mask[np.argsort(-distances, kind="stable")[:m]] = True
    return mask


def fit_tag(X: np.ndarray, cfg: CleanSection, tag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """One tag's crops clustered: (cluster per row, distance to its centroid, outlier mask, the tag's model:
    (crops fitted on, centroids, outlier cut-off))."""
    labels, d = cluster_tag(X, cfg, seed=cfg.seed + tag)
    out = outlier_mask(d, cfg.outlier_fraction, cfg.min_crops)
    k = int(labels.max()) + 1 if len(labels) else 1
    return labels, d, out, (len(X), centroids_of(np.asarray(X, np.float32), labels, k), cutoff_of(d, out))


def cluster_outliers(store: EmbeddingStore, cfg: CleanSection, tags: Iterable[int] | None = None,
                     on_tag: Callable[[int, int, float], None] | None = None) -> tuple[pa.Table, dict]:
    """Cluster every tag of the store, one tag in memory at a time. Returns a table (tag_id, crop_key,
    cluster, distance, outlier) over all crops, and metrics."""
    parts, m = [], Counter()
    t0 = time.perf_counter()
    for t in (store.tags() if tags is None else tags):
        t1 = time.perf_counter()
        keys, X = store.load(t)
        labels, d, out, _ = fit_tag(X, cfg, t)
        parts.append(pa.Table.from_arrays([
            pa.array(np.full(len(keys), t, np.int32)), pa.array(keys, pa.string()), pa.array(labels, pa.int32()),
            pa.array(d, pa.float32()), pa.array(out)], schema=CROP_RESULTS))
        m["tags"] += 1
        m["crops"] += len(keys)
        m["outliers"] += int(out.sum())
        m["tags_below_min_crops"] += int(len(keys) < cfg.min_crops)
        if on_tag:
            on_tag(t, len(keys), time.perf_counter() - t1)
    table = pa.concat_tables(parts) if parts else CROP_RESULTS.empty_table()
    metrics = dict(m)
    metrics["seconds"] = time.perf_counter() - t0
    return table, metrics


def centroids_of(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The centroid of each cluster (the mean of its rows; zeros for an empty one) as float32 [k, D]."""
    C = np.zeros((k, X.shape[1]), np.float32)
    counts = np.bincount(labels, minlength=k)
    np.add.at(C, labels, X)
    nz = counts > 0
    C[nz] /= counts[nz, None]
    return C


def cutoff_of(distances: np.ndarray, outliers: np.ndarray) -> float:
    """The distance from which a crop is an outlier: the nearest outlier's (inf when the tag has none)."""
    return float(distances[outliers].min()) if outliers.any() else float("inf")


def apply_centroids(X: np.ndarray, C: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New crops against a tag's kept model: (nearest cluster, distance to it, outlier: distance >= cutoff)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    d2 = np.maximum(_sq_dist(X, np.einsum("ij,ij->i", X, X), C), 0.0)
    labels = d2.argmin(axis=1)
    d = np.sqrt(d2[np.arange(len(X)), labels]).astype(np.float32)
    return labels.astype(np.int32), d, d >= cutoff


# ---------------------------------------------------------------- the step over the store

STAGE_VERSION = "cluster-1"
CLUSTER_FIELDS = ("outlier_fraction", "k", "k_max", "crops_per_cluster", "min_crops", "algorithm", "max_iter", "tol",
                  "seed_sample", "fit_sample", "minibatch_threshold", "minibatch_size", "seed", "refit",
                  "refit_growth")


def resolve(run) -> dict:
    """With `refit: growth`, the clusters version to grow from: the latest one made under this same code and
    config from other embeddings (None: the first, fitted whole). A rerun over the same embeddings finds the
    version it made and grows from what that one grew from, so it is the same version, not a new one."""
    if run.cfg.refit == "always":
        return {"previous": None}
    code = run.stage.code_version()
    config = {n: getattr(run.cfg, n) for n in CLUSTER_FIELDS}
    for version in reversed(run.store.versions(run.output)):
        made = version.manifest
        if made["code_version"] != code or made["config"].get("clean") != config:
            continue
        if run.inputs["embeddings"].ref not in version.parents:
            return {"previous": version}
        grew_from = next((p for p in version.parents if p.startswith(f"{run.output}/")), None)
        return {"previous": run.store.open_ref(grew_from) if grew_from else None}
    return {"previous": None}


def _embedding_tables(embeddings, parts, tags: set[int] | None = None) -> Iterator[tuple[str, dict]]:
    """(part name, columns) per batch of the given parts' embeddings, only rows of `tags` when given."""
    for part in parts:
        path = next(f["path"] for f in part.files if f["kind"] == "table")
        table = embeddings.read_file(path, columns=["key", "tag_id", "crop_key", "embedding"])
        for batch in table.to_batches(max_chunksize=8192):
            d = batch.to_pydict()
            if tags is not None:
                keep = [i for i, t in enumerate(d["tag_id"]) if t in tags]
                d = {k: [v[i] for i in keep] for k, v in d.items()}
            if d["tag_id"]:
                yield part.name, d


def _fill(store: EmbeddingStore, origin: dict, embeddings, parts, tags: set[int] | None = None) -> None:
    for part, d in _embedding_tables(embeddings, parts, tags):
        store.add(d["tag_id"], d["crop_key"], np.asarray(d["embedding"], dtype=np.float32))
        origin.update({ck: (k, part) for ck, k in zip(d["crop_key"], d["key"])})


def process(run, writer, task):
    cfg, embeddings, previous = run.cfg, run.inputs["embeddings"], run.inputs["previous"]
    parts = embeddings.parts
    rows: list[pa.Table] = []
    models: dict[int, tuple[int, np.ndarray, float]] = {}     # tag -> (crops fitted on, centroids, cutoff)
    kept_rows = None
    refit: set[int] | None = None                              # None: every tag
    new_parts = parts
    if previous is not None:
        prev_emb = run.store.open_ref(next(p for p in previous.parents if p.startswith("embeddings/")))
        before = {p.name: part_digest(p) for p in prev_emb.parts}
        unchanged = {p.name for p in parts if before.get(p.name) == part_digest(p)}
        new_parts = [p for p in parts if p.name not in unchanged]
        old = previous.read_table()
        kept_rows = old.filter(pc.is_in(old["part"], pa.array(sorted(unchanged), pa.string())))
        prev_models = {r["tag_id"]: (r["crops_fit"], np.asarray(r["centroids"], np.float32), r["cutoff"])
                       for r in previous.read_file(next(f["path"] for f in previous.parts[0].files
                                                        if f["kind"] == "centroids")).to_pylist()}
        grown = Counter(kept_rows["tag_id"].to_pylist())
        for _, d in _embedding_tables(embeddings, new_parts):
            grown.update(d["tag_id"])
        refit = {t for t, n in grown.items() if t not in prev_models or n > prev_models[t][0] * (1 + cfg.refit_growth)}
        models = {t: m for t, m in prev_models.items() if t in grown and t not in refit}
    m = Counter(dict.fromkeys(("tags_fitted", "crops_fitted", "tags_applied", "crops_applied", "crops_kept"), 0))
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ram-cluster-"))
    try:
        # Tags fitted now: all their crops. Tags kept: only the crops of new parts, against their model.
        fit_store, origin = EmbeddingStore(tmp / "fit"), {}
        if refit is None or refit:
            _fill(fit_store, origin, embeddings, parts, refit)
        for t, keys, X in fit_store:
            labels, d, out, models[t] = fit_tag(X, cfg, t)
            rows.append(_rows(t, keys, labels, d, out, origin))
            m["tags_fitted"] += 1
            m["crops_fitted"] += len(keys)
        if refit is not None:
            apply_store, origin = EmbeddingStore(tmp / "apply"), {}
            _fill(apply_store, origin, embeddings, new_parts, set(models) - refit)
            for t, keys, X in apply_store:
                _, C, cutoff = models[t]
                labels, d, out = apply_centroids(X, C, cutoff)
                rows.append(_rows(t, keys, labels, d, out, origin))
                m["tags_applied"] += 1
                m["crops_applied"] += len(keys)
            kept = kept_rows.filter(pc.invert(pc.is_in(kept_rows["tag_id"], pa.array(
                sorted(refit), pa.int32()))))
            rows.append(kept)
            m["crops_kept"] += kept.num_rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = pa.concat_tables(rows).cast(CLUSTERS) if rows else CLUSTERS.empty_table()
    if refit is not None:   # one order whatever the history: by tag, then by part and row as the data holds them
        part_order = pc.index_in(table["part"], pa.array([p.name for p in parts], pa.string()))
        order = np.lexsort((np.arange(table.num_rows), part_order.to_numpy(zero_copy_only=False),
                            table["tag_id"].to_numpy()))
        table = table.take(pa.array(order, pa.int64()))
    centroids = pa.Table.from_pylist([{"tag_id": t, "crops_fit": n, "centroids": C.tolist(), "cutoff": c}
                                      for t, (n, C, c) in sorted(models.items())], schema=CENTROIDS)
    outliers = pc.sum(table["outlier"].cast(pa.int32())).as_py() or 0
    m.update(tags=centroids.num_rows, crops=table.num_rows, outliers=outliers,
             tags_below_min_crops=sum(1 for t, (n, _, _) in models.items() if n < cfg.min_crops))
    metrics = dict(m) | {"seconds": time.perf_counter() - t0, "refit": cfg.refit}
    return writer.write_part(task.name, table=table, rows_in=embeddings.manifest["rows_out"],
                             metrics=metrics, extra_tables={"centroids": (CENTROIDS, centroids)})


def _rows(tag: int, crop_keys: list[str], labels, distances, outliers, origin: dict) -> pa.Table:
    return pa.table({"key": [origin[c][0] for c in crop_keys], "part": [origin[c][1] for c in crop_keys],
                     "tag_id": pa.array(np.full(len(crop_keys), tag, np.int32)), "crop_key": crop_keys,
                     "cluster": pa.array(labels, pa.int32()), "distance": pa.array(distances, pa.float32()),
                     "outlier": pa.array(outliers, pa.bool_())}, schema=CLUSTERS)


STAGE = Stage(name="cluster", output="clusters", inputs=("embeddings",), section="clean",
              reads=tuple(f"clean.{n}" for n in CLUSTER_FIELDS), resolve=resolve,
              derives=(Input("previous"),), version=STAGE_VERSION,
              split=lambda run: [PartTask("clusters", "")], process=process,
              summarize=lambda run, records: records[0].metrics, one_part=True)
