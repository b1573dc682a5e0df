"""Clean stage: per-tag K-Means++ outliers, baseline disagreement, no-box, output tables, embedders."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from ram_model.embedder import ClipEmbedder, EmbedderConfig, EncoderEmbedder, build_embedder
from storage.schemas import CLEAN, CLEAN_CROPS
from tasks.engine.config import CleanSection
from tasks.stages.clean import baseline_disagrees, build_clean
from tasks.stages.cluster import EmbeddingStore, cluster_outliers, cluster_tag, outlier_mask
from tasks.stages.embed import embed_part, separate_scorer
from tasks.stages.ground import regions_table

torch.set_num_threads(1)


def _planted(n=1000, d=512, clusters=5, frac=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    n_out = int(n * frac)
    inl = centres[rng.integers(0, clusters, n - n_out)] + 0.02 * rng.standard_normal((n - n_out, d)).astype(np.float32)
    out = rng.standard_normal((n_out, d)).astype(np.float32)
    X = np.concatenate([inl, out])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    truth = np.r_[np.zeros(n - n_out, bool), np.ones(n_out, bool)]
    perm = rng.permutation(n)
    return X[perm], truth[perm]


@pytest.mark.parametrize("cfg", [CleanSection(), CleanSection(algorithm="sklearn"),
                                 CleanSection(minibatch_threshold=500, minibatch_size=256),
                                 CleanSection(fit_sample=300, seed_sample=100)],
                         ids=["fast", "sklearn", "minibatch", "fit-on-sample"])
def test_planted_outliers_found(tmp_path, cfg):
    X, truth = _planted()
    store = EmbeddingStore(tmp_path / "emb")
    keys = [f"c{i}" for i in range(len(X))]
    # written in two parts, interleaved with another tag, as parts of a dataset would be
    other, _ = _planted(n=200, seed=1)
    store.add([7] * 500 + [3] * 100, keys[:500] + [f"o{i}" for i in range(100)], np.r_[X[:500], other[:100]])
    store.add([3] * 100 + [7] * 500, [f"o{i}" for i in range(100, 200)] + keys[500:], np.r_[other[100:], X[500:]])
    table, m = cluster_outliers(store, cfg)
    assert m["tags"] == 2 and m["crops"] == 1200 and table.num_rows == 1200
    t7 = table.filter(pc.equal(table.column("tag_id"), 7))
    assert t7.column("crop_key").to_pylist() == keys  # order kept per tag
    flagged = np.asarray(t7.column("outlier").to_pylist())
    assert flagged.sum() == 100
    tp = (flagged & truth).sum()
    precision, recall = tp / flagged.sum(), tp / truth.sum()
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    # 8 clusters asked for 5 true groups plus scatter: at least the 5 groups are used
    assert 5 <= len(set(t7.column("cluster").to_pylist())) <= cfg.clusters_for(1000) == 8


def test_cluster_count_and_small_tags():
    cfg = CleanSection()
    assert [cfg.clusters_for(n) for n in (1, 49, 100, 260, 10_000)] == [1, 1, 2, 5, 8]
    assert CleanSection(k=3).clusters_for(2) == 2
    X, _ = _planted(n=40, d=16)
    labels, d = cluster_tag(X, cfg)
    assert (labels == 0).all() and np.allclose(d, np.linalg.norm(X - X.mean(0), axis=1), atol=1e-5)
    assert outlier_mask(d, 0.1, min_crops=10).sum() == 4
    assert outlier_mask(d[:9], 0.1, min_crops=10).sum() == 0


def test_embedding_store_errors(tmp_path):
    s = EmbeddingStore(tmp_path, dim=4)
    s.add([1, 2], ["a", "b"], np.ones((2, 4)))
    with pytest.raises(ValueError, match="dim"):
        s.add([1], ["c"], np.ones((1, 5)))
    with pytest.raises(ValueError, match="holds dim 4"):
        EmbeddingStore(tmp_path, dim=8)
    assert EmbeddingStore(tmp_path).count(1) == 1
    (tmp_path / "1.keys").write_text("a\nextra\n")
    with pytest.raises(ValueError, match="interrupted"):
        s.load(1)


def _regions(pairs, boxes=None):
    """Region rows (key, tag id, rank); each its own box unless `boxes` gives them (one per row)."""
    boxes = boxes or [[float(n), 0.0, n + 5.0, 5.0] for n in range(len(pairs))]
    rows = [{"key": k, "tag_id": t, "tag": f"t{t}", "box": b, "score": 0.9,
             "crop_key": f"{k}_t{t}_{r}", "shard": "s.tar"} for (k, t, r), b in zip(pairs, boxes)]
    return regions_table(rows)


def test_baseline_disagrees_exact_pairs():
    regs = _regions([("a", 1, 0), ("a", 2, 0), ("b", 1, 0), ("b", 1, 1), ("c", 2, 0), ("c", 2, 1), ("d", 3, 0)])
    thresholds = [0.5, 0.6, 0.7, 0.5]
    scores = {"a_t1_0": 0.59, "a_t2_0": 0.71,   # a/1 below 0.6 -> removed; a/2 agrees
              "b_t1_0": 0.10, "b_t1_1": 0.65,   # one crop of b/1 agrees -> kept
              "c_t2_0": 0.2, "c_t2_1": 0.69}    # both below 0.7 -> removed; d/3 unscored -> kept
    assert baseline_disagrees(regs, scores, thresholds) == {("a", 1), ("c", 2)}


def test_build_clean_reasons_and_counts():
    gen = pa.table({"key": ["a", "b", "c", "z"], "tag_ids": [[1, 2, 9], [1, 4], [2, 3], [1]]})
    cats = {1: "object", 2: "object", 3: "object", 4: "object", 9: "attribute"}
    regs = _regions([("a", 1, 0), ("a", 2, 0), ("b", 1, 0), ("c", 2, 0), ("c", 2, 1)])
    crop_res = {"a_t1_0": (0, 0.1, False), "a_t2_0": (1, 0.9, True), "b_t1_0": (0, 0.2, False),
                "c_t2_0": (0, 0.8, True), "c_t2_1": (1, 0.1, False)}
    scores = {"a_t1_0": 0.9, "a_t2_0": 0.1, "b_t1_0": 0.1, "c_t2_0": 0.9, "c_t2_1": 0.9}
    thr = [0.5] * 10
    cfg = CleanSection(keep_no_box=False)
    clean, crops, rejects, m = build_clean(gen, regs, crop_res, cats, cfg, scores, thr, ground_rejected={"z"})
    assert clean.schema.equals(CLEAN) and crops.schema.equals(CLEAN_CROPS)
    rows = {r["key"]: r for r in clean.to_pylist()}
    # a: 2 outlier (wins over baseline-disagrees); 9 is an attribute: never removed
    assert rows["a"]["tag_ids"] == [1, 9] and rows["a"]["removed_tag_ids"] == [2]
    assert rows["a"]["removed_reasons"] == ["outlier"]
    # b: 1 baseline-disagrees, 4 has no box and keep_no_box is off
    assert rows["b"]["removed_tag_ids"] == [1, 4] and rows["b"]["removed_reasons"] == ["baseline-disagrees", "no-box"]
    # c: 2 has one inlier crop -> kept; 3 no box
    assert rows["c"]["tag_ids"] == [2] and rows["c"]["removed_reasons"] == ["no-box"]
    assert [r["key"] for r in rejects] == ["z"] and rejects[0]["reason"] == "not-grounded"
    assert m["keys_in"] == m["keys_out"] + m["keys_rejected"] == 4
    assert m["tags_in"] == m["tags_kept"] + m["outlier"] + m["baseline-disagrees"] + m["no-box"] == 7
    assert crops.num_rows == 5 and crops.column("outlier").to_pylist() == [False, True, False, True, False]
    # defaults: no-box tags kept; baseline check off without thresholds
    clean2, _, _, m2 = build_clean(gen, regs, crop_res, cats, CleanSection())
    assert m2["no-box"] == 0 and m2["baseline-disagrees"] == 0 and m2["outlier"] == 1
    assert {r["key"]: r["tag_ids"] for r in clean2.to_pylist()}["b"] == [1, 4]


class _TinyEncoder(torch.nn.Module):
    """A conv encoder that returns tokens [N, T, D] with a pooled token first, like RAM's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        return torch.cat([t.mean(1, keepdim=True), t], dim=1)


