"""Clean stage: remove wrong tags using their grounded regions.

1. Outliers: the crops of each tag are clustered with K-Means++ over their embeddings; the crops
   farthest from their own centroid (the top `outlier_fraction` of the tag) are outliers.
2. Baseline disagrees: the baseline tagger scores every crop; an (image, tag) pair whose crops all
   score below the tag's threshold is removed.
3. No box: a localisable tag the detector found no box for is kept or removed (config).

Clustering needs every crop of a tag, across parts, so embeddings go to an on-disk `EmbeddingStore`
(one float32 file per tag, appended part by part) and are clustered one tag at a time: memory holds
one tag's array, not the dataset. `cluster_outliers` runs once over the store; `build_clean` then
turns each part's regions into CLEAN and CLEAN_CROPS rows.
"""
from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from storage.schemas import CLEAN, CLEAN_CROPS, EMBEDDINGS, REGIONS
from storage.shards import decode_image
from storage.store import digest

from tasks.shared.categories import localisable_tags, tag_categories
from tasks.engine.config import CleanSection
from tasks.engine.runner import Stage

OUTLIER, BASELINE_DISAGREES, NO_BOX = "outlier", "baseline-disagrees", "no-box"

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


def cluster_outliers(store: EmbeddingStore, cfg: CleanSection, tags: Iterable[int] | None = None,
                     on_tag: Callable[[int, int, float], None] | None = None) -> tuple[pa.Table, dict]:
    """Cluster every tag of the store, one tag in memory at a time. Returns a table (tag_id, crop_key,
    cluster, distance, outlier) over all crops, and metrics."""
    parts, m = [], Counter()
    t0 = time.perf_counter()
    for t in (store.tags() if tags is None else tags):
        t1 = time.perf_counter()
        keys, X = store.load(t)
        labels, d = cluster_tag(X, cfg, seed=cfg.seed + t)
        out = outlier_mask(d, cfg.outlier_fraction, cfg.min_crops)
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


# ---------------------------------------------------------------- embeddings and baseline scores of crops

CropScorer = Callable[[Sequence[Image.Image]], tuple[np.ndarray, np.ndarray | None]]


def separate_scorer(embedder, baseline: Callable[[Sequence[Image.Image]], np.ndarray] | None) -> CropScorer:
    """An embedder and (optionally) a baseline (images -> [N, model tags] probabilities) as one crop scorer."""
    def score(images):
        return embedder(images), (np.asarray(baseline(images)) if baseline is not None else None)
    return score


def embed_part(regions: pa.Table, crops: Mapping[str, Image.Image], score_crops: CropScorer,
               label_to_model: Mapping[int, int], batch_size: int, source: str) -> tuple[pa.Table, list[dict], dict]:
    """One regions part to its `embeddings` rows, rejects and metrics: each crop's embedding and, where
    `score_crops` (images -> (embeddings [N, D], baseline probabilities [N, model tags] or None)) gives
    probabilities, the baseline's score for the crop's own tag (label id -> model column by `label_to_model`;
    None where the model lacks the tag). A crop missing from `crops` is a reject.

    Each distinct crop is scored once: the detector often finds one box for several tags of a prompt, and
    the ground stage cuts it once per tag; crops of the same image and box are the same pixels, so one pass
    serves all of them and each tag reads its own column of the same probabilities."""
    keys, tids, cks, boxes = (regions.column(c).to_pylist() for c in ("key", "tag_id", "crop_key", "box"))
    present = [i for i, ck in enumerate(cks) if ck in crops]
    rejects = [{"key": keys[i], "reason": "missing-crop", "detail": f"crop {cks[i]} is not in the shard",
                "source": source, "field": "crop"} for i in sorted(set(range(len(cks))) - set(present))]
    def same_pixels(i: int) -> tuple:     # a row without a box is a crop of its own
        return (keys[i], tuple(boxes[i])) if boxes[i] else (cks[i],)

    first_of: dict[tuple, int] = {}       # -> the row whose crop is scored for all rows of that identity
    for i in present:
        first_of.setdefault(same_pixels(i), i)
    distinct = sorted(first_of.values())
    slot = {i: n for n, i in enumerate(distinct)}
    emb_parts, prob_parts = [], []
    for s in range(0, len(distinct), batch_size):
        imgs = [crops[cks[i]] for i in distinct[s: s + batch_size]]
        emb, probs = score_crops(imgs)
        if probs is not None and (probs.ndim != 2 or len(probs) != len(imgs)):
            raise ValueError(f"baseline returned shape {probs.shape} for {len(imgs)} crops; expected [N, num_tags]")
        emb_parts.append(np.asarray(emb, dtype=np.float32))
        prob_parts.append(probs)
    emb_all = np.concatenate(emb_parts) if emb_parts else np.zeros((0, 0), np.float32)
    probs_all = None if not prob_parts or prob_parts[0] is None else np.concatenate(prob_parts)
    rows: dict[str, list] = {"key": [], "tag_id": [], "crop_key": [], "embedding": [], "baseline_score": []}
    for i in present:
        j = slot[first_of[same_pixels(i)]]
        m = label_to_model.get(tids[i])
        rows["key"].append(keys[i])
        rows["tag_id"].append(tids[i])
        rows["crop_key"].append(cks[i])
        rows["embedding"].append(emb_all[j])
        rows["baseline_score"].append(float(probs_all[j, m]) if probs_all is not None and m is not None else None)
    table = pa.table({k: rows[k] for k in ("key", "tag_id", "crop_key")} | {
        "embedding": pa.array(rows["embedding"], pa.list_(pa.float32())),
        "baseline_score": pa.array(rows["baseline_score"], pa.float32())}).cast(EMBEDDINGS)
    return table, rejects, {"crops": len(present), "crops_scored": len(distinct)}


