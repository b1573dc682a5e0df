"""The production route as a user runs it: `ram-engine -c production check` and `run` with stand-ins for the
official files (RAM `.pth`, bert-base-uncased tokenizer folder, Grounding DINO and CLIP transformers
folders; seeded random weights, real formats: tests/standins.py), over an img2dataset-style tar of 8
images, into an S3 store (moto on loopback), under Prefect with the Dask runner on two worker processes.
Every stage commits, every version verifies, a rerun does no work.

Two sizes of the same route:
* toy sizes (`slow`, in CI's slow step): the formats and the route, in minutes;
* real sizes (`production`: RAM Swin-L 384, 469M parameters; grounding-dino-tiny; CLIP ViT-B/16), run with
  `pytest -m production`, outside CI's bounded slow step: long on CPU, and moto keeps multi-GB uploads in
  memory (13 GB resident was seen importing the 1.9 GB baseline) — give it a machine with >= 32 GB.
  Set RAM_ENGINE_STANDINS=DIR to keep the ~3 GB of stand-ins between runs. Per-stage seconds per image
  are printed and written to DIR/stage_seconds.json.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from .standins import production_files

pytestmark = [pytest.mark.slow, pytest.mark.s3]

CAPTIONS = ["a dog sitting on a couch in a living room", "a red car parked on a street next to a tree",
            "a man riding a bicycle on a road", "two cats sleeping on a bed",
            "a plate of food with broccoli and rice on a table", "a woman holding an umbrella in the rain",
            "a boat on a lake with mountains", "a bowl of fruit with apples and bananas on a kitchen counter"]
STAGES = ("images", "parsed", "models/baseline", "generated", "regions", "embeddings", "clean", "models/ram")


def img2dataset_tar(path: Path, n: int = 8) -> Path:
    """`<key>.jpg` + `<key>.txt` + `<key>.json` per sample, as img2dataset writes them."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert("RGB")
            draw = ImageDraw.Draw(img)
            for _ in range(3):
                x, y = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 80))
                draw.ellipse((x, y, x + 80, y + 60), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            key = f"{i:09d}"
            meta = json.dumps({"key": key, "caption": CAPTIONS[i % len(CAPTIONS)], "width": w, "height": h,
                               "status": "success", "url": f"https://example.com/{key}.jpg"}).encode()
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", CAPTIONS[i % len(CAPTIONS)].encode()),
                               (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                          timeout=5400)
    if proc.returncode != 0 and os.environ.get("RAM_ENGINE_E2E_LOG"):
        Path(os.environ["RAM_ENGINE_E2E_LOG"]).write_text(proc.stdout + "\n" + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


def test_production_route_at_toy_sizes(moto_server, s3_store_url, prefect_api, tmp_path_factory):
    run_production_route(False, s3_store_url, prefect_api, tmp_path_factory)


@pytest.mark.production
def test_production_route_at_real_sizes(moto_server, s3_store_url, prefect_api, tmp_path_factory):
    run_production_route(True, s3_store_url, prefect_api, tmp_path_factory)


def run_production_route(real: bool, s3_store_url, prefect_api, tmp_path_factory) -> None:
    from storage import Store

    root = Path(os.environ.get("RAM_ENGINE_STANDINS") or tmp_path_factory.mktemp("standins"))
    t0 = time.time()
    files = production_files(root, real=real)
    print(f"stand-ins ready in {time.time() - t0:.0f} s under {root}")
    source = img2dataset_tar(tmp_path_factory.mktemp("src") / "00000.tar")
    url, options = s3_store_url
    options = {k: v for k, v in options.items() if k in ("key", "secret", "client_kwargs")}
    sets = [f"{k}={v}" for k, v in files.items()] + [
        f"store.url={url}", f"store.storage_options={json.dumps(options)}", f"ingest.source={source}",
        "orchestration.task_runner=dask", "orchestration.max_workers=2",
        "generate.batch_size=4", "ground.detector.batch_size=4", "ground.batch_size=8",
        "train.steps=1", "train.batch_size=2", "train.holdout_fraction=0.25", "train.checkpoint_every_steps=1",
        "clean.embedder.batch_size=16"] + ([] if real else ["ground.detector.shortest_edge=128",
                                                            "ground.detector.longest_edge=128"])
    args = ["-c", "production"] + sum((["--set", s] for s in sets), [])
    api, home = prefect_api
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=home, OMP_NUM_THREADS="1",
               RAM_ENGINE_CACHE=str(tmp_path_factory.mktemp("cache")), PYTHONPATH=str(Path(__file__).parent.parent))

    check = run_cli(args + ["check"], env)
    assert "the configuration is ready" in check.stdout

    t0 = time.time()
    first = run_cli(args + ["run"], env)
    first_s = time.time() - t0
    store = Store(url, **options)
    seconds = {}
    for stage in STAGES:
        versions = store.versions(stage)
        assert len(versions) == 1, f"{stage}: {len(versions)} versions"
        assert versions[0].verify() == [], stage
        seconds[stage] = versions[0].manifest.get("duration_s")
    assert store.open("images").manifest["rows_out"] == 8

    t0 = time.time()
    second = run_cli(args + ["run"], env)
    rerun_s = time.time() - t0
    for stage in STAGES:
        assert len(store.versions(stage)) == 1, f"the rerun made a new {stage} version"
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in second.stdout.splitlines() if line.count("│") >= 8]
    assert len(rows) >= len(STAGES) and all(r[3] == "reused" for r in rows), second.stdout  # the status column
    report = {"images": 8, "run_s": round(first_s), "rerun_s": round(rerun_s),
              "stage_seconds_per_image": {k: (round(v / 8, 1) if v else None) for k, v in seconds.items()}}
    print(json.dumps(report, indent=1))
    (root / f"stage_seconds_{'real' if real else 'toy'}.json").write_text(json.dumps(report, indent=1))