def _crops(n):
    return [Image.new("RGB", (20 + i, 30), (i * 20 % 255, 100, 50)) for i in range(n)]


def test_encoder_embedder_and_embed_part():
    emb = EncoderEmbedder(_TinyEncoder(), EmbedderConfig(image_size=32, batch_size=3))
    E = emb(_crops(7))
    assert E.shape == (7, 16) and E.dtype == np.float32 and np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    assert emb([]).shape == (0, 16)
    regs = _regions([("a", 1, 0), ("a", 2, 0), ("b", 1, 0), ("c", 2, 0)])
    crop_keys = regs.column("crop_key").to_pylist()
    imgs = dict(zip(crop_keys[:3], _crops(3)))        # c's crop is missing from the shard
    # the baseline here: a fixed probability per model column; label 1 -> column 0, label 2 has no column
    probs = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    table, rejects, metrics = embed_part(regs, imgs, separate_scorer(emb, lambda ims: np.tile(probs, (len(ims), 1))),
                                         {1: 0}, batch_size=2, source="part-0")
    assert table.column("crop_key").to_pylist() == ["a_t1_0", "a_t2_0", "b_t1_0"]
    assert table.column("baseline_score").to_pylist() == pytest.approx([0.1, None, 0.1])
    assert np.allclose(np.array(table.column("embedding").to_pylist()), emb([imgs[k] for k in crop_keys[:3]]),
                       atol=1e-6)
    assert rejects == [{"key": "c", "reason": "missing-crop", "detail": "crop c_t2_0 is not in the shard",
                        "source": "part-0", "field": "crop"}]
    assert metrics == {"crops": 3, "crops_scored": 3}
    without_baseline, _, _ = embed_part(regs, imgs, separate_scorer(emb, None), {1: 0}, batch_size=2, source="part-0")
    assert without_baseline.column("baseline_score").null_count == 3
    with pytest.raises(ValueError, match="baseline returned shape"):
        embed_part(regs, imgs, separate_scorer(emb, lambda ims: np.zeros(len(ims))), {1: 0}, batch_size=2,
                   source="part-0")


