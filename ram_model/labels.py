"""The label system: tag names <-> class ids, synonyms, thresholds.

A tag list is a text file, one tag per line; the line index is the class id (the id RAM's
logits, `union_label_id` and our `tag_ids` use). Optional beside it, with the same number of
lines: Chinese names and per-class sigmoid thresholds. A synonyms file maps other surface forms
to a tag of the list, so synonyms share one id (RAM: 6,449 tags -> 4,585 ids).

Synonyms file format (UTF-8, one mapping per line, `#` starts a comment line):

    surface form<TAB>tag in the list

Matching is case-insensitive and whitespace-insensitive. `map()` resolves each tag in this
order: the whole tag, its synonym, its singular / base form (and that form's synonym); a
multi-word tag that is not known as a whole is split greedily into its longest known parts
("grass driveway" -> grass, driveway), so "tennis racket" is matched before "tennis" and
"racket". Words that match nothing come back as unknown: nothing is dropped silently.

The default system is RAM's 4,585-tag list (ram_model/data, Apache-2.0, see data/README.md)
with the hand-made synonyms of data/ram_synonyms.txt.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from importlib import resources
from pathlib import Path

DEFAULT_THRESHOLD = 0.68      # RAM's constructor default, used where no per-class value is given

TAG_LIST_FILE = "tag_list.txt"
CHINESE_FILE = "tag_list_chinese.txt"
THRESHOLD_FILE = "tag_list_threshold.txt"
SYNONYMS_FILE = "synonyms.txt"
TYPES_FILE = "tag_types.txt"

# A tag's type decides what the engine does with it: objects are grounded and cleaned by their
# regions; scenes, attributes and actions have no box of their own. Declared by the label system
# (one line per tag in tag_types.txt), so it never changes with the corpus.
OBJECT, SCENE, ATTRIBUTE, ACTION, UNKNOWN = "object", "scene", "attribute", "action", "unknown"
TAG_TYPES = (OBJECT, SCENE, ATTRIBUTE, ACTION, UNKNOWN)

# Irregular plurals (and a few -ing forms) that suffix rules get wrong.
IRREGULAR_FORMS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "persons": "person",
    "feet": "foot", "teeth": "tooth", "mice": "mouse", "geese": "goose", "oxen": "ox",
    "knives": "knife", "wives": "wife", "leaves": "leaf", "loaves": "loaf", "shelves": "shelf",
    "halves": "half", "calves": "calf", "wolves": "wolf", "scarves": "scarf", "hooves": "hoof",
    "lying": "lie", "dying": "die", "tying": "tie", "riding": "ride", "skiing": "ski",
    "gentlemen": "gentleman", "businessmen": "businessman", "firemen": "fireman",
    "policemen": "policeman", "fishermen": "fisherman", "sheep": "sheep", "fish": "fish",
}

_WS = re.compile(r"\s+")
_EDGE_PUNCT = " \t\n\r.,;:!?\"'()[]{}*#~`"


def normalize(tag: str) -> str:
    """Lower-case, trim surrounding punctuation, collapse whitespace."""
    return _WS.sub(" ", tag.strip(_EDGE_PUNCT).lower()).strip()


def base_forms(word: str) -> list[str]:
    """Candidate singular / base forms of one word, most likely first (no dictionary).

    Plurals and -ing forms only: -ed participles are attributes ("sliced"), not their verb.
    """
    out: list[str] = []
    irr = IRREGULAR_FORMS.get(word)
    if irr:
        out.append(irr)
    n = len(word)
    if n > 3 and word.endswith("ies"):
        out.append(word[:-3] + "y")
    if n > 3 and word.endswith("ves"):
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if n > 3 and word.endswith("es"):
        out.append(word[:-2])
    if n > 2 and word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    if n > 4 and word.endswith("ing"):
        stem = word[:-3]
        out += [stem, stem + "e"]
        if len(stem) > 2 and stem[-1] == stem[-2]:     # running -> run
            out.append(stem[:-1])
    return [w for w in dict.fromkeys(out) if w and w != word]


def _read_lines(path, what: str) -> list[str]:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"labels: {what} file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"labels: {what} file {path} is not UTF-8 ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":    # tolerate a trailing newline (RAM's files have none)
        lines.pop()
    return [x.rstrip("\r") for x in lines]


def read_synonyms(path) -> dict[str, str]:
    """Read a synonyms file (`surface<TAB>tag` per line) into {surface: tag}."""
    out: dict[str, str] = {}
    for no, line in enumerate(_read_lines(path, "synonyms"), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"labels: {path}:{no}: expected 'surface<TAB>tag', got {line!r}")
        out[parts[0].strip()] = parts[1].strip()
    return out


class LabelSystem:
    """Tag list (index = id), optional Chinese names and thresholds, synonyms."""

    def __init__(self, tags: list[str], synonyms: dict[str, str] | None = None,
                 thresholds: list[float] | None = None, chinese: list[str] | None = None,
                 source: str | None = None, types: list[str] | None = None):
        where = f" ({source})" if source else ""
        if not tags:
            raise ValueError(f"labels: the tag list is empty{where}")
        self.tags = [t.strip() for t in tags]
        self._ids: dict[str, int] = {}
        for i, t in enumerate(self.tags):
            k = normalize(t)
            if not k:
                raise ValueError(f"labels: tag list line {i + 1} is empty{where}")
            if k in self._ids:
                raise ValueError(f"labels: tag {t!r} on line {i + 1} repeats line "
                                 f"{self._ids[k] + 1} (case-insensitive){where}; merge duplicates as synonyms")
            self._ids[k] = i
        n = len(self.tags)
        if thresholds is not None:
            thresholds = [float(x) for x in thresholds]
            if len(thresholds) != n:
                raise ValueError(f"labels: {len(thresholds)} thresholds for {n} tags{where}")
            bad = [i for i, x in enumerate(thresholds) if not (0.0 <= x <= 1.0) or math.isnan(x)]
            if bad:
                raise ValueError(f"labels: thresholds must lie in [0, 1]; line {bad[0] + 1} is "
                                 f"{thresholds[bad[0]]}{where}")
        self.thresholds = thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * n
        self.has_thresholds = thresholds is not None
        if chinese is not None and len(chinese) != n:
            raise ValueError(f"labels: {len(chinese)} Chinese names for {n} tags{where}")
        self.chinese = [c.strip() for c in chinese] if chinese is not None else None
        if types is not None:
            types = [t.strip().lower() for t in types]
            if len(types) != n:
                raise ValueError(f"labels: {len(types)} tag types for {n} tags{where}")
            bad = [i for i, t in enumerate(types) if t not in TAG_TYPES]
            if bad:
                raise ValueError(f"labels: tag type on line {bad[0] + 1} is {types[bad[0]]!r} (tag "
                                 f"{self.tags[bad[0]]!r}); use one of {', '.join(TAG_TYPES)}{where}")
        self.types = types
        self.synonyms: dict[str, int] = {}
        for surface, target in (synonyms or {}).items():
            s, t = normalize(surface), normalize(target)
            if t not in self._ids:
                raise ValueError(f"labels: synonym {surface!r} -> {target!r}: {target!r} is not in "
                                 f"the tag list{where}")
            if s in self._ids and self._ids[s] != self._ids[t]:
                raise ValueError(f"labels: synonym {surface!r} -> {target!r}: {surface!r} is itself "
                                 f"a tag (id {self._ids[s]}){where}")
            if s != t:
                self.synonyms[s] = self._ids[t]
        self._memo: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        self.unknown_counts: Counter = Counter()    # every unknown seen by map(), for reports

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_files(cls, tag_list, synonyms=None, thresholds=None, chinese=None, types=None) -> "LabelSystem":
        tags = _read_lines(tag_list, "tag list")
        syn = read_synonyms(synonyms) if synonyms is not None else None
        thr = None
        if thresholds is not None:
            thr = []
            for no, x in enumerate(_read_lines(thresholds, "thresholds"), 1):
                try:
                    thr.append(float(x))
                except ValueError:
                    raise ValueError(f"labels: {thresholds}:{no}: not a number: {x!r}") from None
        zh = _read_lines(chinese, "Chinese names") if chinese is not None else None
        ty = _read_lines(types, "tag types") if types is not None else None
        return cls(tags, synonyms=syn, thresholds=thr, chinese=zh, source=str(tag_list), types=ty)

    @classmethod
    def from_dir(cls, path) -> "LabelSystem":
        """Load what save() wrote."""
        p = Path(path)
        opt = lambda name: p / name if (p / name).exists() else None   # noqa: E731
        if not (p / TAG_LIST_FILE).exists():
            raise FileNotFoundError(f"labels: {p} has no {TAG_LIST_FILE}")
        return cls.from_files(p / TAG_LIST_FILE, synonyms=opt(SYNONYMS_FILE),
                              thresholds=opt(THRESHOLD_FILE), chinese=opt(CHINESE_FILE), types=opt(TYPES_FILE))

    @classmethod
    def default(cls) -> "LabelSystem":
        """RAM's 4,585 tags with their Chinese names, thresholds and our default synonyms."""
        d = resources.files("ram_model.data")
        with resources.as_file(d) as root:
            return cls.from_files(root / "ram_tag_list.txt", synonyms=root / "ram_synonyms.txt",
                                  thresholds=root / "ram_tag_list_threshold.txt",
                                  chinese=root / "ram_tag_list_chinese.txt")

    def save(self, path) -> Path:
        """Write tag_list.txt (+ thresholds, Chinese names, synonyms when present) into `path`."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)

        def write(name: str, lines: list[str]) -> None:
            tmp = p / (name + ".tmp")
            tmp.write_text("\n".join(lines), encoding="utf-8")
            os.replace(tmp, p / name)

        write(TAG_LIST_FILE, self.tags)
        if self.has_thresholds:
            write(THRESHOLD_FILE, [repr(x) for x in self.thresholds])
        if self.chinese is not None:
            write(CHINESE_FILE, self.chinese)
        if self.types is not None:
            write(TYPES_FILE, self.types)
        if self.synonyms:
            write(SYNONYMS_FILE, ["# surface<TAB>tag; see ram_model/labels.py"]
                  + [f"{s}\t{self.tags[i]}" for s, i in sorted(self.synonyms.items())])
        return p

    # -- lookups --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tags)

    def name(self, i: int) -> str:
        return self.tags[i]

    def id(self, tag: str) -> int | None:
        """Id of one tag (exact, synonym or base form), or None."""
        return self._lookup(normalize(tag))

    def __contains__(self, tag: str) -> bool:
        return self.id(tag) is not None

    def _lookup(self, k: str) -> int | None:
        i = self._ids.get(k)
        if i is None:
            i = self.synonyms.get(k)
        if i is None and k:
            head, _, last = k.rpartition(" ")
            for b in base_forms(last):
                cand = f"{head} {b}" if head else b
                i = self._ids.get(cand)
                if i is None:
                    i = self.synonyms.get(cand)
                if i is not None:
                    break
        return i

    def _map_one(self, tag: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        hit = self._memo.get(tag)
        if hit is not None:
            return hit
        k = normalize(tag)
        ids: list[int] = []
        unknown: list[str] = []
        i = self._lookup(k) if k else None
        if i is not None:
            ids.append(i)
        elif k:
            words = k.split(" ")
            a = 0
            while a < len(words):
                for b in range(len(words), a, -1):   # longest known part first
                    j = self._lookup(" ".join(words[a:b]))
                    if j is not None:
                        ids.append(j)
                        a = b
                        break
                else:
                    unknown.append(words[a])
                    a += 1
        res = (tuple(ids), tuple(unknown))
        if len(self._memo) > 200_000:
            self._memo.clear()
        self._memo[tag] = res
        return res

    def map(self, tags) -> tuple[list[int], list[str]]:
        """Tag strings -> (unique ids in first-seen order, unique unknown words/tags)."""
        ids: dict[int, None] = {}
        unknown: dict[str, None] = {}
        for t in tags:
            a, b = self._map_one(t)
            for i in a:
                ids[i] = None
            for u in b:
                unknown[u] = None
        if unknown:
            self.unknown_counts.update(list(unknown))
        return list(ids), list(unknown)

    def names(self, ids) -> list[str]:
        return [self.tags[i] for i in ids]

    def with_types(self, types: list[str]) -> "LabelSystem":
        """The same system with these tag types declared (one per tag, in id order)."""
        out = LabelSystem(self.tags, thresholds=self.thresholds if self.has_thresholds else None,
                          chinese=self.chinese, types=types)
        out.synonyms = dict(self.synonyms)
        return out

    def type_of(self, i: int) -> str:
        """The declared type of tag id `i` ("unknown" when the system declares none)."""
        return self.types[i] if self.types is not None else UNKNOWN

    def __repr__(self) -> str:
        return (f"LabelSystem({len(self.tags)} tags, {len(self.synonyms)} synonyms, "
                f"thresholds={'per-class' if self.has_thresholds else DEFAULT_THRESHOLD}, "
                f"chinese={self.chinese is not None}, types={self.types is not None})")


def default_synonyms() -> dict[str, str]:
    """The hand-made synonym table shipped with the default label system."""
    with resources.as_file(resources.files("ram_model.data") / "ram_synonyms.txt") as p:
        return read_synonyms(p)


def build_label_system(tag_counts: Counter, top_k: int, synonyms: dict[str, str] | None = None,
                       min_count: int = 1, type_counts: dict[str, Counter] | None = None) -> LabelSystem:
    """Build a label system from parsed tag frequencies, as RAM did.

    Counts are merged onto one canonical name per synonym group (synonyms: {surface: canonical}),
    then the `top_k` most frequent
    canonical tags with at least `min_count` occurrences are kept, most frequent first (ties by
    name), so ids are ranks. Synonyms whose canonical tag is kept stay in the system.
    `type_counts` ({tag: Counter of types}) declares each kept tag's type once, here, by majority
    (ties by TAG_TYPES order); from then on the type is the system's, whatever data comes later.
    """
    if top_k < 1:
        raise ValueError(f"labels: top_k must be >= 1, got {top_k}")
    syn = {normalize(s): normalize(c) for s, c in (synonyms or {}).items()}
    # resolve chains (a -> b -> c) so every surface points at a final canonical name
    for s in list(syn):
        seen = {s}
        c = syn[s]
        while c in syn and c not in seen:
            seen.add(c)
            c = syn[c]
        syn[s] = c
    counts: Counter = Counter()
    for tag, n in tag_counts.items():
        k = normalize(tag)
        if k and n > 0:
            counts[syn.get(k, k)] += n
    ranked = sorted((k for k, n in counts.items() if n >= min_count), key=lambda k: (-counts[k], k))
    kept = ranked[:top_k]
    if not kept:
        raise ValueError("labels: no tag reaches min_count; nothing to build a label system from")
    keep = set(kept)
    out_syn = {s: c for s, c in syn.items() if c in keep and s not in keep}
    types = None
    if type_counts is not None:
        merged: dict[str, Counter] = {}
        for tag, c in type_counts.items():
            k = normalize(tag)
            merged.setdefault(syn.get(k, k), Counter()).update(c)
        types = [min(merged[k].items(), key=lambda kv: (-kv[1], TAG_TYPES.index(kv[0])))[0]
                 if merged.get(k) else UNKNOWN for k in kept]
    return LabelSystem(kept, synonyms=out_syn, types=types)
