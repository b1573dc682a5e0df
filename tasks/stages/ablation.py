"""The data-engine ablation on the user's own data (RAM's paper, "data engine" table).

    label versions (parsed, parsed+generated, cleaned, or any list with tag_ids) x seeds
        ─► one model each: same architecture, budget and seeds (the train stage; each a model version)
        ─► scored on held-out keys against a ground truth (mAP, micro P/R/F1, per tag type)
        ─► an `ablation` version: per-seed rows, and mean ± std over seeds per label version

Every model is an ordinary `models/ablation-<label stage>` version, so a crashed ablation resumes by
reusing the models already trained, and a rerun over the same inputs reuses the committed version.
Models are judged on the keys no model was trained on (`train.holdout_fraction`, by key hash: the
same keys for every label version) that have ground truth.
"""
from __future__ import annotations

import logging
import math
import re
import time
from typing import Mapping

import numpy as np
import pyarrow as pa

from storage import Store, StoreError, Version
from storage.schemas import ABLATION

from tasks.engine.runner import Input, PartTask, Stage

log = logging.getLogger("ram_engine")

STAGE_VERSION = "ablation-1"
METRICS = ("mAP", "precision", "recall", "f1")


def model_name(label_name: str) -> str:
    """`models/<name>` of the ablation models of one label version (a stable, path-safe name)."""
    return "ablation-" + re.sub(r"[^a-z0-9]+", "-", label_name.lower()).strip("-")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def group_quality(scores: np.ndarray, truth_mh: np.ndarray, thresholds: np.ndarray, tags: list[str],
                  groups: Mapping[str, list[str]]) -> dict[str, dict]:
    """tagging_metrics restricted to each group's tags (e.g. the label system's tag types)."""
    from ram_model.metrics import tagging_metrics

    out = {}
    for group, members in groups.items():
        cols = [i for i, t in enumerate(tags) if t in set(members)]
        if cols:
            q = tagging_metrics(scores[:, cols], truth_mh[:, cols], thresholds[cols])
            out[group] = {m: q[m] for m in METRICS}
    return out


def summarise(per_seed: list[dict], baseline: str | None = None) -> list[dict]:
    """Per label version: mean ± std over seeds of every metric, and the mAP gain over `baseline` (the
    first version by default). The ablation is paired (the same seed trains every label version), so the gain
    counts (`gain_over_2std`) when the mean of the per-seed paired differences exceeds two of their standard
    deviations (`mAP_gain_std`); where the versions share fewer than two seeds there are no pairs to read, and
    the gain must exceed two standard deviations of either arm's per-seed mAPs instead."""
    names = list(dict.fromkeys(r["labels"] for r in per_seed))
    baseline = baseline or (names[0] if names else None)
    metric_names = [m for m in per_seed[0] if m not in ("labels", "labels_ref", "seed", "model")] if per_seed else []
    rows = []
    for name in names:
        runs = [r for r in per_seed if r["labels"] == name]
        row = {"labels": name, "labels_ref": runs[0]["labels_ref"], "seeds": len(runs)}
        for m in metric_names:
            vals = [r[m] for r in runs if r.get(m) is not None and not math.isnan(r[m])]
            if vals:
                row[f"{m}_mean"], row[f"{m}_std"] = mean_std(vals)
        rows.append(row)
    base = next((r for r in rows if r["labels"] == baseline), None)
    base_by_seed = {r["seed"]: r["mAP"] for r in per_seed if r["labels"] == baseline}
    for row in rows:
        if base is not None and row is not base and "mAP_mean" in row:
            gain = row["mAP_mean"] - base["mAP_mean"]
            row["mAP_gain"] = gain
            diffs = [r["mAP"] - base_by_seed[r["seed"]] for r in per_seed
                     if r["labels"] == row["labels"] and r["seed"] in base_by_seed]
            if len(diffs) > 1:
                row["mAP_gain_std"] = mean_std(diffs)[1]
                row["gain_over_2std"] = bool(float(np.mean(diffs)) > 2 * row["mAP_gain_std"])
            else:
                row["gain_over_2std"] = bool(gain > 2 * max(row["mAP_std"], base["mAP_std"]))
    return rows


# Below this many held-out keys the figures depend on which keys are held out more than on the labels: on the
# demo at ~55 keys one arm's mAP moved by ~0.03 between output folders, more than the seeds' std.
FEW_HELDOUT_KEYS = 100


def heldout_note(n_keys: int, holdout_fraction: float, field: str = "train.holdout_fraction") -> str:
    """How many held-out keys the figures rest on (and the config field that held them out), with a warning
    when they are few."""
    note = f"Scored on {n_keys} held-out keys with ground truth ({field} {holdout_fraction:g})."
    if n_keys < FEW_HELDOUT_KEYS:
        note += (f" Fewer than {FEW_HELDOUT_KEYS}: these figures move with which keys are held out as much as with "
                 "the labels; raise ablation.holdout_fraction or add data with ground truth before deciding.")
    return note


