"""Training samples streamed from shard sources: shards of images joined with their label rows.

The model package opens no files and knows no store layout: the caller hands it SampleShard sources
(tasks/ builds them with storage.shards.LabelledShard, storage's one shard reader and key rule).
The stream is never materialised. Per shard it reads the tar's member headers (seeking past the
pixel bytes), loads that shard's label rows, and feeds lightweight records (key, tar member,
labels) through a seeded shuffle buffer; pixels are read and decoded only for the samples that
this DDP rank and DataLoader worker own.

Order and ownership are defined on ONE global sequence per epoch, so they do not depend on how
the work is split:

    global sequence  = shuffle_buffer(concat(shards in a seeded per-epoch order))
    after `start`    : j = i - start;  global batch k = j // (batch_size * world_size)
    rank r owns      : the r-th slice of batch_size samples in each global batch
    worker w owns    : the rank's batches k with k % num_workers == w

A DataLoader (batch_size = the stream's batch_size, in-order) therefore yields, on each rank,
exactly the rank's batches in sequence order whatever num_workers is, and a run that resumes
with `set_start(n)` sees the same samples as one that never stopped.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .transforms import ImageTransform  # noqa: F401  (the one transform; streams default to it)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class DataStreamError(RuntimeError):
    """A shard or label part cannot be used; the message names it and says what to do."""


class OpenShard(Protocol):
    """A shard opened for random access (what `SampleShard.open` returns)."""

    def members(self) -> Sequence:  # items with .key, .ext (lower-case, '' when none)
        ...

    def read(self, member) -> bytes:
        ...

    def close(self) -> None:
        ...


class SampleShard(Protocol):
    """One source of samples: a shard of images and the label rows of its samples. The model package
    never opens files: the caller (tasks/, through storage.shards.LabelledShard) supplies these."""
    name: str   # for messages

    def label_rows(self, columns: list[str]) -> pa.Table:
        ...

    def count_labels(self) -> int:
        ...

    def open(self) -> OpenShard:
        ...


def _named(shard_name: str, fn: Callable, *args):
    """Call into a shard source; any error it raises becomes a DataStreamError naming the shard."""
    try:
        return fn(*args)
    except DataStreamError:
        raise
    except Exception as e:  # noqa: BLE001 - the source's own error types are its business
        msg = str(e)
        raise DataStreamError(msg if shard_name in msg else f"shard {shard_name!r}: {msg}") from e


@dataclass
class _Record:
    key: str
    shard: int          # index into the epoch's open-shard table
    member: Any         # the source's handle for the image member
    tag_ids: list
    captions: Any       # None, str or list[str]


class _Opened:
    """An open shard and how many shuffle-buffer records still point into it."""

    def __init__(self, source, reader):
        self.name, self.reader = source.name, reader
        self.pending = 0
        self.scanned = False

    def read(self, member) -> bytes:
        return _named(self.name, self.reader.read, member)

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------------------------------------

class ShardStream(IterableDataset):
    """Samples {key, image, tag_targets, [caption]} from shard sources (SampleShard).

    shards: sequence of SampleShard (e.g. storage.shards.LabelledShard, built by tasks/): each gives
        label rows holding `key`, `tag_column` (list<int>) and optionally `caption_column`
        (string or list<string>), and opens its shard. Every label row must have an image member
        `<key>.jpg|jpeg|png|webp` in its tar (else DataStreamError); tar members without a label
        row are skipped (e.g. samples the clean stage dropped) and counted in `unlabelled_seen`.
    num_tags: length of the multi-hot target; tag ids outside [0, num_tags) are an error.
    transform: PIL RGB image -> tensor. Python `random` and torch's CPU RNG are seeded per sample
        from (seed, epoch, index) inside the call, so random augmentation is reproducible.
    rank, world_size, batch_size: the split described in the module docstring (batch_size is the
        per-rank batch). drop_last: drop the incomplete final global batch; required when
        world_size > 1 (every rank must run the same number of steps).
    shuffle: seeded per-epoch shard order + a shuffle buffer of `shuffle_buffer` records.
    """

    def __init__(self, shards: Sequence[SampleShard], num_tags: int,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, *,
                 image_size: int | None = None, tag_column: str = "tag_ids",
                 caption_column: str | None = None, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, drop_last: bool = True):
        super().__init__()
        if not shards:
            raise ValueError("ShardStream: `shards` is empty")
        for i, item in enumerate(shards):
            if not all(hasattr(item, a) for a in ("name", "label_rows", "count_labels", "open")):
                raise ValueError(f"ShardStream: shards[{i}] must be a shard source (name, label_rows, "
                                 f"count_labels, open; e.g. storage.shards.LabelledShard), got {item!r:.200}")
        if num_tags <= 0:
            raise ValueError(f"ShardStream: num_tags must be > 0, got {num_tags}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} not in [0, world_size={world_size})")
        if batch_size <= 0:
            raise ValueError(f"ShardStream: batch_size must be > 0, got {batch_size}")
        if world_size > 1 and not drop_last:
            raise ValueError("ShardStream: drop_last=False needs world_size == 1 "
                             "(every DDP rank must get the same number of batches)")
        if transform is None:
            if image_size is None:
                raise ValueError("ShardStream: give `transform` or `image_size`")
            transform = ImageTransform(image_size)
        self.shards = list(shards)
        self.num_tags = int(num_tags)
        self.transform = transform
        self.tag_column = tag_column
        self.caption_column = caption_column
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), shuffle, max(1, int(shuffle_buffer))
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        self.unlabelled_seen = 0
        self._num_samples: int | None = None

    # -- position -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order and shuffle depend on it); resets the start position."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, n: int) -> None:
        """Skip the first `n` samples of the epoch's global sequence (mid-epoch resume)."""
        if n < 0:
            raise ValueError(f"set_start: n must be >= 0, got {n}")
        self.start = int(n)

    def skip(self, n: int) -> "ShardStream":
        """Advance the start position by `n` global samples; returns self."""
        self.set_start(self.start + n)
        return self

    def num_samples(self) -> int:
        """Samples per epoch over all ranks (label rows; read from Parquet metadata)."""
        if self._num_samples is None:
            self._num_samples = sum(_named(s.name, s.count_labels) for s in self.shards)
        return self._num_samples

    def samples_per_rank(self) -> int:
        """Samples this rank yields in a full epoch from position 0."""
        n = self.num_samples()
        g = self.batch_size * self.world_size
        if self.drop_last:
            return n // g * self.batch_size
        return n  # world_size == 1

    # -- iteration ------------------------------------------------------------------------
    def _shard_order(self) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch, 0]).shuffle(order)
        return order

    def _load_shard(self, idx: int, slot: int, open_shards: dict) -> list[_Record]:
        source = self.shards[idx]
        url = source.name
        columns = ["key", self.tag_column] + ([self.caption_column] if self.caption_column else [])
        table = _named(url, source.label_rows, columns)
        keys = table.column("key").to_pylist()
        tags = table.column(self.tag_column).to_pylist()
        caps = table.column(self.caption_column).to_pylist() if self.caption_column else [None] * len(keys)
        rows: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in rows:
                raise DataStreamError(f"labels for shard {url!r}: key {k!r} appears more than once")
            rows[k] = i
        shard = _Opened(source, _named(url, source.open))
        open_shards[slot] = shard
        records: list[_Record] = []
        seen: set[str] = set()
        members = _named(url, shard.reader.members)
        shard.scanned = True
        for m in members:
            key, ext = m.key, m.ext
            if ext not in IMAGE_EXTENSIONS:
                continue
            if key in seen:
                raise DataStreamError(f"shard {url!r}: key {key!r} has more than one image member")
            seen.add(key)
            r = rows.get(key)
            if r is None:
                self.unlabelled_seen += 1
                continue
            records.append(_Record(key, slot, m, tags[r], caps[r]))
        if len(records) != len(rows):
            missing = sorted(set(rows) - seen)
            raise DataStreamError(
                f"shard {url!r}: {len(missing)} labelled key(s) have no image member in the tar "
                f"(first: {missing[:5]}); pair each tar with the label rows of its own samples")
        shard.pending = len(records)
        if not records:
            shard.close()
            del open_shards[slot]
        return records

    def _global_records(self, open_shards: dict) -> Iterator[tuple[int, _Record]]:
        """(global index, record) in the epoch's order."""
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        buffer: list[_Record] = []
        i = 0
        for slot, idx in enumerate(self._shard_order()):
            for rec in self._load_shard(idx, slot, open_shards):
                if not self.shuffle:
                    yield i, rec
                    i += 1
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(rec)
                    continue
                j = int(rng.integers(len(buffer)))
                out, buffer[j] = buffer[j], rec
                yield i, out
                i += 1
        if buffer:
            for j in rng.permutation(len(buffer)):
                yield i, buffer[int(j)]
                i += 1

    def _sample_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])

    def _make_sample(self, index: int, rec: _Record, shard: _Opened) -> dict:
        data = shard.read(rec.member)
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many types
            raise DataStreamError(f"shard {shard.name!r}: image of key {rec.key!r} (.{rec.member.ext}) "
                                  f"cannot be decoded: {type(e).__name__}: {e}") from e
        seed = self._sample_seed(index)
        py_state = random.getstate()
        try:
            random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also queues lazy CUDA seeding (~1 ms)
                torch.default_generator.manual_seed(seed)
                image = self.transform(img)
        finally:
            random.setstate(py_state)
        targets = torch.zeros(self.num_tags, dtype=torch.float32)
        ids = rec.tag_ids or []
        if ids:
            t = torch.as_tensor(ids, dtype=torch.long)
            if int(t.min()) < 0 or int(t.max()) >= self.num_tags:
                raise DataStreamError(f"shard {shard.name!r}: key {rec.key!r} has tag id(s) outside "
                                      f"[0, {self.num_tags}): {[x for x in ids if not 0 <= x < self.num_tags][:5]}")
            targets[t] = 1.0
        sample = {"key": rec.key, "image": image, "tag_targets": targets}
        if self.caption_column:
            caps = rec.captions
            if isinstance(caps, (list, tuple)):
                caps = [c for c in caps if c]
                # one caption per sample and epoch, reproducibly
                caps = caps[np.random.default_rng(seed).integers(len(caps))] if caps else ""
            sample["caption"] = caps or ""
        return sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        b, g = self.batch_size, self.batch_size * self.world_size
        remaining = max(0, self.num_samples() - self.start)
        stop = self.start + (remaining // g * g if self.drop_last else remaining)
        open_shards: dict[int, _Opened] = {}
        try:
            for i, rec in self._global_records(open_shards):
                if i >= stop:
                    break
                shard = open_shards[rec.shard]
                if i >= self.start:
                    j = i - self.start
                    k = j // g
                    if (j % g) // b == self.rank and k % nworkers == wid:
                        yield self._make_sample(i, rec, shard)
                shard.pending -= 1
                if shard.pending == 0 and shard.scanned:
                    shard.close()
                    del open_shards[rec.shard]
        finally:
            for s in open_shards.values():
                s.close()


def make_loader(stream: ShardStream, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The DataLoader that keeps the stream's order: batch_size = stream.batch_size, in order.

    Its own generator keeps the global torch RNG untouched (DataLoader otherwise draws a base
    seed from it), which exact resume relies on.
    """
    return DataLoader(stream, batch_size=stream.batch_size, num_workers=num_workers,
                      drop_last=False, pin_memory=pin_memory, in_order=True,
                      generator=torch.Generator().manual_seed(0),
                      persistent_workers=False)