def test_embed_part_scores_each_distinct_crop_once():
    """One box found for several tags of a prompt is cut once per tag: those crops are scored in one pass,
    each tag reading its own column; the same box in another image, or another box, is scored apart."""
    same, other = [0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 9.0, 9.0]
    regs = _regions([("a", 1, 0), ("a", 2, 0), ("a", 3, 0), ("b", 1, 0), ("b", 2, 0)],
                    boxes=[same, same, other, same, same])
    imgs = dict(zip(regs.column("crop_key").to_pylist(), _crops(5)))
    scored: list[int] = []

    def scorer(images):
        scored.append(len(images))
        n = np.array([im.size[0] for im in images], np.float32)     # each crop's own values (its width)
        return np.stack([n, -n], 1), np.stack([n / 100, n / 200, n / 400], 1)

    table, rejects, metrics = embed_part(regs, imgs, scorer, {1: 0, 2: 1, 3: 2}, batch_size=2, source="p")
    assert rejects == [] and sum(scored) == 3 and metrics == {"crops": 5, "crops_scored": 3}
    # a's tags 1 and 2 share a's first crop (width 20); tag 3 has its own (22); b's two share b's (23)
    assert table.column("baseline_score").to_pylist() == pytest.approx([0.2, 0.1, 0.055, 0.23, 0.115])
    assert [e[0] for e in table.column("embedding").to_pylist()] == [20, 20, 22, 23, 23]
    empty, _, m = embed_part(regs.slice(0, 0), {}, scorer, {}, batch_size=2, source="p")
    assert empty.num_rows == 0 and m == {"crops": 0, "crops_scored": 0}


def test_baseline_scorer_one_encoder_pass_when_the_embedder_is_the_baseline(tmp_path):
    from ram_model.ram import RAM, RAMConfig
    from ram_model.transforms import ImageTransform
    from tasks.stages.embed import baseline_scorer

    torch.manual_seed(0)
    model = RAM(RAMConfig.tiny(num_tags=4, with_caption=False, image_size=32), tags=list("abcd")).eval()
    calls = []
    model.visual_encoder.register_forward_hook(lambda *a: calls.append(1))
    crops = _crops(3)
    emb, probs = baseline_scorer(model, EmbedderConfig(kind="baseline"), 32, baseline_check=True)(crops)
    assert len(calls) == 1                                    # one pass gave both
    with torch.inference_mode():
        pixels = ImageTransform(32).batch(crops)
        want_probs = model.tag_probs(pixels).numpy()
        want_emb = torch.nn.functional.normalize(model.encode_image(pixels)[:, 0], dim=-1).numpy()
    assert np.allclose(probs, want_probs, atol=1e-6) and np.allclose(emb, want_emb, atol=1e-6)
    calls.clear()
    emb, probs = baseline_scorer(model, EmbedderConfig(kind="baseline"), 32, baseline_check=False)(crops)
    assert probs is None and len(calls) == 1
    # another embedder (CLIP): the tagger runs for the scores alone, the same scores
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=8)).save_pretrained(str(tmp_path / "clip"))
    scorer = baseline_scorer(model, EmbedderConfig(kind="clip", model=str(tmp_path / "clip")), 32, baseline_check=True)
    calls.clear()
    emb, probs = scorer(crops)
    assert len(calls) == 1 and emb.shape == (3, 8) and np.allclose(probs, want_probs, atol=1e-6)


