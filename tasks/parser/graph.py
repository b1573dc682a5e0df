"""Scene graphs from captions: the data classes, caption checks, and `CaptionParser` (noun chunks,
entities, relations, tags) working on per-document arrays, with its worker pool."""
from __future__ import annotations

import multiprocessing
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from tasks.parser.nlp import _ARRAY_ATTRS, _I64, _U64, BLAS_CHOICES, iter_docs, load_nlp
from tasks.parser.vocab import (ALL_FIXES, DEFAULT_MAX_CHARS, DEFAULT_MODEL, FIX_COMPOUND_ORDER, FIX_INTRANSITIVE_ACTIONS,
                    FIX_LEMMA_EXCEPTIONS, FIX_LOWERCASE, FIX_PHRASAL_PREP_LEMMA, FIX_PHRASAL_PREP_ON_VERB,
                    LEMMA_EXCEPTIONS, NON_ACTION_VERBS, PHRASAL_PREPS, PHRASAL_VERBS, QUANTIFIER_ADJECTIVES,
                    QUANTITY_NOUNS, SCENE_NOUNS)

# ---------------------------------------------------------------------------------------------
# Graph records.

@dataclass(slots=True)
class Modifier:
    dep: str            # det | nummod | amod
    span: str
    lemma_span: str
    i: int              # token index


@dataclass(slots=True)
class Entity:
    span: str
    lemma_span: str
    head: str
    lemma_head: str
    span_bounds: tuple[int, int]
    modifiers: list[Modifier]
    type: str           # scene | unknown
    root: int           # token index of the chunk root


@dataclass(slots=True)
class Relation:
    subject: int        # entity index
    object: int
    relation: str
    lemma_relation: str
    predicate: int      # token index of the verb / AUX / noun that licensed it (-1 if none)
    verb: bool          # the relation's predicate is a verb (its lemma is an action)


@dataclass(slots=True)
class SceneGraph:
    entities: list[Entity]
    relations: list[Relation]


@dataclass(slots=True)
class ParsedCaption:
    caption: str
    objects: list[str] = field(default_factory=list)      # object and scene tags (lemma heads)
    scenes: list[str] = field(default_factory=list)       # the subset of `objects` that are scene nouns
    attributes: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    quantities: list[str] = field(default_factory=list)
    relations: list[tuple[str, str, str]] = field(default_factory=list)   # (subject, relation, object)
    tags: list[str] = field(default_factory=list)         # objects + attributes + actions, unique
    tag_ids: list[int] = field(default_factory=list)
    unknown_tags: list[str] = field(default_factory=list)
    graph: SceneGraph | None = None
    reject_reason: str | None = None                      # set when the caption was not parsed
    reject_detail: str | None = None


# ---------------------------------------------------------------------------------------------
# Caption checks: bad input is data, never a crash.

def _is_latin_letter(ch: str, _cache: dict[str, bool] = {}) -> bool:
    r = _cache.get(ch)
    if r is None:
        r = unicodedata.name(ch, "").startswith("LATIN")
        _cache[ch] = r
    return r


def check_caption(text, max_chars: int = DEFAULT_MAX_CHARS) -> tuple[str, str] | None:
    """Why `text` cannot be parsed, as (reason code, detail); None when it is fine.

    Reason codes: missing-caption, invalid-utf8, empty-caption, too-long, control-characters,
    punctuation-only, non-latin-script.
    """
    if text is None:
        return "missing-caption", "caption is null"
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            return "invalid-utf8", f"bytes are not UTF-8: {e}"
    if not isinstance(text, str):
        return "invalid-utf8", f"caption is a {type(text).__name__}, not text"
    if "\ufffd" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text if not c.isascii()):
        return "invalid-utf8", "caption holds U+FFFD replacement characters or lone surrogates (lossy decoding upstream)"
    if not text.strip():
        return "empty-caption", "caption is empty or whitespace"
    if len(text) > max_chars:
        return "too-long", f"caption has {len(text)} characters, the limit (max_chars) is {max_chars}"
    if not text.isprintable():
        # C0/C1 controls (other than tab and newlines) mean a broken source; format characters
        # (zero-width space, soft hyphen, BOM) are harmless and removed before parsing.
        bad = [c for c in text if c not in "\t\n\r" and unicodedata.category(c) == "Cc"]
        if bad:
            return "control-characters", f"caption holds control characters {sorted({hex(ord(c)) for c in bad})[:5]}"
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "punctuation-only", "caption has no letters"
    if not text.isascii():
        latin = sum(1 for c in letters if c.isascii() or _is_latin_letter(c))
        if latin * 2 < len(letters):
            return "non-latin-script", f"{len(letters) - latin} of {len(letters)} letters are not Latin script"
    return None


