"""Shared fixtures for the training tests: generated WebDataset shards + labels, a tiny stand-in
tagger with RAM's training interface, and the DDP worker used by test_train_ddp.

(No tests here; it is a module so torch.multiprocessing's spawned children can import it.)
"""
from __future__ import annotations

import functools
import gc
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

NUM_TAGS = 6
IMAGE_SIZE = 16


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # deterministic archives
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_labels(key_index: int, num_tags: int = NUM_TAGS) -> list[int]:
    rng = np.random.default_rng(key_index)
    tags = sorted(int(t) for t in rng.choice(num_tags, size=int(rng.integers(0, 3)), replace=False))
    return tags


def write_shards(root: str | os.PathLike, n_shards: int = 3, per_shard: int = 8,
                 num_tags: int = NUM_TAGS, size: int = 20, labels_as: str = "parquet",
                 unlabelled_per_shard: int = 0, fmt: str = "png"):
    """Generate tar shards `shard-XXXX.tar` with members `<key>.<fmt>` (+ `<key>.json`) and one
    label part per shard (columns key, tag_ids, caption). Image colour encodes the tags so the
    stand-in model can learn something.

    Returns (shards: list[(tar_path, labels)], truth: {key: (tag_ids, caption)}).
    labels_as: "parquet" (a part path per shard) or "table" (a pyarrow Table per shard).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards, truth = [], {}
    idx = 0
    for s in range(n_shards):
        keys, tags, caps = [], [], []
        tar_path = root / f"shard-{s:04d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(per_shard + unlabelled_per_shard):
                key = f"s{s:02d}/{idx:06d}"
                t = sample_labels(idx, num_tags)
                rng = np.random.default_rng(1000 + idx)
                base = np.zeros(3)
                for tag in t:
                    base[tag % 3] += 0.4
                arr = np.clip(base[None, None, :] + rng.normal(0, 0.1, (size, size, 3)), 0, 1)
                img = Image.fromarray((arr * 255).astype(np.uint8))
                buf = io.BytesIO()
                img.save(buf, format="PNG" if fmt == "png" else fmt.upper())
                _add_member(tar, f"{key}.{fmt}", buf.getvalue())
                caption = f"an image with {' and '.join(f'tag{x}' for x in t) or 'nothing'}"
                _add_member(tar, f"{key}.json", json.dumps({"caption": caption}).encode())
                if j < per_shard:       # the last `unlabelled_per_shard` members get no label row
                    keys.append(key)
                    tags.append(t)
                    caps.append(caption)
                    truth[key] = (t, caption)
                idx += 1
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "tag_ids": pa.array(tags, pa.list_(pa.int32())),
                          "caption": pa.array(caps, pa.string())})
        if labels_as == "table":
            shards.append((str(tar_path), table))
        else:
            part = root / f"labels-{s:04d}.parquet"
            pq.write_table(table, part)
            shards.append((str(tar_path), str(part)))
    return shards, truth


class TinyTagger(nn.Module):
    """Stand-in for the RAM model: conv + GroupNorm + pooled linear head, a frozen-by-config
    `label_embed` that feeds the logits, optional dropout (to exercise RNG restore)."""

    def __init__(self, num_tags: int = NUM_TAGS, width: int = 8, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_tags)
        self.label_embed = nn.Parameter(torch.randn(num_tags, 4) * 0.1)

    def tag_logits(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(images))).mean(dim=(2, 3))
        return self.head(self.drop(x)) + self.label_embed.sum(-1)

    def training_losses(self, images, tag_targets, caption_ids=None, caption_mask=None,
                        clip_image_embeds=None) -> dict:
        logits = self.tag_logits(images)
        tag = F.binary_cross_entropy_with_logits(logits, tag_targets)
        reg = 1e-3 * self.conv.weight.pow(2).mean()
        return {"loss": tag + reg, "tag_loss": tag, "reg": reg}


def make_model(seed: int = 0, dropout: float = 0.0) -> TinyTagger:
    torch.manual_seed(seed)
    return TinyTagger(dropout=dropout)


def sources(shards, fs=None):
    """(tar path, labels) pairs as the shard sources a ShardStream reads (storage's reader)."""
    import fsspec

    from storage.shards import LabelledShard
    fs = fs or fsspec.filesystem("file")
    return [LabelledShard(fs, tar, labels) for tar, labels in shards]


def stream_factory(shards, **kw):
    """A dataset_factory for train(): ShardStream with the test transform."""
    from ram_model.data_stream import ImageTransform, ShardStream
    kw.setdefault("shuffle_buffer", 10)
    return functools.partial(ShardStream, sources(shards), NUM_TAGS, ImageTransform(IMAGE_SIZE, train=True),
                             **kw)


def ddp_worker(rank: int, world: int, port: int, shards, out_dir: str, cfg_kwargs: dict,
               result_dir: str) -> None:
    """One rank of the 2-process gloo run (torch.multiprocessing.spawn target)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from ram_model.trainer import LoopConfig, train
    model = make_model(seed=0)
    losses = []
    gc.disable()     # so that what train() leaves behind is seen, not collected by chance
    train(model, stream_factory(shards), LoopConfig(**cfg_kwargs), out_dir,
          progress=lambda p: losses.append(p.loss))
    left = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    gc.enable()
    torch.save({"losses": losses, "state": model.state_dict(), "ddp_wrappers_left": left,
                "group_left": torch.distributed.is_initialized()},
               os.path.join(result_dir, f"rank{rank}.pt"))
