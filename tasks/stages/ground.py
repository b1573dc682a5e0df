"""Ground stage: find each localisable tag of an image with the detector and cut the region crops.

Input part: rows with `key` and `tag_ids` (the generated stage's union of caption and model tags).
Output: regions rows (storage.schemas.REGIONS, one per kept box), crop samples for a WebDataset
shard ({"__key__": crop_key, "jpg"/"png": bytes}), rejects and metrics.

Only localisable tags are grounded: by default the tags the label system declares objects
(ram_model.labels: tag_types.txt). Scenes, attributes and actions (and tags of unknown type) have no
box of their own and are not cleaned by regions. The types belong to the labels version, never to a
vote over the corpus, so new data neither changes what is grounded nor re-grounds old parts.
"""
from __future__ import annotations

import io
import time
from collections import Counter, defaultdict
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import pyarrow as pa
from PIL import Image

from storage.schemas import REGIONS
from storage.shards import decode_image
from storage.store import digest, shard_name

from tasks.shared.categories import localisable_tags, tag_categories
from tasks.engine.config import GroundSection
from tasks.engine.runner import Stage


class Region(NamedTuple):
    tag_id: int
    tag: str
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 source pixels
    score: float
    rank: int                                 # 0 = best box of this (image, tag)


# ---------------------------------------------------------------- categories


# ---------------------------------------------------------------- boxes and crops

def ground_batch(detector, images: Sequence[Image.Image], tags_per_image: Sequence[Sequence[tuple[int, str]]],
                 cfg: GroundSection) -> list[list[Region]]:
    """Detect each image's (tag_id, tag name) list; keep the top-N boxes per tag."""
    out: list[list[Region]] = [[] for _ in images]
    todo = [i for i, t in enumerate(tags_per_image) if t]
    if not todo:
        return out
    dets = detector.detect([images[i] for i in todo], [[name for _, name in tags_per_image[i]] for i in todo])
    for i, ds in zip(todo, dets):
        per_tag: dict[int, list] = defaultdict(list)
        for d in ds:
            per_tag[d.tag_index].append(d)
        for ti in sorted(per_tag):
            tid, name = tags_per_image[i][ti]
            best = sorted(per_tag[ti], key=lambda d: -d.score)[: cfg.top_n]
            out[i].extend(Region(tid, name, tuple(d.box), float(d.score), r) for r, d in enumerate(best))
    return out


def cut_crop(image: Image.Image, box: Sequence[float], padding: float = 0.1, min_size: int = 32) -> Image.Image:
    """The box plus `padding` x its size on each side, grown to at least `min_size` px per side around
    its centre, kept inside the image (shifted rather than shrunk when there is room)."""
    W, H = image.size
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"cut_crop: box {tuple(box)} has no area")
    pw, ph = (x1 - x0) * padding, (y1 - y0) * padding
    x0, y0, x1, y1 = x0 - pw, y0 - ph, x1 + pw, y1 + ph

    def span(a, b, lo_limit, hi_limit):
        need = min(max(min_size, b - a), hi_limit - lo_limit)
        if b - a < need:
            c = (a + b) / 2
            a, b = c - need / 2, c + need / 2
        if a < lo_limit:
            a, b = lo_limit, lo_limit + max(b - a, 1)
        if b > hi_limit:
            a, b = max(lo_limit, hi_limit - (b - a)), hi_limit
        return int(round(a)), int(round(b))

    cx0, cx1 = span(x0, x1, 0, W)
    cy0, cy1 = span(y0, y1, 0, H)
    cx1, cy1 = max(cx1, cx0 + 1), max(cy1, cy0 + 1)
    return image.crop((cx0, cy0, cx1, cy1))


def crop_key(key: str, tag_id: int, rank: int) -> str:
    # no "." in a WebDataset key: the first dot of a member name starts its extension
    return f"{key}_t{tag_id}_{rank}"


