"""Stage `embed`: every crop's embedding and the baseline's score for its own tag, one part per regions part
(new data embeds only new crops). The cluster step clusters these embeddings; clean reads the scores.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from storage.schemas import EMBEDDINGS
from storage.shards import decode_image

from tasks.engine.runner import Input, Stage
from tasks.shared.lineage import label_system_of

STAGE_VERSION = "embed-2"   # 2: one pass per distinct crop; the baseline embedder shares the tagging pass


# ---------------------------------------------------------------- embeddings and baseline scores of crops

CropScorer = Callable[[Sequence[Image.Image]], tuple[np.ndarray, np.ndarray | None]]


def separate_scorer(embedder, baseline: Callable[[Sequence[Image.Image]], np.ndarray] | None) -> CropScorer:
    """An embedder and (optionally) a baseline (images -> [N, model tags] probabilities) as one crop scorer."""
    def score(images):
        return embedder(images), (np.asarray(baseline(images)) if baseline is not None else None)
    return score


def embed_part(regions: pa.Table, crops: Mapping[str, Image.Image], score_crops: CropScorer,
               label_to_model: Mapping[int, int], batch_size: int, source: str) -> tuple[pa.Table, list[dict], dict]:
    """One regions part to its `embeddings` rows, rejects and metrics: each crop's embedding and, where
    `score_crops` (images -> (embeddings [N, D], baseline probabilities [N, model tags] or None)) gives
    probabilities, the baseline's score for the crop's own tag (label id -> model column by `label_to_model`;
    None where the model lacks the tag). A crop missing from `crops` is a reject.

    Each distinct crop is scored once: the detector often finds one box for several tags of a prompt, and
    the ground stage cuts it once per tag; crops of the same image and box are the same pixels, so one pass
    serves all of them and each tag reads its own column of the same probabilities."""
    keys, tids, cks, boxes = (regions.column(c).to_pylist() for c in ("key", "tag_id", "crop_key", "box"))
    present = [i for i, ck in enumerate(cks) if ck in crops]
    rejects = [{"key": keys[i], "reason": "missing-crop", "detail": f"crop {cks[i]} is not in the shard",
                "source": source, "field": "crop"} for i in sorted(set(range(len(cks))) - set(present))]
    def same_pixels(i: int) -> tuple:     # a row without a box is a crop of its own
        return (keys[i], tuple(boxes[i])) if boxes[i] else (cks[i],)

    first_of: dict[tuple, int] = {}       # -> the row whose crop is scored for all rows of that identity
    for i in present:
        first_of.setdefault(same_pixels(i), i)
    distinct = sorted(first_of.values())
    slot = {i: n for n, i in enumerate(distinct)}
    emb_parts, prob_parts = [], []
    for s in range(0, len(distinct), batch_size):
        imgs = [crops[cks[i]] for i in distinct[s: s + batch_size]]
        emb, probs = score_crops(imgs)
        if probs is not None and (probs.ndim != 2 or len(probs) != len(imgs)):
            raise ValueError(f"baseline returned shape {probs.shape} for {len(imgs)} crops; expected [N, num_tags]")
        emb_parts.append(np.asarray(emb, dtype=np.float32))
        prob_parts.append(probs)
    emb_all = np.concatenate(emb_parts) if emb_parts else np.zeros((0, 0), np.float32)
    probs_all = None if not prob_parts or prob_parts[0] is None else np.concatenate(prob_parts)
    rows: dict[str, list] = {"key": [], "tag_id": [], "crop_key": [], "embedding": [], "baseline_score": []}
    for i in present:
        j = slot[first_of[same_pixels(i)]]
        m = label_to_model.get(tids[i])
        rows["key"].append(keys[i])
        rows["tag_id"].append(tids[i])
        rows["crop_key"].append(cks[i])
        rows["embedding"].append(emb_all[j])
        rows["baseline_score"].append(float(probs_all[j, m]) if probs_all is not None and m is not None else None)
    table = pa.table({k: rows[k] for k in ("key", "tag_id", "crop_key")} | {
        "embedding": pa.array(rows["embedding"], pa.list_(pa.float32())),
        "baseline_score": pa.array(rows["baseline_score"], pa.float32())}).cast(EMBEDDINGS)
    return table, rejects, {"crops": len(present), "crops_scored": len(distinct)}


def _crop_images(version, part) -> dict[str, Image.Image]:
    return {sample["__key__"]: decode_image(sample) for sample in version.iter_part_samples(part)}


def prepare(run) -> None:
    from tasks.shared.labels import load_labels
    from tasks.shared.models import model_card, model_to_label_ids, resolve_device

    # the model's card (config, tag list), not its weights: this process only maps tags
    card = model_card(run.store, run.inputs["baseline"])
    labels = load_labels(run.store, run.inputs["label_system"])
    run.state["device"] = str(resolve_device(run.cfg.embedder.device))
    run.state["image_size"] = card.config.swin.image_size
    # the baseline's tag list may differ from the label system's: match by name
    run.state["label_to_model"] = {int(lab): m for m, lab in enumerate(model_to_label_ids(card, labels)) if lab >= 0}
    # part work loads the model, once per worker process (a model is never shipped to a worker)


def split(run):
    from tasks.engine.runner import parts_of

    return parts_of(run.inputs["regions"], salt=run.salt)


def baseline_scorer(model, cfg, image_size: int, baseline_check: bool) -> CropScorer:
    """The crop scorer for the embed stage. When the embedder is the baseline's own encoder at the baseline's
    input size, one encoder pass gives both the embedding and the tag probabilities (the Swin is nearly all
    of the cost); otherwise the configured embedder and, with `baseline_check`, the baseline's tagger."""
    import torch
    from ram_model.embedder import build_embedder
    from ram_model.transforms import ImageTransform

    transform = ImageTransform(image_size)   # the baseline's eval transform
    if cfg.kind == "baseline" and cfg.image_size in (None, image_size):
        def joint(images):
            embeds, probs = model.embed_and_tag_probs(transform.batch(images))
            pooled = embeds[:, 0] if cfg.pool == "first" else embeds.mean(dim=1)
            emb = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
            return emb, (probs.cpu().numpy() if baseline_check else None)
        return joint

    embedder = build_embedder(cfg, baseline_encoder=lambda x: model.encode_image(x), image_size=image_size)

    def tag_probs(images):
        with torch.inference_mode():
            return model.tag_probs(transform.batch(images)).cpu().numpy()
    return separate_scorer(embedder, tag_probs if baseline_check else None)


