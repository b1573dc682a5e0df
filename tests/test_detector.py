"""Tiny Grounding DINO through transformers: prompts, chunking, thresholds, training, save/load."""
import pytest
import torch
from PIL import Image, ImageDraw

from ram_model.detector import (CLS_ID, DOT_ID, SEP_ID, DetectorConfig, GroundingDinoDetector, box_iou,
                                build_tiny_detector, evaluate_detector, load_detector, prompt_text, train_detector)

torch.set_num_threads(1)
TAGS = ["red ball", "blue square", "dog", "cat", "traffic light", "green tree"]


def _image(seed=0, size=(128, 96)):
    im = Image.new("RGB", size, (90, 140, 200))
    d = ImageDraw.Draw(im)
    d.rectangle((10 + seed, 12, 50 + seed, 60), fill=(220, 30, 30))
    return im


@pytest.fixture(scope="module")
def det():
    d = build_tiny_detector(TAGS + ["word%d" % i for i in range(60)], seed=0)
    d.cfg.box_threshold = 0.0
    d.cfg.text_threshold = 0.0
    return d


def test_prompt_and_special_token_ids(det):
    assert prompt_text(["Red Ball", "dog"]) == "red ball . dog ."
    (c,) = det.chunk_prompt(TAGS)
    assert c.input_ids[0] == CLS_ID and c.input_ids[-1] == SEP_ID
    assert c.input_ids.count(DOT_ID) == len(TAGS)
    toks = det.tokenizer.convert_ids_to_tokens(c.input_ids)
    for ti, a, e in c.spans:  # every span covers exactly the tag's words
        assert " ".join(toks[a:e]) == TAGS[ti]


def test_detect_shapes_boxes_in_image(det):
    ims = [_image(0), _image(5, (100, 128))]
    out = det.detect(ims, [TAGS, TAGS[:2]])
    assert len(out) == 2
    q = det.model.config.num_queries
    # thresholds 0: every query gets every tag of its image
    assert len(out[0]) == q * len(TAGS) and len(out[1]) == q * 2
    for im, dets in zip(ims, out):
        w, h = im.size
        for d in dets:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0 <= d.score <= 1


def test_long_prompt_is_chunked_and_merged(det):
    many = TAGS + ["word%d" % i for i in range(60)]
    old = det.max_tokens
    try:
        det.max_tokens = 256
        (single,) = det.chunk_prompt(many)
        det.max_tokens = 20
        chunks = det.chunk_prompt(many)
        assert len(chunks) > 5 and all(len(c.input_ids) <= 20 for c in chunks)
        assert [ti for c in chunks for ti, _, _ in c.spans] == list(range(len(many)))
        out = det.detect([_image()], [many])[0]
        assert {d.tag_index for d in out} == set(range(len(many)))
        # one detector pass per chunk: every chunk contributes its tags' detections
        assert len(out) == det.model.config.num_queries * len(many)
    finally:
        det.max_tokens = old
    # a prompt over the model's real 256-token budget is split too
    huge = ["word%d" % (i % 60) for i in range(200)]
    assert len(det.chunk_prompt(huge)) >= 2


def test_thresholds_filter(det):
    im = _image()
    all_d = det.detect([im], [TAGS])[0]
    scores = sorted(d.score for d in all_d)
    cut = scores[len(scores) // 2]
    try:
        det.cfg.text_threshold = cut
        some = det.detect([im], [TAGS])[0]
        assert 0 < len(some) < len(all_d) and all(d.score > cut for d in some)
        det.cfg.text_threshold, det.cfg.box_threshold = 0.0, 0.999999
        assert len(det.detect([im], [TAGS])[0]) <= len(some)
    finally:
        det.cfg.text_threshold = det.cfg.box_threshold = 0.0


def test_proposal_loss_gives_proposal_layers_gradient():
    d = build_tiny_detector(TAGS, seed=1)
    samples = [{"image": _image(i), "tags": TAGS[:3], "boxes": [[10 + i, 12, 50 + i, 60]], "labels": [0]} for i in range(4)]
    names = ["model.enc_output.weight", "model.enc_output_norm.weight"]
    before = {n: p.detach().clone() for n, p in d.model.named_parameters() if n in names}
    train_detector(d, samples, steps=2, batch_size=2, proposal_loss=False, flip=False)
    after = dict(d.model.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) for n in names), "library loss alone should not train them"
    r = train_detector(d, samples, steps=2, batch_size=2, proposal_loss=True)
    after = dict(d.model.named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in names)
    assert r["steps"] == 2 and r["loss_first"] > 0
    assert not d.model.training


def test_train_rejects_bad_labels():
    d = build_tiny_detector(TAGS)
    with pytest.raises(ValueError, match="one label"):
        train_detector(d, [{"image": _image(), "tags": ["dog"], "boxes": [[1, 1, 5, 5]], "labels": [3]}], steps=1)


def test_save_load_roundtrip_and_evaluate(tmp_path, det):
    det.save(tmp_path / "tiny")
    cfg = DetectorConfig(model=str(tmp_path / "tiny"), shortest_edge=128, longest_edge=128, box_threshold=0.0,
                         text_threshold=0.0)
    d2 = load_detector(cfg)
    ims = [_image(3)]
    a, b = det.detect(ims, [TAGS])[0], d2.detect(ims, [TAGS])[0]
    assert len(a) == len(b) and all(x.tag_index == y.tag_index and abs(x.score - y.score) < 1e-4 for x, y in zip(a, b))
    ev = evaluate_detector(d2, [{"image": ims[0], "tags": TAGS, "boxes": [[13, 12, 53, 60]], "labels": [0]}])
    assert ev["pairs"] == 1 and 0 <= ev["recall_at_1"] <= ev["found"] == 1.0


def test_missing_model_and_backend_errors(tmp_path):
    with pytest.raises(OSError, match="local_files_only"):
        GroundingDinoDetector.from_config(DetectorConfig(model=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="backend"):
        DetectorConfig(backend="yolo")
    try:
        import groundingdino  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="groundingdino-py"):
            load_detector(DetectorConfig(backend="groundingdino"))


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