def encode_crop(crop: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        crop.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        crop.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- one part

def regions_table(rows: Sequence[dict]) -> pa.Table:
    """Region rows -> a table of schema REGIONS (the one place that builds it)."""
    cols = {f.name: [r[f.name] for r in rows] for f in REGIONS}
    return pa.Table.from_pydict(cols, schema=REGIONS)


def ground_part(table: pa.Table, image_loader: Callable[[str], Image.Image], detector, cfg: GroundSection,
                tag_names: Mapping[int, str], categories: Mapping[int, str], done_keys: Iterable[str] = (),
                checkpoint: Callable[[pa.Table, list, list, list], None] | None = None, keep_crops: bool = True,
                source: str = "", shard: str = "") -> tuple[pa.Table, list[dict], list[dict], dict]:
    """Ground one part. Returns (regions table, crop samples, rejects, metrics) for the keys processed now.

    Rows whose key is in `done_keys` are skipped (a resumed run). After every batch,
    `checkpoint(batch_rows, batch_crops, batch_keys, batch_rejects)` is called: once it returns, those
    keys are done and a rerun may pass them in `done_keys`. `image_loader(key)` returns the PIL image or
    raises; a failure is a reject ("image-unreadable"), not a crash. With keep_crops=False the crops are
    only handed to `checkpoint` (memory stays flat over a large part). `shard` is the store-relative crop
    tar path written into every region row.
    """
    if "key" not in table.column_names or "tag_ids" not in table.column_names:
        raise ValueError(f"ground_part needs columns key and tag_ids; got {table.column_names}")
    done = set(done_keys)
    keys = table.column("key").to_pylist()
    tag_lists = table.column("tag_ids").to_pylist()
    t0 = time.perf_counter()
    m = Counter({k: 0 for k in ("keys_skipped_done", "keys_grounded", "keys_rejected", "keys_without_localisable_tags",
                                "tags_in", "tags_queried", "tags_with_box", "tag_ids_without_name", "regions")})
    m["keys_in"] = len(keys)
    all_rows, all_crops, all_rejects = [], [], []
    todo = [(k, t) for k, t in zip(keys, tag_lists) if k not in done]
    m["keys_skipped_done"] = len(keys) - len(todo)
    for b in range(0, len(todo), cfg.batch_size):
        batch = todo[b: b + cfg.batch_size]
        rows, crops, rejects, imgs, queries, okkeys = [], [], [], [], [], []
        for key, tids in batch:
            try:
                im = image_loader(key)
                im.load()
            except Exception as e:  # noqa: BLE001 - any decode failure is a reject
                rejects.append({"key": key, "reason": "image-unreadable", "detail": f"{type(e).__name__}: {e}",
                                "source": source, "field": "image"})
                continue
            loc = localisable_tags(tids or [], categories, cfg.localisable)
            unknown = [t for t in loc if t not in tag_names]
            if unknown:
                m["tag_ids_without_name"] += len(unknown)
                loc = [t for t in loc if t in tag_names]
            m["tags_in"] += len(set(tids or []))
            m["tags_queried"] += len(loc)
            if not loc:
                m["keys_without_localisable_tags"] += 1
            imgs.append(im)
            queries.append([(t, tag_names[t]) for t in loc])
            okkeys.append(key)
        regions = ground_batch(detector, imgs, queries, cfg)
        for key, im, q, regs in zip(okkeys, imgs, queries, regions):
            m["tags_with_box"] += len({r.tag_id for r in regs})
            for r in regs:
                ck = crop_key(key, r.tag_id, r.rank)
                crop = cut_crop(im, r.box, cfg.crop_padding, cfg.crop_min_size)
                crops.append({"__key__": ck, cfg.crop_format: encode_crop(crop, cfg.crop_format, cfg.jpeg_quality)})
                rows.append({"key": key, "tag_id": r.tag_id, "tag": r.tag, "box": [float(v) for v in r.box],
                             "score": r.score, "crop_key": ck, "shard": shard})
        batch_table = regions_table(rows)
        if checkpoint is not None:
            checkpoint(batch_table, crops, [k for k, _ in batch], rejects)
        m["keys_grounded"] += len(okkeys)
        m["keys_rejected"] += len(rejects)
        m["regions"] += len(rows)
        all_rows.append(batch_table)
        all_rejects.extend(rejects)
        if keep_crops:
            all_crops.extend(crops)
    m["tags_without_box"] = m["tags_queried"] - m["tags_with_box"]
    metrics: dict = dict(m)
    secs = time.perf_counter() - t0
    metrics["seconds"] = secs
    metrics["images_per_s"] = metrics.get("keys_grounded", 0) / secs if secs > 0 else 0.0
    out = pa.concat_tables(all_rows) if all_rows else regions_table([])
    return out, all_crops, all_rejects, metrics


# ---------------------------------------------------------------- the stage over the store

STAGE_VERSION = "ground-3"   # 2: tag types declared by the label system; 3: crop shards in shards/


class ShardImages:
    """Images of one part's shard by key, read in shard order (the order the stage asks for them);
    a key behind the cursor reopens the shard, so any order works, sequential is fastest."""

    def __init__(self, version, part):
        self.version, self.part = version, part
        self._it = None
        self._seen: list[str] = []

    def __call__(self, key: str) -> Image.Image:
        for attempt in range(2):
            if self._it is None or key in self._seen:
                self._it, self._seen = iter(self.version.iter_part_samples(self.part)), []
            for sample in self._it:
                self._seen.append(sample["__key__"])
                if sample["__key__"] == key:
                    return decode_image(sample)
            self._it = None
        raise KeyError(f"{key} is not in the shard of part {self.part.name}")


def prepare(run) -> None:
    from tasks.shared.labels import load_labels

    run.cfg.detector.require_model()
    labels = load_labels(run.store, run.inputs["label_system"])
    run.state["categories"] = tag_categories(labels)
    run.state["tag_names"] = dict(enumerate(labels.tags))


def split(run):
    from tasks.engine.runner import parts_of

    return parts_of(run.inputs["images"], {"generated": run.inputs["generated"]}, salt=run.salt)


def process(run, w, task):
    from ram_model.detector import load_detector

    from tasks.engine.cache import worker_cached

    cfg, images, generated = run.cfg, run.inputs["images"], run.inputs["generated"]
    categories, tag_names = run.state["categories"], run.state["tag_names"]
    # loaded once per worker process, here: a loaded model is never shipped to a worker
    detector = worker_cached(f"detector|{cfg.detector!r}", lambda: load_detector(cfg.detector))
    part, gen_part = task.payload["part"], task.payload["generated"]
    gen = (generated.read_file(next(f["path"] for f in gen_part.files if f["kind"] == "table"),
                               columns=["key", "tag_ids"]) if gen_part else pa.table(
        {"key": pa.array([], pa.string()), "tag_ids": pa.array([], pa.list_(pa.int32()))}))
    shard_rel = shard_name(task.name)
    # In-part checkpoints (the writer's, see VersionWriter.save_checkpoint): one per detector batch,
    # named by its keys; made by the run holding this part's claim (tasks/engine/runner.py), one at a time.
    done_keys = {k for cp in w.checkpoints(task.name) for k in cp.data["keys"]}

    def checkpoint(batch_table, crops, keys, rejects):
        w.save_checkpoint(task.name, digest(keys), table=batch_table, samples=crops,
                          data={"keys": keys, "rejects": rejects})

    ground_part(gen, ShardImages(images, part), detector, cfg, tag_names, categories, done_keys=done_keys,
                shard=shard_rel,
                checkpoint=checkpoint, keep_crops=False, source=part.name)
    saved = w.checkpoints(task.name)
    covered = {k for cp in saved for k in cp.data["keys"]}
    missing = set(gen.column("key").to_pylist()) - covered
    if missing:  # never assemble a part from some of its checkpoints
        raise RuntimeError(f"ground part {task.name}: its in-part checkpoints cover {len(covered)} keys, "
                           f"{len(missing)} are missing (e.g. {sorted(missing)[0]}); another run removed them")
    # Assemble in key order: the same part whether or not the run was interrupted.
    order = {k: i for i, k in enumerate(gen.column("key").to_pylist())}
    tables = [t for t in (cp.table() for cp in saved) if t is not None]
    table = pa.concat_tables(tables) if tables else regions_table([])
    if table.num_rows:
        idx = sorted(range(table.num_rows), key=lambda i: (order[table["key"][i].as_py()], i))
        table = table.take(pa.array(idx, pa.int64()))
    crops_by_key = {s["__key__"]: s for cp in saved for s in cp.samples()}
    samples = (crops_by_key[ck] for ck in table.column("crop_key").to_pylist())
    rejects = sorted((r for cp in saved for r in cp.data["rejects"]), key=lambda r: order.get(r["key"], -1))
    # write_part removes the part's checkpoints once it is whole
    return w.write_part(task.name, table=table, samples=samples, rejects=rejects, rows_in=gen.num_rows,
                        source_digest=task.source_digest,
                        metrics={"rows_out": gen.num_rows - len(rejects), "regions": table.num_rows,
                                 "regions_per_tag": dict(Counter(table.column("tag").to_pylist()))})


def resolve(run) -> dict:
    from tasks.shared.lineage import label_system_of

    return label_system_of(run.store, run.inputs["parsed"])


# Progress is checkpointed inside a part after every detector batch (the writer's in-part checkpoints); a rerun
# skips the keys already grounded and assembles the same part an uninterrupted run writes.
STAGE = Stage(name="ground", output="regions", inputs=("images", "generated", "parsed"), section="ground",
              files=("ground.detector.model",), resolve=resolve, derives=("label_system",), version=STAGE_VERSION,
              prepare=prepare, split=split, process=process)
