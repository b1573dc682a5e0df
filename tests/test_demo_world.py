"""The demo world: planted caption noise measured back (independent and contextual), determinism, both output
formats."""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.demo.world import (COLOURS, DEFAULT_CATEGORIES, PLURALS, SCENES, WorldInfo, demo_tag_list,
                              generate_world, sample_key)
from tasks.stages.evaluate import label_quality
from tasks.shared.truth import load_ground_truth


P_OBJ, P_COL, P_ABSENT, P_SCENE = 0.2, 0.15, 0.25, 0.1


def _words_to_tags() -> dict[str, str]:
    m = {c: c for c in DEFAULT_CATEGORIES}
    m.update({PLURALS[c]: c for c in DEFAULT_CATEGORIES})
    m.update({c: c for c in COLOURS})
    m.update({s: s for s in SCENES})
    return m


def _parse(caption: str) -> set[str]:
    """A parser independent of the generator: vocabulary words (and plurals) found in the text."""
    vocab = _words_to_tags()
    return {vocab[w] for w in re.findall(r"[a-z]+", caption.lower()) if w in vocab}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The independent world: the expectations below are its formulas."""
    out = tmp_path_factory.mktemp("world")
    return generate_world(out, 200, seed=3, fmt="folder", captions_per_image=1, noise="independent")


@pytest.fixture(scope="module")
def contextual(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("contextual"), 400, seed=5, fmt="folder", noise="contextual")


def _truth_rows(info: WorldInfo) -> list[dict]:
    return [json.loads(line) for line in info.ground_truth.read_text().splitlines()]


def test_folder_format_is_readable(world):
    lines = [json.loads(x) for x in world.captions_file.read_text().splitlines()]
    assert len(lines) == 200 and all(set(x) == {"file", "captions"} for x in lines)
    rows = {r["file"]: r for r in _truth_rows(world)}
    for x in lines[:50]:
        img = Image.open(world.source / x["file"])
        img.load()
        assert img.size == (128, 128) and img.format == "JPEG"
        assert x["captions"] == rows[x["file"]]["captions"]
    assert world.tag_list.read_text().split("\n")[:-1] == demo_tag_list()
    assert len(demo_tag_list()) == 23
    assert WorldInfo.load(world.root) == world


def test_vocabulary_is_in_rams_tag_list():
    from ram_model.labels import LabelSystem
    from tasks.demo.world import CATEGORY_NAMES
    ram_tags = set(LabelSystem.default().tags)  # RAM's tag list as the package ships it
    assert set(CATEGORY_NAMES) | set(COLOURS) | set(SCENES) <= ram_tags


def test_captions_say_what_the_truth_records(world):
    for r in _truth_rows(world):
        assert [sorted(_parse(c)) for c in r["captions"]] == r["caption_tags"], r["captions"]


def test_boxes_come_from_objects_inside_the_image(world):
    for r in _truth_rows(world):
        assert 1 <= len(r["objects"]) <= 4
        boxes = [o["box"] for o in r["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert 0.12 * 128 <= max(x1 - x0, y1 - y0) <= 0.4 * 128  # squares of 17–38 %, shapes fill most
        for i, a in enumerate(boxes):   # objects do not overlap
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert set(r["tags"]) == ({o["category"] for o in r["objects"]} | {o["colour"] for o in r["objects"]}
                                  | {r["scene"]})


def test_objects_have_their_colour(world):
    """The pixels inside a box are closest to the object's colour among the six (the outline and
    background around the shape are excluded by taking the most saturated pixels)."""
    hits = n = 0
    for r in _truth_rows(world)[:60]:
        img = np.asarray(Image.open(world.source / r["file"]).convert("RGB"), dtype=np.float32)
        for o in r["objects"]:
            x0, y0, x1, y1 = o["box"]
            px = img[y0:y1, x0:x1].reshape(-1, 3)
            sat = px.max(1) - px.min(1)
            top = px[sat >= np.quantile(sat, 0.8)].mean(0)
            names = list(COLOURS)
            d = [np.linalg.norm(top - np.array(COLOURS[c])) for c in names]
            hits += names[int(np.argmin(d))] == o["colour"]
            n += 1
    assert hits / n > 0.9, f"only {hits}/{n} objects look like their colour"


def test_caption_noise_matches_what_was_planted(world):
    rows = _truth_rows(world)
    truth = load_ground_truth(world.ground_truth)
    pred = {r["key"]: set().union(*(_parse(c) for c in r["captions"])) for r in rows}
    groups = json.loads(world.tag_groups.read_text())
    q = label_quality(pred, truth, groups=groups)

    # Category recall: a category is missed only when every instance of it is omitted.
    exp = var = 0.0
    n_cat = 0
    for r in rows:
        counts: dict[str, int] = {}
        for o in r["objects"]:
            counts[o["category"]] = counts.get(o["category"], 0) + 1
        for n in counts.values():
            p_hit = 1 - P_OBJ ** n
            exp += p_hit
            var += p_hit * (1 - p_hit)
            n_cat += 1
    cat = q["per_group"]["category"]
    assert cat["tp"] + cat["fn"] == n_cat
    assert abs(cat["recall"] - exp / n_cat) <= 4 * math.sqrt(var) / n_cat + 1e-9, (cat["recall"], exp / n_cat)

    # Category false positives are exactly the absent mentions (one per caption that has one).
    assert cat["fp"] == world.noise["counts"]["absent_mentions"]
    se = math.sqrt(P_ABSENT * (1 - P_ABSENT) / 200)
    assert abs(cat["fp"] / 200 - P_ABSENT) <= 4 * se

    # Colour recall: present when some (category, colour) group keeps an instance and its colour,
    # or when an absent mention happens to carry that colour.
    exp = var = 0.0
    for r in rows:
        groups_n: dict[tuple[str, str], int] = {}
        for o in r["objects"]:
            groups_n[(o["category"], o["colour"])] = groups_n.get((o["category"], o["colour"]), 0) + 1
        for colour in {o["colour"] for o in r["objects"]}:
            p_miss = 1 - P_ABSENT * (1 - P_COL) / len(COLOURS)
            for (c, col), n in groups_n.items():
                if col == colour:
                    p_miss *= 1 - (1 - P_OBJ ** n) * (1 - P_COL)
            exp += 1 - p_miss
            var += p_miss * (1 - p_miss)
    col_q = q["per_group"]["colour"]
    n_col = col_q["tp"] + col_q["fn"]
    assert abs(col_q["recall"] - exp / n_col) <= 4 * math.sqrt(var) / n_col, (col_q["recall"], exp / n_col)

    # Scenes: never wrong, left out with p 0.1.
    sc = q["per_group"]["scene"]
    assert sc["fp"] == 0 and sc["precision"] == 1.0
    assert abs(sc["recall"] - (1 - P_SCENE)) <= 4 * math.sqrt(P_SCENE * (1 - P_SCENE) / 200)

    # The planted rates the generator reports agree with the probabilities it was given.
    c = world.noise["counts"]
    for got, n, p in ((c["objects_omitted"], c["object_instances"], P_OBJ),
                      (c["colours_omitted"], c["colour_mentions"], P_COL),
                      (c["scene_omitted"], c["captions"], P_SCENE)):
        assert abs(got / n - p) <= 4 * math.sqrt(p * (1 - p) / n), (got, n, p)
    # And its own summary is what an exact parser gets.
    assert world.noise["caption_labels_union"]["precision"] == pytest.approx(q["precision"])
    assert world.noise["caption_labels_union"]["recall"] == pytest.approx(q["recall"])


@pytest.mark.parametrize("noise", ["contextual", "independent"])
def test_same_seed_same_world_other_seed_other_world(tmp_path, noise):
    a = generate_world(tmp_path / "a", 25, seed=11, captions_per_image=(1, 3), noise=noise)
    b = generate_world(tmp_path / "b", 25, seed=11, captions_per_image=(1, 3), noise=noise)
    c = generate_world(tmp_path / "c", 25, seed=12, captions_per_image=(1, 3), noise=noise)
    files = sorted(p.relative_to(a.source) for p in a.source.rglob("*") if p.is_file())
    for rel in files:
        assert (a.source / rel).read_bytes() == (b.source / rel).read_bytes(), rel
    assert a.ground_truth.read_text() == b.ground_truth.read_text()
    assert a.ground_truth.read_text() != c.ground_truth.read_text()
    assert (a.source / files[0]).read_bytes() != (c.source / files[0]).read_bytes()
    # a bigger world starts with the smaller one (the demo grows its world this way)
    d = generate_world(tmp_path / "d", 30, seed=11, captions_per_image=(1, 3), noise=noise)
    assert d.ground_truth.read_text().startswith(a.ground_truth.read_text())


def _content_digest(info: WorldInfo) -> str:
    """sha256 of a webdataset world's content: every tar member (images as decoded pixels, so that another JPEG
    encoder build does not change it), the truth and the label system."""
    h = hashlib.sha256()
    for shard in info.shards:
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                h.update(m.name.encode())
                if m.name.endswith((".jpg", ".png")):
                    try:
                        data = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()
                    except OSError:   # a planted corrupt image
                        pass
                h.update(data)
    for p in (info.ground_truth, info.ground_truth.parent / "noise.json", info.tag_list, info.tag_groups,
              info.tag_list.parent / "tag_types.txt"):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_independent_noise_is_the_world_as_it_was(tmp_path):
    # Recorded from a world generated by the code before the noise models (commit cc6aa23, where this call had no
    # `noise`): the control world must stay that world, byte for byte.
    info = generate_world(tmp_path / "w", 40, seed=4, fmt="webdataset", samples_per_shard=16, n_corrupt=2,
                          noise="independent")
    assert _content_digest(info) == "fb72699a84263a22785f9b77cb42bfb8aff78e0c3fa10b076b1ffbb5fc089227"
    assert info.config["noise"] == "independent" and "contextual" not in info.noise


def test_contextual_noise_keeps_the_rates_of_the_independent_world(contextual):
    rows = _truth_rows(contextual)
    for r in rows:   # the captions still say what the truth records
        assert [sorted(_parse(c)) for c in r["captions"]] == r["caption_tags"], r["captions"]
    c = contextual.noise["counts"]
    assert contextual.config["noise"] == "contextual"
    for got, n, p in ((c["objects_omitted"], c["object_instances"], P_OBJ),
                      (c["colours_omitted"], c["colour_mentions"], P_COL),
                      (c["absent_mentions"], c["captions"], P_ABSENT),
                      (c["scene_omitted"], c["captions"], P_SCENE)):
        assert abs(got / n - p) <= 4 * math.sqrt(p * (1 - p) / n), (got, n, p)
    # at most one absent category per caption, and the category false positives are exactly those
    pred = {r["key"]: set().union(*(_parse(x) for x in r["captions"])) for r in rows}
    truth = load_ground_truth(contextual.ground_truth)
    per_caption_fp = [len(set(tags) & set(DEFAULT_CATEGORIES) - set(r["tags"]))
                      for r in rows for tags in r["caption_tags"]]
    assert max(per_caption_fp) == 1 and sum(per_caption_fp) == c["absent_mentions"]
    q = label_quality(pred, truth, groups=json.loads(contextual.tag_groups.read_text()))
    assert q["per_group"]["scene"]["precision"] == 1.0


def test_contextual_omissions_fall_on_small_and_peripheral_objects(contextual):
    rows = _truth_rows(contextual)
    # what each caption's errors record is what its tags show: a left-out or renamed object's category is missing
    # unless another object of that category is named
    for r in rows:
        for tags, err in zip(r["caption_tags"], r["caption_errors"]):
            unnamed = set(err["omitted"]) | ({err["renamed"]} if err["renamed"] is not None else set())
            named = {o["category"] for i, o in enumerate(r["objects"]) if i not in unnamed}
            assert {t for t in tags if t in DEFAULT_CATEGORIES} == named | ({err["absent"]} - {None}), (r, err)
    summary = contextual.noise["contextual"]
    small, _, large = summary["omitted_by_size"]
    centre, _, edge = summary["omitted_by_distance_from_centre"]
    assert small["to"] <= large["from"] and centre["to"] <= edge["from"]
    # thirds of ~2,400 object mentions: a 2x difference is far beyond sampling (se ~0.015)
    assert small["omitted"] > 2 * large["omitted"] and edge["omitted"] > 2 * centre["omitted"], summary


def test_contextual_absent_mentions_are_the_scene_s_or_a_look_alike(contextual):
    from tasks.demo.world import SCENE_CATEGORIES, look_alikes

    rows = _truth_rows(contextual)
    pairs = look_alikes(tuple(DEFAULT_CATEGORIES))
    kinds = {"context": 0, "look-alike": 0, "other": 0}
    for r in rows:
        present = {o["category"] for o in r["objects"]}
        for tags, err in zip(r["caption_tags"], r["caption_errors"]):
            if err["absent"] is None:
                assert err["absent_kind"] is None and err["renamed"] is None
                continue
            kinds[err["absent_kind"]] += 1
            assert err["absent"] in tags and err["absent"] not in present
            if err["absent_kind"] == "look-alike":
                assert pairs[r["objects"][err["renamed"]]["category"]] == err["absent"]
            elif err["absent_kind"] == "context":
                assert err["absent"] in SCENE_CATEGORIES[r["scene"]]
            else:   # only when the scene's likely categories are all in the image
                assert set(SCENE_CATEGORIES[r["scene"]]) & set(DEFAULT_CATEGORIES) <= present
    assert kinds == contextual.noise["contextual"]["absent_by_kind"]
    assert kinds["context"] > kinds["look-alike"] > 0
    # objects go with their scene: p_scene_object 0.6 of them are of its likely categories
    objects = [(r["scene"], o["category"]) for r in rows for o in r["objects"]]
    share = sum(c in SCENE_CATEGORIES[s] for s, c in objects) / len(objects)
    assert abs(share - 0.6) <= 4 * math.sqrt(0.24 / len(objects))
    assert round(share, 4) == contextual.noise["contextual"]["objects_of_scene_categories"]

    # sky => kite: among images without a kite, captions name one far more often over the sky than elsewhere
    def kite_named(scene_is_sky: bool) -> float:
        sel = [r for r in rows if (r["scene"] == "sky") == scene_is_sky and "kite" not in r["tags"]]
        return sum("kite" in t for r in sel for t in r["caption_tags"]) / sum(len(r["captions"]) for r in sel)
    assert kite_named(True) > 5 * kite_named(False) and kite_named(True) > 0.03


def test_look_alikes_are_the_shapes_that_overlap_most():
    from tasks.demo.world import look_alikes, silhouette_similarity

    cats = tuple(DEFAULT_CATEGORIES)
    pairs = look_alikes(cats)
    assert pairs == {"ball": "box", "box": "ball", "flag": "umbrella", "umbrella": "flag", "cross": "heart",
                     "heart": "cross", "star": "triangle", "triangle": "star", "kite": "arrow", "arrow": "kite",
                     "ring": "moon", "moon": "ring"}
    sim = silhouette_similarity(cats)
    assert np.allclose(sim, sim.T) and np.allclose(np.diag(sim), 1.0)
    for a, b in pairs.items():   # each look-alike overlaps its partner more than the typical other shape does
        i, j = cats.index(a), cats.index(b)
        others = [sim[i, k] for k in range(len(cats)) if k != i]
        assert sim[i, j] > np.median(others), (a, b)


def test_the_demo_world_names_its_noise_and_keeps_a_store_to_its_world(tmp_path):
    from flows.demo import run_demo

    with pytest.raises(ValueError, match="--noise must be one of contextual, independent, got 'random'"):
        run_demo(str(tmp_path / "x"), n_images=6, noise="random", world_only=True, say=lambda *a: None)
    said = []
    out = run_demo(str(tmp_path / "d"), n_images=6, noise="independent", world_only=True, say=said.append)
    assert out["world"].config["noise"] == "independent" and "independent noise: objects omitted" in said[1]
    out = run_demo(str(tmp_path / "d"), n_images=6, world_only=True, say=said.append)   # no store yet: regenerated
    assert out["world"].config["noise"] == "contextual" and "contextual" in out["world"].noise   # the demo's default
    assert generate_world(tmp_path / "g", 3).config["noise"] == "independent"   # the function's: callers keep theirs
    (tmp_path / "d" / "store").mkdir()
    with pytest.raises(ValueError, match=r"holds a store made from the contextual world; run the independent world "
                                         r"in another folder \(--out\)"):
        run_demo(str(tmp_path / "d"), n_images=6, noise="independent", world_only=True, say=said.append)


def test_webdataset_format_as_img2dataset_writes_it(tmp_path):
    import webdataset as wds
    info = generate_world(tmp_path / "w", 45, seed=5, fmt="webdataset", samples_per_shard=20,
                          image_format="png", image_size=96)
    assert [s.name for s in info.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(info.shards[0]) as tf:
        names = tf.getnames()
    assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
    truth = {json.loads(x)["key"]: json.loads(x) for x in info.ground_truth.read_text().splitlines()}
    seen = []
    for s in wds.WebDataset([str(p) for p in info.shards], shardshuffle=False):
        key = s["__key__"]
        seen.append(key)
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (96, 96)
        caps = s["txt"].decode().split("\n")
        meta = json.loads(s["json"])
        assert caps == truth[key]["captions"] == meta["captions"] and meta["caption"] == caps[0]
        assert meta["key"] == key and meta["status"] == "success" and meta["width"] == 96
    assert seen == list(info.keys) and seen[20] == sample_key(20, 20) == "000010000"
    table = pq.read_table(info.shards[1].with_suffix(".parquet"))
    assert table.num_rows == 20 and table["key"].to_pylist() == list(info.keys[20:40])
    stats = json.loads((info.source / "00002_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 5


def test_planted_defects_are_listed_and_left_out_of_the_truth(tmp_path):
    info = generate_world(tmp_path / "c", 30, seed=1, n_corrupt=3)
    assert sorted(info.corrupt.values()) == ["empty-caption", "not-an-image", "truncated-image"]
    truth = load_ground_truth(info.ground_truth)
    assert len(truth) == 27 and not set(truth) & set(info.corrupt)
    lines = {json.loads(x)["file"]: json.loads(x) for x in info.captions_file.read_text().splitlines()}
    for key, kind in info.corrupt.items():
        entry = lines[f"images/{key}.jpg"]
        if kind == "empty-caption":
            assert entry["captions"] == [""]
            continue
        with pytest.raises(OSError):
            Image.open(info.source / entry["file"]).load()


def test_more_categories_and_bad_arguments(tmp_path):
    from tasks.demo.world import CATEGORY_NAMES
    info = generate_world(tmp_path / "all", 20, seed=2, categories=CATEGORY_NAMES)
    assert len(info.tag_list.read_text().split()) == len(CATEGORY_NAMES) + 11
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_world(tmp_path / "all", 5, seed=2)
    generate_world(tmp_path / "all", 5, seed=2, overwrite=True)
    with pytest.raises(ValueError, match="unknown categories"):
        generate_world(tmp_path / "x", 5, categories=["ball", "dragon"])
    with pytest.raises(ValueError, match="fmt must be"):
        generate_world(tmp_path / "x", 5, fmt="zip")
    with pytest.raises(ValueError, match="p_absent"):
        generate_world(tmp_path / "x", 5, p_absent=1.5)
    with pytest.raises(ValueError, match="p_lookalike"):
        generate_world(tmp_path / "x", 5, p_lookalike=-0.1)
    with pytest.raises(ValueError, match=r"noise must be one of \['contextual', 'independent'\], got 'random'"):
        generate_world(tmp_path / "x", 5, noise="random")
    with pytest.raises(FileNotFoundError, match="world.json"):
        WorldInfo.load(tmp_path / "nothing")
