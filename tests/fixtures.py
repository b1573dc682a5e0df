"""Data the tests generate: images, sources, and the demo world with its detector and config."""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.demo.world import WorldInfo


# ---------------------------------------------------------------- stages, as the tests call them most
# (the product has one way, `tasks.engine.runner.run(STAGE, store, cfg, inputs)`; these only spell it short)

def ingest(store, cfg, source=None, **kwargs):
    """The ingest stage over `source` with IngestConfig `cfg`."""
    from tasks.engine.runner import run
    from tasks.stages.ingest import STAGE

    return run(STAGE, store, {"ingest": cfg}, {"source": source}, **kwargs)


def train_model(store, model_cfg, train_cfg, labels, images, init=None, **kwargs):
    """The train stage: `models/<train_cfg.name>` trained on `labels` over `images`."""
    from tasks.engine.runner import run
    from tasks.stages.train import STAGE

    return run(STAGE, store, {"train": train_cfg, "model": model_cfg},
               {"labels": labels, "images": images, "init": init}, **kwargs)


def image_bytes(size=(48, 40), color=(200, 30, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    from PIL import Image

    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def write_folder_source(root: Path, items: dict[str, tuple[bytes | None, object]]) -> Path:
    """items: file name -> (image bytes or None for absent, captions (str|list|None|bytes))."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, (data, captions) in items.items():
        if data is not None:
            (root / name).write_bytes(data)
        if captions is None:
            continue
        if isinstance(captions, bytes):  # raw line content for invalid-encoding tests
            lines.append(b'{"file": "' + name.encode() + b'", "caption": "' + captions + b'"}')
        else:
            key = "captions" if isinstance(captions, list) else "caption"
            lines.append(json.dumps({"file": name, key: captions}).encode())
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


# ---------------------------------------------------------------------------------------------- the demo world
# One small demo world, one random tiny detector and one set of overrides serve every test that runs the
# loop or its stages over the store (tests/conftest.py: `demo_world`, `demo_loop`, `demo_loop_copy`).
# 24 images in 3 tars of 8 (one part each): enough for every stage to have parts to resume and reuse.
DEMO_WORLD = {"n_images": 24, "seed": 11, "fmt": "webdataset", "samples_per_shard": 8, "captions_per_image": (1, 2)}


@dataclass(frozen=True)
class DemoWorld:
    world: "WorldInfo"       # tasks.demo.world.WorldInfo: source tars, tag list, ground truth
    detector: Path           # a tiny Grounding DINO with random weights over the world's categories


def demo_world_of(root: Path, n_images: int = DEMO_WORLD["n_images"]) -> "WorldInfo":
    """The demo world at `root`; a larger `n_images` is the same world grown (its first tars are the same)."""
    from tasks.demo.world import generate_world

    return generate_world(root, n_images, **{k: v for k, v in DEMO_WORLD.items() if k != "n_images"})


def make_demo_world(root: Path) -> DemoWorld:
    """The demo world and its detector."""
    from ram_model.detector import build_tiny_detector

    world = demo_world_of(root / "world")
    categories = json.loads(Path(world.tag_groups).read_text())["category"]
    build_tiny_detector(categories, seed=0, image_size=128).save(root / "detector")  # random weights
    return DemoWorld(world, root / "detector")


def demo_overrides(demo: DemoWorld, store_url, **extra) -> list[str]:
    """The config overrides of the tests' loop: the world's paths, a detector that finds boxes at random
    weights, and tiny training (several checkpoints and ground batches per part, for the crash tests) of
    a model with its caption branch (the demo config has none: the tests keep training and loading it).
    `extra` (dotted field -> value) comes last and wins."""
    world = demo.world
    return [f"store.url={store_url}", f"ingest.source={world.source}", f"parse.labels={world.tag_list}",
            f"evaluate.ground_truth={world.ground_truth}", f"ground.detector.model={demo.detector}",
            "ground.detector.box_threshold=0.05", "ground.detector.text_threshold=0.05", "ground.batch_size=4",
            f"ingest.part_size={DEMO_WORLD['samples_per_shard']}", "train.steps=3", "generate.baseline_steps=null",
            "train.batch_size=4", "train.warmup_steps=1", "train.checkpoint_every_steps=1",
            "train.holdout_fraction=0.25", "generate.max_length=10", "clean.min_crops=3",
            "model.with_caption=true"] + \
        [f"{k}={v}" for k, v in extra.items()]


def demo_config(demo: DemoWorld, store_url, storage_options: dict | None = None, **extra):
    from tasks.engine.config import load_config

    cfg = load_config(None, demo_overrides(demo, store_url, **extra))
    if storage_options:
        cfg.store.storage_options = storage_options
    return cfg


def copy_store(src: Path, dst: Path) -> None:
    """A private copy of a local store. Committed files are hard links (the store never writes a file in
    place: it writes a temporary and renames it, so a link is never changed through the copy)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another filesystem
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def tree_state(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under `roots`: what a test that only reads must leave as it was."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}