def baseline_disagrees(regions: pa.Table, scores: Mapping[str, float], thresholds: Sequence[float] | np.ndarray
                       ) -> set[tuple[str, int]]:
    """(key, tag_id) pairs whose every crop scores below the tag's threshold (crops without a score do
    not count either way; a pair with no scored crop is not removed)."""
    thr = np.asarray(thresholds, dtype=np.float64)
    agree, scored = set(), set()
    for key, tid, ck in zip(regions.column("key").to_pylist(), regions.column("tag_id").to_pylist(),
                            regions.column("crop_key").to_pylist()):
        if ck not in scores:
            continue
        scored.add((key, tid))
        if scores[ck] >= thr[tid]:
            agree.add((key, tid))
    return scored - agree


# ---------------------------------------------------------------- output tables

def clean_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in CLEAN}, schema=CLEAN)


def clean_crops_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pydict({f.name: [r[f.name] for r in rows] for f in CLEAN_CROPS}, schema=CLEAN_CROPS)


def build_clean(generated: pa.Table, regions: pa.Table, crop_results: pa.Table | Mapping[str, tuple[int, float, bool]],
                categories: Mapping[int, str], cfg: CleanSection, scores: Mapping[str, float] | None = None,
                thresholds: Sequence[float] | None = None, ground_rejected: Iterable[str] = ()
                ) -> tuple[pa.Table, pa.Table, list[dict], dict]:
    """One part: (CLEAN table, CLEAN_CROPS table, rejects, metrics).

    `generated` gives each key's tags (`tag_ids`); `regions` that part's boxes; `crop_results` the
    clustering result (table from `cluster_outliers`, or {crop_key: (cluster, distance, outlier)}).
    A pair is an outlier when all its crops are outliers. Reasons in priority order: outlier,
    baseline-disagrees, no-box. Keys the ground stage rejected are rejected here ("not-grounded").
    """
    if isinstance(crop_results, pa.Table):
        d = crop_results.select(["crop_key", "cluster", "distance", "outlier"]).to_pydict()
        res = {k: (c, dd, o) for k, c, dd, o in zip(d["crop_key"], d["cluster"], d["distance"], d["outlier"])}
    else:
        res = dict(crop_results)
    scores = scores or {}
    disagree = baseline_disagrees(regions, scores, thresholds) if (cfg.baseline_check and thresholds is not None) else set()
    crops_of: dict[tuple[str, int], list[str]] = defaultdict(list)
    crop_rows = []
    for key, tid, ck in zip(regions.column("key").to_pylist(), regions.column("tag_id").to_pylist(),
                            regions.column("crop_key").to_pylist()):
        crops_of[(key, tid)].append(ck)
        c, dist, out = res.get(ck, (-1, float("nan"), False))  # -1: not clustered (no embedding)
        crop_rows.append({"key": key, "tag_id": tid, "crop_key": ck, "cluster": int(c), "distance": float(dist),
                          "outlier": bool(out), "baseline_score": scores.get(ck)})
    rejected = set(ground_rejected)
    rows, rejects, m = [], [], Counter({k: 0 for k in (OUTLIER, BASELINE_DISAGREES, NO_BOX, "tags_in", "tags_kept")})
    for key, tids in zip(generated.column("key").to_pylist(), generated.column("tag_ids").to_pylist()):
        if key in rejected:
            rejects.append({"key": key, "reason": "not-grounded", "detail": "the ground stage rejected this key",
                            "source": "", "field": "image"})
            continue
        tids = list(dict.fromkeys(tids or []))
        loc = set(localisable_tags(tids, categories, cfg.localisable))
        kept, removed, reasons = [], [], []
        for t in tids:
            cks = crops_of.get((key, t))
            reason = None
            if cks:
                if all(res.get(ck, (0, 0.0, False))[2] for ck in cks):
                    reason = OUTLIER
                elif (key, t) in disagree:
                    reason = BASELINE_DISAGREES
            elif t in loc and not cfg.keep_no_box:
                reason = NO_BOX
            if reason is None:
                kept.append(t)
            else:
                removed.append(t)
                reasons.append(reason)
                m[reason] += 1
        m["tags_in"] += len(tids)
        m["tags_kept"] += len(kept)
        rows.append({"key": key, "tag_ids": kept, "removed_tag_ids": removed, "removed_reasons": reasons})
    metrics = dict(m)
    metrics.update(keys_in=generated.num_rows, keys_out=len(rows), keys_rejected=len(rejects), crops=len(crop_rows))
    return clean_table(rows), clean_crops_table(crop_rows), rejects, metrics


