"""Training loop for the RAM tagger: AdamW, warm-up + decay, gradient accumulation, mixed
precision, clipping, DDP through torchrun, and checkpoints that resume mid-epoch exactly.

The model only needs two methods:
    model.training_losses(images, tag_targets, caption_ids=None, caption_mask=None,
                          clip_image_embeds=None) -> {"loss": total, <component>: tensor, ...}
    model.tag_logits(images) -> [B, num_tags]           (for evaluate_tagging)

The loss is expected to be a mean over the batch: micro-batch losses are divided by
grad_accum_steps and DDP averages gradients over ranks, so B x accum x world behaves like one
batch of that size.

Exact resume: a checkpoint holds model, optimizer, scheduler, grad scaler, the RNG states of
every rank (python, numpy, torch, cuda) and the data position (epoch, global samples consumed in
the epoch). The data stream (ram_model.data_stream.ShardStream) orders samples by a seeded global
sequence, so restarting at that position replays the uninterrupted run (bitwise on CPU, same
world size, batch size and seed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data_stream import make_loader
from .fit import fit_in_memory
from .metrics import tagging_metrics

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ram-train-checkpoint/1"
_CKPT_RE = re.compile(r"^step_(\d{8,})\.pt$")


@dataclass
class LoopConfig:
    """Training hyper-parameters. Give exactly one of total_steps / epochs.

    batch_size is per rank and per micro-batch: one optimizer step sees
    batch_size * grad_accum_steps * world_size samples.
    """
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int | None = None
    epochs: int | None = None
    schedule: str = "cosine"                 # cosine | linear | constant (after warm-up)
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0        # None or 0: no clipping
    amp: str = "auto"                        # auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | off
    device: str = "auto"                     # auto | cpu | cuda
    seed: int = 0
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    num_workers: int = 0
    image_size: int | None = None            # checked against the first batch when set
    # Parameters whose name matches (re.search) are frozen (RAM keeps its CLIP label queries fixed).
    frozen_patterns: tuple[str, ...] = ("label_embed",)
    # No weight decay for these names, for every parameter with ndim <= 1 (biases, norm scales)
    # and for parameters of Embedding / norm modules.
    no_decay_patterns: tuple[str, ...] = ("absolute_pos_embed", "relative_position_bias_table",
                                          "position_embeddings", "label_embed", "reweight_scale")
    lr_scales: tuple[tuple[str, float], ...] = ()   # (parameter-name regex, lr multiplier), first match wins
    find_unused_parameters: bool = True      # RAM's caption branch is idle when no captions are given
    log_every_steps: int = 1
    log_every_seconds: float | None = 30.0   # also log when this long has passed (slow steps still report)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"LoopConfig.{name}: {why} (got {getattr(self, name)!r})")
        if (self.total_steps is None) == (self.epochs is None):
            raise ValueError("LoopConfig: give exactly one of total_steps or epochs "
                             f"(got total_steps={self.total_steps!r}, epochs={self.epochs!r})")
        if self.total_steps is not None and self.total_steps <= 0:
            bad("total_steps", "must be > 0")
        if self.epochs is not None and self.epochs <= 0:
            bad("epochs", "must be > 0")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", "must be in [0, lr]")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if self.schedule not in ("cosine", "linear", "constant"):
            bad("schedule", "must be cosine, linear or constant")
        for name in ("batch_size", "grad_accum_steps", "checkpoint_every_steps", "keep_checkpoints",
                     "log_every_steps"):
            if int(getattr(self, name)) <= 0:
                bad(name, "must be > 0")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            bad("amp", "must be auto, bf16, fp16 or off")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be auto, cpu or cuda")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0 or None")
        self.betas = tuple(self.betas)
        self.frozen_patterns = tuple(self.frozen_patterns)
        self.no_decay_patterns = tuple(self.no_decay_patterns)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(step: int, cfg: LoopConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warm-up rises linearly to cfg.lr, reached at step warmup_steps - 1 (step 0 already moves:
    lr * 1/warmup_steps). Then cosine / linear decay from cfg.lr at step warmup_steps towards
    cfg.min_lr, which it would reach at step total_steps (so the last step still learns), or constant.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr - (cfg.lr - cfg.min_lr) * p


@dataclass
class TrainProgress:
    step: int                 # optimizer steps done
    total_steps: int
    epoch: int
    loss: float               # mean over micro-batches and ranks
    components: dict[str, float]
    lr: float                 # lr used by this step
    samples_per_s: float      # global, since the previous report
    grad_norm: float | None
    checkpoint: str | None    # written at this step


@dataclass
class TrainResult:
    step: int
    total_steps: int
    epoch: int
    consumed: int             # global samples consumed in `epoch`
    loss: float | None
    checkpoint: str | None
    resumed_from: str | None
    wall_s: float


# ---------------------------------------------------------------------------------------------
# Distributed setup

@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("LoopConfig.device='cuda' but CUDA is not available")
    if world <= 1:
        return _Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun "
                               "(it sets RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        owns = True
    return _Dist(rank, world, local, device, owns)


def _resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("LoopConfig.amp='fp16' needs CUDA; use 'bf16' or 'off' on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


# ---------------------------------------------------------------------------------------------
# Parameters

def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set requires_grad=False on parameters whose name matches any regex; returns their names."""
    frozen = []
    regs = [re.compile(p) for p in patterns]
    for name, p in model.named_parameters():
        if any(r.search(name) for r in regs):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                     nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, weight_decay: float,
                     no_decay_patterns: Sequence[str] = (), lr: float | None = None,
                     lr_scales: Sequence[tuple[str, float]] = ()) -> list[dict]:
    """AdamW groups: decayed weights, and biases / norms / embeddings without decay; each split again
    by learning-rate scale when `lr_scales` ((name regex, multiplier), first match wins) is given."""
    regs = [re.compile(p) for p in no_decay_patterns]
    scales = [(re.compile(p), float(m)) for p, m in lr_scales]
    no_decay_ids = set()
    for mod in model.modules():
        if isinstance(mod, _NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    buckets: dict[tuple[bool, float], list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:   # tied weights appear once
            continue
        seen.add(id(p))
        decayed = not (p.ndim <= 1 or id(p) in no_decay_ids or any(r.search(name) for r in regs))
        scale = next((m for r, m in scales if r.search(name)), 1.0)
        buckets.setdefault((decayed, scale), []).append(p)
    groups = []
    for (decayed, scale), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], -kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if lr is not None:
            group["lr"] = lr * scale
        groups.append(group)
    if not groups:
        raise ValueError("the model has no trainable parameters (check LoopConfig.frozen_patterns)")
    return groups


# ---------------------------------------------------------------------------------------------
# RNG state (stored as tensors / plain Python so checkpoints load with weights_only=True)

def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Checkpoints

def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints in out_dir/checkpoints, oldest first."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the distinct tensor storages in a nested checkpoint: about its size on disk."""
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return sum(seen.values())


def _check_free_space(obj: Any, path: Path) -> None:
    """Refuse, naming the folder and the sizes, a checkpoint its disk cannot hold: torch.save on a full disk
    fails deep in its zip writer ("enforce fail at inline_container.cc … unexpected pos"), which names
    neither the disk nor the cause."""
    need = _tensor_bytes(obj)
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise OSError(errno.ENOSPC, f"no room for the checkpoint {path}: it needs ~{need / 1e9:.2f} GB, and "
                                    f"{free / 1e9:.2f} GB are free on that disk; free space there, or give the "
                                    f"training work folder a larger disk (the engine's: RAM_ENGINE_CACHE)")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    _check_free_space(obj, path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    with contextlib.suppress(OSError):   # make the rename durable where the OS allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _LossModule(nn.Module):
    """Routes DDP's forward to model.training_losses so gradient sync hooks run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict) -> dict:
        return self.model.training_losses(**inputs)


def default_batch_to_inputs(batch: dict, device: torch.device) -> dict:
    """Collated stream batch -> kwargs of training_losses (images + tag targets only).

    Pass your own `batch_to_inputs` to tokenize batch["caption"] into caption_ids/caption_mask
    or to add clip_image_embeds from a frozen CLIP teacher.
    """
    return {"images": batch["image"].to(device, non_blocking=True),
            "tag_targets": batch["tag_targets"].to(device, non_blocking=True)}


# ---------------------------------------------------------------------------------------------

class Trainer:
    """See module docstring. `dataset_factory(rank=, world_size=, batch_size=, seed=)` returns a
    stream with `batch_size`, `set_epoch(e)`, `set_start(n)` and, when cfg.epochs is used,
    `samples_per_rank()`; e.g. functools.partial(ShardStream, shards, num_tags, transform).
    """

    def __init__(self, model: nn.Module, dataset_factory: Callable[..., Any], cfg: LoopConfig,
                 out_dir: str | os.PathLike, *,
                 batch_to_inputs: Callable[[dict, torch.device], dict] | None = None,
                 progress: Callable[[TrainProgress], Any] | None = None):
        for meth in ("training_losses",):
            if not callable(getattr(model, meth, None)):
                raise TypeError(f"Trainer: model {type(model).__name__} has no {meth}() method")
        self.model = model
        self.dataset_factory = dataset_factory
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.batch_to_inputs = batch_to_inputs or default_batch_to_inputs
        self.progress = progress

    # -- setup ----------------------------------------------------------------------------
    def _build(self):
        cfg = self.cfg
        self.dist = _setup_distributed(cfg.device)
        d = self.dist
        _seed_all(cfg.seed + d.rank)
        self.frozen = freeze_parameters(self.model, cfg.frozen_patterns)
        # A frozen BatchNorm keeps its running statistics too (eval mode in every step): frozen is as it started
        self.frozen_norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                             and m.affine and not m.weight.requires_grad]
        self.model.to(d.device)
        self.amp_dtype = _resolve_amp(cfg.amp, d.device)
        self.loss_module = _LossModule(self.model)
        if d.world_size > 1:
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        groups = parameter_groups(self.model, cfg.weight_decay, cfg.no_decay_patterns, cfg.lr, cfg.lr_scales)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.stream = self.dataset_factory(rank=d.rank, world_size=d.world_size,
                                           batch_size=cfg.batch_size, seed=cfg.seed)
        if getattr(self.stream, "batch_size", cfg.batch_size) != cfg.batch_size:
            raise ValueError(f"dataset_factory returned a stream with batch_size="
                             f"{self.stream.batch_size}, LoopConfig.batch_size={cfg.batch_size}")
        self.global_batch = cfg.batch_size * d.world_size
        self.steps_per_epoch = None
        if hasattr(self.stream, "samples_per_rank"):
            self.steps_per_epoch = self.stream.samples_per_rank() // cfg.batch_size // cfg.grad_accum_steps
        if cfg.total_steps is not None:
            self.total_steps = cfg.total_steps
        else:
            if self.steps_per_epoch is None:
                raise ValueError("LoopConfig.epochs needs a stream with samples_per_rank(); "
                                 "set total_steps instead")
            self.total_steps = cfg.epochs * self.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset is smaller than one optimizer step: {self.stream.num_samples()} samples, "
                f"one step needs batch_size*grad_accum_steps*world_size = "
                f"{cfg.batch_size}*{cfg.grad_accum_steps}*{d.world_size}")
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, cfg, total) / cfg.lr)

    # -- checkpoints ------------------------------------------------------------------------
    def _save(self, step: int, epoch: int, consumed: int) -> str | None:
        rng = _rng_state()
        if self.dist.world_size > 1:
            states = [None] * self.dist.world_size
            dist.all_gather_object(states, rng)   # every rank's RNG, so each resumes its own
        else:
            states = [rng]
        if not self.dist.is_main:
            return None
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": states,
            "step": step, "epoch": epoch, "consumed": consumed,
            "total_steps": self.total_steps, "world_size": self.dist.world_size,
            "batch_size": self.cfg.batch_size, "grad_accum_steps": self.cfg.grad_accum_steps,
            "config": self.cfg.to_dict(),
        }
        ckdir = self.out_dir / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        for stale in ckdir.glob(".step_*.pt.tmp-*"):    # left by a writer that died mid-save
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        path = ckdir / f"step_{step:08d}.pt"
        _atomic_torch_save(state, path)
        for old in list_checkpoints(self.out_dir)[:-self.cfg.keep_checkpoints]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return str(path)

    def _load_latest(self) -> tuple[dict, Path] | None:
        for path in reversed(list_checkpoints(self.out_dir)):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - an unreadable file: fall back to an older one
                log.warning("checkpoint %s cannot be loaded (%s: %s); trying an older one",
                            path, type(e).__name__, e)
                continue
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint "
                                 f"(format={state.get('format')!r})")
            return state, path
        return None

    def _restore(self, state: dict, path: Path) -> tuple[int, int, int]:
        cfg, d = self.cfg, self.dist
        if state["total_steps"] != self.total_steps:
            log.warning("resume %s: total_steps %s -> %s changes the lr schedule", path,
                        state["total_steps"], self.total_steps)
        if (state["world_size"], state["batch_size"], state["grad_accum_steps"]) != \
                (d.world_size, cfg.batch_size, cfg.grad_accum_steps):
            log.warning("resume %s: world_size/batch_size/grad_accum %s -> %s; the data position "
                        "is kept in samples but the run will not replay the original exactly", path,
                        (state["world_size"], state["batch_size"], state["grad_accum_steps"]),
                        (d.world_size, cfg.batch_size, cfg.grad_accum_steps))
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise RuntimeError(f"checkpoint {path} does not fit this model: {e}") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        _set_rng_state(rngs[d.rank] if d.rank < len(rngs) else rngs[0])
        return int(state["step"]), int(state["epoch"]), int(state["consumed"])

    # -- one optimizer step ---------------------------------------------------------------
    def _step(self, micro: list[dict]) -> tuple[torch.Tensor, dict, float | None]:
        cfg, d = self.cfg, self.dist
        accum = len(micro)
        self.loss_module.train()
        for m in self.frozen_norms:
            m.eval()
        total = None
        comps: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            inputs = self.batch_to_inputs(batch, d.device)
            last = i == accum - 1
            sync = (self.loss_module.no_sync() if d.world_size > 1 and not last
                    else contextlib.nullcontext())
            with sync:
                with torch.autocast(device_type=d.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.loss_module(inputs)
                if "loss" not in out:
                    raise KeyError(f"model.training_losses returned keys {sorted(out)}; it must "
                                   "return the total as 'loss'")
                loss = out["loss"].float()
                self.scaler.scale(loss / accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
            for k, v in out.items():
                if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                    comps[k] = comps.get(k, 0) + v.detach().float()
        names = sorted(comps)
        vec = torch.stack([total] + [comps[n] for n in names]) / accum
        if d.world_size > 1:
            dist.all_reduce(vec)
            vec /= d.world_size
        vals = vec.tolist()
        # fp16's scaler skips steps with inf gradients itself; otherwise stop before applying them
        if not math.isfinite(vals[0]) and self.amp_dtype != torch.float16:
            raise FloatingPointError(f"non-finite training loss {vals[0]} at step "
                                     f"{self.scheduler.last_epoch} (lower lr, check the data)")
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return vals[0], dict(zip(names, vals[1:])), grad_norm

    # -- main loop ------------------------------------------------------------------------
    def train(self, resume: bool = True) -> TrainResult:
        t_start = time.perf_counter()
        try:
            self._build()       # inside: a group made before a bad config is found is destroyed too
            cfg, d = self.cfg, self.dist
            step, epoch, consumed = 0, 0, 0
            resumed_from = None
            if resume:
                found = self._load_latest()
                if found is not None:
                    step, epoch, consumed = self._restore(*found)
                    resumed_from = str(found[1])
                    if d.is_main:
                        log.info("resumed from %s: step %d, epoch %d, %d samples into the epoch",
                                 resumed_from, step, epoch, consumed)
            last_loss, last_ckpt = None, resumed_from
            t_report, n_report = time.perf_counter(), 0
            t_run, step_run = t_report, step     # rate and ETA over this run (a resume starts afresh)
            checked_size = cfg.image_size is None
            while step < self.total_steps:
                self.stream.set_epoch(epoch)
                self.stream.set_start(consumed)
                loader = make_loader(self.stream, cfg.num_workers, pin_memory=d.device.type == "cuda")
                it = iter(loader)
                epoch_over = False
                while step < self.total_steps:
                    micro = []
                    for _ in range(cfg.grad_accum_steps):
                        try:
                            micro.append(next(it))
                        except StopIteration:
                            epoch_over = True
                            break
                    if epoch_over:      # a trailing partial accumulation is dropped
                        break
                    if not checked_size:
                        hw = tuple(micro[0]["image"].shape[-2:])
                        if hw != (cfg.image_size, cfg.image_size):
                            raise ValueError(f"the stream yields images of {hw}, LoopConfig."
                                             f"image_size={cfg.image_size}: fix the transform or config")
                        checked_size = True
                    lr = self.optimizer.param_groups[0]["lr"]
                    loss, comps, gnorm = self._step(micro)
                    step += 1
                    consumed += cfg.grad_accum_steps * self.global_batch
                    n_report += cfg.grad_accum_steps * self.global_batch
                    last_loss = loss
                    ckpt = None
                    if step % cfg.checkpoint_every_steps == 0 or step == self.total_steps:
                        ckpt = self._save(step, epoch, consumed)
                        last_ckpt = ckpt or last_ckpt
                    now = time.perf_counter()
                    due = (step % cfg.log_every_steps == 0 or step == self.total_steps
                           or (cfg.log_every_seconds is not None and now - t_report >= cfg.log_every_seconds))
                    if d.is_main and due:
                        sps = n_report / max(now - t_report, 1e-9)
                        t_report, n_report = now, 0
                        steps_per_s = (step - step_run) / max(now - t_run, 1e-9)
                        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
                        log.info("step %d/%d (%.0f %%) epoch %d loss %.4f lr %.3g %.1f samples/s, %.3g steps/s, "
                                 "ETA %s", step, self.total_steps, 100 * step / self.total_steps, epoch, loss, lr,
                                 sps, steps_per_s, format_duration(eta))
                        if self.progress is not None:
                            self.progress(TrainProgress(step, self.total_steps, epoch, loss, comps,
                                                        lr, sps, gnorm, ckpt))
                del it, loader
                if epoch_over:
                    epoch, consumed = epoch + 1, 0
            return TrainResult(step, self.total_steps, epoch, consumed, last_loss, last_ckpt,
                               resumed_from, time.perf_counter() - t_start)
        finally:
            self._release_process_group()

    def _release_process_group(self) -> None:
        """Unwrap DDP and destroy the group we made, here and now.

        The DDP wrapper sits in a reference cycle and its Reducer holds the process group, so left to
        the garbage collector the group's gloo threads are joined at some later moment: during
        interpreter exit that aborts the process ("terminate called without an active exception",
        pytorch/pytorch#179291); while the main thread holds the GIL that a gloo thread needs to free a
        finished collective's tensors, it deadlocks (both seen in CI).
        """
        if isinstance(getattr(self, "loss_module", None), nn.parallel.DistributedDataParallel):
            self.loss_module = self.loss_module.module
            gc.collect()
        if getattr(self, "dist", None) is not None and self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def format_duration(seconds: float) -> str:
    """h:mm:ss ("?" for nan: no rate measured yet)."""
    if seconds != seconds:
        return "?"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(model: nn.Module, dataset_factory: Callable[..., Any], cfg: LoopConfig,
          out_dir: str | os.PathLike, resume: bool = True,
          progress: Callable[[TrainProgress], Any] | None = None, *,
          batch_to_inputs: Callable[[dict, torch.device], dict] | None = None) -> TrainResult:
    """Train `model` in place; see Trainer. Under torchrun (WORLD_SIZE > 1) every rank calls it."""
    return Trainer(model, dataset_factory, cfg, out_dir, batch_to_inputs=batch_to_inputs,
                   progress=progress).train(resume=resume)


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate_tagging(model: nn.Module, dataset: Iterable | torch.utils.data.Dataset,
                     thresholds: float | Sequence[float] | np.ndarray, *, batch_size: int = 32,
                     num_workers: int = 0, device: str | torch.device | None = None,
                     amp: str = "off") -> dict:
    """Run model.tag_logits over `dataset` (samples {image, tag_targets}) and score it with
    tagging_metrics(sigmoid(logits), targets, thresholds). Single process; the model's train/eval
    mode is restored afterwards.
    """
    if not callable(getattr(model, "tag_logits", None)):
        raise TypeError(f"evaluate_tagging: model {type(model).__name__} has no tag_logits() method")
    if hasattr(dataset, "samples_per_rank") and getattr(dataset, "world_size", 1) == 1 \
            and dataset.samples_per_rank() != dataset.num_samples():
        raise ValueError(f"evaluate_tagging: the stream would drop {dataset.num_samples() - dataset.samples_per_rank()} "
                         "of its samples (drop_last=True); build it with drop_last=False")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = _resolve_amp(amp, dev)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    scores, targets = [], []
    try:
        for batch in loader:
            with torch.autocast(device_type=dev.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                logits = model.tag_logits(batch["image"].to(dev))
            scores.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(batch["tag_targets"].cpu().numpy())
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("evaluate_tagging: the dataset yielded no samples")
    return tagging_metrics(np.concatenate(scores), np.concatenate(targets), thresholds)


# ---------------------------------------------------------------------------------------------
# Pretraining a small tagger in memory

def pretrain_tagger(model: nn.Module, images: Sequence, targets: np.ndarray, *, steps: int, batch_size: int = 32,
                    lr: float = 2e-3, encoder_lr_scale: float = 1.0, weight_decay: float = 0.05,
                    warmup_steps: int = 50, seed: int = 0, time_limit_s: float | None = None,
                    log_every: int = 250, log: Callable[[str], Any] = print) -> dict:
    """Train a RAM tagger on images held in memory (PIL) and their true multi-hot tags: the one-off
    pretraining of a small image encoder (the demo's stand-in for a backbone pretrained elsewhere), not
    the engine's training, which streams shards through Trainer. AdamW with warm-up and cosine decay,
    random resized crops and flips, gradient clipping at 1."""
    from .transforms import ImageTransform

    if len(images) != len(targets) or not len(images):
        raise ValueError(f"pretrain_tagger: {len(images)} images and {len(targets)} target rows; give one row "
                         f"per image, at least one")
    rng = np.random.default_rng(seed)
    random.seed(seed)             # ImageTransform's crops and flips draw from Python's random
    torch.manual_seed(seed)
    transform = ImageTransform(model.config.swin.image_size, train=True)
    loop = LoopConfig(lr=lr, warmup_steps=warmup_steps, total_steps=steps, batch_size=batch_size)
    opt = torch.optim.AdamW(parameter_groups(model, weight_decay, lr=lr, lr_scales=[
        (r"^(visual_encoder|image_proj)\.", encoder_lr_scale)]), lr=lr)
    base = [g["lr"] for g in opt.param_groups]
    y_all = torch.as_tensor(np.asarray(targets, dtype=np.float32))

    def step_loss(step: int) -> torch.Tensor:
        factor = lr_at(step, loop, steps) / lr
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * factor
        idx = rng.integers(0, len(images), batch_size)
        return model.training_losses(transform.batch([images[i] for i in idx]), y_all[idx])["loss"]

    return fit_in_memory(model, opt, step_loss, steps=steps, name="pretraining", clip_norm=1.0,
                         time_limit_s=time_limit_s, log_every=log_every, log=log)
