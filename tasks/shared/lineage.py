"""Looking inside the store: lineage of a version and tag diffs between two versions."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from storage import Store, StoreError, Version

from tasks.shared.labels import load_labels

MAX_LINEAGE_DEPTH = 100   # a real lineage is a few levels; a manifest edited into a long chain stops here


def lineage(store: Store, version: Version) -> Iterator[tuple[int, Version | None, str]]:
    """Depth-first walk of a version's parents: (depth, version or None if missing, ref). Each version
    appears once, where the walk first reaches it (a parent cycle ends where it closes); the parents of a
    version already shown elsewhere are named together on one line after its other parents (version None),
    also when they were reached while walking one of its earlier parents. The walk stops MAX_LINEAGE_DEPTH
    levels down, saying so. Iterative: no recursion limit."""
    seen: set[str] = {version.ref}
    stack: list[tuple] = [("visit", 0, version, version.ref)]
    while stack:
        item = stack.pop()
        if item[0] == "shown":   # after a version's parents were walked: those shown elsewhere, on one line
            _, depth, repeated = item
            if repeated:
                yield depth, None, ", ".join(repeated) + " (shown above)"
            continue
        if item[0] == "parent":
            _, depth, parent, repeated = item
            if parent in seen:
                repeated.append(parent)
                continue
            seen.add(parent)
            stage, _, vid = parent.rpartition("/")
            try:
                found = store.find(stage, vid)
            except StoreError as exc:  # a damaged parent manifest: named, and the walk goes on
                yield depth, None, f"{parent} (unreadable: {exc})"
                continue
            if found is None:
                yield depth, None, f"{parent} (missing: deleted or in another store)"
            else:
                stack.append(("visit", depth, found, parent))
            continue
        _, depth, v, ref = item
        yield depth, v, ref
        if depth >= MAX_LINEAGE_DEPTH:
            if v.parents:
                yield depth + 1, None, f"… deeper lineage not shown (over {MAX_LINEAGE_DEPTH} levels)"
            continue
        repeated: list[str] = []
        stack.append(("shown", depth + 1, repeated))
        stack.extend(("parent", depth + 1, p, repeated) for p in reversed(v.parents))  # in the manifest's order


def nearest_versions(store: Store, version: Version) -> dict[str, Version]:
    """Per stage, the version of it closest to `version` in its lineage (breadth first): the images,
    parsed, … versions `version` was made from, not older ones deeper in the lineage (a fine-tuned
    model's parents reach back to the data of every earlier training)."""
    found: dict[str, Version] = {}
    queue, seen = [version], {version.ref}
    while queue:
        v = queue.pop(0)
        found.setdefault(v.stage, v)
        for parent in v.parents:
            if parent not in seen:
                seen.add(parent)
                stage, _, vid = parent.rpartition("/")
                p = store.find(stage, vid)
                if p is not None:
                    queue.append(p)
    return found


def key_tags(version: Version) -> dict[str, set[int]]:
    """The label set of every key in a version that has `tag_ids` (unioned over rows of one key)."""
    if "tag_ids" not in version.schema.names:
        raise StoreError(f"{version.ref} has no tag_ids column; diff works on parsed, generated and clean versions")
    out: dict[str, set[int]] = {}
    for batch in version.iter_batches(columns=["key", "tag_ids"]):
        keys = batch.column(0).to_pylist()
        tags = batch.column(1).to_pylist()
        for key, ids in zip(keys, tags):
            out.setdefault(key, set()).update(ids or [])
    return out


@dataclass
class TagDiff:
    keys_a: int
    keys_b: int
    keys_common: int
    added: Counter = field(default_factory=Counter)     # tag id -> keys where B has it and A not
    removed: Counter = field(default_factory=Counter)   # tag id -> keys where A has it and B not
    labels_a: int = 0
    labels_b: int = 0


def diff_tags(a: Version, b: Version) -> TagDiff:
    """Per tag, how many of the keys both versions share gained or lost it from A to B."""
    ta, tb = key_tags(a), key_tags(b)
    common = ta.keys() & tb.keys()
    result = TagDiff(len(ta), len(tb), len(common))
    for key in common:
        result.added.update(tb[key] - ta[key])
        result.removed.update(ta[key] - tb[key])
        result.labels_a += len(ta[key])
        result.labels_b += len(tb[key])
    return result


def labels_version(store: Store, version: Version) -> Version | None:
    """The `labels` version (tag list files) in a version's lineage: what its tag ids mean."""
    for _, v, _ in lineage(store, version):
        if v is not None and v.stage == "labels":
            return v
    return None


def label_system_of(store: Store, version: Version) -> dict:
    """{"label_system": the labels version of `version`}: a stage's derived input (`Stage.resolve`) where its tag ids
    mean what that label system says. Raises naming the version when it has none."""
    lv = labels_version(store, version)
    if lv is None:
        raise StoreError(f"{version.ref} has no labels version in its lineage: the tag list its ids refer to is "
                         f"unknown; run the parse stage, which records it")
    return {"label_system": lv}


def tag_names_for(store: Store, version: Version) -> list[str] | None:
    """The tag names a version's ids refer to, or None when no labels version is in its lineage."""

    labels = labels_version(store, version)
    return list(load_labels(store, labels).tags) if labels is not None else None


# --------------------------------------------------------------------------- display (show, artifacts)
TAG_ID_COLUMNS = ("tag_ids", "parsed_tag_ids", "predicted_tag_ids", "generated_tag_ids", "removed_tag_ids")


def ranked(counter: dict) -> list[tuple[str, Any]]:
    """A counter's items, largest count first (manifests store dicts with sorted keys, so the order
    they were saved in is lost)."""
    return sorted(counter.items(), key=lambda kv: (-kv[1] if isinstance(kv[1], (int, float)) else 0, str(kv[0])))


def display_metrics(store: Store, version: Version, top: int = 15) -> list[tuple[str, str, Any]]:
    """A version's metrics ready to show: (name, kind, value) where kind is "counter" (a ranked list of
    (label, count), tag ids named), "table" (rows, e.g. the ablation) or "value" (floats rounded, lists
    joined, "(none)" for an empty one)."""
    metrics = version.manifest.get("metrics") or {}
    names = None
    out: list[tuple[str, str, Any]] = []
    for name, value in metrics.items():
        if name == "markdown" or name.endswith("_markdown"):  # tables pre-rendered for the CLI: shown from their rows
            continue
        name = metric_label(version.manifest.get("stage", ""), name)
        if isinstance(value, (dict, list)) and not value:
            out.append((name, "value", "(none)"))
            continue
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            items = ranked(value)[:top]
            if all(str(k).lstrip("-").isdigit() for k, _ in items) and name.startswith(("tag", "top", "removed")):
                names = names if names is not None else (tag_names_for(store, version) or [])
                items = [(_tag_name(names, int(k)), v) for k, v in items]
            out.append((name, "counter", items))
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            out.append((name, "table", value))
        elif isinstance(value, dict):
            out.append((name, "value", ", ".join(f"{k}: {format_value(v)}" for k, v in list(value.items())[:top])))
        elif isinstance(value, list):
            out.append((name, "value", ", ".join(format_value(v) for v in value)))
        else:
            out.append((name, "value", format_value(value)))
    return out


# What a figure is measured against, where its name alone would not say: a model's own mAP is scored on its
# held-out keys against the labels it trained on (noisy), the evaluate version's against the ground truth; the
# same model shows both.
METRIC_LABELS = {
    ("models/", "mAP"): "mAP (held-out keys, against the noisy labels it trained on; evaluate: against the truth)",
    ("evaluate", "ablation"): "against the ground truth (label quality per stage, models' mAP on held-out keys)",
    ("evaluate", "cleaning_removal"): "cleaning's removals against the ground truth",
    ("ablation", "summary"): "ablation: held-out mAP / P / R / F1 against the ground truth, mean ± std over seeds",
}


def metric_label(stage: str, name: str) -> str:
    """The name a metric is shown under (show, Prefect artifacts): what it is scored against, where it matters."""
    for (prefix, metric), label in METRIC_LABELS.items():
        if name == metric and (stage == prefix or (prefix.endswith("/") and stage.startswith(prefix))):
            return label
    return name


def format_value(value: Any) -> str:
    """Floats to 3 decimals (tiny ones to 2 significant digits), as the markdown tables print them."""
    if isinstance(value, float):
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"
    return str(value)


def _tag_name(names: list[str], tag_id: int) -> str:
    return names[tag_id] if 0 <= tag_id < len(names) else f"#{tag_id}"


def with_tag_names(row: dict, names: list[str] | None) -> dict:
    """A row with a `<column>:names` list beside every tag-id column (ids stay: they are the data)."""
    if not names:
        return row
    out = {}
    for key, value in row.items():
        out[key] = value
        if key in TAG_ID_COLUMNS and isinstance(value, list):
            out[key.replace("_ids", "s")] = [_tag_name(names, int(i)) for i in value]
        elif key == "tag_id" and isinstance(value, int) and "tag" not in row:
            out["tag"] = _tag_name(names, value)
    return out
