"""Generate: a baseline model fills in tags the captions missed, and writes captions that are parsed again.

Per images part (joined with the parsed part of the same name), for every key:
    parsed tags (union over its captions) ∪ model tags above threshold ∪ tags parsed from generated captions
The result is the `generated` version; counts reconcile per part (keys in = rows out + rejected).
"""
from __future__ import annotations

import logging
from collections import Counter

import pyarrow as pa
import torch
from PIL import Image

from storage import PartRecord, Version, VersionWriter, schemas
from storage.shards import decode_image

from tasks.engine.config import GenerateConfig
from tasks.shared.lineage import label_system_of
from tasks.shared.labels import load_labels
from tasks.shared.models import load_model, model_card, model_to_label_ids
from tasks.parser import get_parser, parse_captions
from tasks.engine.runner import Input, PartTask, Stage, parts_of, top

log = logging.getLogger("ram_engine")

STAGE_VERSION = "generate-1"
def parsed_by_key(parsed: Version, part: PartRecord | None) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    if part is None:
        return out
    for f in part.files:
        if f["kind"] == "table":
            table = parsed.read_file(f["path"], columns=["key", "tag_ids"])
            for key, ids in zip(table.column("key").to_pylist(), table.column("tag_ids").to_pylist()):
                out.setdefault(key, set()).update(ids or [])
    return out


def generate_part(writer: VersionWriter, task: PartTask, *, images: Version, parsed: Version, model, labels,
                  parser, cfg: GenerateConfig) -> PartRecord:
    from ram_model.transforms import ImageTransform

    part = task.payload["part"]
    index = next(images.read_file(f["path"], columns=["key"]) for f in part.files if f["kind"] == "table")
    keys = index.column("key").to_pylist()
    caption_tags = parsed_by_key(parsed, task.payload["parsed"])
    to_label = model_to_label_ids(model, labels)
    transform = ImageTransform(model.config.swin.image_size)
    thresholds = model.class_threshold if cfg.threshold is None else cfg.threshold
    rows, rejects = [], []
    counters: Counter = Counter()
    wanted = set(keys)
    seen: set[str] = set()

    def flush(batch_keys: list[str], batch_images: list[Image.Image]) -> None:
        x = torch.stack([transform(im) for im in batch_images])
        if cfg.caption and model.config.has_caption:
            ids, scores, captions = model.tag_and_caption(x, thresholds, num_beams=cfg.num_beams,
                                                          max_length=cfg.max_length, min_length=cfg.min_length)
        else:
            ids, scores = model.tag(x, thresholds)
            captions = [""] * len(batch_keys)
        parsed_gen = parse_captions(captions, parser, labels) if any(captions) else [None] * len(captions)
        for key, row_ids, row_scores, cap, pc in zip(batch_keys, ids, scores, captions, parsed_gen):
            mapped = [(int(to_label[i]), float(s)) for i, s in zip(row_ids, row_scores) if to_label[i] >= 0]
            predicted = sorted({i for i, _ in mapped})
            best = {i: s for i, s in sorted(mapped, key=lambda t: t[1])}
            gen_ids = sorted(set(pc.tag_ids)) if pc is not None and pc.reject_reason is None else []
            parsed_ids = sorted(caption_tags.get(key, set()))
            union = sorted(set(parsed_ids) | set(predicted) | set(gen_ids))
            counters["added_by_model"] += len(set(predicted) - set(parsed_ids))
            counters["added_by_caption"] += len(set(gen_ids) - set(parsed_ids) - set(predicted))
            counters["labels_parsed"] += len(parsed_ids)
            counters["labels_out"] += len(union)
            rows.append({"key": key, "parsed_tag_ids": parsed_ids, "predicted_tag_ids": predicted,
                         "predicted_scores": [best[i] for i in predicted],
                         "generated_captions": [cap] if cap else [], "generated_tag_ids": gen_ids,
                         "tag_ids": union})

    batch_keys: list[str] = []
    batch_images: list[Image.Image] = []
    shard = next((f["path"] for f in part.files if f["kind"] == "shard"), None)
    for sample in images.iter_part_samples(part):
        key = sample["__key__"]
        if key not in wanted or key in seen:
            continue
        seen.add(key)
        try:
            image = decode_image(sample)
        except Exception as exc:  # damaged pixels cost one sample, never the run
            rejects.append({"key": key, "reason": "decode-error", "detail": f"{type(exc).__name__}: {exc}"[:300],
                            "source": shard, "field": "image"})
            continue
        batch_keys.append(key)
        batch_images.append(image)
        if len(batch_keys) == cfg.batch_size:
            flush(batch_keys, batch_images)
            batch_keys, batch_images = [], []
    if batch_keys:
        flush(batch_keys, batch_images)
    for key in keys:
        if key not in seen:  # the index names a sample its shard does not hold: say so, never a silent gap
            rejects.append({"key": key, "reason": "missing-pixels", "detail": f"no image for this key in {shard}",
                            "source": shard, "field": "image"})
    position = {k: i for i, k in enumerate(keys)}
    rows.sort(key=lambda r: position[r["key"]])  # index order, whatever order the shard holds
    table = pa.Table.from_pylist(rows, schema=schemas.GENERATED)
    metrics = dict(counters) | {"top_added_tags": top(Counter(
        labels.name(i) for r in rows for i in set(r["tag_ids"]) - set(r["parsed_tag_ids"])))}
    return writer.write_part(task.name, table=table, rejects=rejects, rows_in=len(keys),
                             source_digest=task.source_digest, metrics=metrics)


def prepare(run) -> None:
    # the model's card is read here to fail before any part (a missing model, an unreadable config or tag list)
    # without holding its weights in this process: part work loads the model once per worker process
    model_card(run.store, run.inputs["baseline"])
    run.state["labels"] = load_labels(run.store, run.inputs["label_system"])


def split(run) -> list[PartTask]:
    return parts_of(run.inputs["images"], {"parsed": run.inputs["parsed"]}, salt=run.salt)


def process(run, w: VersionWriter, task: PartTask) -> PartRecord:
    cfg = run.cfg
    with torch.inference_mode():
        return generate_part(w, task, images=run.inputs["images"], parsed=run.inputs["parsed"],
                             labels=run.state["labels"], parser=get_parser(run.sections["parse"]), cfg=cfg,
                             model=load_model(run.store, run.inputs["baseline"], device=cfg.device))


STAGE = Stage(name="generate", output="generated", inputs=("images", "parsed", Input("baseline", "model")),
              section="generate", also=("parse",), files=("generate.baseline", "parse.labels"), version=STAGE_VERSION,
              resolve=lambda run: label_system_of(run.store, run.inputs["parsed"]), derives=("label_system",),
              prepare=prepare, split=split, process=process)
