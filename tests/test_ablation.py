"""The ablation's arithmetic, cleaning's removal precision / recall, and declared tag types."""
from __future__ import annotations

from collections import Counter

import pytest

from ram_model.labels import LabelSystem, build_label_system
from storage import Store, StoreError
from tasks.stages.ablation import common_label_system, heldout_note, mean_std, model_name, summarise, summary_markdown
from tasks.stages.evaluate import removal_quality


def seed_rows(name, maps):
    return [{"labels": name, "labels_ref": f"{name}@v", "seed": s, "model": f"models/x@{s}", "mAP": m,
             "precision": 0.5, "recall": 0.5, "f1": 0.5, "object_f1": 0.4} for s, m in enumerate(maps)]


def test_summary_is_mean_and_std_over_seeds_with_the_gain_test():
    rows = summarise(seed_rows("parsed", [0.50, 0.52, 0.54]) + seed_rows("cleaned", [0.60, 0.61, 0.62])
                     + seed_rows("noisy", [0.40, 0.60, 0.80]))
    parsed, cleaned, noisy = rows
    assert parsed["seeds"] == 3 and parsed["mAP_mean"] == pytest.approx(0.52)
    assert parsed["mAP_std"] == pytest.approx(0.02)        # sample std (ddof 1)
    assert "mAP_gain" not in parsed                         # the first version is the reference
    assert cleaned["mAP_gain"] == pytest.approx(0.09) and cleaned["gain_over_2std"] is True
    assert noisy["mAP_gain"] == pytest.approx(0.08) and noisy["gain_over_2std"] is False   # std 0.2
    table = summary_markdown(rows)
    assert "| cleaned | 3 | 0.610 ± 0.010 |" in table and "object F1" in table and "+0.090 ± 0.010 (yes)" in table
    assert cleaned["mAP_gain_std"] == pytest.approx(0.01)   # paired by seed: 0.10, 0.09, 0.08
    assert mean_std([0.3]) == (0.3, 0.0)
    assert model_name("parsed+generated") == "ablation-parsed-generated"


def test_the_table_says_how_many_held_out_keys_it_rests_on():
    rows = summarise(seed_rows("parsed", [0.50, 0.52]) + seed_rows("cleaned", [0.60, 0.61]))
    few, many = heldout_note(55, 0.1), heldout_note(200, 0.33, "ablation.holdout_fraction")
    assert few.startswith("Scored on 55 held-out keys with ground truth (train.holdout_fraction 0.1). Fewer than 100")
    assert "raise ablation.holdout_fraction" in few
    assert many == "Scored on 200 held-out keys with ground truth (ablation.holdout_fraction 0.33)."
    assert summary_markdown(rows, few).endswith("\n" + few + "\n")
    # which reading the ± is: over seeds for an arm, over the per-seed paired differences for the gain
    table = summary_markdown(rows, many)
    assert "| mAP gain over parsed ± paired std (> 2 std) |" in table and "| +0.095 ± 0.007 (yes) |" in table
    assert ("± after a metric: sample std over the seeds. The gain: mean over seeds of the paired differences from "
            "parsed (each seed trains every label version) ± their sample std") in table
    assert table.index("paired differences") < table.index("Scored on 200 held-out keys")
    assert summary_markdown(rows[:1]).endswith("±: sample std over the seeds.\n")


def test_the_gain_is_read_against_the_paired_std():
    # arms steady (std 0.01) but the paired differences swing (seed 0 helped by 0.06, seed 2 by 0.00):
    # the gain 0.03 beats 2 x the arms' std and fails 2 x the paired std (0.03): not counted
    rows = summarise(seed_rows("parsed", [0.50, 0.51, 0.52]) + seed_rows("cleaned", [0.56, 0.54, 0.52]))
    assert rows[1]["mAP_gain"] == pytest.approx(0.03) and rows[1]["mAP_gain_std"] == pytest.approx(0.03)
    assert rows[1]["gain_over_2std"] is False
    # a steady paired gain with noisy arms (seeds move both arms alike): the pairs see it, the arms would not
    rows = summarise(seed_rows("parsed", [0.40, 0.50, 0.60]) + seed_rows("cleaned", [0.45, 0.55, 0.65]))
    assert rows[1]["mAP_gain_std"] == pytest.approx(0.0, abs=1e-9) and rows[1]["gain_over_2std"] is True
    # one seed: no paired std, the arms' reading alone (both stds 0)
    rows = summarise(seed_rows("parsed", [0.5]) + seed_rows("cleaned", [0.6]))
    assert "mAP_gain_std" not in rows[1] and rows[1]["gain_over_2std"] is True


