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

from tasks.engine.config import EngineConfig, load_config

log = logging.getLogger("ram_engine")



def world_samples_for_detector(world, limit: int) -> list[dict]:
    """Detector training samples from the world's truth: every object's box, prompted with all categories."""
    from storage.shards import decode_image, iter_tar
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
        image = decode_image(sample)
        objects = row["objects"]
        samples.append({"image": image, "tags": categories,
                        "boxes": [o["box"] for o in objects],
                        "labels": [categories.index(o["category"]) for o in objects]})
        if len(samples) >= limit:
            break
    return samples


SHIPPED_DETECTOR = Path(__file__).resolve().parent / "demo_assets" / "detector"
DETECTOR_META = "demo_detector.json"


def train_demo_detector(folder: Path, *, world=None, n_images: int = 2000, seed: int = 1000, steps: int = 3500,
                        time_limit_s: float | None = None, init: Path | None = None, say=print) -> dict:
    """Train the demo's tiny Grounding DINO on the true boxes of a generated world (by default its own
    world, another seed than the demo's) and save it with its held-out quality. This is the command that
    made the checkpoint shipped in flows/demo_assets/detector."""
    import tempfile

    import torch

    from ram_model.detector import build_tiny_detector, evaluate_detector, train_detector
    from tasks.demo.world import generate_world

    torch.set_num_threads(1)  # measured: one thread trains faster than two on a shared 2-core machine
    if world is None:
        # the independent world: the one the shipped stand-in was trained on (its images have no scene-object bias)
        world = generate_world(Path(tempfile.mkdtemp(prefix="detector-world-")), n_images, seed=seed,
                               fmt="webdataset", noise="independent")
    categories = json.loads(Path(world.tag_groups).read_text())["category"]
    if init is not None:  # continue training a saved detector (same categories)
        from ram_model.detector import DetectorConfig, load_detector

        size = world.config.get("image_size", 128)
        detector = load_detector(DetectorConfig(model=str(init), shortest_edge=size, longest_edge=size,
                                                box_threshold=0.25, text_threshold=0.2, batch_size=8))
    else:
        detector = build_tiny_detector(categories, seed=seed, image_size=world.config.get("image_size", 128))
    previous = json.loads((Path(init) / DETECTOR_META).read_text())["train"]["steps"] if init else 0
    samples = world_samples_for_detector(world, limit=100_000)
    held, train = samples[-100:], samples[:-100] or samples
    say(f"training the tiny detector: {len(train)} images, up to {steps} steps")
    info = train_detector(detector, train, steps=steps, time_limit_s=time_limit_s, seed=seed,
                          log_every=250, log=say)
    detector.model.eval()
    quality = evaluate_detector(detector, held)
    detector.save(folder)
    info["steps"] = info["steps"] + previous
    meta = {"train": info, "heldout": quality, "samples": len(train), "world_seed": world.config.get("seed"),
            "categories": categories}
    (Path(folder) / DETECTOR_META).write_text(json.dumps(meta, indent=1, default=float))
    return meta


def _shipped_or_trained(world, shipped: Path, local: Path, meta_name: str, train,
                        require: dict | None = None) -> tuple[Path, dict]:
    """A demo stand-in: the shipped one when it knows the world's categories (and its meta has the `require`d
    values), else the one trained for this output folder earlier, else `train(local)` now (once; reused)."""
    categories = json.loads(Path(world.tag_groups).read_text())["category"]
    for folder in (shipped, local):
        meta_path = folder / meta_name
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("categories") == categories and all(meta.get(k) == v for k, v in (require or {}).items()):
                return folder, meta
    return local, train(local)


def prepare_detector(world, out: Path, steps: int, time_limit_s: float, seed: int, say=print) -> tuple[Path, dict]:
    """The demo's detector: shipped, or trained now on the world's boxes within the time limit."""
    return _shipped_or_trained(world, SHIPPED_DETECTOR, out / "detector", DETECTOR_META, lambda folder: train_demo_detector(
        folder, world=world, steps=steps, time_limit_s=time_limit_s, seed=seed, say=say))


SHIPPED_EMBEDDER = Path(__file__).resolve().parent / "demo_assets" / "embedder"
EMBEDDER_META = "demo_embedder.json"


