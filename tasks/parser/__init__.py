"""The caption parser: captions -> scene graphs -> tags (the `parse` stage is tasks/stages/parse.py).

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
from tasks.parser.captions import default_parser, get_parser, parse_captions, parse_part
from tasks.parser.graph import CaptionParser, Entity, Modifier, ParsedCaption, Relation, SceneGraph, check_caption
from tasks.parser.nlp import iter_docs, load_nlp
from tasks.parser.vocab import (ALL_FIXES, FIX_COMPOUND_ORDER, FIX_INTRANSITIVE_ACTIONS, FIX_LEMMA_EXCEPTIONS, FIX_LOWERCASE,
                    FIX_PHRASAL_PREP_LEMMA, FIX_PHRASAL_PREP_ON_VERB, LEMMA_EXCEPTIONS, PHRASAL_PREPS,
                    PHRASAL_VERBS, SCENE_NOUNS)

__all__ = ["ALL_FIXES", "FIX_COMPOUND_ORDER", "FIX_INTRANSITIVE_ACTIONS", "FIX_LEMMA_EXCEPTIONS", "FIX_LOWERCASE",
           "FIX_PHRASAL_PREP_LEMMA", "FIX_PHRASAL_PREP_ON_VERB", "LEMMA_EXCEPTIONS", "PHRASAL_PREPS", "PHRASAL_VERBS",
           "SCENE_NOUNS", "CaptionParser", "Entity", "Modifier", "ParsedCaption", "Relation", "SceneGraph",
           "check_caption", "default_parser", "get_parser", "iter_docs", "load_nlp", "parse_captions", "parse_part"]
