"""The offline demo: a generated world with known truth, the whole loop with tiny models on CPU,
an evaluation against the planted truth, and an HTML report.

    world (images + noisy captions, truth kept aside) ─► tiny detector trained on the world's boxes
    ─► ingest … evaluate (the data-engine loop) ─► report
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tasks.config import EngineConfig, load_config

log = logging.getLogger("ram_engine")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def world_samples_for_detector(world, limit: int) -> list[dict]:
    """Detector training samples from the world's truth: every object's box, prompted with all categories."""
    from PIL import Image

    from storage.shards import iter_tar
    from fsspec.implementations.local import LocalFileSystem

    truth = {}
    with open(world.ground_truth, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            truth[row["key"]] = row
    categories = json.loads(Path(world.tag_groups).read_text())["category"]
    samples = []
    for sample in iter_tar(LocalFileSystem(), [str(p) for p in world.shards]):
        row = truth.get(sample["__key__"])
        if row is None:
            continue
        ext = next(e for e in ("jpg", "png") if e in sample)
        import io

        image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
        objects = row["objects"]
        samples.append({"image": image, "tags": categories,
                        "boxes": [o["box"] for o in objects],
                        "labels": [categories.index(o["category"]) for o in objects]})
        if len(samples) >= limit:
            break
    return samples


def prepare_detector(world, out: Path, steps: int, time_limit_s: float, seed: int) -> dict:
    """Train the demo's tiny Grounding DINO on the world's true boxes (once; reused when present)."""
    from ram_model.detector import build_tiny_detector, evaluate_detector, train_detector

    folder = out / "detector"
    done = folder / "demo_detector.json"
    if done.exists():
        return json.loads(done.read_text())
    categories = json.loads(Path(world.tag_groups).read_text())["category"]
    detector = build_tiny_detector(categories, seed=seed, image_size=world.config.get("image_size", 128))
    samples = world_samples_for_detector(world, limit=100_000)
    held = samples[-100:]
    info = train_detector(detector, samples[:-100] or samples, steps=steps, time_limit_s=time_limit_s, seed=seed)
    detector.model.eval()
    quality = evaluate_detector(detector, held)
    detector.save(folder)
    meta = {"train": info, "heldout": quality, "samples": len(samples) - len(held)}
    done.write_text(json.dumps(meta, indent=1, default=float))
    return meta


def demo_config(out: Path, world, config_path: str | None, overrides: list[str]) -> EngineConfig:
    base = [f"store.url={out / 'store'}", f"ingest.source={world.source}", f"parse.labels={world.tag_list}",
            f"evaluate.ground_truth={world.ground_truth}", f"ground.detector.model={out / 'detector'}"]
    return load_config(config_path or DEMO_CONFIG, base + list(overrides))


def run_demo(out_dir: str = "ram-demo", n_images: int = 600, seed: int = 0, engine: str = "prefect",
             config_path: str | None = None, overrides: list[str] = (), detector_steps: int = 2000,
             detector_minutes: float = 2.5, say=print) -> dict:
    """Generate the world, train the detector, run the loop, evaluate and render the report."""
    import torch

    from tasks.demo_world import WorldInfo, generate_world

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world_dir = out / "world"
    try:
        world = WorldInfo.load(world_dir)
        if world.config.get("n_images") != n_images or world.config.get("seed") != seed:
            raise FileNotFoundError
    except (FileNotFoundError, ValueError):
        say(f"[1/4] generating a world of {n_images} images with known truth in {world_dir}")
        world = generate_world(world_dir, n_images, seed=seed, fmt="webdataset", overwrite=True)
    say(f"      caption labels vs truth (planted noise): {_noise_line(world)}")
    say(f"[2/4] training the tiny Grounding DINO on the world's boxes (up to {detector_minutes:g} min)")
    det = prepare_detector(world, out, detector_steps, detector_minutes * 60, seed)
    say(f"      detector: {det['train'].get('steps')} steps, held-out recall@1 {det['heldout'].get('recall@1', 0):.2f}")
    cfg = demo_config(out, world, config_path, list(overrides))
    say(f"[3/4] running the data-engine loop ({engine}); the store is {cfg.store.url}")
    from .data_engine import data_engine_flow

    if engine == "prefect":
        results = data_engine_flow(cfg)
    else:
        results = data_engine_flow.fn(cfg)
    say("[4/4] rendering the report")
    from tasks.report import build_report
    from storage import Store

    store = Store(cfg.store.url)
    last = results.get("evaluate") or results[list(results)[-1]]
    notes = [f"The detector is a tiny Grounding DINO (about 2M parameters) trained for "
             f"{det['train'].get('steps')} steps on the demo world's true boxes; held-out recall@1 "
             f"{det['heldout'].get('recall@1', 0):.2f}. It stands in for a pretrained Grounding DINO."]
    report = build_report(store, last.version, out / "report", truth_path=str(world.ground_truth), notes=notes)
    return {"results": results, "report": str(report), "store": cfg.store.url, "seconds": time.perf_counter() - t0,
            "detector": det, "world": world}


def _noise_line(world) -> str:
    q = (world.noise or {}).get("caption_labels_union") or {}
    if not q:
        return "see world/truth/noise.json"
    return f"precision {q.get('precision', 0):.3f}, recall {q.get('recall', 0):.3f}"