def world_crops(world, limit: int, padding: float = 0.1, min_size: int = 32) -> tuple[list, list[int], list[str]]:
    """Crops of every true object box of a world (cut as the ground stage cuts them) and their category."""
    from tasks.stages.ground import cut_crop

    crops, labels = [], []
    samples = world_samples_for_detector(world, limit=limit)
    for s in samples:
        for box, label in zip(s["boxes"], s["labels"]):
            crops.append(cut_crop(s["image"], box, padding, min_size))
            labels.append(label)
    return crops, labels, samples[0]["tags"] if samples else []


def train_demo_embedder(folder: Path, *, world=None, n_images: int = 2000, seed: int = 1000, steps: int = 1500,
                        time_limit_s: float | None = None, say=print) -> dict:
    """Train the demo's crop embedder, a small conv net, on the true object crops of a generated world
    (another seed than the demo's), so that crops of one shape embed together, and save it with its
    held-out nearest-centroid accuracy. This is the command that made flows/demo_assets/embedder: the
    demo's stand-in for a pretrained CLIP image tower (`clean.embedder.kind: conv`)."""
    import tempfile

    import torch

    from ram_model.embedder import (ConvCropEncoder, EmbedderConfig, EncoderEmbedder, nearest_centroid_accuracy,
                                    train_crop_embedder)
    from tasks.demo.world import generate_world

    torch.set_num_threads(1)
    if world is None:
        # the independent world: the one the shipped stand-in was trained on (its images have no scene-object bias)
        world = generate_world(Path(tempfile.mkdtemp(prefix="embedder-world-")), n_images, seed=seed,
                               fmt="webdataset", noise="independent")
    crops, labels, categories = world_crops(world, limit=100_000)
    n_held = max(1, len(crops) // 10)
    say(f"training the tiny crop embedder: {len(crops) - n_held} crops of {len(categories)} categories, "
        f"up to {steps} steps")
    torch.manual_seed(seed)
    model = ConvCropEncoder()
    info = train_crop_embedder(model, crops[:-n_held], labels[:-n_held], len(categories), steps=steps, seed=seed,
                               time_limit_s=time_limit_s, log=say)
    embed = EncoderEmbedder(model, EmbedderConfig(image_size=model.image_size, batch_size=128))
    accuracy = nearest_centroid_accuracy(embed(crops[-n_held:]), labels[-n_held:], embed(crops[:-n_held]),
                                         labels[:-n_held])
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    meta = {"train": info, "heldout": {"nearest_centroid_accuracy": accuracy, "crops": n_held},
            "crops": len(crops) - n_held, "world_seed": world.config.get("seed"), "categories": categories}
    (Path(folder) / EMBEDDER_META).write_text(json.dumps(meta, indent=1, default=float))
    return meta


def prepare_embedder(world, out: Path, steps: int, time_limit_s: float, seed: int, say=print) -> tuple[Path, dict]:
    """The demo's crop embedder: shipped, or trained now on the world's true crops within the time limit."""
    return _shipped_or_trained(world, SHIPPED_EMBEDDER, out / "embedder", EMBEDDER_META, lambda folder: train_demo_embedder(
        folder, world=world, steps=steps, time_limit_s=time_limit_s, seed=seed, say=say))


SHIPPED_ENCODER = Path(__file__).resolve().parent / "demo_assets" / "encoder"
ENCODER_META = "demo_encoder.json"


def world_tagging_samples(world, limit: int) -> tuple[list, "np.ndarray", list[str]]:
    """A world's images (PIL, in generation order) and their true tags as multi-hot rows over its tag list."""
    import numpy as np
    from fsspec.implementations.local import LocalFileSystem

    from storage.shards import decode_image, iter_tar

    tags = Path(world.tag_list).read_text(encoding="utf-8").split()
    truth = {}
    with open(world.ground_truth, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            truth[row["key"]] = row["tags"]
    images, rows = [], []
    for sample in iter_tar(LocalFileSystem(), [str(p) for p in world.shards]):
        if sample["__key__"] not in truth:      # a planted corrupt sample
            continue
        images.append(decode_image(sample))
        rows.append([1.0 if t in truth[sample["__key__"]] else 0.0 for t in tags])
        if len(images) >= limit:
            break
    return images, np.asarray(rows, dtype=np.float32).reshape(len(rows), len(tags)), tags


def tagger_quality(model, images: list, targets, tags: list[str], groups: dict[str, list[str]]) -> dict:
    """Held-out mAP of a tagger over all tags and per tag group (the world's category / colour / scene)."""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score

    from ram_model.transforms import ImageTransform

    transform = ImageTransform(model.config.swin.image_size)
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model.tag_probs(transform.batch(images[i:i + 64]))
                            for i in range(0, len(images), 64)]).numpy()
    ap = {t: float(average_precision_score(targets[:, j], scores[:, j])) for j, t in enumerate(tags)
          if 0 < targets[:, j].sum() < len(targets)}
    out = {"mAP": float(np.mean(list(ap.values())))}
    for group, members in groups.items():
        vals = [ap[t] for t in members if t in ap]
        if vals:
            out[f"{group}_mAP"] = float(np.mean(vals))
    return out


