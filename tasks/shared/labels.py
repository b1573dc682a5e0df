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

from ram_model.labels import (ACTION, ATTRIBUTE, OBJECT, SCENE, TAG_LIST_FILE, TYPES_FILE, UNKNOWN, LabelSystem,
                              build_label_system, default_synonyms)

from storage import Store, StoreError, Version
from storage.store import digest

from tasks.engine.identity import code_version
from tasks.engine.cache import cache_dir, worker_cached

STAGE = "labels"
STAGE_VERSION = "labels-2"   # 2: every label version declares its tag types


def parsed_type(parsed) -> str | None:
    """The type a ParsedCaption gives its first tag: scene, object, attribute or action (None: no tag)."""
    if parsed.reject_reason is not None or not parsed.tags:
        return None
    word = parsed.tags[0]
    for kind, words in ((SCENE, parsed.scenes), (OBJECT, parsed.objects), (ATTRIBUTE, parsed.attributes),
                        (ACTION, parsed.actions)):
        if word in words:
            return kind
    return None


def declare_tag_types(labels: LabelSystem, parser) -> LabelSystem:
    """A label system that declares no tag types gets them once from the caption parser, each tag name
    parsed on its own (a noun is an object or a scene, a verb an action; a name that gives no tag alone
    is an attribute when it modifies a noun, "a red thing", else unknown).
    The result depends on the tag list only, never on the corpus, and is stored in the labels version."""
    if labels.types is not None:
        return labels
    alone = [parsed_type(p) for p in parser.parse(list(labels.tags))]
    # a bare adjective ("red") gives no tag on its own; as a modifier ("a red thing") it is an attribute
    as_modifier = parser.parse([f"a {t} thing" for t, kind in zip(labels.tags, alone) if kind is None])
    modifier_types = iter(ATTRIBUTE if p.reject_reason is None and p.attributes else UNKNOWN for p in as_modifier)
    return labels.with_types([kind or next(modifier_types) for kind in alone])


def resolve_label_system(spec: str) -> LabelSystem:
    """`ram` (RAM's 4,585 tags), a folder written by LabelSystem.save, or a tag-list file."""
    if spec == "ram":
        return LabelSystem.default()
    path = Path(spec)
    if path.is_dir():
        return LabelSystem.from_dir(path)
    if path.is_file():   # a tag-list file; a tag_types.txt beside it declares the tags' types
        types = path.parent / TYPES_FILE
        return LabelSystem.from_files(path, types=types if types.is_file() else None)
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
    from tasks.parser.vocab import SCENE_NOUNS

    counts: Counter = Counter()
    type_counts: dict[str, Counter] = {}
    for batch in parsed.iter_batches(columns=["tags", "objects", "attributes", "actions"]):
        cols = batch.to_pydict()
        for tags, objs, attrs, acts in zip(cols["tags"], cols["objects"], cols["attributes"], cols["actions"]):
            counts.update(tags or [])
            for kind, words in ((OBJECT, objs), (ATTRIBUTE, attrs), (ACTION, acts)):
                for word in words or []:
                    w = word.lower()
                    kind_here = SCENE if kind == OBJECT and w in SCENE_NOUNS else kind
                    type_counts.setdefault(w, Counter())[kind_here] += 1
    try:
        # the types are declared here, once, by the corpus the system is built from; they stay fixed after
        labels = build_label_system(counts, top_k, synonyms if synonyms is not None else default_synonyms(),
                                    min_count=min_count, type_counts=type_counts)
    except ValueError as exc:
        raise StoreError(f"labels build from {parsed.ref}: {exc}") from None
    return register_labels(store, labels, parents=[parsed], note=f"top {top_k} of {parsed.ref}")
