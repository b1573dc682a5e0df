"""Ground stage on generated images with a tiny random detector: regions, crops, counts, resume."""
import io

import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageDraw

from ram_model.detector import build_tiny_detector
from storage.schemas import PARSED, REGIONS
from tasks.shared.categories import tag_categories
from tasks.engine.config import GroundSection
from tasks.stages.ground import (crop_key, cut_crop, ground_batch, ground_part,
                          localisable_tags)

torch.set_num_threads(1)
NAMES = {0: "dog", 1: "cat", 2: "red", 3: "running", 4: "traffic light", 5: "tree"}
CATS = {0: "object", 1: "object", 2: "attribute", 3: "action", 4: "object", 5: "object"}


def _img(i):
    im = Image.new("RGB", (96 + 8 * (i % 3), 80 + 4 * (i % 5)), (40 * (i % 5), 120, 200))
    ImageDraw.Draw(im).ellipse((10 + i % 7, 10, 50 + i % 7, 55), fill=(230, 20, 20))
    return im


@pytest.fixture(scope="module")
def det():
    d = build_tiny_detector(list(NAMES.values()), seed=0)
    d.cfg.box_threshold = d.cfg.text_threshold = 0.0
    return d


def _part(n=20):
    keys = [f"k{i:03d}" for i in range(n)]
    tags = [[0, 2, 3, 1] if i % 4 else [2, 3] for i in range(n)]  # every 4th key: nothing localisable
    if n > 5:
        tags[5] = [0, 4, 5, 1, 0]
    return pa.table({"key": keys, "tag_ids": pa.array(tags, pa.list_(pa.int32()))})


def _loader(bad=()):
    def load(key):
        if key in bad:
            return Image.open(io.BytesIO(b"not an image"))
        return _img(int(key[1:]))
    return load


def test_declared_types_and_localisable():
    from ram_model.labels import LabelSystem

    labels = LabelSystem(["dog", "grass", "red", "run"], types=["object", "scene", "attribute", "action"])
    cats = tag_categories(labels)
    assert cats == {0: "object", 1: "scene", 2: "attribute", 3: "action"}
    assert localisable_tags([3, 0, 2, 0, 7], cats) == [0]
    assert localisable_tags([3, 0, 2], cats, ("object", "action")) == [3, 0]
    with pytest.raises(ValueError, match="declares no tag types"):
        tag_categories(LabelSystem(["dog"]))


def test_cut_crop_padding_and_min_size():
    im = Image.new("RGB", (100, 80))
    assert cut_crop(im, (20, 20, 60, 40), padding=0.0, min_size=1).size == (40, 20)
    assert cut_crop(im, (20, 20, 60, 40), padding=0.25, min_size=1).size == (60, 30)
    # tiny box grows to min_size around its centre; at the border it shifts inside the image
    assert cut_crop(im, (50, 40, 52, 42), padding=0.1, min_size=32).size == (32, 32)
    assert cut_crop(im, (0, 0, 3, 3), padding=0.1, min_size=32).size == (32, 32)
    assert cut_crop(im, (98, 78, 100, 80), padding=0.0, min_size=32).size == (32, 32)
    # min_size larger than the image: the whole image
    assert cut_crop(im, (10, 10, 20, 20), padding=0.0, min_size=500).size == (100, 80)
    with pytest.raises(ValueError, match="no area"):
        cut_crop(im, (5, 5, 5, 9))


def test_ground_batch_top_n(det):
    ims = [_img(1), _img(2)]
    q = [[(0, "dog"), (4, "traffic light")], []]
    r1 = ground_batch(det, ims, q, GroundSection(top_n=1))
    assert [(r.tag_id, r.rank) for r in r1[0]] == [(0, 0), (4, 0)] and r1[1] == []
    r3 = ground_batch(det, ims, q, GroundSection(top_n=3))
    assert [(r.tag_id, r.rank) for r in r3[0]] == [(0, 0), (0, 1), (0, 2), (4, 0), (4, 1), (4, 2)]
    assert r3[0][0].score >= r3[0][1].score >= r3[0][2].score
    assert r3[0][0] == r1[0][0]


