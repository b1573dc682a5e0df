"""Paths in a config file are relative to the file; the demo leaves a config beside its store that
works from any working directory; a relative ingest source is the same data as its absolute path."""
from __future__ import annotations

from pathlib import Path

import yaml

from flows.demo import CONFIG_NAME, demo_config, write_demo_config
from storage import Store
from tasks.engine.config import load_config, packaged_configs
from tasks.demo.world import WorldInfo, generate_world
from tests.fixtures import ingest

from tests.fixtures import image_bytes, write_folder_source


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "world" / "source").mkdir(parents=True)
    (folder / "tags.txt").write_text("cat\n")
    (folder / "truth.jsonl").write_text("")
    cfg_file = folder / "engine.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "store": {"url": "store"}, "ingest": {"source": "./world/source"},
        "parse": {"labels": "tags.txt"}, "evaluate": {"ground_truth": "truth.jsonl"},
        "ground": {"detector": {"model": "IDEA-Research/grounding-dino-tiny"}},   # a hub id stays a hub id
        "train": {"init": "models/baseline"},                                      # a store ref stays a ref
    }))
    for cwd in (tmp_path, Path("/")):
        monkeypatch.chdir(cwd)
        cfg = load_config(cfg_file)
        assert cfg.store.url == str(folder / "store")
        assert cfg.ingest.source == str(folder / "world" / "source")
        assert cfg.parse.labels == str(folder / "tags.txt")
        assert cfg.evaluate.ground_truth == str(folder / "truth.jsonl")
        assert cfg.ground.detector.model == "IDEA-Research/grounding-dino-tiny"
        assert cfg.train.init == "models/baseline"
    # Built-in names, URLs and absolute paths are left alone; --set overrides stay the caller's.
    cfg = load_config(cfg_file, ["store.url=s3://bucket/x", "parse.labels=ram"])
    assert cfg.store.url == "s3://bucket/x" and cfg.parse.labels == "ram"
    # The shipped templates keep ./ram-data relative to where the command runs.
    assert load_config(packaged_configs()["demo"]).store.url == "./ram-data"


def test_demo_config_beside_the_store_works_from_anywhere(tmp_path, monkeypatch):
    out = tmp_path / "ram-demo"
    world = generate_world(out / "world", 4, seed=1, fmt="webdataset")
    detector = out / "detector"
    detector.mkdir()
    cfg = demo_config(out, world, detector, None, ["train.steps=7"])
    path = write_demo_config(out, cfg)
    assert path == out / CONFIG_NAME
    text = path.read_text()
    assert str(tmp_path) not in text, "paths inside the demo folder are written relative to it"
    moved = tmp_path / "elsewhere" / "ram-demo"  # the folder can move: nothing points outside it
    moved.parent.mkdir()
    out.rename(moved)
    monkeypatch.chdir("/")
    again = load_config(moved / CONFIG_NAME)
    assert again.store.url == str(moved / "store")
    assert again.ingest.source == str(moved / "world" / "source")
    assert again.parse.labels == str(moved / "world" / "tags" / "tag_list.txt")
    assert again.evaluate.ground_truth == str(moved / "world" / "truth" / "ground_truth.jsonl")
    assert again.ground.detector.model == str(moved / "detector")
    assert again.train.steps == 7 and again.orchestration.retrain_min_new_samples == 100
    assert WorldInfo.load(moved / "world").config["n_images"] == 4


def test_relative_and_absolute_source_are_one_images_version(tmp_path, monkeypatch):
    src = write_folder_source(tmp_path / "src", {f"a{i}.jpg": (image_bytes(size=(24, 24)), f"a cat {i}")
                                                 for i in range(3)})
    cfg = load_config(None, [f"store.url={tmp_path / 'store'}"])
    store = Store(cfg.store.url)
    first = ingest(store, cfg.ingest, source=str(src))
    monkeypatch.chdir(tmp_path)
    second = ingest(store, cfg.ingest, source="src")
    assert second.version.id == first.version.id and second.status == "reused"
    assert len(store.versions("images")) == 1
