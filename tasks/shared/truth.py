"""Ground truth: reading it (the demo's jsonl, OpenImages `*_annots.txt`, Parquet), matching it to the
store's keys and the label system's spelling, and scoring a model against it. Shared by the evaluate and
ablation stages (a module of its own, so that no stage imports another).

Ground truth comes in two formats:
- the demo world's `ground_truth.jsonl`: one JSON object per line with at least `key` and `tags`
  (also read: a `.json` dict {key: [tags]}, or a Parquet table with `key` and `tags` columns);
- the OpenImages format of the reference repository's `*_annots.txt`: `path,tag,tag,...` per
  line (tags may contain spaces; a line with a path alone is an image without tags).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ram_model.metrics import Labels
from storage import StoreError
from storage.parquet import read_parquet


def load_ground_truth(path: str | Path, fmt: str = "auto", key_fn: Callable[[str], str] | None = None,
                      vocabulary: Iterable[str] | None = None) -> dict[str, set[str]]:
    """Read ground truth as {key: set of tags}.

    fmt: "auto" (by extension: .jsonl/.json -> demo, .parquet -> parquet, else OpenImages),
    "demo", "parquet" or "openimages". key_fn maps the file's key (the OpenImages path, e.g.
    "test/0a1b2c") to the pipeline's key, e.g. `lambda p: Path(p).stem`. vocabulary, if given,
    drops tags outside it (e.g. the 214 OpenImages-common classes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth file {path} does not exist")
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".jsonl": "demo", ".json": "demo", ".parquet": "parquet"}.get(suffix, "openimages")
    if fmt == "demo":
        raw = _read_demo(path)
    elif fmt == "parquet":
        raw = _read_parquet_truth(path)
    elif fmt == "openimages":
        raw = _read_openimages(path)
    else:
        raise ValueError(f"load_ground_truth: fmt must be auto, demo, parquet or openimages, got {fmt!r}")
    vocab = set(vocabulary) if vocabulary is not None else None
    out: dict[str, set[str]] = {}
    for key, tags in raw:
        k = key_fn(key) if key_fn else key
        if k in out:
            raise ValueError(f"{path}: key {k!r} appears twice (after key_fn); ground truth needs unique keys")
        out[k] = {t for t in tags if vocab is None or t in vocab}
    return out


def rekey_truth(truth: dict[str, set[str]], images) -> dict[str, set[str]]:
    """Ground truth keyed by the source's own keys (img2dataset's, before ingest tagged them with their
    folder) is matched to store keys through the images table's `source_key`, where that is unambiguous."""
    table = images.read_table(columns=["key", "source_key"])
    keys, source_keys = table.column("key").to_pylist(), table.column("source_key").to_pylist()
    counts = Counter(source_keys)
    known = set(keys)
    alias = {s: k for k, s in zip(keys, source_keys) if s is not None and counts[s] == 1 and s not in known}
    return {alias.get(k, k): tags for k, tags in truth.items()}


def _read_demo(path: Path) -> list[tuple[str, list[str]]]:
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return [(str(k), list(v)) for k, v in data.items()]
        rows = data
    else:
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e}); expected {{\"key\": ..., \"tags\": [...]}}")
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "key" not in row or "tags" not in row:
            raise ValueError(f"{path}: record {n} has no 'key' and 'tags' fields; got {str(row)[:120]}")
        out.append((str(row["key"]), list(row["tags"])))
    return out


def _read_parquet_truth(path: Path) -> list[tuple[str, list[str]]]:
    table = read_parquet(path)
    missing = {"key", "tags"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: Parquet ground truth needs columns key and tags; missing {sorted(missing)}")
    return [(str(k), list(t or [])) for k, t in zip(table["key"].to_pylist(), table["tags"].to_pylist())]


def _read_openimages(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split(",")]
            out.append((parts[0], [p for p in parts[1:] if p]))
    return out


def multi_hot(labels: Labels, keys: Sequence[str], tags: Sequence[str]) -> np.ndarray:
    """[len(keys), len(tags)] 0/1 matrix; tags outside `tags` are ignored, missing keys are all 0."""
    index = {t: j for j, t in enumerate(tags)}
    out = np.zeros((len(keys), len(tags)), dtype=np.uint8)
    for i, k in enumerate(keys):
        for t in labels.get(k, ()):
            j = index.get(t)
            if j is not None:
                out[i, j] = 1
    return out


def normalise_truth(truth: Labels, labels) -> dict[str, set[str]]:
    """Truth tags spelled as the label system spells them (synonyms and plurals resolved)."""
    out = {}
    for key, tags in truth.items():
        names = set()
        for t in tags:
            i = labels.id(t)
            names.add(labels.name(i) if i is not None else t)
        out[key] = names
    return out


def score_model(store, model_ref: str, images, keys: set[str], batch_size: int = 32):
    """Sigmoid scores of a model over the images of `keys`: (keys in order, [N, T] scores, model)."""
    import torch

    from ram_model.transforms import ImageTransform

    from storage.shards import decode_image

    from tasks.shared.models import load_model

    model = load_model(store, model_ref)
    transform = ImageTransform(model.config.swin.image_size)
    out_keys, scores, batch, batch_keys = [], [], [], []

    def flush():
        with torch.inference_mode():
            scores.append(model.tag_probs(torch.stack(batch)).cpu().numpy())
        out_keys.extend(batch_keys)
        batch.clear()
        batch_keys.clear()

    for sample in images.iter_samples():
        if sample["__key__"] in keys:
            batch.append(transform(decode_image(sample)))
            batch_keys.append(sample["__key__"])
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    return out_keys, (np.concatenate(scores) if scores else np.zeros((0, len(model.tags)))), model


def ground_truth_path(cfg, missing: str) -> Path:
    """The evaluate section's ground-truth file; `missing` opens the error when none is set."""
    if not cfg.ground_truth:
        raise StoreError(f"{missing}: give a ground-truth file in evaluate.ground_truth (demo jsonl, OpenImages "
                         "csv or Parquet with key and tags)")
    path = Path(cfg.ground_truth)
    if not path.is_file():
        raise StoreError(f"evaluate.ground_truth {path} does not exist")
    return path
