"""Models for the stages: build from config, load from the store, cache once per worker process.

A model is named in config as a store ref (`models/baseline@latest`), a local folder written by
`ram_model.checkpoint.save_pretrained`, or an official RAM / RAM++ / Tag2Text `.pth` checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ram_model.devices import resolve_device
from ram_model.checkpoint import (MODEL_CARD_FILES, ModelCard, from_pretrained, load_official, official_card,
                                  read_model_card)
from ram_model.labels import LabelSystem
from storage import Store, StoreError, Version

from tasks.engine.cache import cache_dir, worker_cached

log = logging.getLogger("ram_engine")


def model_version(store: Store, ref: str) -> Version | None:
    """A store ref `models/<name>[@version|ref]`, or None when `ref` is not one."""
    if not ref.startswith("models/"):
        return None
    if "@" in ref:
        stage, _, version = ref.partition("@")
    elif ref.count("/") == 2:  # a version ref as manifests write it: models/<name>/<version>
        stage, _, version = ref.rpartition("/")
    else:
        stage, version = ref, "latest"
    return store.open(stage, version)


def local_model_dir(version: Version, names: tuple[str, ...] | None = None) -> str:
    """The model files of a store version (or only `names`) in the local cache (downloaded once, checked by size)."""
    return version.download(str(cache_dir() / "models" / version.stage.replace("/", "__") / version.id), names)


def load_model(store: Store, ref: str, device: str = "auto", tags_file: str | None = None,
               thresholds_file: str | None = None):
    """Load a RAM model named by a store ref, a save_pretrained folder or an official checkpoint; cached."""

    version = model_version(store, ref)
    key = f"{store.url}|{version.ref if version else os.path.abspath(ref)}|{device}"

    def factory():
        dev = resolve_device(device)
        if version is not None:
            model = from_pretrained(local_model_dir(version), map_location=dev)
        elif Path(ref).is_dir():
            model = from_pretrained(ref, map_location=dev)
        elif Path(ref).is_file():
            # an official checkpoint outside the store: RAM's packaged tag list and thresholds by default
            model = load_official(ref, tags=tags_file, thresholds=thresholds_file, map_location=dev)
        else:
            raise unknown_model(ref)
        model.eval()
        log.info("loaded model %s on %s", ref, dev)
        return model

    return worker_cached(key, factory)


def model_card(store: Store, ref: str) -> ModelCard:
    """The config, tag list and per-class thresholds of the model `ref` names (as load_model takes it), without
    loading its weights where they are a file of their own: a process that only maps tags or reads thresholds
    (a stage's prepare step in the CLI) fetches a few KB, not the 1.9 GB of a Swin-L model."""
    version = model_version(store, ref)
    if version is not None:
        return read_model_card(local_model_dir(version, MODEL_CARD_FILES))
    if Path(ref).is_dir():
        return read_model_card(ref)
    if Path(ref).is_file():
        # an official checkpoint outside the store: its config is what its tensors' shapes imply, and its tags
        # and thresholds are RAM's packaged ones, as load_model gives it
        return official_card(ref)
    raise unknown_model(ref)


def unknown_model(ref: str) -> StoreError:
    return StoreError(f"model {ref!r} is neither a store ref (models/<name>[@version]), a folder written "
                      f"by save_pretrained, nor a checkpoint file; check generate.baseline / train.init")


def load_official_with_files(path: str, model_cfg, device: str = "cpu"):
    """An official .pth with its tag list, Chinese names (checked against the list), per-class thresholds
    and caption tokenizer as the config names them; RAM's packaged files where a field is empty."""
    from ram_model.tokenizer import load_tokenizer

    tag_list = model_cfg.tag_list or _packaged("ram_tag_list.txt")
    # RAM's per-class thresholds go with RAM's tag list; a tag list of one's own needs its own thresholds
    thresholds = model_cfg.thresholds or (None if model_cfg.tag_list else _packaged("ram_tag_list_threshold.txt"))
    labels = LabelSystem.from_files(tag_list, thresholds=thresholds, chinese=model_cfg.tag_list_chinese)
    tags = list(labels.tags)
    thresholds = labels.thresholds if thresholds else None
    tokenizer = load_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else None
    return load_official(path, tags=tags, thresholds=thresholds, tokenizer=tokenizer,
                         image_size=model_cfg.image_size, map_location=resolve_device(device))


def _packaged(name: str) -> str:
    from importlib import resources

    return str(resources.files("ram_model.data") / name)


def model_to_label_ids(model, labels) -> np.ndarray:
    """Map the model's tag indices (a model's or a ModelCard's `tags`) onto the label system's ids by name
    (-1 where a tag is not in it)."""
    return np.array([labels.id(t) if labels.id(t) is not None else -1 for t in model.tags], dtype=np.int64)


def is_holdout(key: str, fraction: float) -> bool:
    """Whether a key is in the held-out split of `fraction`: a hash of the key alone, so every stage and
    host agrees on which keys a model was not trained on."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return (h % 10_000) < fraction * 10_000