def test_ground_part_counts_and_crops(det):
    part = _part(20)
    cfg = GroundSection(batch_size=6, crop_min_size=24, crop_padding=0.1)
    regions, crops, rejects, m = ground_part(part, _loader(bad={"k007"}), det, cfg, NAMES, CATS, source="part-0",
                                             shard="regions/v1/crops-0000.tar")
    assert regions.schema.equals(REGIONS)
    assert [r["key"] for r in rejects] == ["k007"] and rejects[0]["reason"] == "image-unreadable"
    assert m["keys_in"] == m["keys_grounded"] + m["keys_rejected"] + m["keys_skipped_done"] == 20
    assert m["keys_without_localisable_tags"] == 5
    # localisable tags per key: 0 and 1 (k005: 0, 4, 5, 1); thresholds 0 -> every tag has a box
    expected = {(f"k{i:03d}", t) for i in range(20) if i % 4 and i != 7 for t in (0, 1)} | {("k005", t) for t in (0, 4, 5, 1)}
    got = list(zip(regions.column("key").to_pylist(), regions.column("tag_id").to_pylist()))
    assert len(got) == len(set(got)) and set(got) == expected
    assert m["regions"] == regions.num_rows == len(crops) == m["tags_queried"] == m["tags_with_box"]
    assert m["tags_without_box"] == 0
    assert [c["__key__"] for c in crops] == regions.column("crop_key").to_pylist()
    assert set(regions.column("shard").to_pylist()) == {"regions/v1/crops-0000.tar"}
    for c, row in zip(crops, regions.to_pylist()):
        assert c["__key__"] == crop_key(row["key"], row["tag_id"], 0) and "." not in c["__key__"]
        im = Image.open(io.BytesIO(c["jpg"]))
        W, H = _img(int(row["key"][1:])).size
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert min(24, W) <= im.size[0] <= W and min(24, H) <= im.size[1] <= H


def test_ground_part_no_box_and_png(det):
    # random weights saturate scores near 1: a text threshold this high keeps some tags, not all
    det.cfg.text_threshold = 0.9999
    try:
        regions, crops, rejects, m = ground_part(_part(8), _loader(), det, GroundSection(crop_format="png"), NAMES, CATS)
    finally:
        det.cfg.text_threshold = 0.0
    assert m["tags_with_box"] > 0 and m["tags_without_box"] > 0
    assert m["tags_queried"] == m["tags_with_box"] + m["tags_without_box"] == 14  # k005 asks for 4 tags, 5 other keys for 2
    assert regions.num_rows == m["tags_with_box"] and all(s > 0.9999 for s in regions.column("score").to_pylist())
    assert all(set(c) == {"__key__", "png"} for c in crops)


class Killed(RuntimeError):
    pass


def test_resume_after_kill_gives_same_result_without_duplicates(det):
    part = _part(20)
    cfg = GroundSection(batch_size=4)
    full, full_crops, full_rej, _ = ground_part(part, _loader(bad={"k010"}), det, cfg, NAMES, CATS)

    saved_rows, saved_crops, done, saved_rej = [], [], set(), []
    calls = {"n": 0}

    def checkpoint(rows, crops, keys, rejects):
        calls["n"] += 1
        if calls["n"] == 3:  # the process dies while committing batch 3: only batches 1-2 are durable
            raise Killed("simulated kill")
        saved_rows.append(rows)
        saved_crops.extend(crops)
        saved_rej.extend(rejects)
        done.update(keys)

    with pytest.raises(Killed):
        ground_part(part, _loader(bad={"k010"}), det, cfg, NAMES, CATS, checkpoint=checkpoint)
    assert len(done) == 8
    calls["n"] = -100  # the rerun is not killed
    rest, rest_crops, rest_rej, m = ground_part(part, _loader(bad={"k010"}), det, cfg, NAMES, CATS,
                                                done_keys=done, checkpoint=checkpoint)
    assert m["keys_skipped_done"] == 8
    combined = pa.concat_tables(saved_rows)
    assert combined.num_rows == full.num_rows
    pairs = list(zip(combined.column("key").to_pylist(), combined.column("tag_id").to_pylist()))
    assert len(pairs) == len(set(pairs))
    key = lambda t: sorted(map(tuple, (r.values() for r in t.to_pylist())), key=str)  # noqa: E731
    assert key(combined) == key(full)
    assert sorted(c["__key__"] for c in saved_crops) == sorted(c["__key__"] for c in full_crops)
    assert [r["key"] for r in saved_rej] == [r["key"] for r in full_rej] == ["k010"]


def test_config_errors():
    with pytest.raises(ValueError, match="top_n"):
        GroundSection(top_n=0)
    with pytest.raises(ValueError, match="localisable"):
        GroundSection(localisable=["scene-ish"])
    with pytest.raises(ValueError, match="tag_ids"):
        ground_part(pa.table({"key": ["a"]}), _loader(), None, GroundSection(), NAMES, CATS)
