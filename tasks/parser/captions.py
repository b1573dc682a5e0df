"""Captions in bulk: plain lists (`parse_captions`) and a table part to `parsed` rows (`parse_part`)."""
from __future__ import annotations

import time
from collections import Counter
from typing import Sequence

import pyarrow as pa

from storage.schemas import PARSED

from tasks.parser.graph import CaptionParser, ParsedCaption

# ---------------------------------------------------------------------------------------------
# Plain lists and stage parts.

_DEFAULT_PARSER: CaptionParser | None = None


def default_parser() -> CaptionParser:
    global _DEFAULT_PARSER
    if _DEFAULT_PARSER is None:
        _DEFAULT_PARSER = CaptionParser()
    return _DEFAULT_PARSER


def get_parser(cfg) -> CaptionParser:
    """The CaptionParser of a ParseConfig, once per worker process."""
    from tasks.engine.cache import worker_cached

    return worker_cached(f"parser|{cfg.spacy_model}|{cfg.batch_size}|{cfg.n_process}|{cfg.max_chars}",
                         lambda: CaptionParser(model=cfg.spacy_model, batch_size=cfg.batch_size,
                                               n_process=cfg.n_process, max_chars=cfg.max_chars))


def parse_captions(texts: Sequence[str], parser: CaptionParser | None = None,
                   labels=None) -> list[ParsedCaption]:
    """Parse a plain list of captions (e.g. generated ones). With `labels` (a LabelSystem), tag ids
    and unknown tags are filled in. Bad captions come back with `reject_reason` and no tags."""
    parser = parser or default_parser()
    out = parser.parse(texts)
    if labels is not None:
        for pc in out:
            if pc.reject_reason is None:
                pc.tag_ids, pc.unknown_tags = labels.map(pc.tags)
    return out


def _caption_lists(table: pa.Table) -> list:
    """Captions per row as Python lists of str/bytes; invalid UTF-8 stays bytes for check_caption."""
    if "key" not in table.column_names or "captions" not in table.column_names:
        raise ValueError(f"parse: input table needs columns 'key' and 'captions' "
                         f"(list<string>), it has {table.column_names}")
    col = table.column("captions")
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError(f"parse: column 'captions' must be list<string>, it is {col.type}")
    # Arrow does not always validate UTF-8; read raw bytes and decode per caption ourselves.
    raw = col.cast(pa.list_(pa.binary())).to_pylist()
    out = []
    for caps in raw:
        if caps is None:
            out.append(None)
            continue
        row = []
        for b in caps:
            if b is None:
                row.append(None)
            else:
                try:
                    row.append(b.decode("utf-8"))
                except UnicodeDecodeError:
                    row.append(b)
        out.append(row)
    return out


def build_parsed_table(rows: list[dict]) -> pa.Table:
    """The one place that builds the `parsed` table (storage.schemas.PARSED)."""
    cols = {f.name: [r[f.name] for r in rows] for f in PARSED}
    return pa.Table.from_pydict(cols, schema=PARSED)


def parse_part(table: pa.Table, parser: CaptionParser, labels, source: str | None = None,
               top_n: int = 20) -> tuple[pa.Table, list[dict], dict]:
    """Stage logic over one part: rows (key, captions) -> one `parsed` row per (key, caption).

    Bad captions go to rejects with a reason code (see check_caption) and field `captions[i]`;
    a row with no captions at all is one reject with field `captions`. Rows in (captions, plus
    caption-less keys) = rows out + rows rejected.
    """
    t0 = time.perf_counter()
    keys = table.column("key").to_pylist() if "key" in table.column_names else None
    captions = _caption_lists(table)
    flat: list = []
    where: list[tuple[str, int]] = []
    rejects: list[dict] = []
    for key, caps in zip(keys, captions):
        if key is None:
            rejects.append({"key": "", "reason": "missing-key", "detail": "row has no key",
                            "source": source, "field": "key"})
            continue
        if not caps:
            rejects.append({"key": key, "reason": "no-captions", "detail": "row has no captions",
                            "source": source, "field": "captions"})
            continue
        for i, c in enumerate(caps):
            flat.append(c)
            where.append((key, i))
    parsed = parser.parse(flat)
    rows: list[dict] = []
    tag_counts: Counter = Counter()
    unknown_counts: Counter = Counter()
    reasons: Counter = Counter()
    n_known = n_unknown = n_tags = 0
    for (key, i), pc in zip(where, parsed):
        if pc.reject_reason is not None:
            reasons[pc.reject_reason] += 1
            rejects.append({"key": key, "reason": pc.reject_reason, "detail": pc.reject_detail,
                            "source": source, "field": f"captions[{i}]"})
            continue
        ids, unknown = labels.map(pc.tags)
        pc.tag_ids, pc.unknown_tags = ids, unknown
        tag_counts.update(labels.name(k) for k in ids)
        unknown_counts.update(unknown)
        n_known += len(ids)
        n_unknown += len(unknown)
        n_tags += len(pc.tags)
        rows.append({
            "key": key, "caption_index": i, "caption": pc.caption,
            "objects": pc.objects, "attributes": pc.attributes, "actions": pc.actions,
            "relations": [{"subject": s, "relation": r, "object": o} for s, r, o in pc.relations],
            "quantities": pc.quantities, "tags": pc.tags, "tag_ids": ids, "unknown_tags": unknown,
        })
    for r in rejects:
        if r["field"] in ("captions", "key"):
            reasons[r["reason"]] += 1
    out = build_parsed_table(rows)
    seconds = time.perf_counter() - t0
    n_rows = len(rows)
    metrics = {
        "captions": len(flat),
        "captions_parsed": n_rows,
        "captions_rejected": len(flat) - n_rows,
        "rows_rejected": len(rejects),
        "reject_reasons": dict(reasons),
        "tags_per_caption": (n_tags / n_rows) if n_rows else 0.0,
        "tag_ids_per_caption": (n_known / n_rows) if n_rows else 0.0,
        "captions_without_tags": sum(1 for r in rows if not r["tag_ids"]),
        # share of tag occurrences (after multi-word splitting) that the label system knows
        "coverage": (n_known / (n_known + n_unknown)) if (n_known + n_unknown) else 0.0,
        "top_tags": tag_counts.most_common(top_n),
        "top_unknown_tags": unknown_counts.most_common(top_n),
        "seconds": seconds,
        "captions_per_s": (len(flat) / seconds) if seconds > 0 else 0.0,
    }
    return out, rejects, metrics
