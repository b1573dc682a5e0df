"""Progress of long work as log lines with a rate and an ETA, and the CPU threads work may use.

Prefect-free: `flows/runtime.py` forwards these lines (and a progress artifact) to Prefect; the CLI
adds its own bar. Lines are throttled (`every_s`), but the first and the last unit always log, so
short work still says how fast it went.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from ram_model.trainer import format_duration

log = logging.getLogger("ram_engine")


# --------------------------------------------------------------------------- quiet by default
_verbose = [False]


class TrainerStepLines(logging.Filter):
    """The trainer logs a line every 1 % of its steps; a stage's training progress line (StageProgress, every
    ~10 s with rate and ETA) already says the same, so the trainer's own lines show at --verbose only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _verbose[0] or not (record.levelno == logging.INFO and str(record.msg).startswith("step "))


def quiet_by_default() -> None:
    """Progress lines, warnings and errors only: no per-step trainer lines, no third-party progress bars
    (transformers / huggingface_hub read the variable when they are imported; a loaded transformers is told
    too). Idempotent; `set_verbose(True)` undoes it."""
    trainer = logging.getLogger("ram_model.trainer")
    if not any(isinstance(f, TrainerStepLines) for f in trainer.filters):
        trainer.addFilter(TrainerStepLines())
    if _verbose[0]:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def set_verbose(on: bool) -> None:
    """--verbose: every log line of ours at DEBUG and up, the trainer's per-step lines, third-party bars."""
    _verbose[0] = on
    for name in ("ram_engine", "ram_model"):
        logging.getLogger(name).setLevel(logging.DEBUG if on else os.environ.get("RAM_ENGINE_LOG", "INFO"))
    if on and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS")


class ProgressLog:
    """`update(what, done, total)` logs "what: done/total unit (pct), rate unit/s, ETA h:mm:ss" at most
    every `every_s` seconds per `what` (and always for the first and the last unit)."""

    def __init__(self, unit: str = "parts", every_s: float = 10.0, logger: logging.Logger = log,
                 clock: Callable[[], float] = time.monotonic):
        self.unit, self.every_s, self.logger, self.clock = unit, every_s, logger, clock
        self._start: dict[str, tuple[float, int]] = {}
        self._last: dict[str, float] = {}

    def line(self, what: str, done: int, total: int) -> str:
        """The progress line, rate and ETA measured since the first update of `what`."""
        now = self.clock()
        t0, done0 = self._start.setdefault(what, (now, done))
        elapsed = now - t0
        rate = (done - done0) / elapsed if elapsed > 0 and done > done0 else None
        pct = f" ({100 * done / total:.0f} %)" if total else ""
        text = f"{what}: {done}/{total} {self.unit}{pct}"
        if rate:
            eta = (total - done) / rate
            text += f", {rate:.3g} {self.unit}/s, ETA {format_duration(eta)}"
        elif done >= total:
            text += ", done"
        else:
            text += ", ETA: measuring"
        return text

    def __call__(self, what: str, done: int, total: int) -> str | None:
        """Log the line when due; returns it when logged (None when throttled)."""
        now = self.clock()
        first = what not in self._start
        text = self.line(what, done, total)
        if first or done >= total or now - self._last.get(what, now) >= self.every_s:
            self._last[what] = now
            self.logger.info(text)
            return text
        return None


# --------------------------------------------------------------------------- threads
def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def choose_threads(requested: int | None, workers: int = 1, *, cores: int | None = None) -> int:
    """Torch threads per process: `requested` when set, else the cores this process may use shared by
    `workers` concurrent workers. Not from the load average: the thread count can change float results,
    and the same inputs must give the same bytes whatever else the machine is doing. On a machine
    shared with other jobs set `orchestration.torch_threads` (more threads than free cores made
    training ~12x slower on two busy cores)."""
    if requested:
        return requested
    return max(1, (cores or available_cores()) // max(1, workers))


def apply_torch_threads(requested: int | None, workers: int = 1) -> int:
    """Set torch's intra-op threads (and RAM_ENGINE_THREADS for training subprocesses); returns the count."""
    n = choose_threads(requested, workers)
    os.environ["RAM_ENGINE_THREADS"] = str(n)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    # Said once per process and choice (every stage sets it again; a line before each stage was noise).
    choice = (n, workers, bool(requested))
    (log.info if choice not in _threads_said else log.debug)(
        "torch uses %d thread(s) (%d core(s) available, %d worker(s)%s)", n, available_cores(), workers,
        "" if not requested else ", set by orchestration.torch_threads")
    _threads_said.add(choice)
    return n


_threads_said: set[tuple[int, int, bool]] = set()
