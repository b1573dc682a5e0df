"""Tag types as the ground and clean stages use them, shared so neither stage imports the other: the type
of each tag id (declared by the label system, ram_model.labels) and which of them are localisable."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from ram_model.labels import OBJECT, UNKNOWN


def localisable_tags(tag_ids: Iterable[int], categories: Mapping[int, str],
                     localisable: Sequence[str] = (OBJECT,)) -> list[int]:
    """The tag ids whose type is localisable (ids absent from `categories` count as unknown)."""
    return [int(t) for t in dict.fromkeys(tag_ids) if categories.get(int(t), UNKNOWN) in localisable]


def tag_categories(labels) -> dict[int, str]:
    """Type of every tag id as the label system declares it (object, scene, attribute, action): fixed by
    the labels version, so new data never changes what is grounded nor the reuse key of old parts."""
    if labels.types is None:
        raise ValueError("the label system declares no tag types (tag_types.txt); parse declares them when it "
                         "registers a label system, so re-run parse with this code")
    return {i: labels.type_of(i) for i in range(len(labels))}