# ---------------------------------------------------------------- the stages over the store

EMBED_VERSION = "embed-2"   # 2: one pass per distinct crop; the baseline embedder shares the tagging pass
STAGE_VERSION = "clean-3"   # 2: declared tag types; 3: baseline_min_ap


def _crop_images(version, part) -> dict[str, Image.Image]:
    return {sample["__key__"]: decode_image(sample) for sample in version.iter_part_samples(part)}


def embed_stage(store, cfg, regions, baseline_ref: str, *, executor=None, progress=None):
    """The `embeddings` version: every crop's embedding and the baseline's score for its own tag.
    Per regions part, so new data embeds only new crops."""
    from tasks.engine.runner import run

    return run(EMBED, store, {"clean": cfg}, {"regions": regions, "baseline": baseline_ref}, executor=executor,
               progress=progress)


def embed_identify(run) -> None:
    """Identity: the embedder's section and the baseline (by digest), not the whole clean section."""
    from tasks.engine.config import section_dict
    from tasks.shared.models import model_digest, model_version

    mv = model_version(run.store, run.inputs["baseline"])
    ident = model_digest(mv, run.inputs["baseline"])
    run.config = section_dict(run.cfg.embedder) | {"baseline": ident, "baseline_check": run.cfg.baseline_check}
    run.parents = [run.inputs["regions"]] + ([mv] if mv else [])
    run.state["ident"] = ident


def embed_prepare(run) -> None:
    from tasks.shared.lineage import labels_version
    from tasks.shared.labels import load_labels
    from tasks.shared.models import model_card, model_to_label_ids, resolve_device

    # the model's card (config, tag list), not its weights: this process only maps tags
    card = model_card(run.store, run.inputs["baseline"])
    labels = load_labels(run.store, labels_version(run.store, run.inputs["regions"]))
    run.state["device"] = str(resolve_device(run.cfg.embedder.device))
    run.state["image_size"] = card.config.swin.image_size
    # the baseline's tag list may differ from the label system's: match by name
    run.state["label_to_model"] = {int(lab): m for m, lab in enumerate(model_to_label_ids(card, labels)) if lab >= 0}
    # part work loads the model, once per worker process (a model is never shipped to a worker)