def process(run, w, task):
    from tasks.engine.cache import worker_cached
    from tasks.shared.models import load_model

    store, cfg, regions, baseline_ref = run.store, run.cfg, run.inputs["regions"], run.inputs["baseline"]
    device, image_size = run.state["device"], run.state["image_size"]
    model = load_model(store, baseline_ref, device=device)   # once per worker process
    score = worker_cached(f"crop-scorer|{cfg.embedder!r}|{cfg.baseline_check}|{run.salt}|{device}",
                          lambda: baseline_scorer(model, cfg.embedder, image_size, cfg.baseline_check))
    part = task.payload["part"]
    table = regions.read_file(next(f["path"] for f in part.files if f["kind"] == "table"))
    out, rejects, metrics = embed_part(table, _crop_images(regions, part), score, run.state["label_to_model"],
                                       cfg.embedder.batch_size, source=part.name)
    return w.write_part(task.name, table=out, rejects=rejects, rows_in=table.num_rows, source_digest=task.source_digest,
                        metrics=metrics)


STAGE = Stage(name="embed", output="embeddings", inputs=("regions", Input("baseline", "model")), section="clean",
              reads=("clean.embedder", "clean.baseline_check"), files=("clean.embedder.model",),
              resolve=lambda run: label_system_of(run.store, run.inputs["regions"]), derives=("label_system",),
              version=STAGE_VERSION, prepare=prepare, split=split, process=process)
