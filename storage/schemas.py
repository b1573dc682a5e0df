"""Every stage's Parquet schema, declared in one place.

A stage never lets Arrow infer its output schema: it builds tables against these, so a
type drift is an error at write time, not a surprise for the next stage.
Every row carries `key`, the sample key that is stable across stages.
"""
from __future__ import annotations

import pyarrow as pa

KEY = pa.field("key", pa.string(), nullable=False)

# Rows a stage could not use. `field` names the input field (or file member) at fault.
REJECTS = pa.schema([
    KEY,
    pa.field("reason", pa.string(), nullable=False),   # short machine-readable code, e.g. "decode-error"
    pa.field("detail", pa.string()),                  # human-readable explanation
    pa.field("source", pa.string()),                  # input file / shard / row the sample came from
    pa.field("field", pa.string()),                   # input field at fault (image, caption, ...)
])

# images: one row per sample; pixels live in the WebDataset shard named by `shard`.
IMAGES = pa.schema([
    KEY,
    pa.field("captions", pa.list_(pa.string())),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("format", pa.string()),         # format of the stored bytes: jpeg / png / webp
    pa.field("sha256", pa.string()),         # of the stored image bytes
    pa.field("shard", pa.string()),          # the tar holding `<key>.<ext>`, relative to the version folder
    pa.field("source", pa.string()),         # where the sample came from (file / tar member)
    pa.field("source_key", pa.string()),     # the key as the source named it (img2dataset's, before its folder tag)
    # What img2dataset recorded (null for other sources):
    pa.field("url", pa.string()),
    pa.field("original_width", pa.int32()),  # before img2dataset resized it (size checks use these)
    pa.field("original_height", pa.int32()),
    pa.field("exif", pa.string()),           # JSON, as img2dataset extracted it
    pa.field("source_sha256", pa.string()),  # of the bytes img2dataset downloaded
    pa.field("status", pa.string()),         # img2dataset's status ("success" for every stored row)
    pa.field("extra", pa.string()),          # JSON of its --save_additional_columns
])

# parsed: one row per (key, caption).
PARSED = pa.schema([
    KEY,
    pa.field("caption_index", pa.int32()),
    pa.field("caption", pa.string()),
    pa.field("objects", pa.list_(pa.string())),
    pa.field("attributes", pa.list_(pa.string())),
    pa.field("actions", pa.list_(pa.string())),
    pa.field("relations", pa.list_(pa.struct([
        ("subject", pa.string()), ("relation", pa.string()), ("object", pa.string())]))),
    pa.field("quantities", pa.list_(pa.string())),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("tag_ids", pa.list_(pa.int32())),
    pa.field("unknown_tags", pa.list_(pa.string())),
])

# generated: one row per key: caption tags, model tags, generated captions and their union.
GENERATED = pa.schema([
    KEY,
    pa.field("parsed_tag_ids", pa.list_(pa.int32())),      # union over the key's caption parses
    pa.field("predicted_tag_ids", pa.list_(pa.int32())),   # baseline tagger above its thresholds
    pa.field("predicted_scores", pa.list_(pa.float32())),
    pa.field("generated_captions", pa.list_(pa.string())),
    pa.field("generated_tag_ids", pa.list_(pa.int32())),   # parsed from the generated captions
    pa.field("tag_ids", pa.list_(pa.int32())),             # the union: the labels the next stage verifies
])

# regions: one row per detected box of (key, tag_id); crops live in WebDataset shards.
REGIONS = pa.schema([
    KEY,
    pa.field("tag_id", pa.int32()),
    pa.field("tag", pa.string()),
    pa.field("box", pa.list_(pa.float32(), 4)),     # x0, y0, x1, y1 in source pixels
    pa.field("score", pa.float32()),                # detector score
    pa.field("crop_key", pa.string()),              # WebDataset key of the crop
    pa.field("shard", pa.string()),                 # the crop tar, relative to the version folder
])

# clean: one row per key: the labels that survived and the ones removed, with reasons.
CLEAN = pa.schema([
    KEY,
    pa.field("tag_ids", pa.list_(pa.int32())),
    pa.field("removed_tag_ids", pa.list_(pa.int32())),
    pa.field("removed_reasons", pa.list_(pa.string())),    # outlier / baseline-disagrees / no-box
])

# clean's per-crop inspection table.
CLEAN_CROPS = pa.schema([
    KEY,
    pa.field("tag_id", pa.int32()),
    pa.field("crop_key", pa.string()),
    pa.field("cluster", pa.int32()),
    pa.field("distance", pa.float32()),
    pa.field("outlier", pa.bool_()),
    pa.field("baseline_score", pa.float32()),
])

# embeddings: one row per crop: its embedding and the baseline's score for its own tag (clean's input).
EMBEDDINGS = pa.schema([
    KEY,
    pa.field("tag_id", pa.int32()),
    pa.field("crop_key", pa.string()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("baseline_score", pa.float32()),       # null when the baseline does not know the tag
])

# clusters: the per-tag clustering of every crop (the `cluster` step, clean's input): its cluster, its distance
# to that cluster's centroid, whether it is one of the tag's outliers, and the embeddings part it came from.
CLUSTERS = pa.schema([
    KEY,
    pa.field("part", pa.string()),
    pa.field("tag_id", pa.int32()),
    pa.field("crop_key", pa.string()),
    pa.field("cluster", pa.int32()),
    pa.field("distance", pa.float32()),
    pa.field("outlier", pa.bool_()),
])

# clusters' per-tag model: the centroids, how many crops they were fitted on, and the distance from which a
# crop is an outlier (what a later step applies to new crops instead of fitting again).
CENTROIDS = pa.schema([
    pa.field("tag_id", pa.int32()),
    pa.field("crops_fit", pa.int64()),
    pa.field("centroids", pa.list_(pa.list_(pa.float32()))),
    pa.field("cutoff", pa.float32()),                # outlier when distance >= cutoff (inf: none)
])

# evaluate: one row per (stage, metric).
EVALUATION = pa.schema([
    pa.field("stage", pa.string(), nullable=False),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("value", pa.float64()),
])

# ablation: one row per (label version, seed, metric) of the models trained per label version.
ABLATION = pa.schema([
    pa.field("labels", pa.string(), nullable=False),      # the label version's name (parsed, cleaned, ...)
    pa.field("labels_ref", pa.string(), nullable=False),  # stage@version it names
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("model", pa.string(), nullable=False),       # the model version trained on it with this seed
    pa.field("metric", pa.string(), nullable=False),      # mAP, precision, recall, f1, <tag type>_<metric>
    pa.field("value", pa.float64()),
])

STAGE_SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES,
    "parsed": PARSED,
    "generated": GENERATED,
    "regions": REGIONS,
    "embeddings": EMBEDDINGS,
    "clusters": CLUSTERS,
    "clean": CLEAN,
    "evaluate": EVALUATION,
    "ablation": ABLATION,
}

# Versions made of files only, no table: models (`models/<name>`: weights, config, tag list) and
# label systems (`labels`: tag list, synonyms, thresholds, Chinese names).
FILES_ONLY = pa.schema([KEY])


def schema_for(stage: str) -> pa.Schema | None:
    if stage.startswith("models/") or stage == "labels":
        return FILES_ONLY
    return STAGE_SCHEMAS.get(stage)