def embed_split(run):
    from tasks.engine.runner import parts_of

    return parts_of(run.inputs["regions"], salt=digest(run.config))


def baseline_scorer(model, cfg, image_size: int, baseline_check: bool) -> CropScorer:
    """The crop scorer for the embed stage. When the embedder is the baseline's own encoder at the baseline's
    input size, one encoder pass gives both the embedding and the tag probabilities (the Swin is nearly all
    of the cost); otherwise the configured embedder and, with `baseline_check`, the baseline's tagger."""
    import torch
    from ram_model.embedder import build_embedder
    from ram_model.transforms import ImageTransform

    transform = ImageTransform(image_size)   # the baseline's eval transform
    if cfg.kind == "baseline" and cfg.image_size in (None, image_size):
        def joint(images):
            embeds, probs = model.embed_and_tag_probs(transform.batch(images))
            pooled = embeds[:, 0] if cfg.pool == "first" else embeds.mean(dim=1)
            emb = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
            return emb, (probs.cpu().numpy() if baseline_check else None)
        return joint

    embedder = build_embedder(cfg, baseline_encoder=lambda x: model.encode_image(x), image_size=image_size)

    def tag_probs(images):
        with torch.inference_mode():
            return model.tag_probs(transform.batch(images)).cpu().numpy()
    return separate_scorer(embedder, tag_probs if baseline_check else None)


def embed_process(run, w, task):
    from tasks.shared.models import load_model, worker_cached

    store, cfg, regions, baseline_ref = run.store, run.cfg, run.inputs["regions"], run.inputs["baseline"]
    device, image_size, ident = run.state["device"], run.state["image_size"], run.state["ident"]
    model = load_model(store, baseline_ref, device=device)   # once per worker process
    score = worker_cached(f"crop-scorer|{cfg.embedder!r}|{cfg.baseline_check}|{ident}|{device}",
                          lambda: baseline_scorer(model, cfg.embedder, image_size, cfg.baseline_check))
    part = task.payload["part"]
    table = regions.read_file(next(f["path"] for f in part.files if f["kind"] == "table"))
    out, rejects, metrics = embed_part(table, _crop_images(regions, part), score, run.state["label_to_model"],
                                       cfg.embedder.batch_size, source=part.name)
    return w.write_part(task.name, table=out, rejects=rejects, rows_in=table.num_rows, source_digest=task.source_digest,
                        metrics=metrics)


EMBED = Stage(name="embed", output="embeddings", inputs=("regions", "baseline"), section="clean",
              version=EMBED_VERSION, identify=embed_identify, prepare=embed_prepare, split=embed_split,
              process=embed_process)


def baseline_unlearned_tags(store, baseline_ref: str, min_ap: float) -> set[str]:
    """Tags whose held-out AP (recorded in the baseline's model version) is below `min_ap`: the
    baseline's opinion of their crops is no better than chance, so it must not veto them. A baseline
    without recorded per-tag metrics (e.g. an official checkpoint) is trusted on every tag."""
    from tasks.shared.models import model_version

    if min_ap <= 0:
        return set()
    version = model_version(store, baseline_ref)
    per_tag = (version.manifest.get("per_tag_metrics") or {}) if version is not None else {}
    return {tag for tag, m in per_tag.items() if m.get("ap", 1.0) < min_ap}


def clean_stage(store, cfg, generated, regions, embeddings, parsed, baseline_ref: str, *, progress=None):
    """The `clean` version: per key the kept tags and the removed ones with their reasons, per crop its
    cluster and distance. Clustering is global per tag (all parts), one tag in memory at a time."""
    from tasks.engine.runner import run

    return run(STAGE, store, {"clean": cfg}, {"generated": generated, "regions": regions, "embeddings": embeddings,
                                              "parsed": parsed, "baseline": baseline_ref}, progress=progress)