def test_removal_precision_and_recall_per_reason():
    truth = {"a": {"ball", "red", "sand"}, "b": {"star", "blue"}, "c": {"kite"}}
    given = {"a": {"ball", "red", "sand", "kite", "moon"}, "b": {"star", "blue", "ring"}, "c": {"kite"},
             "z": {"flag"}}                                  # z has no truth: not scored
    removed = {"a": [("kite", "outlier"), ("ball", "outlier"), ("moon", "no-box")],
               "b": [("ring", "baseline-disagrees")], "z": [("flag", "outlier")]}
    objects = {"ball", "star", "kite", "moon", "ring", "flag"}
    rows = {r["reason"]: r for r in removal_quality(removed, given, truth, objects)}
    # wrong localisable pairs given: a/kite, a/moon, b/ring -> 3; localisable pairs given: 6
    assert rows["all"]["removed"] == 4 and rows["all"]["removed_wrong"] == 3
    assert rows["all"]["removal_precision"] == pytest.approx(0.75) and rows["all"]["removal_recall"] == 1.0
    assert rows["all"]["base_rate"] == pytest.approx(0.5)
    assert rows["outlier"]["removal_precision"] == pytest.approx(0.5)
    assert rows["outlier"]["removal_recall"] == pytest.approx(1 / 3)
    assert rows["no-box"]["removal_precision"] == 1.0 and rows["baseline-disagrees"]["removed"] == 1
    # nothing removed, nothing wrong: zeros, not a division error
    empty = {r["reason"]: r for r in removal_quality({}, {"c": {"kite"}}, truth, objects)}
    assert empty["all"]["removal_precision"] == 0.0 and empty["all"]["removal_recall"] == 0.0


def test_tag_types_are_declared_saved_and_checked(tmp_path):
    labels = LabelSystem(["ball", "Red", "sand"], types=["object", "Attribute", "scene"])
    assert labels.type_of(1) == "attribute"
    back = LabelSystem.from_dir(labels.save(tmp_path / "l"))
    assert back.types == ["object", "attribute", "scene"]
    assert LabelSystem(["ball"]).types is None and LabelSystem(["ball"]).type_of(0) == "unknown"
    with pytest.raises(ValueError, match="2 tag types for 3 tags"):
        LabelSystem(["ball", "red", "sand"], types=["object", "scene"])
    with pytest.raises(ValueError, match=r"line 2 is 'colour' \(tag 'red'\)"):
        LabelSystem(["ball", "red"], types=["object", "colour"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tag_list.txt").write_text("ball\nred\n")
    (tmp_path / "bad" / "tag_types.txt").write_text("object\n")
    with pytest.raises(ValueError, match="1 tag types for 2 tags"):
        LabelSystem.from_dir(tmp_path / "bad")


def test_a_built_label_system_freezes_the_majority_type():
    counts = Counter({"orange": 10, "ball": 8, "fruit": 1})
    types = {"orange": Counter({"attribute": 6, "object": 4}), "balls": Counter({"object": 3})}
    labels = build_label_system(counts, top_k=2, synonyms={"balls": "ball"}, type_counts=types)
    assert labels.tags == ["orange", "ball"] and labels.types == ["attribute", "object"]
    untyped = build_label_system(counts, top_k=3, type_counts={})
    assert untyped.types == ["unknown"] * 3


def test_a_tag_list_file_picks_up_the_types_beside_it(tmp_path):
    from tasks.demo.world import generate_world
    from tasks.shared.labels import resolve_label_system

    world = generate_world(tmp_path / "w", 3, seed=1)
    labels = resolve_label_system(str(world.tag_list))
    assert labels.types[labels.id("ball")] == "object" and labels.types[labels.id("red")] == "attribute"
    assert labels.types[labels.id("grass")] == "scene"


def test_undeclared_types_come_from_the_parser_once():
    from tasks.shared.labels import declare_tag_types
    from tasks.parser import default_parser

    typed = declare_tag_types(LabelSystem(["dog", "beach", "red", "running"]), default_parser())
    assert typed.types[:3] == ["object", "scene", "attribute"]
    assert typed.types[3] in ("action", "unknown")


def test_label_versions_compare_by_their_tag_lists_not_their_ids(tmp_path):
    # After a code upgrade the same tag list is committed again as a new labels version while a reused baseline's
    # lineage still names the old one: the demo rerun in its folder failed with "different label systems".
    from tasks.shared.labels import register_labels

    store = Store(str(tmp_path / "store"))
    before = register_labels(store, LabelSystem(["cat", "dog", "red"]), note="before the upgrade")
    after = register_labels(store, LabelSystem(["cat", "dog", "red"]), note="after the upgrade")
    assert before.id != after.id
    assert common_label_system(store, {"parsed": after, "clean": before}) is after
    other = register_labels(store, LabelSystem(["cat", "bird", "red"]))
    with pytest.raises(StoreError, match=r"different label systems: clean \(labels/.*3 tags\) against parsed"):
        common_label_system(store, {"parsed": after, "clean": other})
