"""Label and model quality against ground truth, and the data-engine ablation table.

Ground truth is read and matched to the store by `tasks/shared/truth.py`. Labels are compared as sets of tag strings per sample key; the metrics themselves (label quality,
AP, mAP) are `ram_model.metrics`, the one implementation the training loop uses too.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from ram_model.metrics import Labels, label_quality, tagging_metrics
from storage import StoreError

from tasks.engine.runner import Input, PartTask, Stage
from tasks.shared.truth import ground_truth_path, load_ground_truth, multi_hot, normalise_truth, rekey_truth, score_model

ABLATION_COLUMNS = ("stage", "n_keys", "labels_per_key", "precision", "recall", "f1", "tp", "fp", "fn")


def ablation_table(stage_labels: Mapping[str, Labels], truth: Labels, keys: Iterable[str] | None = None,
                   groups: Mapping[str, Iterable[str]] | None = None) -> list[dict]:
    """One row per stage (in the mapping's order) of label quality against the truth.

    The paper's data-engine ablation: e.g. {"parsed": ..., "parsed+generated": ..., "cleaned": ...,
    "model": ...}. Each row has the ABLATION_COLUMNS, plus `<group>_f1` per group when given.
    All stages are scored over the same keys (default: every key of the truth).
    """
    keys = list(truth.keys()) if keys is None else list(keys)
    rows = []
    for stage, labels in stage_labels.items():
        q = label_quality(labels, truth, keys=keys, groups=groups)
        row = {"stage": stage, **{c: q[c] for c in ABLATION_COLUMNS[1:]}}
        for g, v in q.get("per_group", {}).items():
            row[f"{g}_f1"] = v["f1"]
        rows.append(row)
    return rows


REMOVAL_REASONS = ("outlier", "baseline-disagrees", "no-box")


def removal_quality(removed: Mapping[str, Iterable[tuple[str, str]]], cleaning_input: Labels, truth: Labels,
                    localisable: Iterable[str], keys: Iterable[str] | None = None) -> list[dict]:
    """How well cleaning removed wrong tags, per reason and over all ("all").

    `removed`: {key: [(tag, reason), ...]} what cleaning removed; `cleaning_input`: {key: tags} what it
    was given (kept + removed); `localisable`: the tags cleaning can judge (objects). Scored over the
    truth's keys (or `keys`). Removal precision: the share of removed (key, tag) pairs that are wrong
    (not in the truth); recall: the share of wrong localisable input pairs that were removed.
    Random removal scores a precision equal to the input's wrong share (`base_rate`).
    """
    keys = [k for k in (truth.keys() if keys is None else keys) if k in truth]
    loc = set(localisable)
    wrong_loc = wrong_all = n_loc = 0
    removed_by: dict[str, list[bool]] = {r: [] for r in REMOVAL_REASONS}
    for k in keys:
        true = truth[k]
        for t in set(cleaning_input.get(k, ())):
            wrong_all += t not in true
            if t in loc:
                n_loc += 1
                wrong_loc += t not in true
        for t, reason in removed.get(k, ()):
            removed_by.setdefault(reason, []).append(t not in true)
    rows = []
    every = [w for flags in removed_by.values() for w in flags]
    for reason, flags in [("all", every), *removed_by.items()]:
        n, wrong = len(flags), sum(flags)
        rows.append({"reason": reason, "removed": n, "removed_wrong": wrong,
                     "removal_precision": wrong / n if n else 0.0,
                     "removal_recall": wrong / wrong_loc if wrong_loc else 0.0,
                     "wrong_localisable_in": wrong_loc,
                     "base_rate": wrong_loc / n_loc if n_loc else 0.0})
    return rows


def cleaning_removals(clean_version, labels) -> tuple[dict[str, list[tuple[str, str]]], dict[str, set[str]]]:
    """From a `clean` version: ({key: [(removed tag, reason)]}, {key: cleaning input tags = kept + removed})."""
    removed: dict[str, list[tuple[str, str]]] = {}
    given: dict[str, set[str]] = {}
    for batch in clean_version.iter_batches(columns=["key", "tag_ids", "removed_tag_ids", "removed_reasons"]):
        cols = batch.to_pydict()
        for key, kept, gone, why in zip(cols["key"], cols["tag_ids"], cols["removed_tag_ids"],
                                        cols["removed_reasons"]):
            pairs = [(labels.name(t), r) for t, r in zip(gone or [], why or [])]
            removed.setdefault(key, []).extend(pairs)
            given.setdefault(key, set()).update(labels.name(t) for t in (kept or []))
            given[key].update(t for t, _ in pairs)
    return removed, given


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def ablation_columns(rows: Sequence[Mapping]) -> list[str]:
    """The columns of evaluation tables (label quality, cleaning removal, ablation seeds) in reading order:
    what a row is (stage, labels, seed, reason), the quality figures, any other column, then the counts and
    references. Rows read back from a manifest have their keys sorted, so order is not kept."""
    present: list[str] = []
    for r in rows:
        present += [c for c in r if c not in present]
    lead = ["stage", "labels", "seed", "reason", "n_keys", "labels_per_key", "precision", "recall", "f1", "mAP",
            "removal_precision", "removal_recall", "removed", "removed_wrong"]
    tail = ["tp", "fp", "fn", "wrong_localisable_in", "base_rate", "labels_ref", "model"]
    first = [c for c in lead if c in present]
    return first + sorted(c for c in present if c not in lead + tail) + [c for c in tail if c in present]


def rows_to_markdown(rows: Sequence[Mapping]) -> str:
    """A GitHub markdown table of ablation rows (columns in `ablation_columns` order, floats to 3 places)."""
    if not rows:
        return ""
    cols = ablation_columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def evaluation_table(rows: Sequence[Mapping], metrics: Sequence[str] = ("precision", "recall", "f1",
                                                                          "labels_per_key")):
    """Ablation rows as an Arrow table in the `evaluate` stage schema (stage, metric, value)."""
    import pyarrow as pa
    from storage.schemas import EVALUATION
    # An undefined metric (mAP without positives) is left out rather than written as a number.
    recs = [{"stage": r["stage"], "metric": m, "value": float(r[m])} for r in rows for m in metrics
            if r.get(m) is not None]
    return pa.Table.from_pylist(recs, schema=EVALUATION)


# ---------------------------------------------------------------------------------------------
# The stage over the store: label quality of every stage and the models' quality, one version.

STAGE_VERSION = "evaluate-2"   # 2: cleaning removal precision / recall per reason


def key_tag_names(version, labels) -> dict[str, set[str]]:
    """Tag names per key of a version with `tag_ids` (unioned over a key's rows)."""
    from tasks.shared.lineage import key_tags

    return {k: {labels.name(i) for i in ids} for k, ids in key_tags(version).items()}


def prepare(run) -> None:
    from tasks.shared.models import model_version

    run.state["truth_path"] = ground_truth_path(run.cfg, "evaluate.ground_truth is not set")
    run.state["model_versions"] = {name: model_version(run.store, ref) for name, ref in run.inputs["models"].items()}


def process(run, writer, task):
    from tasks.shared.lineage import labels_version
    from tasks.shared.labels import load_labels
    from tasks.shared.models import is_holdout

    store, cfg, images = run.store, run.cfg, run.inputs["images"]
    label_versions, models = run.inputs["labels"], run.inputs["models"]
    truth_path, model_versions = run.state["truth_path"], run.state["model_versions"]
    first = next(iter(label_versions.values()))
    labels = load_labels(store, labels_version(store, first))
    truth = rekey_truth(normalise_truth(load_ground_truth(truth_path, cfg.format), labels), images)
    keys = [k for k in truth if k in set(images.read_table(columns=["key"]).column(0).to_pylist())]
    if not keys:
        raise StoreError(f"no key of {truth_path} is in {images.ref}: the ground truth does not belong to this data")
    stage_labels = {name: key_tag_names(v, labels) for name, v in label_versions.items()}
    rows = ablation_table(stage_labels, truth, keys=keys)
    model_rows = []
    for name, ref in models.items():
        mv = model_versions[name]
        fraction = (mv.manifest["config"]["train"]["holdout_fraction"] if mv is not None else 0.0)
        held = {k for k in keys if is_holdout(k, fraction)} if fraction > 0 else set(keys)
        if not held:
            continue
        order, scores, model = score_model(store, ref, images, held, cfg.batch_size)
        tags = list(model.tags)
        truth_mh = multi_hot(truth, order, tags)
        q = tagging_metrics(scores, truth_mh, model.class_threshold.cpu().numpy(), tags)
        predicted = {k: {tags[j] for j in np.flatnonzero(scores[i] > model.class_threshold.cpu().numpy())}
                     for i, k in enumerate(order)}
        lq = label_quality(predicted, truth, keys=order)
        model_rows.append({"stage": f"model:{name}", "n_keys": len(order), "labels_per_key": lq["labels_per_key"],
                           "precision": q["precision"], "recall": q["recall"], "f1": q["f1"], "mAP": q["mAP"],
                           "tp": q["tp"], "fp": q["fp"], "fn": q["fn"]})
    all_rows = rows + model_rows
    removal = []
    for v in label_versions.values():
        if v.stage == "clean":   # what cleaning removed, judged against the truth, per reason
            removed, given = cleaning_removals(v, labels)
            localisable = [labels.name(i) for i in range(len(labels)) if labels.type_of(i) == "object"]
            removal = removal_quality(removed, given, truth, localisable, keys=keys)
    table = evaluation_table(all_rows + [{"stage": f"cleaning:{r['reason']}", **r} for r in removal],
                             metrics=("precision", "recall", "f1", "labels_per_key", "mAP", "n_keys",
                                      "removal_precision", "removal_recall", "removed", "base_rate"))
    markdown = rows_to_markdown(all_rows)
    return writer.write_part(task.name, table=table, rows_in=table.num_rows, metrics={
        "ablation": all_rows, "markdown": markdown, "truth_keys": len(keys), "cleaning_removal": removal,
        "cleaning_removal_markdown": rows_to_markdown(removal)})


STAGE = Stage(name="evaluate", output="evaluate",
              inputs=("images", Input("labels", "versions"), Input("models", "models")), section="evaluate",
              files=("evaluate.ground_truth",), version=STAGE_VERSION, prepare=prepare,
              split=lambda run: [PartTask("evaluation", "")],
              process=process, summarize=lambda run, records: records[0].metrics, one_part=True)
