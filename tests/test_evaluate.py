"""Evaluation functions on hand-computed examples, and the ground-truth readers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ram_model.metrics import average_precision, label_quality, tagging_metrics
from tasks.stages.evaluate import ABLATION_COLUMNS, ablation_columns, ablation_table, evaluation_table, rows_to_markdown
from tasks.shared.truth import load_ground_truth, multi_hot

TRUTH = {"a": {"cat"}, "b": {"car", "tree"}, "c": {"sky"}}
PRED = {"a": {"cat", "dog"}, "b": {"car"}, "c": set(), "z": {"cat"}}


def test_label_quality_by_hand():
    q = label_quality(PRED, TRUTH, groups={"animals": ["cat", "dog"], "things": ["car", "tree", "sky"]})
    # tp: a/cat, b/car; fp: a/dog; fn: b/tree, c/sky; key z has no truth and is not scored.
    assert (q["tp"], q["fp"], q["fn"]) == (2, 1, 2)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(0.5)
    assert q["f1"] == pytest.approx(4 / 7)
    assert q["n_keys"] == 3 and q["keys_without_truth"] == 1 and q["labels_per_key"] == pytest.approx(1.0)
    assert q["per_tag"]["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 0,
                                   "support": 0}
    assert q["per_tag"]["cat"]["f1"] == 1.0 and q["per_tag"]["tree"]["support"] == 1
    assert q["per_group"]["animals"]["precision"] == pytest.approx(0.5)
    assert q["per_group"]["things"]["recall"] == pytest.approx(1 / 3)
    assert q["macro_f1"] == pytest.approx((1 + 0 + 1 + 0 + 0) / 5)   # cat, dog, car, tree, sky


def test_label_quality_subset_of_keys_and_errors():
    q = label_quality(PRED, TRUTH, keys=["a"])
    assert (q["tp"], q["fp"], q["fn"]) == (1, 1, 0)
    with pytest.raises(KeyError, match="no ground truth"):
        label_quality(PRED, TRUTH, keys=["a", "nope"])
    empty = label_quality({}, {"x": set()})
    assert empty["precision"] == empty["recall"] == empty["f1"] == 0.0


def test_tagging_metrics_by_hand():
    scores = np.array([[0.9, 0.9, 0.9], [0.8, 0.8, 0.8], [0.7, 0.7, 0.7], [0.6, 0.6, 0.6]])
    truth = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    q = tagging_metrics(scores, truth, 0.75, tags=["x", "y", "z"])
    # class x: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; class y: rank 4 -> 1/4; z has no positives.
    assert q["per_class"]["ap"][0] == pytest.approx(5 / 6) and q["per_class"]["ap"][1] == pytest.approx(0.25) and q["per_class"]["ap"][2] is None
    assert q["mAP"] == pytest.approx((5 / 6 + 0.25) / 2) and q["num_tags_present"] == 2
    # Above 0.75: rows 0 and 1 for every class -> tp 1 (x row 0), fp 5, fn 2 (x row 2, y row 3).
    assert (q["tp"], q["fp"], q["fn"]) == (1, 5, 2)
    assert q["precision"] == pytest.approx(1 / 6) and q["recall"] == pytest.approx(1 / 3)
    per_class = tagging_metrics(scores, truth, [0.95, 0.55, 2.0])
    # x: nothing above 0.95 (fn 2); y: every row above 0.55 (tp 1, fp 3); z: nothing above 2.
    assert (per_class["tp"], per_class["fp"], per_class["fn"]) == (1, 3, 2)
    assert q["ap_by_tag"]["y"] == pytest.approx(0.25)
    # Strictly above the threshold, as RAM's model predicts.
    assert tagging_metrics(scores, truth, 0.9)["tp"] == 0


def test_average_precision_counts_ties_as_one_threshold():
    # Positives at ranks 1 and 3 of distinct scores: (1/1 + 2/3) / 2.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # Rows 2 and 3 tie: one cut with precision 2/3 whatever the order of the tied rows.
    assert average_precision([0.9, 0.7, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert average_precision([0.9, 0.7, 0.7, 0.6], [1, 1, 0, 0]) == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="no positives"):
        average_precision([0.5, 0.4], [0, 0])


def test_undefined_map_is_none_and_left_out_of_the_table():
    q = tagging_metrics(np.array([[0.9], [0.1]]), np.array([[0], [0]]), 0.5)
    assert q["mAP"] is None and q["per_class"]["ap"] == [None] and q["fp"] == 1
    table = evaluation_table([{"stage": "model:m", "precision": 0.0, "mAP": q["mAP"]}],
                             metrics=("precision", "mAP"))
    assert table.column("metric").to_pylist() == ["precision"]


def test_tagging_metrics_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        tagging_metrics(np.zeros((3, 2)), np.zeros((3, 3)), 0.5)
    with pytest.raises(ValueError, match="thresholds"):
        tagging_metrics(np.zeros((3, 2)), np.zeros((3, 2)), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="only 0 and 1"):
        tagging_metrics(np.zeros((3, 2)), np.full((3, 2), 2), 0.5)


def test_multi_hot():
    m = multi_hot({"a": {"cat", "unknown"}, "b": {"car"}}, ["a", "b", "missing"], ["cat", "car"])
    assert m.tolist() == [[1, 0], [0, 1], [0, 0]]


def test_ablation_table_and_markdown():
    stages = {"parsed": {"a": {"cat"}, "b": {"car"}, "c": set()},
              "parsed+generated": {"a": {"cat", "dog"}, "b": {"car", "tree"}, "c": {"sky"}},
              "cleaned": {"a": {"cat"}, "b": {"car", "tree"}, "c": {"sky"}}}
    rows = ablation_table(stages, TRUTH, groups={"animals": ["cat", "dog"]})
    assert [r["stage"] for r in rows] == list(stages)
    assert list(rows[0])[:len(ABLATION_COLUMNS)] == list(ABLATION_COLUMNS)
    assert rows[0]["precision"] == 1.0 and rows[0]["recall"] == pytest.approx(0.5)
    assert rows[1]["precision"] == pytest.approx(0.8) and rows[1]["recall"] == 1.0
    assert rows[2]["f1"] == 1.0 and rows[2]["animals_f1"] == 1.0
    md = rows_to_markdown(rows)
    lines = md.strip().split("\n")
    assert lines[0].startswith("| stage | n_keys | labels_per_key | precision |")
    assert lines[1] == "|" + "---|" * len(rows[0])
    assert lines[3].startswith("| parsed+generated | 3 | 1.667 | 0.800 | 1.000 |")
    assert rows_to_markdown([{"stage": "a|b"}]).split("\n")[2] == "| a\\|b |"
    t = evaluation_table(rows)
    from storage.schemas import EVALUATION
    assert t.schema == EVALUATION and t.num_rows == 12
    assert t.filter(pc.equal(t["metric"], "f1"))["value"].to_pylist()[2] == 1.0


def test_openimages_format(tmp_path: Path):
    p = tmp_path / "openimages_common_214_ram_annots.txt"
    p.write_text("test/0a1b,person,traffic light,car\r\ntest/0c2d\n\ntest/0e3f,dog, cat ,\n")
    gt = load_ground_truth(p)
    assert gt == {"test/0a1b": {"person", "traffic light", "car"}, "test/0c2d": set(), "test/0e3f": {"dog", "cat"}}
    by_stem = load_ground_truth(p, key_fn=lambda k: Path(k).stem, vocabulary={"car", "dog", "cat"})
    assert by_stem == {"0a1b": {"car"}, "0c2d": set(), "0e3f": {"dog", "cat"}}
    p.write_text("x/a,dog\ny/a,cat\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_ground_truth(p, key_fn=lambda k: Path(k).stem)


def test_demo_json_and_parquet_formats(tmp_path: Path):
    jl = tmp_path / "ground_truth.jsonl"
    jl.write_text(json.dumps({"key": "k1", "tags": ["ball", "red"], "objects": []}) + "\n\n"
                  + json.dumps({"key": "k2", "tags": []}) + "\n")
    assert load_ground_truth(jl) == {"k1": {"ball", "red"}, "k2": set()}
    js = tmp_path / "gt.json"
    js.write_text(json.dumps({"k1": ["sky"]}))
    assert load_ground_truth(js) == {"k1": {"sky"}}
    pqf = tmp_path / "gt.parquet"
    pq.write_table(pa.table({"key": ["k1", "k2"], "tags": [["a"], None]}), pqf)
    assert load_ground_truth(pqf) == {"k1": {"a"}, "k2": set()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "k1"}\n')
    with pytest.raises(ValueError, match="'key' and 'tags'"):
        load_ground_truth(bad)
    with pytest.raises(FileNotFoundError):
        load_ground_truth(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="fmt must be"):
        load_ground_truth(jl, fmt="csv")


def test_best_f1_thresholds_by_hand():
    from ram_model.metrics import best_f1_thresholds
    scores = np.array([[0.9, 0.5, 0.9], [0.8, 0.5, 0.9], [0.3, 0.5, 0.1], [0.2, 0.5, 0.9]])
    targets = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    thr = best_f1_thresholds(scores, targets, current=[0.6, 0.7, 0.6], grid=np.array([0.1, 0.5, 0.85]),
                             min_precision=0.5)
    # class 0: F1 2/3, 1, 2/3 -> 0.5; class 1 has no positive: kept; class 2: never precise -> disabled.
    assert thr == [0.5, 0.7, 1.0]


def test_tables_lead_with_what_a_row_is_and_metrics_show_no_raw_structures(tmp_path: Path):
    """Manifests store rows with sorted keys: the removal table must not open with base_rate, nor the
    per-seed ablation with precision before its labels; pre-rendered markdown, lists and empty counters
    must not reach the CLI or an artifact as Python reprs or blanks."""
    from storage import Store, Version
    from tasks.shared.lineage import display_metrics

    def display_metrics_of(folder: Path, metrics: dict) -> dict:
        version = Version(Store(str(folder)), {"metrics": metrics})
        return {name: (kind, value) for name, kind, value in display_metrics(version.store, version)}

    removal = [{"base_rate": 0.19, "reason": "outlier", "removal_precision": 0.505, "removal_recall": 0.163,
                "removed": 97, "removed_wrong": 49, "wrong_localisable_in": 300}]
    per_seed = [{"f1": 0.39, "labels": "parsed", "labels_ref": "parsed/x", "mAP": 0.515, "model": "models/a/1",
                 "object_f1": 0.04, "precision": 0.94, "recall": 0.25, "seed": 0}]
    assert ablation_columns(removal) == ["reason", "removal_precision", "removal_recall", "removed", "removed_wrong",
                                         "wrong_localisable_in", "base_rate"]
    assert ablation_columns(per_seed) == ["labels", "seed", "precision", "recall", "f1", "mAP", "object_f1",
                                          "labels_ref", "model"]
    assert rows_to_markdown(removal).startswith("| reason | removal_precision |")
    shown = display_metrics_of(tmp_path, {"cleaning_removal": removal, "markdown": "| pre-rendered |",
                                          "cleaning_removal_markdown": rows_to_markdown(removal),
                                          "models": ["models/a/1", "models/b/2"], "reject_reasons": {},
                                          "per_seed": per_seed, "coverage": 0.82512})
    assert shown == {"cleaning_removal": ("table", removal), "models": ("value", "models/a/1, models/b/2"),
                     "reject_reasons": ("value", "(none)"), "per_seed": ("table", per_seed),
                     "coverage": ("value", "0.825")}


def test_precision_lower_bound_is_scipys_wilson_bound():
    """The one-sided bound at 95 % is the low end of scipy's two-sided 90 % Wilson interval, count by count."""
    from scipy.stats import binomtest

    from ram_model.metrics import precision_lower_bound

    right = np.array([0, 1, 12, 9, 20, 500])
    predicted = np.array([3, 1, 20, 10, 20, 1000])
    ours = precision_lower_bound(right, predicted, 0.95)
    theirs = [binomtest(int(k), int(n)).proportion_ci(confidence_level=0.90, method="wilson").low
              for k, n in zip(right, predicted)]
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert precision_lower_bound(np.array([0, 7]), np.array([0, 10]), 0.5).tolist() == [0.0, 0.7]
    with pytest.raises(ValueError, match="confidence must be in"):
        precision_lower_bound(right, predicted, 0.3)


def test_a_class_precise_on_a_few_lucky_predictions_is_disabled():
    """12 right of 20 held-out predictions reach 0.6 as measured, not 0.5 with 95 % confidence (the demo's
    "ring", which then added 100 tags, 8 of them right); 45 of 50 do."""
    from ram_model.metrics import best_f1_thresholds

    def column(right: int, wrong: int, missed: int):
        scores = np.r_[np.full(right + wrong, 0.9), np.full(missed, 0.1)]
        targets = np.r_[np.ones(right), np.zeros(wrong), np.ones(missed)]
        return scores, targets

    lucky, steady = column(12, 8, 5), column(45, 5, 5)
    n = max(len(lucky[0]), len(steady[0]))
    scores = np.zeros((n, 2))
    targets = np.zeros((n, 2))
    for j, (s, t) in enumerate((lucky, steady)):
        scores[: len(s), j], targets[: len(t), j] = s, t
    grid = np.array([0.5])
    assert best_f1_thresholds(scores, targets, [0.3, 0.3], grid, min_precision=0.6) == [0.5, 0.5]
    assert best_f1_thresholds(scores, targets, [0.3, 0.3], grid, min_precision=0.5, confidence=0.95) == [1.0, 0.5]
