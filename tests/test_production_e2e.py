"""The production route as a user runs it: `ram-engine -c production check` and `run` with stand-ins for the
official files (RAM `.pth`, bert-base-uncased tokenizer folder, Grounding DINO and CLIP transformers
folders; seeded random weights, real formats: tests/standins.py), over an img2dataset-style tar of 8
images, into an S3 store (moto on loopback), under Prefect with the Dask runner on two worker processes.
Every stage commits, every version verifies, a rerun does no work.

Two sizes of the same route:
* toy sizes (`slow`, in CI's slow step): the formats and the route, in minutes;
* real sizes (`production`: RAM Swin-L 384, 469M parameters; grounding-dino-tiny; CLIP ViT-B/16), run with
  `pytest -m production`, CI's own bounded step after the slow one (.ci/run): ~25 min on 2 cores with the
  stand-ins built; peak ~11 GB in one process (the fine-tuning step), ~16 GB for the engine's processes
  together, ~7.5 GB for this process with moto (it assembles uploads in memory): a 24 GB machine.
  Set RAM_ENGINE_STANDINS=DIR to keep the ~3 GB of stand-ins between runs. Per-stage wall and CPU seconds
  per image, crop counts and memory peaks are printed and written to DIR/stage_seconds_real.json.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

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


class ResourceWatch:
    """Samples, every second, the CPU seconds and resident memory of a process tree (the engine: the CLI and
    its Dask workers) and this process's resident memory (pytest and the moto server it runs), so that CPU
    seconds can be charged to the stage whose time window they fall in."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.me = psutil.Process(pid), psutil.Process()
        self.cpu_by_pid: dict[int, float] = {}
        self.samples: list[tuple[float, float]] = []     # (unix time, engine CPU seconds so far)
        self.engine_peak = self.moto_peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            rss = 0
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    t, m = p.cpu_times(), p.memory_info()
                except psutil.Error:
                    continue
                self.cpu_by_pid[p.pid] = t.user + t.system + t.children_user + t.children_system
                rss += m.rss
            self.engine_peak = max(self.engine_peak, rss)
            self.moto_peak = max(self.moto_peak, self.me.memory_info().rss)
            self.samples.append((time.time(), sum(self.cpu_by_pid.values())))
            self.stop.wait(1.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def cpu_between(self, start: float, end: float) -> float:
        def at(t: float) -> float:
            before = [c for s, c in self.samples if s <= t]
            return before[-1] if before else 0.0
        return at(end) - at(start)


def run_cli(args: list[str], env: dict, watch: list | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watcher = ResourceWatch(proc.pid) if watch is not None else None
    try:
        out, err = proc.communicate(timeout=5400)
    finally:
        if watcher is not None:
            watcher.close()
            watch.append(watcher)
        if proc.poll() is None:
            proc.kill()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if done.returncode != 0 and os.environ.get("RAM_ENGINE_E2E_LOG"):
        Path(os.environ["RAM_ENGINE_E2E_LOG"]).write_text(out + "\n" + err)
    assert done.returncode == 0, out[-4000:] + err[-8000:]
    return done


def test_production_route_at_toy_sizes(moto_server, s3_store_url, prefect_api, tmp_path_factory):
    run_production_route(False, s3_store_url, prefect_api, tmp_path_factory)


@pytest.mark.production
def test_production_route_at_real_sizes(moto_server, s3_store_url, prefect_api, tmp_path_factory):
    run_production_route(True, s3_store_url, prefect_api, tmp_path_factory)


def run_production_route(real: bool, s3_store_url, prefect_api, tmp_path_factory) -> None:
    from storage import Store

    root = Path(os.environ.get("RAM_ENGINE_STANDINS") or tmp_path_factory.mktemp("standins"))
    t0 = time.time()
    # built in a child process: building a 469M-parameter model leaves ~2 GB of allocations in the process that
    # did it, and this process also runs moto, which holds every upload in memory
    built = subprocess.run([sys.executable, "-c", "import json, sys; from pathlib import Path; "
                            "from tests.standins import production_files; "
                            "print(json.dumps(production_files(Path(sys.argv[1]), real=sys.argv[2] == 'real')))",
                            str(root), "real" if real else "toy"], capture_output=True, text=True,
                           cwd=Path(__file__).parent.parent, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert built.returncode == 0, built.stderr[-4000:]
    files = json.loads(built.stdout.strip().splitlines()[-1])
    print(f"stand-ins ready in {time.time() - t0:.0f} s under {root}")
    source = img2dataset_tar(tmp_path_factory.mktemp("src") / "00000.tar")
    url, options = s3_store_url
    options = {k: v for k, v in options.items() if k in ("key", "secret", "client_kwargs")}
    # moto assembles a multipart object in memory: completing a 1.9 GB model upload on a loaded machine takes
    # longer than botocore's 60 s read timeout, and the client's retry then races the first completion inside
    # moto (a 500: "seek of closed file"). Real S3 and MinIO complete in seconds.
    options["config_kwargs"] = {"read_timeout": 1800}
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
    watch: list = []
    run_cli(args + ["run"], env, watch)
    first_s = time.time() - t0
    store = Store(url, **options)
    seconds, cpu = {}, {}
    for stage in STAGES:
        versions = store.versions(stage)
        assert len(versions) == 1, f"{stage}: {len(versions)} versions"
        assert versions[0].verify() == [], stage
        m = versions[0].manifest
        seconds[stage] = m.get("duration_s")
        end = datetime.fromisoformat(m["created"].replace("Z", "+00:00")).timestamp()
        cpu[stage] = watch[0].cpu_between(end - m["duration_s"], end)
    assert store.open("images").manifest["rows_out"] == 8

    t0 = time.time()
    second = run_cli(args + ["run"], env)
    rerun_s = time.time() - t0
    for stage in STAGES:
        assert len(store.versions(stage)) == 1, f"the rerun made a new {stage} version"
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in second.stdout.splitlines() if line.count("│") >= 8]
    assert len(rows) >= len(STAGES) and all(r[3] == "reused" for r in rows), second.stdout  # the status column
    report = {"images": 8, "run_s": round(first_s), "rerun_s": round(rerun_s),
              "engine_cpu_s": round(watch[0].samples[-1][1]) if watch[0].samples else None,
              "engine_peak_rss_gb": round(watch[0].engine_peak / 2**30, 2),
              "test_process_peak_rss_gb (pytest + moto server)": round(watch[0].moto_peak / 2**30, 2),
              "crops": store.open("embeddings").manifest["metrics"].get("crops"),
              "crops scored (distinct image and box)": store.open("embeddings").manifest["metrics"].get("crops_scored"),
              "stage_seconds_per_image": {k: (round(v / 8, 1) if v else None) for k, v in seconds.items()},
              "stage_cpu_seconds_per_image": {k: round(v / 8, 1) for k, v in cpu.items()}}
    print(json.dumps(report, indent=1))
    (root / f"stage_seconds_{'real' if real else 'toy'}.json").write_text(json.dumps(report, indent=1))