def test_clip_embedder_and_config_errors():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=32, patch_size=8,
                                                           projection_dim=24))
    e = ClipEmbedder(EmbedderConfig(kind="clip", model="<in memory>"), model=model)
    E = e(_crops(3))
    assert E.shape == (3, 24) and np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="baseline image encoder"):
        build_embedder(EmbedderConfig())
    with pytest.raises(ValueError, match="model"):
        build_embedder(EmbedderConfig(kind="clip"))
    with pytest.raises(OSError, match="local_files_only"):
        build_embedder(EmbedderConfig(kind="clip", model="/nonexistent/clip"))


def _shape_crop(kind: str, rng) -> Image.Image:
    from PIL import ImageDraw

    im = Image.new("RGB", (40, 40), (240, 240, 240))
    d = ImageDraw.Draw(im)
    colour = tuple(int(v) for v in rng.integers(0, 160, 3))
    a, b = int(rng.integers(4, 10)), int(rng.integers(30, 36))
    if kind == "ball":
        d.ellipse((a, a, b, b), fill=colour)
    else:
        d.polygon([(a, b), ((a + b) // 2, a), (b, b)], fill=colour)
    return im


def test_conv_crop_embedder_trains_saves_and_loads_as_an_embedder(tmp_path):
    """The demo's stand-in for CLIP: trained on labelled crops, shipped as a folder, used by kind 'conv'."""
    from ram_model.embedder import ConvCropEncoder, nearest_centroid_accuracy, train_crop_embedder

    rng = np.random.default_rng(0)
    kinds = ["ball", "triangle"]
    labels = [i % 2 for i in range(120)]
    crops = [_shape_crop(kinds[y], rng) for y in labels]
    torch.manual_seed(0)
    model = ConvCropEncoder(image_size=32, channels=(8, 16), dim=16)
    info = train_crop_embedder(model, crops[:100], labels[:100], 2, steps=60, batch_size=32, log_every=0)
    assert info["steps"] == 60
    model.save_pretrained(tmp_path / "emb")
    embedder = build_embedder(EmbedderConfig(kind="conv", model=str(tmp_path / "emb"), image_size=224))
    train_emb, held_emb = embedder(crops[:100]), embedder(crops[100:])
    assert held_emb.shape == (20, 16) and np.allclose(np.linalg.norm(held_emb, axis=1), 1, atol=1e-5)
    assert nearest_centroid_accuracy(held_emb, labels[100:], train_emb, labels[:100]) >= 0.9
    with pytest.raises(FileNotFoundError, match="demo-embedder"):
        build_embedder(EmbedderConfig(kind="conv", model=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="must name a folder"):
        build_embedder(EmbedderConfig(kind="conv"))
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"architecture": "CLIPVisionModel"}')
    with pytest.raises(ValueError, match="not a conv-crop-encoder"):
        build_embedder(EmbedderConfig(kind="conv", model=str(tmp_path / "clip")))


def test_the_baseline_vetoes_only_tags_it_has_learned(monkeypatch):
    import tasks.shared.models as models
    from tasks.stages.clean import baseline_unlearned_tags

    class Version:
        manifest = {"per_tag_metrics": {"ball": {"ap": 0.3}, "red": {"ap": 0.9}, "sky": {"ap": 0.5}}}

    monkeypatch.setattr(models, "model_version", lambda store, ref: Version())
    assert baseline_unlearned_tags(None, "models/baseline@x", 0.5) == {"ball"}
    assert baseline_unlearned_tags(None, "models/baseline@x", 0.0) == set()       # the paper's rule: every tag
    monkeypatch.setattr(models, "model_version", lambda store, ref: None)         # an official checkpoint
    assert baseline_unlearned_tags(None, "/ckpt.pth", 0.5) == set()
