"""Train: a RAM model from a labelled version (`parsed` or `clean`) and its `images`, into the store.

    labels (parsed/clean) + images ─► training tables (train / held-out split by key hash)
        ─► Trainer (in process, or torchrun workers) ─► held-out evaluation ─► models/<name>/<version>

The model version's parents are the label version, the images version and the model it was
fine-tuned from; its metrics are the held-out mAP and precision/recall at the model's thresholds.
A crashed run resumes from its last mid-epoch checkpoint (kept in the local cache under the version id).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from ram_model.metrics import best_f1_thresholds
from storage import Store, StoreError, Version, digest
from storage.shards import write_label_table

from tasks.engine.cache import cache_dir
from tasks.engine.config import ModelConfig
from tasks.engine.runner import Input, PartTask, Stage
from tasks.shared.labels import load_labels
from tasks.shared.lineage import label_system_of
from tasks.shared.models import is_holdout, load_model, local_model_dir, model_version, resolve_device

log = logging.getLogger("ram_engine")

STAGE_VERSION = "train-1"
# How a torchrun worker gets the store's storage options (keys included): the environment, not job.json.
STORAGE_OPTIONS_ENV = "RAM_ENGINE_STORAGE_OPTIONS"


def label_rows(labels: Version, images: Version) -> list[tuple[str, pa.Table]]:
    """Per images part: (store-relative shard path, table key / tag_ids / captions) for keys that have labels.

    Works for `parsed` (several rows per key: tag ids are unioned) and `clean` (one row per key)."""
    by_part: dict[str, dict[str, set[int]]] = {}
    for part, table in labels.iter_part_tables(columns=["key", "tag_ids"]):
        tags = by_part.setdefault(part.name, {})
        for key, ids in zip(table.column("key").to_pylist(), table.column("tag_ids").to_pylist()):
            tags.setdefault(key, set()).update(ids or [])
    out = []
    for part, table in images.iter_part_tables(columns=["key", "captions", "shard"]):
        tags = by_part.get(part.name)
        if not tags or table.num_rows == 0:
            continue
        keys = table.column("key").to_pylist()
        captions = table.column("captions").to_pylist()
        keep = [i for i, k in enumerate(keys) if k in tags]
        rows = pa.table({"key": [keys[i] for i in keep],
                         "tag_ids": pa.array([sorted(tags[keys[i]]) for i in keep], pa.list_(pa.int32())),
                         "captions": pa.array([captions[i] for i in keep], pa.list_(pa.string()))})
        shard = next(f for f in part.files if f["kind"] == "shard")
        images.check_inputs([shard])  # the trainer streams it later: stop here if it changed
        out.append((shard["path"], rows))
    return out


def _write_split(parts: list[tuple[str, pa.Table]], work: Path, fraction: float) -> tuple[dict[str, list], dict]:
    """The train / held-out label tables per shard, as local files a torchrun worker reads: ({split: [[shard
    path, table path], ...]}, {split: rows})."""
    splits: dict[str, list] = {"train": [], "holdout": []}
    counts = {"train": 0, "holdout": 0}
    for i, (shard, rows) in enumerate(parts):
        mask = np.array([is_holdout(k, fraction) for k in rows.column("key").to_pylist()], dtype=bool)
        for name, m in (("train", ~mask), ("holdout", mask)):
            sub = rows.filter(pa.array(m))
            if sub.num_rows:
                path = work / f"{name}-{i:05d}.parquet"
                write_label_table(str(path), sub)
                splits[name].append([shard, str(path)])
                counts[name] += sub.num_rows
    return splits, counts


def sample_shards(store: Store, split: list) -> list:
    """The sample sources of a split ([[shard path, labels path], ...]) through the store's reader: what the
    model package's stream reads (it never opens the store itself)."""
    return [store.labelled_shard(shard, labels) for shard, labels in split]


