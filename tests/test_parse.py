"""The parse stage: each fix on its own, tag extraction, bad captions, parts and lists."""
from __future__ import annotations


import pyarrow as pa
import pytest

from ram_model.labels import LabelSystem
from storage.schemas import IMAGES, PARSED
from tasks.parser import (ALL_FIXES, FIX_COMPOUND_ORDER, FIX_INTRANSITIVE_ACTIONS,
                         FIX_LEMMA_EXCEPTIONS, FIX_LOWERCASE, FIX_PHRASAL_PREP_LEMMA,
                         FIX_PHRASAL_PREP_ON_VERB, CaptionParser, check_caption, iter_docs,
                         load_nlp, parse_captions, parse_part)

from tests.reference import bench_dir


@pytest.fixture(scope="module")
def labels():
    return LabelSystem.default()


@pytest.fixture(scope="module")
def fixed():
    return CaptionParser()


def without(fix):
    return CaptionParser(fixes=ALL_FIXES - {fix})


def rels(parser, text):
    g = parser.graph(text)
    return [(g.entities[r.subject].lemma_head, r.lemma_relation, g.entities[r.object].lemma_head)
            for r in g.relations]


def one(parser, text):
    return parser.parse([text])[0]


# -- each fix, with it and without it ---------------------------------------------------------

def test_fix_phrasal_prep_lemma(fixed):
    text = "Two dogs in front of a house"
    assert rels(fixed, text) == [("dog", "in front of", "house")]
    assert rels(without(FIX_PHRASAL_PREP_LEMMA), text) == [("dog", "in front", "house")]


def test_fix_phrasal_prep_on_verb(fixed):
    text = "A black Honda motorcycle parked in front of a garage."
    assert rels(fixed, text) == [("honda motorcycle", "in front of", "garage")]
    assert rels(without(FIX_PHRASAL_PREP_ON_VERB), text) == []
    # "front" is not an entity either way
    assert [e.lemma_head for e in fixed.graph(text).entities] == ["honda motorcycle", "garage"]


def test_fix_lemma_exceptions(fixed):
    text = "A man riding a horse on a beach"
    assert rels(fixed, text)[0] == ("man", "ride", "horse")
    assert rels(without(FIX_LEMMA_EXCEPTIONS), text)[0] == ("man", "rid", "horse")
    assert "ride" in one(fixed, text).actions
    assert "rid" in one(without(FIX_LEMMA_EXCEPTIONS), text).actions
    # a custom table replaces the default one
    custom = CaptionParser(lemma_exceptions={("horse", "NOUN"): "pony"})
    assert [e.lemma_head for e in custom.graph(text).entities][1] == "pony"


def test_fix_lowercase(fixed):
    text = "A black Honda motorcycle on the road"
    assert one(fixed, text).objects[0] == "honda motorcycle"
    assert one(without(FIX_LOWERCASE), text).objects[0] == "Honda motorcycle"


def test_fix_compound_order(fixed):
    text = "A New York City taxi cab on the street"
    heads = lambda p: [e.head for e in p.graph(text).entities]   # noqa: E731
    assert heads(fixed)[0] == "New York City taxi cab"
    assert heads(without(FIX_COMPOUND_ORDER))[0] == "taxi New York City cab"
    assert one(fixed, text).objects[0] == "new york city taxi cab"


def test_fix_intransitive_actions(fixed):
    assert one(fixed, "A man skiing").actions == ["ski"]
    assert one(without(FIX_INTRANSITIVE_ACTIONS), "A man skiing").actions == []
    # without the fix, verbs that head a relation still give actions, as in the reference
    assert one(without(FIX_INTRANSITIVE_ACTIONS), "A woman playing the piano").actions == ["play"]


def test_unknown_fix_name_is_an_error():
    with pytest.raises(ValueError, match="unknown fixes"):
        CaptionParser(fixes={"lowercase", "typo"})


# -- tags from the graph ----------------------------------------------------------------------

