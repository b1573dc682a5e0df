"""Progress lines (rate and ETA), the torch thread count chosen from the free cores, and the trainer's
step lines."""
from __future__ import annotations

import logging

import pytest

from tasks.engine.config import ConfigError, load_config
from tasks.engine.progress import ProgressLog, apply_torch_threads, choose_threads


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_lines_have_rate_and_eta_and_are_throttled(caplog):
    clock = FakeClock()
    lines = ProgressLog(unit="parts", every_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="ram_engine"):
        assert lines("parsed", 0, 10) == "parsed: 0/10 parts (0 %), ETA: measuring"
        clock.t += 4
        assert lines("parsed", 1, 10) is None            # within 10 s of the last line: quiet
        clock.t += 6
        # 2 parts in 10 s: 0.2 parts/s, 8 left: 40 s
        assert lines("parsed", 2, 10) == "parsed: 2/10 parts (20 %), 0.2 parts/s, ETA 0:00:40"
        clock.t += 1
        assert lines("generated", 0, 3) is not None       # another stage has its own clock
        clock.t += 30
        assert lines("parsed", 10, 10) == "parsed: 10/10 parts (100 %), 0.244 parts/s, ETA 0:00:00"
    assert [r.getMessage() for r in caplog.records if r.name == "ram_engine"] == [
        "parsed: 0/10 parts (0 %), ETA: measuring", "parsed: 2/10 parts (20 %), 0.2 parts/s, ETA 0:00:40",
        "generated: 0/3 parts (0 %), ETA: measuring", "parsed: 10/10 parts (100 %), 0.244 parts/s, ETA 0:00:00"]


def test_the_last_unit_always_logs_even_when_throttled():
    clock = FakeClock()
    lines = ProgressLog(every_s=1000, clock=clock)
    lines("x", 0, 2)
    clock.t += 1
    assert lines("x", 1, 2) is None
    assert lines("x", 2, 2).startswith("x: 2/2 parts (100 %)")


@pytest.mark.parametrize("requested,workers,cores,expected", [
    (None, 1, 2, 2),      # two cores, one worker (training)
    (None, 2, 2, 1),      # two cores, two part workers
    (None, 2, 16, 8),     # 16 cores shared by two workers
    (None, 16, 16, 1),    # as many workers as cores
    (None, 32, 16, 1),    # never zero threads
    (3, 8, 2, 3),         # orchestration.torch_threads wins (the demo sets 1 for shared machines)
])
def test_thread_count_follows_cores_and_workers(requested, workers, cores, expected):
    assert choose_threads(requested, workers, cores=cores) == expected


def test_available_cores_is_what_this_process_may_use():
    import os

    from tasks.engine.progress import available_cores

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_apply_sets_torch_and_the_training_subprocess_env(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("RAM_ENGINE_THREADS", raising=False)
    try:
        assert apply_torch_threads(1) == 1
        assert torch.get_num_threads() == 1
        import os

        assert os.environ["RAM_ENGINE_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_torch_threads_is_a_validated_setting():
    assert load_config(None, ["orchestration.torch_threads=2"]).orchestration.torch_threads == 2
    from tasks.engine.config import EngineConfig

    assert EngineConfig().orchestration.torch_threads is None      # production default: usable cores
    assert load_config(None).orchestration.torch_threads == 1      # the demo config: shared machines
    with pytest.raises(ConfigError, match="orchestration.torch_threads"):
        load_config(None, ["orchestration.torch_threads=0"])


def test_trainer_step_lines_carry_rate_and_eta(tmp_path, caplog, monkeypatch):
    """The trainer logs steps with steps/s and an ETA (what --verbose shows beside the stage's progress line)."""
    from ram_model.trainer import LoopConfig, train
    from tasks.engine import progress

    monkeypatch.setattr(progress, "_verbose", [True])
    from tests.test_train_helpers import make_model, stream_factory, write_shards

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)[0]
    cfg = LoopConfig(lr=1e-2, warmup_steps=0, total_steps=4, batch_size=4, checkpoint_every_steps=100,
                      image_size=16, log_every_steps=2)
    with caplog.at_level(logging.INFO, logger="ram_model"):
        train(make_model(seed=0), stream_factory(shards), cfg, tmp_path / "out")
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [s.split(" ")[1] for s in steps] == ["2/4", "4/4"]
    assert all("steps/s, ETA " in s for s in steps) and steps[-1].endswith("ETA 0:00:00")
