"""ram_model.trainer: schedule, resume bit-exactness, accumulation, param groups, evaluation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ram_model.data_stream import ShardStream
from ram_model.metrics import tagging_metrics
from ram_model.trainer import (LoopConfig, _resolve_amp, evaluate_tagging, list_checkpoints, lr_at,
                             parameter_groups, train)
from tests.test_train_helpers import NUM_TAGS, make_model, sources, stream_factory, write_shards

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=8)[0]


def _cfg(**kw):
    base = dict(lr=3e-2, warmup_steps=2, total_steps=9, batch_size=4, checkpoint_every_steps=2,
                max_grad_norm=1.0, seed=11, image_size=16)
    base.update(kw)
    return LoopConfig(**base)


class _Crash(Exception):
    pass


def _run(shards, out, cfg, crash_at=None, dropout=0.2):
    model = make_model(seed=0, dropout=dropout)
    log = []

    def progress(p):
        log.append((p.step, p.loss, p.lr))
        if crash_at is not None and p.step == crash_at:
            raise _Crash()
    try:
        res = train(model, stream_factory(shards), cfg, out, progress=progress)
    except _Crash:
        res = None
    return model, log, res


def test_lr_schedule_values():
    cfg = LoopConfig(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=10, schedule="cosine")
    got = [lr_at(s, cfg, 10) for s in range(10)]
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # decay towards min_lr at step total_steps: the last step (9) still has lr > min_lr
    assert got[4] == pytest.approx(1.0) and got[7] == pytest.approx(0.55)
    assert got[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(a > b for a, b in zip(got[4:], got[5:])) and got[9] > 0.1
    assert lr_at(10, cfg, 10) == pytest.approx(0.1) and lr_at(50, cfg, 10) == pytest.approx(0.1)
    lin = LoopConfig(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=10, schedule="linear")
    assert lr_at(6, lin, 10) == pytest.approx(1.0 - 0.9 * 2 / 6)
    assert lr_at(9, lin, 10) == pytest.approx(0.25)
    const = LoopConfig(lr=1.0, warmup_steps=0, total_steps=10, schedule="constant")
    assert [lr_at(s, const, 10) for s in (0, 9)] == [1.0, 1.0]


@pytest.mark.parametrize("workers,accum", [(0, 1), (2, 2)])
def test_resume_mid_epoch_is_bitwise_equal(shards, tmp_path, workers, accum):
    # 24 samples / (4 x accum) per step: the run crosses an epoch boundary, and the crash at
    # step 5 lands after the step-4 checkpoint, mid-epoch, so step 5 is replayed on resume.
    cfg = _cfg(num_workers=workers, grad_accum_steps=accum, batch_size=4 // accum)
    ref_model, ref_log, ref_res = _run(shards, tmp_path / "ref", cfg)
    assert ref_res.step == 9 and ref_res.epoch >= 1
    # the lr each step used follows the schedule
    assert [lr for _, _, lr in ref_log] == pytest.approx([lr_at(s, cfg, 9) for s in range(9)])

    out = tmp_path / "crashy"
    _, log1, res1 = _run(shards, out, cfg, crash_at=5)
    assert res1 is None and [p.name for p in list_checkpoints(out)] == ["step_00000002.pt",
                                                                        "step_00000004.pt"]
    model2, log2, res2 = _run(shards, out, cfg)
    assert res2.resumed_from.endswith("step_00000004.pt") and res2.step == 9
    assert [s for s, _, _ in log2] == [5, 6, 7, 8, 9]
    assert [l for _, l, _ in log2] == [l for s, l, _ in ref_log if s >= 5]
    for (k, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["step_00000008.pt", "step_00000009.pt"]      # keep_checkpoints=2, no temp files
    # frozen by pattern: label_embed never moves
    assert torch.equal(model2.label_embed, make_model(seed=0).label_embed)


def test_resume_of_finished_run_does_nothing(shards, tmp_path):
    cfg = _cfg(total_steps=3, checkpoint_every_steps=10)
    m1, _, r1 = _run(shards, tmp_path, cfg, dropout=0.0)
    m2, log2, r2 = _run(shards, tmp_path, cfg, dropout=0.0)
    assert log2 == [] and r2.step == 3 and r2.resumed_from.endswith("step_00000003.pt")
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_grad_accumulation_matches_full_batch(shards, tmp_path):
    full, log_f, _ = _run(shards, tmp_path / "f", _cfg(batch_size=8, grad_accum_steps=1, total_steps=5),
                          dropout=0.0)
    acc, log_a, _ = _run(shards, tmp_path / "a", _cfg(batch_size=4, grad_accum_steps=2, total_steps=5),
                         dropout=0.0)
    assert [l for _, l, _ in log_a] == pytest.approx([l for _, l, _ in log_f], rel=1e-5)
    for (k, a), b in zip(full.state_dict().items(), acc.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_epochs_mode_and_image_size_check(shards, tmp_path):
    cfg = _cfg(total_steps=None, epochs=2, batch_size=8, warmup_steps=0)
    _, log, res = _run(shards, tmp_path / "e", cfg, dropout=0.0)
    assert res.total_steps == 6 and len(log) == 6          # 24 samples / 8 per step x 2 epochs
    with pytest.raises(ValueError, match="image_size=32"):
        _run(shards, tmp_path / "s", _cfg(image_size=32))


def test_param_groups_and_frozen():
    m = make_model()
    m.label_embed.requires_grad_(False)
    groups = parameter_groups(m, 0.05, ())
    names = {id(p): n for n, p in m.named_parameters()}
    decay = sorted(names[id(p)] for p in groups[0]["params"])
    no_decay = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decay == ["conv.weight", "head.weight"]
    assert no_decay == ["conv.bias", "head.bias", "norm.bias", "norm.weight"]
    emb = torch.nn.Embedding(5, 3)
    assert parameter_groups(emb, 0.1, ())[0]["weight_decay"] == 0.0


def test_amp_resolution_and_bf16_on_cpu(shards, tmp_path):
    cpu = torch.device("cpu")
    assert _resolve_amp("auto", cpu) is None and _resolve_amp("off", cpu) is None
    assert _resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        _resolve_amp("fp16", cpu)
    _, log, res = _run(shards, tmp_path, _cfg(amp="bf16", total_steps=2), dropout=0.0)
    assert res.step == 2 and all(math.isfinite(l) for _, l, _ in log)


def test_config_errors():
    with pytest.raises(ValueError, match="exactly one of total_steps or epochs"):
        LoopConfig()
    with pytest.raises(ValueError, match="LoopConfig.schedule"):
        LoopConfig(total_steps=1, schedule="step")
    with pytest.raises(ValueError, match="LoopConfig.amp"):
        LoopConfig(total_steps=1, amp="fp8")


def test_tagging_metrics_known_values():
    scores = np.array([[0.9, 0.2, 0.6, 0.3],
                       [0.1, 0.8, 0.4, 0.7],
                       [0.7, 0.3, 0.2, 0.1],
                       [0.2, 0.6, 0.9, 0.5]])
    targets = np.array([[1, 0, 1, 0],
                        [0, 1, 0, 0],
                        [1, 0, 0, 0],
                        [0, 1, 0, 0]])
    m = tagging_metrics(scores, targets, 0.5)
    # class 3 has no positive: it is left out of mAP; class 2's positive ranks second -> AP 0.5
    assert m["num_tags_present"] == 3
    assert m["per_class"]["ap"] == [1.0, 1.0, 0.5, None]
    assert m["mAP"] == pytest.approx(2.5 / 3)
    # predicted (> 0.5, strict: 0.5 itself is not): c0 {0,2}, c1 {1,3}, c2 {0,3}, c3 {1}
    assert m["per_class"]["precision"] == [1.0, 1.0, 0.5, 0.0]
    assert m["per_class"]["recall"] == [1.0, 1.0, 1.0, None]
    assert m["precision"] == pytest.approx(5 / 7) and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 * (5 / 7) / (5 / 7 + 1))
    assert m["macro_precision"] == pytest.approx(2.5 / 3) and m["macro_recall"] == 1.0
    per_class = tagging_metrics(scores, targets, [0.5, 0.5, 0.95, 0.75])
    assert per_class["per_class"]["precision"] == [1.0, 1.0, None, None]
    assert per_class["recall"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="thresholds"):
        tagging_metrics(scores, targets, [0.5, 0.5])


def test_evaluate_tagging_matches_direct_computation(shards):
    model = make_model(seed=3)
    ds = ShardStream(sources(shards), NUM_TAGS, image_size=16, shuffle=False, drop_last=False, batch_size=5)
    res = evaluate_tagging(model, ds, 0.5, batch_size=5)
    images = torch.cat([b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=5)])
    targets = torch.cat([b["tag_targets"] for b in torch.utils.data.DataLoader(ds, batch_size=5)])
    with torch.no_grad():
        scores = torch.sigmoid(model.tag_logits(images)).numpy()
    ref = tagging_metrics(scores, targets.numpy(), 0.5)
    assert res["num_samples"] == 24
    assert res["mAP"] == pytest.approx(ref["mAP"]) and res["f1"] == pytest.approx(ref["f1"])
    assert model.training                                  # mode restored
    dropping = ShardStream(sources(shards), NUM_TAGS, image_size=16, shuffle=False, batch_size=5)
    with pytest.raises(ValueError, match="drop 4 of its samples"):
        evaluate_tagging(model, dropping, 0.5)


def test_unreadable_latest_checkpoint_falls_back(shards, tmp_path):
    cfg = _cfg(total_steps=4, checkpoint_every_steps=2)
    ref, _, _ = _run(shards, tmp_path / "ref", cfg, dropout=0.0)
    out = tmp_path / "run"
    _run(shards, out, cfg, dropout=0.0)
    stale = out / "checkpoints" / ".step_00000006.pt.tmp-999"    # a writer killed mid-save
    stale.write_bytes(b"partial")
    latest = list_checkpoints(out)[-1]
    latest.write_bytes(latest.read_bytes()[:1000])          # e.g. a disk that lost the tail
    model, log, res = _run(shards, out, cfg, dropout=0.0)
    assert res.resumed_from.endswith("step_00000002.pt") and [s for s, _, _ in log] == [3, 4]
    assert not stale.exists()
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_the_disk_cannot_hold_is_refused_by_name(shards, tmp_path, monkeypatch):
    """A full disk is named with the folder and the sizes, before a byte is written (torch.save itself fails
    deep in its zip writer with "unexpected pos"), and no partial file is left; with room it saves."""
    import shutil

    import ram_model.trainer as trainer

    model = make_model(seed=0)
    need = trainer._tensor_bytes({"model": model.state_dict(), "again": model.state_dict()})
    assert need == sum(t.untyped_storage().nbytes() for t in model.state_dict().values())  # shared storage once
    real = shutil.disk_usage
    monkeypatch.setattr(trainer.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=need // 2))
    with pytest.raises(OSError, match=r"no room for the checkpoint .*step_00000002\.pt: it needs ~0\.\d+ GB, "
                                      r"and 0\.\d+ GB are free on that disk"):
        _run(shards, tmp_path, _cfg(total_steps=3))
    assert not [p for p in (tmp_path / "checkpoints").iterdir()]
    monkeypatch.setattr(trainer.shutil, "disk_usage", real)
    _, _, res = _run(shards, tmp_path, _cfg(total_steps=3))
    assert res.step == 3 and res.checkpoint.endswith("step_00000003.pt")
