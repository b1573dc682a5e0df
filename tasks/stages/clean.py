"""Clean stage: remove wrong tags using their grounded regions.

1. Outliers: the crops of each tag are clustered with K-Means++ over their embeddings; the crops
   farthest from their own centroid (the top `outlier_fraction` of the tag) are outliers. That is a
   decision over all crops, made by the cluster step (tasks/stages/cluster.py), an input read whole.
2. Baseline disagrees: the baseline tagger scores every crop; an (image, tag) pair whose crops all
   score below the tag's threshold is removed.
3. No box: a localisable tag the detector found no box for is kept or removed (config).

`build_clean` turns each part's regions into CLEAN and CLEAN_CROPS rows.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from storage.schemas import CLEAN, CLEAN_CROPS, REGIONS

from tasks.engine.config import CleanSection
from tasks.engine.runner import Input, Stage
from tasks.shared.categories import localisable_tags, tag_categories
from tasks.shared.lineage import label_system_of

OUTLIER, BASELINE_DISAGREES, NO_BOX = "outlier", "baseline-disagrees", "no-box"


# ---------------------------------------------------------------- baseline disagreement

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


# ---------------------------------------------------------------- the stage over the store

STAGE_VERSION = "clean-4"   # 2: declared tag types; 3: baseline_min_ap; 4: clustering is the cluster step's


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


def prepare(run) -> None:
    """Once, before the parts: the baseline's thresholds per label id, and each part's clustering rows."""
    from tasks.shared.labels import load_labels
    from tasks.shared.models import model_card, model_to_label_ids

    store, cfg, baseline_ref = run.store, run.cfg, run.inputs["baseline"]
    labels = load_labels(store, run.inputs["label_system"])
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


def split(run):
    from tasks.engine.runner import parts_of

    tasks = parts_of(run.inputs["generated"], {"regions": run.inputs["regions"], "embeddings": run.inputs["embeddings"]},
                     salt=run.salt)
    # each part carries its own crops' clustering (the cluster step's rows of the same-named embeddings part)
    by_part: dict[str, dict] = defaultdict(dict)
    for batch in run.inputs["clusters"].iter_batches(columns=["part", "crop_key", "cluster", "distance", "outlier"]):
        for part, k, c, d, o in zip(*(batch.column(n).to_pylist() for n in range(5))):
            by_part[part][k] = (c, d, o)
    for task in tasks:
        task.payload["clusters"] = by_part.get(task.name, {})
    return tasks


def process(run, w, task):
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
    table, crops, rejects, metrics = build_clean(gen, reg, task.payload["clusters"], run.state["categories"], cfg,
                                                 scores=scores, thresholds=run.state["thresholds"],
                                                 ground_rejected=ground_rejected)
    return w.write_part(task.name, table=table, rejects=rejects, rows_in=gen.num_rows,
                        source_digest=task.source_digest, metrics=metrics,
                        extra_tables={"crops": (CLEAN_CROPS, crops)})


def summarize(run, records) -> dict:
    from tasks.engine.runner import merge_metrics

    m = merge_metrics(records)
    clustering = run.inputs["clusters"].manifest["metrics"]
    m.update({f"clustering_{k}": v for k, v in clustering.items() if isinstance(v, (int, float, str))})
    if m.get("tags_in"):
        m["removed_fraction"] = 1 - m.get("tags_kept", 0) / m["tags_in"]
    return m


STAGE = Stage(name="clean", output="clean", inputs=("generated", "regions", "embeddings", "parsed",
                                                    Input("baseline", "model"), Input("clusters", whole=True)),
              section="clean", reads=tuple(f"clean.{n}" for n in ("baseline_check", "baseline_min_ap", "keep_no_box",
                                                                  "localisable")),
              resolve=lambda run: label_system_of(run.store, run.inputs["parsed"]), derives=("label_system",),
              version=STAGE_VERSION, prepare=prepare, split=split, process=process, summarize=summarize)
