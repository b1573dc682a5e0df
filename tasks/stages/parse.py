"""Stage `parse`: captions -> scene graphs -> tags -> tag ids, one parsed part per images part; the
parser itself is the `tasks.parser` package."""
from __future__ import annotations

from collections import Counter

from tasks.parser import get_parser, parse_part
from tasks.engine.runner import Stage

# ---------------------------------------------------------------------------------------------
# The stage over the store: one parsed part per images part, the label system in the lineage.

STAGE_VERSION = "parse-1"
TOP_COUNTS_PER_PART = 500


def summarize_parts(records) -> dict:
    """Stage metrics from the parts' counts (ratios are recomputed, never summed)."""
    tags, unknown, reasons = Counter(), Counter(), Counter()
    n = {"captions": 0, "captions_parsed": 0, "tags": 0, "known": 0, "unknown": 0, "without_tags": 0}
    for r in records:
        m = r.metrics
        for k in n:
            n[k] += m.get(k, 0)
        tags.update(m.get("tag_counts", {}))
        unknown.update(m.get("unknown_counts", {}))
        reasons.update(m.get("reject_reasons", {}))
    parsed = n["captions_parsed"]
    return {"captions": n["captions"], "captions_parsed": parsed, "reject_reasons": dict(reasons),
            "tags_per_caption": n["tags"] / parsed if parsed else 0.0,
            "tag_ids_per_caption": n["known"] / parsed if parsed else 0.0,
            "captions_without_tags": n["without_tags"],
            "coverage": n["known"] / (n["known"] + n["unknown"]) if n["known"] + n["unknown"] else 0.0,
            "top_tags": dict(tags.most_common(30)), "top_unknown_tags": dict(unknown.most_common(30))}


def resolve(run) -> dict:
    """The label system is part of what a parse means: registered as a `labels` version, a parent."""
    from tasks.engine.cache import worker_cached
    from tasks.shared.labels import declare_tag_types, register_labels, resolve_label_system

    labels = resolve_label_system(run.cfg.labels)
    if labels.types is None:   # declared once per tag list (not per corpus), then stored with the labels
        labels = worker_cached(f"typed-labels|{run.cfg.labels}|{len(labels)}",
                               lambda: declare_tag_types(labels, get_parser(run.cfg)))
    return {"label_system": register_labels(run.store, labels)}


def prepare(run) -> None:
    from tasks.shared.labels import load_labels

    run.state["labels"] = load_labels(run.store, run.inputs["label_system"])


def split(run):
    from tasks.engine.runner import parts_of

    return parts_of(run.inputs["images"], salt=run.salt)


def process(run, w, task):
    import pyarrow.compute as pc

    images, labels, parser = run.inputs["images"], run.state["labels"], get_parser(run.cfg)
    part = task.payload["part"]
    index = next(f for f in part.files if f["kind"] == "table")
    table = images.read_file(index["path"], columns=["key", "captions"])
    out, rejects, m = parse_part(table, parser, labels, source=index["path"], top_n=TOP_COUNTS_PER_PART)
    def total(column: str) -> int:
        return int(pc.sum(pc.list_value_length(out.column(column))).as_py() or 0)

    metrics = {"captions": m["captions"], "captions_parsed": m["captions_parsed"],
               "tags": total("tags"), "known": total("tag_ids"), "unknown": total("unknown_tags"),
               "without_tags": m["captions_without_tags"], "reject_reasons": m["reject_reasons"],
               "tag_counts": dict(m["top_tags"]), "unknown_counts": dict(m["top_unknown_tags"])}
    return w.write_part(task.name, table=out, rejects=rejects, rows_in=m["captions"] + sum(
        1 for r in rejects if r["field"] in ("captions", "key")), source_digest=task.source_digest,
                        metrics=metrics)


STAGE = Stage(name="parse", output="parsed", inputs=("images",), section="parse", files=("parse.labels",),
              resolve=resolve, derives=("label_system",), version=STAGE_VERSION, prepare=prepare, split=split,
              process=process,
              summarize=lambda run, records: summarize_parts(records))
