"""DDP on CPU: 2 gloo processes at batch 4 each follow the single process at batch 8."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from ram_model.trainer import LoopConfig, list_checkpoints, train
from tests.test_train_helpers import ddp_worker, make_model, stream_factory, write_shards

torch.set_num_threads(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_ddp_two_processes_follow_single_process(tmp_path):
    shards, _ = write_shards(tmp_path / "shards", n_shards=4, per_shard=6)
    common = dict(lr=3e-2, warmup_steps=1, total_steps=6, grad_accum_steps=1, seed=5,
                  checkpoint_every_steps=3, max_grad_norm=1.0, image_size=16)

    single = make_model(seed=0)
    single_losses = []
    train(single, stream_factory(shards), LoopConfig(batch_size=8, **common), tmp_path / "single",
          progress=lambda p: single_losses.append(p.loss))

    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(ddp_worker, args=(2, _free_port(), shards, str(tmp_path / "ddp"),
                               dict(batch_size=4, **common), str(results)),
             nprocs=2, join=True)
    r0 = torch.load(results / "rank0.pt")
    r1 = torch.load(results / "rank1.pt")

    # train() tore its group down itself: no DDP wrapper (whose Reducer holds the group) is left for a
    # later garbage collection to free at a random moment, and the group is gone
    assert [r["ddp_wrappers_left"] for r in (r0, r1)] == [0, 0]
    assert [r["group_left"] for r in (r0, r1)] == [False, False]
    assert len(r0["losses"]) == 6 and r1["losses"] == []       # progress is reported on rank 0
    # same samples per global step, gradients averaged: only float rounding differs
    assert r0["losses"] == pytest.approx(single_losses, rel=1e-4)
    assert single_losses[-1] < single_losses[0]
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k                 # ranks stay in sync
        assert torch.allclose(v, single.state_dict()[k], atol=1e-4), k
    # one writer: the checkpoints are rank 0's, complete, and carry both ranks' RNG states
    ckpts = list_checkpoints(tmp_path / "ddp")
    assert [p.name for p in ckpts] == ["step_00000003.pt", "step_00000006.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and (state["epoch"], state["consumed"]) == (1, 24)
    assert not [p for p in (tmp_path / "ddp" / "checkpoints").iterdir() if p.name.startswith(".")]