def summary_markdown(rows: list[dict], note: str = "") -> str:
    """The ablation table: label version, then mean ± std over seeds of mAP, P, R, F1 and per-group F1, and the
    mAP gain over the first version with its paired std; under it, which reading each ± is, then the note
    (heldout_note: how many held-out keys)."""
    if not rows:
        return ""
    groups = [k[: -len("_f1_mean")] for k in rows[0] if k.endswith("_f1_mean") and k != "f1_mean"]
    base = rows[0]["labels"]
    head = ["labels", "seeds", *METRICS, *(f"{g} F1" for g in groups), f"mAP gain over {base} ± paired std (> 2 std)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["labels"], str(r["seeds"])]
        for m in [*METRICS, *(f"{g}_f1" for g in groups)]:
            cells.append(f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}" if f"{m}_mean" in r else "")
        cells.append("" if "mAP_gain" not in r else f"{r['mAP_gain']:+.3f}"
                     + (f" ± {r['mAP_gain_std']:.3f}" if "mAP_gain_std" in r else "")
                     + f" ({'yes' if r['gain_over_2std'] else 'no'})")
        lines.append("| " + " | ".join(cells) + " |")
    legend = ("± after a metric: sample std over the seeds. The gain: mean over seeds of the paired differences from "
              f"{base} (each seed trains every label version) ± their sample std; yes when it exceeds two of that std "
              "and two of either arm's std.") if len(rows) > 1 else "±: sample std over the seeds."
    return "\n".join(lines) + "\n\n" + legend + "\n" + (f"\n{note}\n" if note else "")


def common_label_system(store: Store, lvs: Mapping[str, Version]) -> Version:
    """The labels version shared by the compared label versions. Compared by content (tag names in id order),
    not by version id: after a code upgrade the same tag list is committed again as a new labels version, and a
    reused baseline's lineage still names the old one."""
    from tasks.shared.labels import load_labels

    tag_lists = {name: tuple(load_labels(store, lv).tags) for name, lv in lvs.items()}
    if len(set(tag_lists.values())) != 1:
        first = next(iter(tag_lists.values()))
        differ = [f"{name} ({lvs[name].ref}, {len(tags)} tags)" for name, tags in tag_lists.items() if tags != first]
        raise StoreError("ablation: the label versions use different label systems: "
                         f"{', '.join(differ)} against {next(iter(lvs))} ({next(iter(lvs.values())).ref}, "
                         f"{len(first)} tags); tag ids would not mean the same tags, so the models would not be "
                         "comparable. Compare versions labelled with one label system.")
    return next(iter(lvs.values()))


def prepare(run) -> None:
    """The training budget, the ground truth and the label system the compared versions share."""
    from tasks.shared.lineage import labels_version
    from tasks.shared.truth import ground_truth_path

    store, cfg, label_versions = run.store, run.cfg, run.inputs["labels"]
    model_cfg, train_cfg, evaluate_cfg = (run.sections[n] for n in ("model", "train", "evaluate"))
    if not label_versions:
        raise StoreError("ablation: no label versions given (ablation.versions, or run the loop first)")
    truth_path = ground_truth_path(evaluate_cfg, "ablation needs a ground truth")
    lvs = {name: labels_version(store, v) for name, v in label_versions.items()}
    missing = [v.ref for name, v in label_versions.items() if lvs[name] is None]
    if missing:
        raise StoreError(f"ablation: {', '.join(missing)} has no labels version in its lineage (not a label version "
                         f"with tag_ids?); give parsed, generated or clean versions")
    labels_version = common_label_system(store, lvs)
    budget = train_cfg.model_copy(update={"steps": cfg.steps or train_cfg.steps, "init": cfg.init,
                                          "fine_tune_latest": False, "freeze_encoder": train_cfg.freeze_encoder
                                          if cfg.freeze_encoder is None else cfg.freeze_encoder,
                                          "holdout_fraction": cfg.holdout_fraction or train_cfg.holdout_fraction})
    holdout_field = "ablation.holdout_fraction" if cfg.holdout_fraction else "train.holdout_fraction"
    run.state.update(truth_path=truth_path, budget=budget, holdout_field=holdout_field, labels_version=labels_version)


def process(run, writer, task):
    from ram_model.metrics import tagging_metrics

    from tasks.shared.labels import load_labels
    from tasks.shared.models import is_holdout
    from tasks.shared.truth import load_ground_truth, multi_hot, normalise_truth, rekey_truth, score_model

    store, cfg, images, label_versions = run.store, run.cfg, run.inputs["images"], run.inputs["labels"]
    model_cfg, evaluate_cfg = run.sections["model"], run.sections["evaluate"]
    truth_path, budget, progress = run.state["truth_path"], run.state["budget"], run.progress
    labels = load_labels(store, run.state["labels_version"])
    truth = rekey_truth(normalise_truth(load_ground_truth(truth_path, evaluate_cfg.format), labels), images)
    image_keys = set(images.read_table(columns=["key"]).column(0).to_pylist())
    held = {k for k in truth if k in image_keys and is_holdout(k, budget.holdout_fraction)}
    if not held:
        raise StoreError(f"ablation: no held-out key of {images.ref} has ground truth in {truth_path} "
                         f"({run.state['holdout_field']} {budget.holdout_fraction}); the truth must cover the data")
    groups: dict[str, list[str]] = {}
    for i, tag in enumerate(labels.tags):
        groups.setdefault(labels.type_of(i), []).append(tag)
    per_seed, records, models = [], [], []
    total = len(label_versions) * len(cfg.seeds)
    for name, lv in label_versions.items():
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            run_cfg = budget.model_copy(update={"name": model_name(name), "seed": seed})
            result = run.run_stage("train", {"train": run_cfg, "model": model_cfg},
                                   {"labels": lv, "images": images, "init": None})
            models.append(result.version)
            order, scores, model = score_model(store, result.version.ref, images, held, evaluate_cfg.batch_size)
            tags = list(model.tags)
            thresholds = model.class_threshold.cpu().numpy()
            truth_mh = multi_hot(truth, order, tags)
            q = tagging_metrics(scores, truth_mh, thresholds, tags)
            row = {"labels": name, "labels_ref": lv.ref, "seed": seed, "model": result.version.ref,
                   **{m: float(q[m]) if q[m] is not None else float("nan") for m in METRICS}}
            for group, gq in group_quality(scores, truth_mh, thresholds, tags, groups).items():
                row.update({f"{group}_{m}": float(v) for m, v in gq.items()})
            per_seed.append(row)
            records += [{"labels": name, "labels_ref": lv.ref, "seed": seed, "model": row["model"], "metric": m,
                         "value": v} for m, v in row.items() if m not in ("labels", "labels_ref", "seed", "model")]
            log.info(f"ablation {len(per_seed)}/{total}: {name} seed {seed}: mAP {q['mAP']:.3f} F1 {q['f1']:.3f} "
                f"({result.status}, {time.perf_counter() - t0:.0f} s)")
            if progress is not None:
                progress(STAGE.output, len(per_seed), total)
    summary = summarise(per_seed)
    note = heldout_note(len(held), budget.holdout_fraction, run.state["holdout_field"])
    if len(held) < FEW_HELDOUT_KEYS:
        log.warning("ablation: %s", note)
    table = pa.Table.from_pylist(records, schema=ABLATION)
    return writer.write_part(task.name, table=table, rows_in=table.num_rows, metrics={
        "summary": summary, "per_seed": per_seed, "markdown": summary_markdown(summary, note), "note": note,
        "heldout_keys": len(held), "models": [m.ref for m in models]})


# Its trainings run the train stage through the runner (`runs`): the train stage's code is part of its identity.
STAGE = Stage(name="ablation", output="ablation", inputs=("images", Input("labels", "versions")), section="ablation",
              also=("model", "train", "evaluate"), files=("evaluate.ground_truth",), runs=("train",),
              version=STAGE_VERSION, prepare=prepare,
              split=lambda run: [PartTask("ablation", "")], process=process,
              summarize=lambda run, records: records[0].metrics, one_part=True)


def latest_label_versions(store: Store, refs: list[str] | None = None) -> dict[str, Version]:
    """The label versions to compare: the given refs (stage@version; names are their stages), or the
    latest clean version's lineage: its parsed, generated and clean versions."""
    from tasks.shared.lineage import lineage

    if refs:
        out = {}
        for ref in refs:
            v = store.open_ref(ref)
            out[_display_name(v.stage, out)] = v
        return out
    if not store.versions("clean"):
        raise StoreError("ablation: no clean version in the store; run the loop first or give label versions")
    clean = store.versions("clean")[-1]
    found = {v.stage: v for _, v, _ in lineage(store, clean) if v is not None}
    out = {}
    for stage, name in (("parsed", "parsed"), ("generated", "parsed+generated"), ("clean", "cleaned")):
        if stage in found:
            out[name] = found[stage]
    return out


def _display_name(stage: str, taken: Mapping[str, Version]) -> str:
    name = {"generated": "parsed+generated", "clean": "cleaned"}.get(stage, stage)
    n, base = 2, name
    while name in taken:
        name, n = f"{base}#{n}", n + 1
    return name