def clean_prepare(run) -> None:
    """Once, before the parts: the baseline's thresholds per label id, and the clustering of every crop."""
    import shutil
    import tempfile

    from tasks.shared.lineage import labels_version
    from tasks.shared.labels import load_labels
    from tasks.shared.models import model_card, model_to_label_ids

    store, cfg, baseline_ref, embeddings = run.store, run.cfg, run.inputs["baseline"], run.inputs["embeddings"]
    labels = load_labels(store, labels_version(store, run.inputs["parsed"]))
    run.state["categories"] = tag_categories(labels)
    # Per label id, the baseline's threshold for that tag (0: a tag the baseline does not know is never
    # "disagreed" with; its crops carry no score anyway).
    thresholds = np.zeros(len(labels))
    if cfg.baseline_check:
        card = model_card(store, baseline_ref)   # tags and thresholds only: no weights in this process
        model_thr = np.asarray(card.thresholds)
        unlearned = baseline_unlearned_tags(store, baseline_ref, cfg.baseline_min_ap)
        for m, lab in enumerate(model_to_label_ids(card, labels)):
            # a disabled class (threshold 1.0), or one the baseline has not learned, has no opinion to disagree with
            if lab >= 0 and model_thr[m] < 1.0 and card.tags[m] not in unlearned:
                thresholds[lab] = model_thr[m]
    run.state["thresholds"] = thresholds
    tmp = Path(tempfile.mkdtemp(prefix="ram-clean-"))
    try:
        emb_store = EmbeddingStore(tmp)
        for batch in embeddings.iter_batches(columns=["tag_id", "crop_key", "embedding"], batch_size=8192):
            d = batch.to_pydict()
            if d["tag_id"]:
                emb_store.add(d["tag_id"], d["crop_key"], np.asarray(d["embedding"], dtype=np.float32))
        crop_results, run.state["cluster_metrics"] = cluster_outliers(emb_store, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run.state["results"] = {k: (c, dd, o) for k, c, dd, o in zip(
        *(crop_results.column(n).to_pylist() for n in ("crop_key", "cluster", "distance", "outlier")))}


def clean_split(run):
    from tasks.engine.runner import parts_of

    return parts_of(run.inputs["generated"], {"regions": run.inputs["regions"], "embeddings": run.inputs["embeddings"]},
                    salt=digest(run.config))


def clean_process(run, w, task):
    cfg, generated, regions, embeddings = run.cfg, run.inputs["generated"], run.inputs["regions"], run.inputs["embeddings"]
    gen_part, reg_part, emb_part = task.payload["part"], task.payload["regions"], task.payload["embeddings"]
    gen = generated.read_file(next(f["path"] for f in gen_part.files if f["kind"] == "table"),
                              columns=["key", "tag_ids"])
    reg = regions.read_file(next(f["path"] for f in reg_part.files if f["kind"] == "table")) if reg_part \
        else REGIONS.empty_table()
    scores = {}
    if emb_part is not None:
        et = embeddings.read_file(next(f["path"] for f in emb_part.files if f["kind"] == "table"),
                                  columns=["crop_key", "baseline_score"])
        scores = {k: s for k, s in zip(et.column(0).to_pylist(), et.column(1).to_pylist()) if s is not None}
    ground_rejected = set()
    if reg_part is not None:
        for f in reg_part.files:
            if f["kind"] == "rejects":
                ground_rejected.update(regions.read_file(f["path"], columns=["key"]).column(0).to_pylist())
    table, crops, rejects, metrics = build_clean(gen, reg, run.state["results"], run.state["categories"], cfg,
                                                 scores=scores, thresholds=run.state["thresholds"],
                                                 ground_rejected=ground_rejected)
    return w.write_part(task.name, table=table, rejects=rejects, rows_in=gen.num_rows,
                        source_digest=task.source_digest, metrics=metrics,
                        extra_tables={"crops": (CLEAN_CROPS, crops)})


def clean_summary(run, records) -> dict:
    from tasks.engine.runner import merge_metrics

    m = merge_metrics(records)
    m.update({f"clustering_{k}": v for k, v in run.state["cluster_metrics"].items()})
    if m.get("tags_in"):
        m["removed_fraction"] = 1 - m.get("tags_kept", 0) / m["tags_in"]
    return m


STAGE = Stage(name="clean", output="clean", inputs=("generated", "regions", "embeddings", "parsed", "baseline"),
              section="clean", version=STAGE_VERSION, prepare=clean_prepare,
              split=clean_split, process=clean_process, summarize=clean_summary)
