"""The demo's shipped stand-ins: the crop embedder is used when it knows the world, trained otherwise."""
from __future__ import annotations

import json

from flows.demo import SHIPPED_EMBEDDER, demo_config, prepare_embedder
from ram_model.embedder import EmbedderConfig, build_embedder
from tasks.demo.world import generate_world


def test_the_shipped_embedder_serves_the_default_world(tmp_path):
    world = generate_world(tmp_path / "w", 6, seed=0, fmt="webdataset")
    folder, meta = prepare_embedder(world, tmp_path / "out", steps=5, time_limit_s=5, seed=0)
    assert folder == SHIPPED_EMBEDDER and meta["heldout"]["nearest_centroid_accuracy"] >= 0.9
    cfg = demo_config(tmp_path / "out", world, tmp_path / "det", None, [], embedder=folder)
    assert cfg.clean.embedder.kind == "conv" and cfg.clean.embedder.model == str(folder)
    embedder = build_embedder(EmbedderConfig(kind="conv", model=str(folder)))
    from flows.demo import world_crops

    crops, labels, categories = world_crops(world, limit=6)
    assert embedder(crops).shape == (len(crops), embedder.dim) and len(categories) == 12


def test_a_world_of_other_categories_trains_its_own_embedder(tmp_path):
    world = generate_world(tmp_path / "w", 12, seed=2, fmt="webdataset", categories=["ball", "box", "star"])
    folder, meta = prepare_embedder(world, tmp_path / "out", steps=3, time_limit_s=60, seed=0)
    assert folder == tmp_path / "out" / "embedder" and meta["train"]["steps"] == 3
    assert json.loads((folder / "demo_embedder.json").read_text())["categories"] == ["ball", "box", "star"]
    again, _ = prepare_embedder(world, tmp_path / "out", steps=3, time_limit_s=60, seed=0)
    assert again == folder   # trained once, reused