def _decode(text) -> str:
    return bytes(text).decode("utf-8") if isinstance(text, (bytes, bytearray, memoryview)) else text


def _prepare(text: str) -> str:
    """The text spaCy sees: format characters dropped, whitespace collapsed (case kept: the tagger uses it)."""
    if not text.isascii():
        text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# The parser.

class CaptionParser:
    """Scene-graph parser on spaCy, with tag extraction.

    model: spaCy pipeline name or folder. fixes: names from ALL_FIXES to apply (() reproduces the
    reference SceneGraphParser). n_process > 1 parses in that many worker processes (spawned once,
    each loading the model once); close() or a `with` block stops them. blas: "numpy" (OpenBLAS,
    default, faster here) or "blis" (spaCy's default) for the model's matrix products;
    blas_threads caps BLAS threads while parsing (None: no cap).
    """

    def __init__(self, model: str = DEFAULT_MODEL, fixes: Iterable[str] = ALL_FIXES,
                 batch_size: int = 256, n_process: int = 1, max_chars: int = DEFAULT_MAX_CHARS,
                 lemma_exceptions: dict[tuple[str, str], str] | None = None,
                 blas: str = "numpy", blas_threads: int | None = 1):
        fixes = frozenset(fixes)
        if blas not in BLAS_CHOICES:
            raise ValueError(f"parse: blas must be one of {BLAS_CHOICES}, got {blas!r}")
        if blas_threads is not None and blas_threads < 1:
            raise ValueError(f"parse: blas_threads must be >= 1 or None, got {blas_threads}")
        unknown = fixes - ALL_FIXES
        if unknown:
            raise ValueError(f"parse: unknown fixes {sorted(unknown)}; known: {sorted(ALL_FIXES)}")
        if batch_size < 1 or n_process < 1 or max_chars < 1:
            raise ValueError(f"parse: batch_size, n_process and max_chars must be >= 1, got "
                             f"{batch_size}, {n_process}, {max_chars}")
        self.model = model
        self.fixes = fixes
        self.batch_size = batch_size
        self.n_process = n_process
        self.max_chars = max_chars
        self.blas = blas
        self.blas_threads = blas_threads
        self.lemma_exceptions = dict(LEMMA_EXCEPTIONS if lemma_exceptions is None else lemma_exceptions)
        self._pool: ProcessPoolExecutor | None = None
        self._strings: dict[int, str] = {}   # spaCy string hashes -> str (the vocab's store only grows)
        f = fixes
        self._lower = FIX_LOWERCASE in f
        self._exc = FIX_LEMMA_EXCEPTIONS in f
        self._order = FIX_COMPOUND_ORDER in f
        self._pp_lemma = FIX_PHRASAL_PREP_LEMMA in f
        self._pp_verb = FIX_PHRASAL_PREP_ON_VERB in f
        self._intrans = FIX_INTRANSITIVE_ACTIONS in f

    @property
    def nlp(self):
        return load_nlp(self.model, blas=self.blas)

    def config(self) -> dict:
        """What determines the output (for the stage's version id)."""
        return {"model": self.model, "fixes": sorted(self.fixes), "max_chars": self.max_chars,
                "blas": self.blas,
                "lemma_exceptions": sorted(f"{k[0]}/{k[1]}={v}" for k, v in self.lemma_exceptions.items())}

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    # -- graphs ----------------------------------------------------------------------------
    def graph(self, text: str) -> SceneGraph:
        return self.graphs([text])[0]

    def graphs(self, texts: Iterable[str]) -> list[SceneGraph]:
        return [self.graph_from_doc(d) for d in self._docs(texts)]

    def _docs(self, texts):
        return iter_docs(texts, self.model, self.batch_size, self.blas, self.blas_threads)

    def graph_from_doc(self, doc) -> SceneGraph:
        return self._graph(doc)[0]

    def _graph(self, doc):
        """(SceneGraph, token arrays) for one spaCy Doc; the arrays feed tag extraction."""
        # One to_array call and a hash->string memo instead of per-token property access.
        arr = doc.to_array(_ARRAY_ATTRS).tolist()
        n = len(arr)
        if n == 0:
            return SceneGraph([], []), ([], [], [], [], [], [], [])
        c_orth, c_space, c_pos, c_dep, c_head, c_lemma, c_lower, like_num = zip(*arr)
        strs = self._strings
        try:
            text = [strs[h] for h in c_orth]
            pos = [strs[h] for h in c_pos]
            dep = [strs[h] for h in c_dep]
            lowers = [strs[h] for h in c_lower]
            lem0 = [strs[h] for h in c_lemma]
        except KeyError:
            vocab_strings = doc.vocab.strings
            for col in (c_orth, c_pos, c_dep, c_lower, c_lemma):
                for h in col:
                    if h not in strs:
                        strs[h] = vocab_strings[h]
            text = [strs[h] for h in c_orth]
            pos = [strs[h] for h in c_pos]
            dep = [strs[h] for h in c_dep]
            lowers = [strs[h] for h in c_lower]
            lem0 = [strs[h] for h in c_lemma]
        ws = [" " if x else "" for x in c_space]
        # HEAD is a relative offset stored as uint64: negative offsets wrap around.
        head = [i + (h - _U64 if h >= _I64 else h) for i, h in enumerate(c_head)]
        if self._exc:
            exc = self.lemma_exceptions
            lemma = [exc.get((lw, p)) or exc.get((lw, "*")) or l0 for l0, lw, p in zip(lem0, lowers, pos)]
        else:
            lemma = lem0
        if self._lower:
            lemma = [x.lower() for x in lemma]
        children: list[list[int]] = [[] for _ in range(n)]
        for i, h in enumerate(head):
            if h != i:
                children[h].append(i)

        def flatten(i: int) -> list[int]:
            out = [i]
            for c in children[i]:
                if dep[c] == "conj":
                    out.extend(flatten(c))
            return out

        def span_text(a: int, b: int) -> str:
            return "".join(text[k] + ws[k] for k in range(a, b)).strip()

        def span_lemma(a: int, b: int) -> str:
            return "".join(lemma[k] + ws[k] for k in range(a, b)).strip()

        chunks = _noun_chunks(doc, pos, dep, head)

        # Step 1: entities.
        entities: list[Entity] = []
        kept: list[tuple[int, int, int]] = []
        for start, end, r in chunks:
            if pos[r] == "PRON":
                continue
            mods: list[Modifier] = []
            compounds: list[int] = []     # in the reference's prepend order
            visited = {r}
            # Pre-order walk that descends through compound children only.
            def walk(node: int) -> None:
                for c in children[node]:
                    d = dep[c]
                    if d == "det" or d == "nummod":
                        mods.append(Modifier(d, text[c], lemma[c], c))
                    elif d == "amod":
                        for y in flatten(c):
                            mods.append(Modifier("amod", text[y], lemma[y], y))
                    elif d == "compound" and c not in visited:
                        visited.add(c)
                        compounds.append(c)
                        walk(c)
            walk(r)
            if compounds:
                if self._order:
                    words = sorted(compounds) + [r]
                else:
                    words = list(reversed(compounds)) + [r]
                head_text = " ".join(text[k] for k in words)
                head_lemma = " ".join(lemma[k] for k in words)
            else:
                head_text, head_lemma = text[r], lemma[r]
            last = head_lemma.rsplit(" ", 1)[-1]
            etype = "scene" if (head_lemma in SCENE_NOUNS or last in SCENE_NOUNS) else "unknown"
            entities.append(Entity(span_text(start, end), span_lemma(start, end), head_text, head_lemma,
                                   (start, end), mods, etype, r))
            kept.append((start, end, r))

        # Step 2: the subject of each predicate.
        subj: dict[int, int] = {}
        for i in range(n):
            d = dep[i]
            if d == "nsubj":
                subj[head[i]] = i
            elif d == "acl":
                subj[i] = head[i]
            elif d == "pobj":
                h = head[i]
                if dep[h] == "agent" and pos[head[h]] == "VERB":
                    subj[head[h]] = i

        # Step 3: relations, as (subject token, object token, relation, lemma, predicate, is_verb).
        raw: list[tuple[int, int, str, str, int, bool]] = []
        fake: set[int] = set()
        for start, end, r in chunks:
            d = dep[r]
            p = head[r]
            if d == "dobj" or d == "attr":
                if p in subj:
                    raw.append((subj[p], r, text[p], lemma[p], p, pos[p] == "VERB"))
            elif d == "pobj":
                g = head[p]
                if dep[p] == "agent":
                    continue
                if (pos[g] == "VERB" and g + 1 == p and g in subj
                        and (lemma[g] + " " + lemma[p]) in PHRASAL_VERBS):
                    raw.append((subj[g], r, text[g] + " " + text[p], lemma[g] + " " + lemma[p], g, True))
                elif (pos[g] == "VERB" or dep[g] == "acl") and g in subj:
                    raw.append((subj[g], r, text[p], lemma[p], g, pos[g] == "VERB"))
                elif dep[g] == "pobj" and span_text(head[g], p + 1).lower() in PHRASAL_PREPS:
                    q = head[g]
                    fake.add(g)
                    x = head[q]
                    if pos[x] == "AUX" and x in subj:
                        s = subj[x]
                    elif self._pp_verb and x in subj and (pos[x] == "VERB" or dep[x] == "acl"):
                        s = subj[x]
                    else:
                        s = x
                    lem = span_lemma(q, p + 1) if self._pp_lemma else span_lemma(q, p)
                    raw.append((s, r, span_text(q, p + 1), lem, x, pos[x] == "VERB"))
                elif pos[g] == "NOUN":
                    raw.append((g, r, text[p], lemma[p], g, False))
                else:
                    dg = dep[g]
                    gh = head[g]
                    rel = text[g] + " " + text[p]
                    lem = lemma[g] + " " + lemma[p]
                    if (dg == "amod" or dg == "advmod") and pos[gh] == "NOUN":
                        raw.append((gh, r, rel, lem, gh, False))
                    elif dg in ("amod", "advmod", "acomp") and pos[gh] == "AUX" and gh in subj:
                        raw.append((subj[gh], r, rel, lem, gh, False))
                    elif (dg == "amod" or dg == "advmod") and pos[gh] == "VERB" and gh in subj:
                        raw.append((subj[gh], r, rel, lem, gh, True))
                    elif pos[g] == "AUX" and g in subj:
                        raw.append((subj[g], r, text[p], lemma[p], g, False))
            elif d == "nsubjpass" and p in subj:
                raw.append((subj[p], r, text[p], lemma[p], p, pos[p] == "VERB"))

        if fake:
            keep = [k for k, (_, _, r) in enumerate(kept) if r not in fake]
            entities = [entities[k] for k in keep]
            kept = [kept[k] for k in keep]
        owner = [-1] * n
        for idx in range(len(kept) - 1, -1, -1):   # first chunk wins, as in the reference
            a, b, _ = kept[idx]
            for k in range(a, b):
                owner[k] = idx
        relations: list[Relation] = []
        for s, o, rel, lem, pred, is_verb in raw:
            for x in flatten(s):
                ex = owner[x]
                if ex < 0:
                    continue
                for y in flatten(o):
                    ey = owner[y]
                    if ey >= 0:
                        relations.append(Relation(ex, ey, rel, lem, pred, is_verb))
        return SceneGraph(entities, relations), (pos, dep, lemma, text, lowers, like_num, children)

    # -- tags ------------------------------------------------------------------------------
    def _tags(self, graph: SceneGraph, tokens, out: ParsedCaption) -> None:
        pos, dep, lemma, text, lowers, like_num, children = tokens
        lower = self._lower
        objects, scenes, attributes, actions, quantities = [], [], [], [], []
        for e in graph.entities:
            r = e.root
            for m in e.modifiers:
                if m.dep == "nummod":
                    quantities.append(m.span.lower())
                elif m.dep == "amod":
                    if m.lemma_span.lower() in QUANTIFIER_ADJECTIVES:
                        quantities.append(m.span.lower())
                    else:
                        # Participles used as adjectives keep their form ("sliced", not "slice").
                        a = m.lemma_span if pos[m.i] == "ADJ" else text[m.i]
                        attributes.append(a.lower() if lower else a)
            if like_num[r] or pos[r] == "NUM":
                quantities.append(e.head.lower())
                continue
            if lemma[r].lower() in QUANTITY_NOUNS and any(dep[c] == "prep" and lowers[c] == "of"
                                                          for c in children[r]):
                quantities.append(e.lemma_head.lower())
                continue
            objects.append(e.lemma_head)
            if e.type == "scene":
                scenes.append(e.lemma_head)
        if self._intrans:
            for i, p in enumerate(pos):
                if p == "VERB" and dep[i] not in ("amod", "compound") and lemma[i].lower() not in NON_ACTION_VERBS:
                    actions.append(lemma[i])
        else:
            # The reference's reach: only verbs that head a relation are actions.
            for rel in graph.relations:
                if rel.verb and rel.predicate >= 0 and lemma[rel.predicate].lower() not in NON_ACTION_VERBS:
                    actions.append(lemma[rel.predicate])
        ents = graph.entities
        out.relations = [(ents[r.subject].lemma_head, r.lemma_relation, ents[r.object].lemma_head)
                         for r in graph.relations]
        out.objects, out.scenes = _unique(objects), _unique(scenes)
        out.attributes, out.actions = _unique(attributes), _unique(actions)
        out.quantities = quantities
        out.tags = _unique(out.objects + out.attributes + out.actions)

    # -- captions --------------------------------------------------------------------------
    def parse(self, texts: Sequence, keep_graph: bool = False) -> list[ParsedCaption]:
        """Check, parse and tag every caption; bad ones come back with `reject_reason` set."""
        texts = list(texts)
        if self.n_process > 1 and len(texts) >= 2 * self.batch_size:
            return self._parse_parallel(texts, keep_graph)
        return self._parse_local(texts, keep_graph)

    def _parse_local(self, texts: list, keep_graph: bool) -> list[ParsedCaption]:
        results: list[ParsedCaption] = []
        todo: list[str] = []
        slots: list[ParsedCaption] = []
        for t in texts:
            bad = check_caption(t, self.max_chars)
            if bad is not None:
                cap = t if isinstance(t, str) else (repr(t)[:200] if t is not None else None)
                results.append(ParsedCaption(caption=cap, reject_reason=bad[0], reject_detail=bad[1]))
                continue
            t = _decode(t)
            pc = ParsedCaption(caption=t)
            results.append(pc)
            todo.append(_prepare(t))
            slots.append(pc)
        if todo:
            for pc, doc in zip(slots, self._docs(todo)):
                g, tokens = self._graph(doc)
                self._tags(g, tokens, pc)
                if keep_graph:
                    pc.graph = g
        return results

    def _parse_parallel(self, texts: list, keep_graph: bool) -> list[ParsedCaption]:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")   # safe with threads in the parent (torch, Prefect)
            self._pool = ProcessPoolExecutor(self.n_process, mp_context=ctx,
                                             initializer=_worker_init, initargs=(self._worker_config(),))
        step = max(self.batch_size, -(-len(texts) // (self.n_process * 4)))
        chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
        out: list[ParsedCaption] = []
        for part in self._pool.map(_worker_parse, chunks, [keep_graph] * len(chunks)):
            out.extend(part)
        return out

    def _worker_config(self) -> dict:
        return {"model": self.model, "fixes": sorted(self.fixes), "batch_size": self.batch_size,
                "max_chars": self.max_chars, "lemma_exceptions": self.lemma_exceptions,
                "blas": self.blas, "blas_threads": self.blas_threads}


# spaCy's English noun-chunk rule, on our arrays (doc.noun_chunks builds Token and Span objects).
_NP_DEPS = frozenset({"oprd", "nsubj", "dobj", "nsubjpass", "pcomp", "pobj", "dative", "appos", "attr", "ROOT"})
_NOMINAL = frozenset({"NOUN", "PROPN", "PRON"})


def _noun_chunks(doc, pos: list[str], dep: list[str], head: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, root) of each base noun phrase, as spaCy's English syntax iterator yields them:
    a nominal with a subject/object-like dependency (or conjoined to one), spanning from the left
    edge of its subtree to itself, never nested."""
    n = len(pos)
    left = list(range(n))
    for i in range(n):              # left edge = smallest index in each token's subtree
        j, steps = i, 0
        while head[j] != j and steps < n:
            j = head[j]
            steps += 1
            if left[j] > i:
                left[j] = i
    out = []
    prev_end = -1
    for i in range(n):
        if pos[i] not in _NOMINAL or left[i] <= prev_end:
            continue
        d = dep[i]
        if d not in _NP_DEPS:
            if d != "conj":
                continue
            h = head[i]
            while dep[h] == "conj" and head[h] < h:
                h = head[h]
            if dep[h] not in _NP_DEPS:
                continue
        prev_end = i
        a, h = left[i], head[i]
        # the root is the chunk's last token unless the parse is non-projective there
        root = i if (h == i or h < a or h > i) else doc[a:i + 1].root.i
        out.append((a, i + 1, root))
    return out


_WORKER: CaptionParser | None = None


def _worker_init(config: dict) -> None:
    global _WORKER
    _WORKER = CaptionParser(n_process=1, **config)
    _WORKER.nlp   # load once, before the first chunk arrives


def _worker_parse(texts: list, keep_graph: bool) -> list[ParsedCaption]:
    return _WORKER._parse_local(texts, keep_graph)


def _unique(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(x for x in xs if x))