def test_tags_objects_attributes_actions_no_prepositions(fixed):
    pc = one(fixed, "A young woman in a red dress is standing next to a wooden table in the kitchen.")
    assert pc.objects == ["woman", "dress", "table", "kitchen"]
    assert pc.scenes == ["kitchen"]
    assert pc.attributes == ["young", "red", "wooden"]
    assert pc.actions == ["stand"]
    assert pc.tags == pc.objects + pc.attributes + pc.actions
    assert not {"in", "next", "to", "next to"} & set(pc.tags)
    assert ("woman", "next to", "table") in pc.relations


def test_quantities_kept_apart(fixed):
    pc = one(fixed, "Two dogs and 4 cats next to several birds and a couple of horses")
    assert set(pc.quantities) >= {"two", "4", "several", "couple"}
    assert not {"two", "4", "several", "couple"} & set(pc.tags)
    assert {"dog", "cat", "bird", "horse"} <= set(pc.objects)


def test_participle_attributes_keep_their_form(fixed):
    assert one(fixed, "a plate of sliced oranges").attributes == ["sliced"]


def test_light_verbs_are_not_actions(fixed):
    assert one(fixed, "A kitchen that has a stove").actions == []


def test_memoised_attributes_match_spacy():
    texts = ["There is a dog on the bed.", "Let's go gon na eat", "A man riding a horse.",
             "I am holding it for you", "A cat   sitting\ton a mat", "y'all come", "", "DOGS RUNNING"]
    coco = bench_dir() / "coco_val2017_captions.tsv"
    if coco.exists():   # 1,500 real captions from the middle of the file, not the ones other tests use
        lines = coco.read_text(encoding="utf-8").splitlines()[10000:11500]
        texts += [line.split("\t", 1)[1] for line in lines]
    # spaCy as shipped (blis) against ours (numpy BLAS, memoised ruler + lemmatizer)
    nlp = load_nlp(blas="blis")
    ann = lambda docs: [[(t.tag_, t.pos_, t.dep_, t.head.i, t.lemma_, str(t.morph)) for t in d]  # noqa: E731
                        for d in docs]
    plain = ann(nlp.pipe(texts))
    for _ in range(2):   # first pass fills the memo, second reads it
        assert ann(iter_docs(texts)) == plain


def test_blas_choice_is_validated():
    with pytest.raises(ValueError, match="blas must be one of"):
        CaptionParser(blas="mkl")


# -- bad captions -----------------------------------------------------------------------------

BAD = {
    "empty-caption": ["", "   \n\t "],
    "punctuation-only": ["...!!!", "-- ?? --", "123 456"],
    "too-long": ["a dog " * 1700],
    "invalid-utf8": [b"a dog \xff\xfe on a bed", "a dog \ufffd on a bed"],
    "non-latin-script": ["一只狗在床上", "Собака лежит на кровати", "كلب على السرير"],
    "control-characters": ["a dog\x00 on a bed", "a cat \x1b[31m red"],
    "missing-caption": [None],
}


@pytest.mark.parametrize("reason,texts", list(BAD.items()))
def test_bad_captions_give_reasons(fixed, reason, texts):
    for t in texts:
        got = check_caption(t, 1000)
        assert got is not None and got[0] == reason, (t, got)
        pc = fixed.parse([t])[0]
        assert pc.reject_reason == reason and pc.reject_detail and pc.tags == []


def test_fine_captions_pass_checks(fixed):
    for t in ["A dog on a bed.", "Un café près de la fenêtre", "A man\tand a dog\n", "Zoë's crème brûlée",
              "a\u200bdog on a bed\ufeff"]:
        assert check_caption(t, 1000) is None, t
    assert fixed.parse(["A man\tand   a dog\non a bed"])[0].objects == ["man", "dog", "bed"]
    # format characters (zero-width space, BOM) are dropped, not rejected
    assert fixed.parse(["\ufeffA dog on a b\u200bed"])[0].objects == ["dog", "bed"]


def test_max_chars_is_a_parameter():
    p = CaptionParser(max_chars=10)
    assert p.parse(["a dog on a bed"])[0].reject_reason == "too-long"
    with pytest.raises(ValueError, match="max_chars"):
        CaptionParser(max_chars=0)


def test_mixed_batch_keeps_order(fixed):
    texts = ["A dog on a bed.", "", "A cat.", b"\xff", "A horse in a field."]
    out = fixed.parse(texts)
    assert [o.reject_reason for o in out] == [None, "empty-caption", None, "invalid-utf8", None]
    assert [o.objects for o in out] == [["dog", "bed"], [], ["cat"], [], ["horse", "field"]]


