"""The step loop of the one-off, in-memory pretraining commands (the demo's tagger encoder and crop embedder):
what they share once the batch's loss is computed. The engine's own training streams shards (`trainer.Trainer`)."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch


def fit_in_memory(model: torch.nn.Module, opt: torch.optim.Optimizer, step_loss: Callable[[int], torch.Tensor], *,
                  steps: int, name: str, clip_norm: float | None = None, time_limit_s: float | None = None,
                  log_every: int = 250, log: Callable[[str], Any] = print, digits: int = 2) -> dict:
    """Run `step_loss(step)` (which sets the step's learning rates and draws its batch) and one optimiser step
    per step; log the mean loss every `log_every` steps; stop early after `time_limit_s`. Leaves the model in
    eval mode and returns the steps done, the seconds taken and the mean loss of the last 50 steps."""
    model.train()
    t0, done, losses = time.perf_counter(), 0, []
    for step in range(steps):
        loss = step_loss(step)
        opt.zero_grad()
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if log_every and done % log_every == 0:
            log(f"  {name} step {done}/{steps}: loss {np.mean(losses[-log_every:]):.{digits}f}")
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
    model.eval()
    return {"steps": done, "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-50:]))}
