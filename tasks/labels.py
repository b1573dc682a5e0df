"""Label systems in the store: a `labels` version holds the tag list (line index = tag id), its
synonyms, thresholds and Chinese names. Every version with tag ids has one in its lineage, so its
ids can always be read back as tags.

`build_labels` follows the paper's procedure over a parsed corpus: count tag frequencies, keep the
top K, merge synonyms, write the tag list and synonyms file.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from ram_model.labels import TAG_LIST_FILE, LabelSystem, build_label_system, default_synonyms

from storage import Store, StoreError, Version
from storage.store import digest

from .code_version import code_version
from .models import cache_dir, worker_cached

STAGE = "labels"
STAGE_VERSION = "labels-1"


def resolve_label_system(spec: str) -> LabelSystem:
    """`ram` (RAM's 4,585 tags), a folder written by LabelSystem.save, or a tag-list file."""
    if spec == "ram":
        return LabelSystem.default()
    path = Path(spec)
    if path.is_dir():
        return LabelSystem.from_dir(path)
    if path.is_file():
        return LabelSystem.from_files(path)
    raise StoreError(f"label system {spec!r} not found: use 'ram', a folder with {TAG_LIST_FILE}, or a tag-list "
                     f"file (config field parse.labels)")


def register_labels(store: Store, labels: LabelSystem, parents: list[Version] = (), note: str = "") -> Version:
    """Commit a label system as a `labels` version (the same content always gives the same version)."""
    with tempfile.TemporaryDirectory() as tmp:
        labels.save(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    writer = store.begin(STAGE, code_version=code_version(__name__, STAGE_VERSION),
                         config={"content": digest({k: v.hex() for k, v in files.items()}), "note": note},
                         parents=list(parents))
    committed = writer.committed
    if committed is not None:
        return committed
    writer.write_files("labels", files, metrics={"tags": len(labels), "synonyms": len(labels.synonyms)})
    return writer.commit(metrics={"tags": len(labels), "synonyms": len(labels.synonyms)})


def load_labels(store: Store, version: Version) -> LabelSystem:
    """The LabelSystem of a `labels` version (downloaded once per process)."""
    if version.stage != STAGE:
        raise StoreError(f"{version.ref} is not a labels version")

    def factory() -> LabelSystem:
        folder = version.download(str(cache_dir() / "labels" / version.id))
        return LabelSystem.from_dir(folder)

    return worker_cached(f"labels|{store.url}|{version.id}", factory)


def build_labels(store: Store, parsed: Version, top_k: int, min_count: int = 1,
                 synonyms: dict[str, str] | None = None) -> Version:
    """A label system from a parsed corpus: the top-K tags by frequency, synonyms merged."""
    if parsed.stage != "parsed":
        raise StoreError(f"labels build needs a parsed version, got {parsed.ref}")
    counts: Counter = Counter()
    for batch in parsed.iter_batches(columns=["tags"]):
        for tags in batch.column(0).to_pylist():
            counts.update(tags or [])
    try:
        labels = build_label_system(counts, top_k, synonyms if synonyms is not None else default_synonyms(),
                                    min_count=min_count)
    except ValueError as exc:
        raise StoreError(f"labels build from {parsed.ref}: {exc}") from None
    return register_labels(store, labels, parents=[parsed], note=f"top {top_k} of {parsed.ref}")