def train_demo_encoder(folder: Path, *, world=None, n_images: int = 2000, seed: int = 1000, steps: int = 3000,
                       time_limit_s: float | None = None, image_size: int = 64, image_encoder: str = "conv",
                       say=print) -> dict:
    """Pretrain the demo's tiny tagger on the true tags of a generated world (another seed than the demo's)
    and save it with its held-out mAP: the baseline and the ablation's models start their image encoder
    from it (`model.encoder_init`; their heads start fresh), as RAM starts from a pretrained Swin. This is
    the command that made flows/demo_assets/encoder. `image_encoder`: "conv" (the demo's, model.image_encoder)
    or "swin" (the tiny Swin, which learns shapes slowly at 64 px)."""
    import tempfile

    import torch

    from ram_model.checkpoint import save_pretrained
    from ram_model.ram import RAM, RAMConfig
    from ram_model.trainer import pretrain_tagger
    from tasks.demo.world import generate_world

    torch.set_num_threads(1)
    if world is None:
        # the independent world: the one the shipped stand-in was trained on (its images have no scene-object bias)
        world = generate_world(Path(tempfile.mkdtemp(prefix="encoder-world-")), n_images, seed=seed,
                               fmt="webdataset", noise="independent")
    images, targets, tags = world_tagging_samples(world, limit=100_000)
    n_held = max(1, len(images) // 10)
    say(f"pretraining the tiny tagger's encoder: {len(images) - n_held} images, {len(tags)} tags, up to {steps} steps")
    torch.manual_seed(seed)
    model = RAM(RAMConfig.tiny(num_tags=len(tags), image_size=image_size, with_caption=False, max_pool_head=True,
                               image_encoder=image_encoder), tags=tags)
    info = pretrain_tagger(model, images[:-n_held], targets[:-n_held], steps=steps, seed=seed,
                           time_limit_s=time_limit_s, log=say)
    groups = json.loads(Path(world.tag_groups).read_text())
    quality = tagger_quality(model, images[-n_held:], targets[-n_held:], tags, groups)
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_pretrained(model, folder)
    meta = {"train": info, "heldout": quality | {"images": n_held}, "images": len(images) - n_held,
            "world_seed": world.config.get("seed"), "categories": groups["category"], "image_size": image_size,
            "image_encoder": image_encoder}
    (Path(folder) / ENCODER_META).write_text(json.dumps(meta, indent=1, default=float))
    return meta


def prepare_encoder(world, out: Path, steps: int, time_limit_s: float, seed: int, image_size: int = 64,
                    image_encoder: str = "conv", say=print) -> tuple[Path, dict]:
    """The demo's pretrained tagger encoder: shipped, or pretrained now on the world's truth within the limit."""
    return _shipped_or_trained(world, SHIPPED_ENCODER, out / "encoder", ENCODER_META, lambda folder: train_demo_encoder(
        folder, world=world, steps=steps, time_limit_s=time_limit_s, seed=seed, image_size=image_size,
        image_encoder=image_encoder, say=say), require={"image_size": image_size, "image_encoder": image_encoder})


def demo_config(out: Path, world, detector: Path, config_path: str | None, overrides: list[str],
                embedder: Path | None = None, encoder: Path | None = None) -> EngineConfig:
    base = [f"store.url={out / 'store'}", f"ingest.source={world.source}", f"parse.labels={world.tag_list}",
            f"evaluate.ground_truth={world.ground_truth}", f"ground.detector.model={detector}"]
    if embedder is not None:   # the shipped stand-in for CLIP's pretrained image tower
        base += ["clean.embedder.kind=conv", f"clean.embedder.model={embedder}"]
    if encoder is not None:    # the shipped stand-in for RAM's pretrained Swin
        base += [f"model.encoder_init={encoder}"]
    return load_config(config_path or "demo", base + list(overrides))


CONFIG_NAME = "ram-engine.yaml"


def write_demo_config(out: Path, cfg: EngineConfig) -> Path:
    """The demo's whole resolved config beside its store, paths relative to it (tasks.engine.config resolves
    them against the file's folder): `ram-engine -c <out>/ram-engine.yaml run|serve|ingest` works from
    any working directory and finds the same store, source, labels, truth and detector."""
    import os

    import yaml

    from tasks.engine.config import PATH_FIELDS, MAYBE_PATH_FIELDS

    data = cfg.model_dump(mode="json")
    for dotted in PATH_FIELDS + MAYBE_PATH_FIELDS:
        *sections, name = dotted.split(".")
        node = data
        for section in sections:
            node = node[section]
        value = node.get(name)
        if isinstance(value, str) and Path(value).is_absolute() and (dotted in PATH_FIELDS or Path(value).exists()):
            rel = os.path.relpath(value, out)
            node[name] = rel if not rel.startswith("..") else value  # outside the folder: keep absolute
    path = out / CONFIG_NAME
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("# Written by `ram-engine demo`: the demo's resolved config. Relative paths are relative to\n"
                   "# this file. Use it with: ram-engine -c <this file> run | ingest | serve | ls | show ...\n"
                   + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def run_demo(out_dir: str = "ram-demo", n_images: int = 600, seed: int = 0, engine: str = "prefect",
             config_path: str | None = None, overrides: list[str] = (), detector_steps: int = 2000,
             detector_minutes: float = 2.5, say=print, world_only: bool = False, progress=None,
             noise: str = "contextual") -> dict:
    """Generate the world, train the detector, run the loop, evaluate and render the report.
    `world_only`: generate (or grow: the first images of a bigger world are the same) the world and
    write the config beside the store, but run nothing; ingesting it is the next step.
    `noise`: how the world's captions err, "contextual" (tied to the image) or "independent" (at random, the
    control): tasks.demo.world.NOISE_MODELS, docs/demo.md."""
    from tasks.demo.world import NOISE_MODELS, WorldInfo, generate_world

    if noise not in NOISE_MODELS:
        raise ValueError(f"demo: --noise must be one of {', '.join(NOISE_MODELS)}, got {noise!r}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world_dir = out / "world"
    try:
        world = WorldInfo.load(world_dir)
    except (FileNotFoundError, ValueError):
        world = None
    # a world written before the noise models were is the independent one
    had = world.config.get("noise", "independent") if world else noise
    if had != noise and (out / "store").exists():
        # the store's kept baseline (models/baseline) would be reused on the other world's data
        raise ValueError(f"demo: {out} holds a store made from the {had} world; run the {noise} world in "
                         f"another folder (--out) or delete {out / 'store'} first")
    if world is None or (world.config.get("n_images"), world.config.get("seed"), had) != (n_images, seed, noise):
        say(f"[1/5] generating a world of {n_images} images with known truth and {noise} caption noise in {world_dir}")
        world = generate_world(world_dir, n_images, seed=seed, fmt="webdataset", noise=noise, overwrite=True)
    say(f"      caption labels vs truth (planted noise): {_noise_line(world)}")
    say("[2/5] the tiny Grounding DINO (the shipped checkpoint, or trained now on the world's boxes)")
    det_dir, det = prepare_detector(world, out, detector_steps, detector_minutes * 60, seed, say=say)
    say(f"      {det_dir}: {det['train'].get('steps')} training steps, held-out recall@1 "
        f"{det['heldout'].get('recall_at_1', 0):.2f}")
    emb_dir, emb = prepare_embedder(world, out, 1500, detector_minutes * 60, seed, say=say)
    say(f"      {emb_dir}: a small conv crop embedder, {emb['train'].get('steps')} training steps, held-out "
        f"nearest-centroid accuracy {emb['heldout'].get('nearest_centroid_accuracy', 0):.2f}")
    model_cfg = demo_config(out, world, det_dir, config_path, list(overrides)).model   # the encoder it must fit
    enc_dir, enc = prepare_encoder(world, out, 3000, detector_minutes * 60, seed, image_size=model_cfg.image_size,
                                   image_encoder=model_cfg.image_encoder, say=say)
    say(f"      {enc_dir}: the tagger's image encoder, pretrained {enc['train'].get('steps')} steps on another "
        f"world's truth (held-out mAP {enc['heldout'].get('mAP', 0):.2f}, shapes "
        f"{enc['heldout'].get('category_mAP', 0):.2f}); the baseline and the ablation's models start from it")
    cfg = demo_config(out, world, det_dir, config_path, list(overrides), embedder=emb_dir, encoder=enc_dir)
    config_file = out / CONFIG_NAME
    if not (world_only and config_file.exists()):  # growing the world keeps the config (and any edit to it)
        write_demo_config(out, cfg)
    say(f"      config: {config_file} (ram-engine -c {config_file} run | ingest | serve)")
    if world_only:
        return {"results": {}, "report": None, "store": cfg.store.url, "seconds": time.perf_counter() - t0,
                "detector": det, "world": world, "config": str(config_file), "noise": noise}
    say(f"[3/5] running the data-engine loop ({engine}); the store is {cfg.store.url}")
    from .data_engine import data_engine_flow

    if engine == "prefect":
        from .temp_server import ensure_server

        ensure_server()
        from .runtime import console_progress

        with console_progress(progress):
            results = data_engine_flow(cfg)
    else:
        results = data_engine_flow.fn(cfg, progress=progress)
    from storage import Store

    from .ablation import ablation_flow

    store = Store(cfg.store.url)
    say(f"[4/5] the ablation: a model per label version (parsed, parsed+generated, cleaned) x "
        f"{len(cfg.ablation.seeds)} seeds, {cfg.ablation.steps or cfg.train.steps} steps each")
    results["ablation"] = (ablation_flow if engine == "prefect" else ablation_flow.fn)(cfg)
    ablation = results["ablation"].version
    say("[5/5] rendering the report")
    from tasks.inspection.report import build_report

    last = results.get("evaluate") or results[list(results)[-1]]
    notes = [f"The detector is a tiny Grounding DINO (about 2M parameters) trained for "
             f"{det['train'].get('steps')} steps on true boxes of generated scenes (world seed "
             f"{det.get('world_seed')}); on held-out scenes its best box overlaps the true one (IoU >= 0.5) for "
             f"{det['heldout'].get('recall_at_1', 0):.0%} of the objects. It stands in for a pretrained "
             f"Grounding DINO.",
             f"The taggers (baseline, retrained, ablation) start their image encoder from a tiny RAM pretrained "
             f"{enc['train'].get('steps')} steps on the true tags of another generated world (seed "
             f"{enc.get('world_seed')}; held-out mAP {enc['heldout'].get('mAP', 0):.2f}: colours "
             f"{enc['heldout'].get('colour_mAP', 0):.2f}, scenes {enc['heldout'].get('scene_mAP', 0):.2f}, shapes "
             f"{enc['heldout'].get('category_mAP', 0):.2f}), as RAM starts from a pretrained Swin; their heads "
             f"learn from the labels.",
             {"contextual": "The world's captions err as people's do (contextual noise): objects go with their "
                            "scene, small and peripheral objects are left out more often, look-alike shapes are "
                            "named for one another, and absent objects named are what the scene suggests "
                            "(docs/demo.md). Its control: ram-engine demo --noise independent.",
              "independent": "The world's captions err at random, whatever the image shows (independent noise, "
                             "the control; the default world's errors depend on the image: docs/demo.md)."}[noise]]
    report = build_report(store, last.version, out / "report", truth_path=str(world.ground_truth), notes=notes,
                          ablation=ablation)
    if engine == "prefect":
        from .runtime import publish_report

        publish_report(report, last.version)
    return {"results": results, "report": str(report), "store": cfg.store.url, "seconds": time.perf_counter() - t0,
            "detector": det, "world": world, "ablation": ablation, "config": str(config_file), "noise": noise}


def _noise_line(world) -> str:
    q = (world.noise or {}).get("caption_labels_union") or {}
    if not q:
        return "see world/truth/noise.json"
    r = world.noise.get("rates", {})
    return (f"precision {q.get('precision', 0):.3f}, recall {q.get('recall', 0):.3f} "
            f"({world.config.get('noise', 'independent')} noise: objects omitted {r.get('object_omitted', 0):.3f}, "
            f"captions with an absent object {r.get('captions_with_absent', 0):.3f}, colours omitted "
            f"{r.get('colour_omitted', 0):.3f}, scene omitted {r.get('scene_omitted', 0):.3f})")
