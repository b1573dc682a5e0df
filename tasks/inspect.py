"""Looking inside the store: lineage of a version and tag diffs between two versions."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from storage import Store, StoreError, Version


def lineage(store: Store, version: Version) -> Iterator[tuple[int, Version | None, str]]:
    """Depth-first walk of a version's parents: (depth, version or None if missing, ref)."""
    seen: set[str] = set()

    def walk(v: Version, depth: int):
        yield depth, v, v.ref
        for parent in v.parents:
            stage, _, vid = parent.rpartition("/")
            if parent in seen:
                yield depth + 1, store.find(stage, vid), parent + " (shown above)"
                continue
            seen.add(parent)
            found = store.find(stage, vid)
            if found is None:
                yield depth + 1, None, parent + " (missing: deleted or in another store)"
            else:
                yield from walk(found, depth + 1)

    yield from walk(version, 0)


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


def tag_names_for(store: Store, version: Version) -> list[str] | None:
    """The tag names a version's ids refer to, or None when no labels version is in its lineage."""
    from .labels import load_labels

    labels = labels_version(store, version)
    return list(load_labels(store, labels).tags) if labels is not None else None