def _build_model(cfg: ModelConfig, tags: list[str], thresholds: list[float] | None, captions: list[str]):
    from ram_model.label_embeddings import build_label_embeddings
    from ram_model.ram import RAM, RAMConfig
    from ram_model.tokenizer import load_tokenizer, train_wordpiece_tokenizer

    tokenizer = None
    if cfg.with_caption and cfg.preset in ("tiny", "ram", "tag2text"):
        tokenizer = (load_tokenizer(cfg.tokenizer) if cfg.tokenizer else
                     train_wordpiece_tokenizer(captions + tags, vocab_size=cfg.tokenizer_vocab_size))
    vocab = len(tokenizer) if tokenizer is not None else 1000
    kw = {"default_threshold": cfg.default_threshold, "max_pool_head": cfg.max_pool_head}
    if cfg.image_encoder != "swin":     # the tiny preset's option (ModelConfig checks)
        kw["image_encoder"] = cfg.image_encoder
    if cfg.preset == "tiny":
        rc = RAMConfig.tiny(num_tags=len(tags), vocab_size=vocab, image_size=cfg.image_size,
                            with_caption=tokenizer is not None, **kw)
    elif cfg.preset == "ram":
        rc = RAMConfig.ram(cfg.vit, cfg.image_size, with_caption=tokenizer is not None, num_tags=len(tags), **kw)
    elif cfg.preset == "ram_plus":
        rc = RAMConfig.ram_plus(cfg.vit, cfg.image_size, num_tags=len(tags), **kw)
    else:
        rc = RAMConfig.tag2text(cfg.vit, cfg.image_size, num_tags=len(tags), **kw)
    if tokenizer is not None and rc.text is not None and rc.text.vocab_size != vocab:
        import dataclasses

        rc = dataclasses.replace(rc, text=dataclasses.replace(rc.text, vocab_size=vocab))
    embeddings = build_label_embeddings(tags, cfg.clip) if cfg.clip else None
    model = RAM(rc, tags=tags, thresholds=thresholds, label_embeddings=embeddings, tokenizer=tokenizer)
    if cfg.encoder_init:
        from ram_model.checkpoint import load_image_encoder

        try:
            load_image_encoder(model, cfg.encoder_init)
        except (FileNotFoundError, ValueError) as e:
            raise StoreError(f"model.encoder_init {cfg.encoder_init}: {e}") from e
    return model


def _clip_label_rows(cfg: ModelConfig):
    """The label embeddings of tags a fine-tuned model has not seen, from the configured CLIP text encoder
    (model.clip), as the reference builds them; None without one (set_tags then gives random rows)."""
    if not cfg.clip:
        return None
    from ram_model.label_embeddings import build_label_embeddings

    return lambda new_tags: build_label_embeddings(new_tags, cfg.clip)


def _batch_to_inputs(model, caption_loss: bool):
    def convert(batch: dict, device) -> dict:
        inputs = {"images": batch["image"].to(device), "tag_targets": batch["tag_targets"].to(device)}
        if caption_loss and "caption" in batch:
            ids, mask = model.tokenize_captions(list(batch["caption"]), device)
            inputs.update(caption_ids=ids, caption_mask=mask)
        return inputs

    return convert


