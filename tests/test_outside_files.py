"""What a command writes outside its output folder: only the places docs/demo.md names (training work
and model copies under ~/.cache/ram-engine, Prefect's home under ~/.prefect), and both move with
their environment variables. Run as a user would, with HOME pointed at an empty folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.demo.world import generate_world

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from ram_model.detector import build_tiny_detector

    root = tmp_path_factory.mktemp("outside")
    world = generate_world(root / "world", 12, seed=5, fmt="webdataset", samples_per_shard=6)
    categories = json.loads(Path(world.tag_groups).read_text())["category"]
    build_tiny_detector(categories, seed=0, image_size=128).save(root / "detector")
    return root, world


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def run_cli(tmp_path: Path, small_world, engine: str, env_extra: dict[str, str]) -> tuple[Path, Path, Path]:
    """`ram-engine --engine ENGINE run --until generate` (ingest, parse, a baseline trained, generation)
    with HOME, the working directory and TMPDIR all empty folders of their own."""
    root, world = small_world
    home, work, tmp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for folder in (home, work, tmp):
        folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "RAM_ENGINE_", "XDG_", "HF_", "MPLCONFIGDIR", "TORCH_HOME"))}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | env_extra
    overrides = [f"store.url={work / 'out'}", f"ingest.source={world.source}", f"parse.labels={world.tag_list}",
                 f"ground.detector.model={root / 'detector'}", "ingest.part_size=6", "train.steps=2", "generate.baseline_steps=2",
                 "train.batch_size=4", "train.warmup_steps=1", "train.holdout_fraction=0.25",
                 "generate.max_length=12"]
    cmd = [sys.executable, "-c", "from flows.cli import main; main()", "--engine", engine]
    cmd += [arg for o in overrides for arg in ("--set", o)] + ["run", "--until", "generate"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.listdir(work) == ["out"], "the working directory gets only the store"
    assert files_under(tmp) == [], "temporary files are removed"
    return home, work, tmp


def check_cache(cache: Path) -> None:
    """Model and label copies (kept: stages load them from here), training locks (kept, empty), content digests
    of input files (kept: a file is read again only when it changes); no training work folder once its model
    committed."""
    for f in files_under(cache):
        top = f.split("/")[0]
        assert top in ("models", "labels", "train", "digests"), f   # digests: content digests of input files
        if top == "train":
            assert f.endswith(".lock") and (cache / f).stat().st_size == 0, f"a training work file was left: {f}"
    assert any(f.startswith("models/models__baseline/") for f in files_under(cache))


def test_local_engine_writes_only_the_training_cache_outside_its_store(tmp_path, small_world):
    home, _, _ = run_cli(tmp_path, small_world, "local", {})
    assert sorted(os.listdir(home)) == [".cache", ".prefect"] and os.listdir(home / ".cache") == ["ram-engine"]
    assert files_under(home / ".prefect") == [], "importing Prefect makes its home folder, and writes nothing there"
    check_cache(home / ".cache" / "ram-engine")


@pytest.mark.slow
def test_prefect_engine_adds_only_prefect_home_and_it_moves(tmp_path, small_world):
    """Under --engine prefect with no PREFECT_API_URL a temporary server keeps its database in PREFECT_HOME;
    RAM_ENGINE_CACHE and PREFECT_HOME move everything out of HOME."""
    home, _, _ = run_cli(tmp_path / "a", small_world, "prefect", {})
    assert sorted(os.listdir(home)) == [".cache", ".prefect"]
    assert any(f.endswith(".db") for f in files_under(home / ".prefect"))
    check_cache(home / ".cache" / "ram-engine")
    moved, cache = tmp_path / "prefect-home", tmp_path / "cache"
    home, _, _ = run_cli(tmp_path / "b", small_world, "prefect", {"PREFECT_HOME": str(moved), "RAM_ENGINE_CACHE": str(cache)})
    assert os.listdir(home) == [] and any(f.endswith(".db") for f in files_under(moved))
    check_cache(cache)