# -- plain lists and parts --------------------------------------------------------------------

def test_parse_captions_fills_ids(fixed, labels):
    out = parse_captions(["A man riding a bike down a street", "!!!"], fixed, labels)
    assert labels.names(out[0].tag_ids) == ["man", "bicycle", "road", "ride"]
    assert out[0].unknown_tags == []
    assert out[1].reject_reason == "punctuation-only" and out[1].tag_ids == []


def _images(rows):
    cols = {f.name: [r.get(f.name) for r in rows] for f in IMAGES}
    return pa.Table.from_pydict(cols, schema=IMAGES)


def test_parse_part(fixed, labels):
    table = _images([
        {"key": "a", "captions": ["A man riding a horse.", "A Honda motorcycle parked in front of a garage."]},
        {"key": "b", "captions": ["", "一只狗在床上", "A dog on a bed"]},
        {"key": "c", "captions": []},
        {"key": "d", "captions": None},
    ])
    out, rejects, metrics = parse_part(table, fixed, labels, source="part-0")
    assert out.schema.equals(PARSED)
    assert out.column("key").to_pylist() == ["a", "a", "b"]
    assert out.column("caption_index").to_pylist() == [0, 1, 2]
    assert sorted((r["key"], r["reason"], r["field"]) for r in rejects) == [
        ("b", "empty-caption", "captions[0]"), ("b", "non-latin-script", "captions[1]"),
        ("c", "no-captions", "captions"), ("d", "no-captions", "captions")]
    assert all(r["source"] == "part-0" and r["detail"] for r in rejects)
    row = out.slice(1, 1).to_pylist()[0]
    assert row["relations"] == [{"subject": "honda motorcycle", "relation": "in front of", "object": "garage"}]
    assert labels.names(row["tag_ids"]) == ["motorcycle", "garage", "park"]
    assert row["unknown_tags"] == ["honda"]
    # counts reconcile: captions (plus caption-less rows) in = rows out + rejects
    assert metrics["captions"] + 2 == out.num_rows + len(rejects)
    assert metrics["reject_reasons"] == {"empty-caption": 1, "non-latin-script": 1, "no-captions": 2}
    assert metrics["captions_parsed"] == 3
    assert 0 < metrics["coverage"] < 1
    assert ("honda", 1) in metrics["top_unknown_tags"]
    assert dict(metrics["top_tags"])["man"] == 1
    assert metrics["tags_per_caption"] > 2


def test_parse_part_invalid_utf8_in_arrow(fixed, labels):
    # Arrow string arrays built from raw buffers are not validated: bad bytes must become a reject
    values = pa.array([b"A dog on a bed", b"a \xff\xfe cat"], pa.binary()).cast(pa.string(), safe=False)
    captions = pa.ListArray.from_arrays(pa.array([0, 2], pa.int32()), values)
    table = pa.table({"key": ["k"], "captions": captions})
    out, rejects, _ = parse_part(table, fixed, labels)
    assert out.num_rows == 1
    assert [(r["reason"], r["field"]) for r in rejects] == [("invalid-utf8", "captions[1]")]


def test_parse_part_needs_columns(fixed, labels):
    with pytest.raises(ValueError, match="'key' and 'captions'"):
        parse_part(pa.table({"key": ["a"]}), fixed, labels)


def test_parse_part_empty(fixed, labels):
    out, rejects, metrics = parse_part(_images([]), fixed, labels)
    assert out.num_rows == 0 and rejects == [] and metrics["captions"] == 0


def test_multiprocess_matches_single_process(labels):
    texts = [f"{n} dogs and a man riding a horse near a red barn" for n in ("two", "three")] * 20
    texts += ["", "A cat on a mat."] * 10
    single = CaptionParser(batch_size=8).parse(texts)
    with CaptionParser(batch_size=8, n_process=2) as multi:
        many = multi.parse(texts)
    key = lambda pcs: [(p.objects, p.attributes, p.actions, p.relations, p.quantities, p.reject_reason)  # noqa: E731
                       for p in pcs]
    assert key(many) == key(single)