def run_training(job_path: str, storage_options: dict | None = None, progress: Callable | None = None) -> None:
    """The training loop of a prepared job (job.json): in process, or in each torchrun worker. The store's
    storage options come as an argument, or in a torchrun worker from its environment (never a file)."""
    import torch

    from ram_model.checkpoint import from_pretrained, save_pretrained
    from ram_model.data_stream import ShardStream
    from ram_model.transforms import ImageTransform
    from ram_model.trainer import LoopConfig
    from ram_model.trainer import train

    job = json.loads(Path(job_path).read_text())
    if storage_options is None:
        storage_options = json.loads(os.environ.get(STORAGE_OPTIONS_ENV, "{}"))
    # each rank builds its own sample stream here, through the store's reader
    shards = sample_shards(Store(job["store"], **storage_options), job["train"])
    torch.set_num_threads(max(1, int(os.environ.get("RAM_ENGINE_THREADS", torch.get_num_threads()))))
    model = from_pretrained(job["init_dir"])
    model.train()
    caption_loss = job["caption_loss"] and model.config.has_caption
    transform = ImageTransform(job["image_size"], train=job["augment"])
    factory = functools.partial(ShardStream, shards, model.config.num_tags, transform,
                                caption_column="captions" if caption_loss else None, shuffle_buffer=256)
    loop = LoopConfig(**job["loop"])
    result = train(model, factory, loop, job["work_dir"], resume=True,
                   batch_to_inputs=_batch_to_inputs(model, caption_loss),
                   progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(job["out_dir"])
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".final-"))
        save_pretrained(model, tmp)
        # No wall-clock figures in the model's files: a rerun must give the same bytes.
        (tmp / "train_result.json").write_text(json.dumps({"steps": result.step, "final_loss": result.loss}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # the trained model appears whole or not at all


def calibrate_thresholds(model, shards: list, image_size: int, min_precision: float, confidence: float,
                         max_samples: int = 1024, grid: np.ndarray = np.linspace(0.05, 0.95, 19)) -> list[float]:
    """Per-class thresholds that maximise F1 against the labels of `shards` among those whose precision
    reaches `min_precision` with `confidence` (a few lucky held-out predictions must not enable a class); a
    class no threshold makes that precise gets 1.0 (disabled, as RAM ships some tags): a weak class must not
    flood the generated labels. Classes without positives keep their threshold. Called with the held-out
    split: on the training split an overfit model looks precise on classes it has not learned (measured in
    the demo: 910 true tags then wrongly removed by cleaning).
    `shards`: sample sources (sample_shards)."""
    import torch

    from ram_model.data_stream import ShardStream, make_loader
    from ram_model.transforms import ImageTransform

    stream = ShardStream(shards, model.config.num_tags, ImageTransform(image_size),
                         shuffle=False, drop_last=False, batch_size=64)
    stream.set_epoch(0)
    probs, targets = [], []
    with torch.inference_mode():
        for batch in make_loader(stream):
            probs.append(model.tag_probs(batch["image"]).cpu().numpy())
            targets.append(batch["tag_targets"].numpy() > 0.5)
            if sum(len(p) for p in probs) >= max_samples:
                break
    return best_f1_thresholds(np.concatenate(probs), np.concatenate(targets),
                              model.class_threshold.cpu().numpy().astype(float), grid, min_precision, confidence)


def evaluate_model(model, holdout: list, image_size: int) -> dict:
    """Held-out metrics of `model` over sample sources (sample_shards)."""
    from ram_model.data_stream import ShardStream
    from ram_model.transforms import ImageTransform
    from ram_model.trainer import evaluate_tagging

    if not holdout:
        return {}
    stream = ShardStream(holdout, model.config.num_tags, ImageTransform(image_size),
                         shuffle=False, drop_last=False)
    metrics = evaluate_tagging(model, stream, model.class_threshold.cpu().numpy(), batch_size=32)
    per_class = metrics.pop("per_class")
    metrics["per_tag"] = {tag: {"ap": per_class["ap"][i], "precision": per_class["precision"][i],
                                "recall": per_class["recall"][i], "positives": per_class["positives"][i]}
                          for i, tag in enumerate(model.tags) if per_class["positives"][i]}
    return metrics


def resolve(run) -> dict:
    """What it starts from: the explicit init, else the latest model of this name trained on other data (new
    data fine-tunes it; a rerun on the same data finds the same start, so the same version), else train.init
    (e.g. the baseline), else from scratch. And the label system its tag ids mean."""
    store, cfg, labels, images = run.store, run.cfg, run.inputs["labels"], run.inputs["images"]
    start = run.inputs["init"]
    if start is None and cfg.fine_tune_latest:
        earlier = [v for v in store.versions(run.output) if not {labels.ref, images.ref} <= set(v.parents)]
        start = earlier[-1].ref if earlier else None
    return label_system_of(store, labels) | {"start": start or cfg.init}


def split(run):
    return [PartTask("model", "")]


def process(run, writer, task):
    store, cfg = run.store, run.cfg
    work = train_work_dir(store, cfg.name, writer.id)
    # One trainer per (store, version) on this machine; a second one waits. The lock file sits beside
    # the work folder and is never deleted: a lock on a deleted file would let a third trainer in.
    with _exclusive(work.with_name(work.name + ".lock")):
        work.mkdir(parents=True, exist_ok=True)
        if writer.part_done(task.name):
            return writer.record(task.name)
        label_system = load_labels(store, run.inputs["label_system"])
        return _train_locked(store, run.sections["model"], cfg, run.inputs["labels"], run.inputs["images"],
                             run.inputs["start"], label_system, writer, work, run.progress)


# The model's held-out metrics come from its part's record, so a resumed run commits the same; the runner
# records their "per_tag" entry in the manifest beside them (clean.baseline_min_ap reads it).
STAGE = Stage(name="train", output=lambda section: f"models/{section.name}",
              inputs=("labels", "images", Input("init", "model")), section="train", also=("model",),
              files=("train.init", "model.encoder_init"), resolve=resolve,
              derives=("label_system", Input("start", "model")), version=STAGE_VERSION, split=split, process=process,
              summarize=lambda run, records: records[0].metrics, one_part=True)


def train_work_dir(store: Store, name: str, vid: str) -> Path:
    """The local cache folder of one training job: per store (the cache is shared by every store this
    machine uses) and per version."""
    return cache_dir() / "train" / digest(store.full_url(""))[:12] / name.replace("/", "__") / vid


@contextlib.contextmanager
def _exclusive(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train_locked(store, model_cfg, cfg, labels, images, init, label_system, writer, work, progress=None):
    from ram_model.checkpoint import save_pretrained

    stage = writer.stage
    tags = list(label_system.tags)
    parts = label_rows(labels, images)
    splits, counts = _write_split(parts, work, cfg.holdout_fraction)
    n_train = counts["train"]
    if n_train < cfg.batch_size:
        raise StoreError(f"train {stage}: {n_train} labelled training samples in {labels.ref}, fewer than one "
                         f"batch ({cfg.batch_size}); ingest more data or lower train.batch_size")
    thresholds = label_system.thresholds if label_system.has_thresholds else None
    init_dir = work / "init"
    if not (init_dir / "config.json").exists():
        stored = model_version(store, init) if init else None
        stored_dir = local_model_dir(stored) if stored is not None else None
        if stored_dir and (Path(stored_dir) / "tags.txt").read_text(encoding="utf-8").split("\n") == tags:
            # the stored model's files as they are: loading it here only to save it again would hold a
            # second copy of a Swin-L (1.9 GB) in this process for the whole training
            tmp = Path(tempfile.mkdtemp(dir=work))
            shutil.copytree(stored_dir, tmp, dirs_exist_ok=True)
            tmp.rename(init_dir)
    if not (init_dir / "config.json").exists():
        if init:
            model = load_model(store, init, device="cpu")
            if list(model.tags) != tags:
                import copy

                model = copy.deepcopy(model)
                model.set_tags(tags, thresholds=thresholds, embed_new=_clip_label_rows(model_cfg))
        else:
            captions = [c for _, rows in parts for cs in rows.column("captions").to_pylist() for c in cs]
            import torch

            torch.manual_seed(cfg.seed)  # the initial weights are part of what the version id promises
            model = _build_model(model_cfg, tags, thresholds, captions)
        tmp = Path(tempfile.mkdtemp(dir=work))
        save_pretrained(model, tmp)
        tmp.rename(init_dir)
    image_size = json.loads((init_dir / "config.json").read_text())["swin"]["image_size"]
    out_dir = work / "final"
    job = {"store": store.url, "init_dir": str(init_dir), "work_dir": str(work / "loop"), "out_dir": str(out_dir),
           "train": splits["train"], "image_size": image_size, "augment": cfg.augment,
           "caption_loss": cfg.caption_loss,  # no storage_options: credentials never reach the disk
           "loop": {"lr": cfg.lr, "lr_scales": [[r"^(visual_encoder|image_proj)\.", cfg.encoder_lr_scale]],
                    "frozen_patterns": ["label_embed"] + ([r"^(visual_encoder|image_proj)\."] if cfg.freeze_encoder
                                                         else []),
                    "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps,
                    "max_grad_norm": cfg.max_grad_norm,
                    "total_steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                    "checkpoint_every_steps": cfg.checkpoint_every_steps, "seed": cfg.seed, "device": cfg.device,
                    "image_size": image_size, "log_every_steps": max(1, cfg.steps // 100)}}
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    if not (out_dir / "train_result.json").exists():
        if cfg.nproc_per_node > 1:
            _torchrun(job_path, cfg.nproc_per_node, store.storage_options)
        else:
            run_training(str(job_path), store.storage_options,
                         progress=progress and _step_progress(progress, stage))
    from ram_model.checkpoint import from_pretrained

    trained = from_pretrained(out_dir, map_location=resolve_device(cfg.device)).eval()
    if cfg.calibrate_thresholds:
        import torch

        calibrated = calibrate_thresholds(trained, sample_shards(store, splits["holdout"] or splits["train"]),
                                          image_size, min_precision=cfg.calibration_min_precision,
                                          confidence=cfg.calibration_confidence)
        trained.class_threshold = torch.tensor(calibrated, dtype=torch.float32)
        (out_dir / "thresholds.txt").write_text("\n".join(repr(float(x)) for x in calibrated), encoding="utf-8")
    metrics = evaluate_model(trained, sample_shards(store, splits["holdout"]), image_size)
    metrics["train"] = json.loads((out_dir / "train_result.json").read_text())
    metrics["samples"] = {"train": n_train, "holdout": counts["holdout"]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    files = {str(p.relative_to(out_dir)): str(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    record = writer.write_files("model", files, rows_in=0, metrics=metrics)
    shutil.rmtree(work, ignore_errors=True)
    return record


def _step_progress(progress: Callable, stage: str) -> Callable:
    """Training steps reported through the stage progress callback as "<stage> training" (done, total)."""
    def report(p) -> None:
        progress(f"{stage} training", p.step, p.total_steps)
    return report


def _torchrun(job_path: Path, nproc: int, storage_options: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tasks.stages.train", str(job_path)]
    log.info("training with %d workers: %s", nproc, " ".join(cmd))
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
                                        **{STORAGE_OPTIONS_ENV: json.dumps(storage_options)}))
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun training failed (exit {proc.returncode}); its checkpoints in "
                           f"{job_path.parent} let a rerun resume")


if __name__ == "__main__":  # a torchrun worker: python -m tasks.stages.train JOB.json
    run_training(sys.argv[1])
