"""The label system: ids, synonyms, plurals, multi-word precedence, unknowns, build, save/load."""
from __future__ import annotations

from collections import Counter

import pytest

from ram_model.labels import LabelSystem, base_forms, build_label_system, default_synonyms, normalize


@pytest.fixture(scope="module")
def ram():
    return LabelSystem.default()


def small(**kw):
    tags = ["person", "tennis racket", "racket", "tennis", "French fries", "dog", "ride", "sit", "leaf"]
    return LabelSystem(tags, **kw)


def test_default_is_rams_list(ram):
    assert len(ram) == 4585
    assert ram.name(0) == "3D CG rendering"
    assert ram.id("person") == 2163 and ram.thresholds[2163] == 0.86   # line 2164
    assert ram.chinese[ram.id("dog")] == "狗"
    assert ram.has_thresholds and ram.synonyms


def test_default_synonyms_point_into_the_list(ram):
    syn = default_synonyms()
    assert syn["people"] == "person"
    for surface, tag in syn.items():
        assert ram.id(surface) == ram.id(tag), surface


def test_exact_case_insensitive():
    ls = small()
    assert ls.map(["Dog", " french  FRIES "]) == ([5, 4], [])


def test_synonyms_share_one_id():
    ls = small(synonyms={"people": "person", "human": "person", "racquet": "racket"})
    assert ls.map(["people", "human", "person", "racquets"]) == ([0, 2], [])


def test_plurals_and_base_forms():
    ls = small()
    assert ls.map(["dogs", "leaves", "rackets", "riding", "sitting"]) == ([5, 8, 2, 6, 7], [])
    assert "leaf" in base_forms("leaves") and "sit" in base_forms("sitting")
    assert base_forms("sliced") == []     # participles are not reduced


def test_multi_word_before_parts():
    ls = small()
    assert ls.map(["tennis racket"]) == ([1], [])
    assert ls.map(["tennis rackets"]) == ([1], [])
    # an unknown compound splits into its longest known parts; the rest is reported
    assert ls.map(["red tennis racket"]) == ([1], ["red"])
    assert ls.map(["dog tennis"]) == ([5, 3], [])


def test_unknowns_returned_and_counted():
    ls = small()
    ids, unknown = ls.map(["dog", "zebra", "honda dog", "zebra"])
    assert ids == [5] and unknown == ["zebra", "honda"]
    ls.map(["zebra"])
    assert ls.unknown_counts == Counter({"zebra": 2, "honda": 1})
    assert ls.map([]) == ([], [])
    assert ls.map(["", "  "]) == ([], [])


def test_validation_errors():
    with pytest.raises(ValueError, match="repeats line 1"):
        LabelSystem(["dog", "Dog"])
    with pytest.raises(ValueError, match="not in the tag list"):
        LabelSystem(["dog"], synonyms={"puppy": "hound"})
    with pytest.raises(ValueError, match="is itself a tag"):
        LabelSystem(["dog", "cat"], synonyms={"cat": "dog"})
    with pytest.raises(ValueError, match="2 thresholds for 1 tags"):
        LabelSystem(["dog"], thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        LabelSystem(["dog"], thresholds=[1.5])
    with pytest.raises(ValueError, match="Chinese"):
        LabelSystem(["dog"], chinese=["狗", "猫"])


def test_files_roundtrip(tmp_path):
    ls = small(synonyms={"people": "person"}, thresholds=[0.5] * 9, chinese=[f"c{i}" for i in range(9)])
    d = ls.save(tmp_path / "labels")
    back = LabelSystem.from_dir(d)
    assert back.tags == ls.tags and back.thresholds == ls.thresholds and back.chinese == ls.chinese
    assert back.map(["people"]) == ([0], [])
    only = LabelSystem.from_files(d / "tag_list.txt")
    assert only.chinese is None and not only.has_thresholds and only.thresholds == [0.68] * 9


def test_synonyms_file_errors(tmp_path):
    (tmp_path / "t.txt").write_text("dog\ncat", encoding="utf-8")
    (tmp_path / "s.txt").write_text("# c\npuppy dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="s.txt:2: expected 'surface<TAB>tag'"):
        LabelSystem.from_files(tmp_path / "t.txt", synonyms=tmp_path / "s.txt")
    with pytest.raises(FileNotFoundError, match="tag list file not found"):
        LabelSystem.from_files(tmp_path / "missing.txt")


def test_build_label_system():
    counts = Counter({"man": 50, "person": 30, "people": 25, "human": 1, "dog": 40, "cat": 40,
                      "Tennis Racket": 7, "racquet": 3, "rare": 1})
    ls = build_label_system(counts, top_k=5, synonyms={"people": "person", "human": "person",
                                                       "racquet": "racket"})
    # person 56 > man 50 > cat 40 = dog 40 (ties by name) > tennis racket 7; "racket" (3) cut
    assert ls.tags == ["person", "man", "cat", "dog", "tennis racket"]
    assert ls.map(["people", "human"]) == ([0], [])
    assert "racquet" not in ls.synonyms            # its tag did not make the cut
    assert ls.map(["rare"]) == ([], ["rare"])
    assert build_label_system(counts, top_k=100, min_count=8).tags == ["man", "cat", "dog", "person", "people"]
    with pytest.raises(ValueError, match="top_k"):
        build_label_system(counts, top_k=0)


def test_normalize():
    assert normalize("  Tennis   Racket. ") == "tennis racket"
