"""Tokenizers for RAM's caption branch.

RAM uses bert-base-uncased's WordPiece vocabulary plus two special tokens: `[DEC]` (bos of the text
decoder, id 30522) and `[ENC]` (first token of the tag encoder input, id 30523) → 30524 ids.
Real configs load that vocabulary from a local folder or hub id; the tiny configuration trains a
small WordPiece vocabulary on captions so tests and the demo run offline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def add_ram_special_tokens(tok: BertTokenizerFast) -> BertTokenizerFast:
    """Add [DEC] as bos and [ENC] as an additional special token, in that order (reference ids V, V+1)."""
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    else:
        tok.bos_token = "[DEC]"
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_tokenizer(name_or_path: str) -> BertTokenizerFast:
    """bert-base-uncased-style tokenizer from a local folder or hub id, with RAM's special tokens."""
    try:
        tok = BertTokenizerFast.from_pretrained(name_or_path)
    except OSError as e:
        raise OSError(f"RAM tokenizer: cannot load {name_or_path!r} (config field `tokenizer`). Give a local folder "
                      f"with vocab.txt / tokenizer.json, or a hub id while online. Cause: {e}") from e
    return add_ram_special_tokens(tok)


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = 1000, out_dir: str | Path | None = None,
                              min_frequency: int = 1) -> BertTokenizerFast:
    """A lower-cased WordPiece vocabulary for `texts` (captions, tag names) -> BertTokenizerFast.

    Deterministic (a model version must not depend on thread timing, and the `tokenizers` trainer breaks
    ties differently from run to run): the special tokens, every character seen (whole and as a `##`
    continuation, so no word is ever [UNK]), then whole words by frequency (ties alphabetical) up to
    `vocab_size`. The caption prompt "a picture of" is always covered. The result carries RAM's
    [DEC]/[ENC] tokens; with `out_dir` it is also saved there (`from_pretrained(out_dir)` reloads it).
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    texts = list(texts)
    if not texts:
        raise ValueError("train_wordpiece_tokenizer: no texts given")
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts + ["a picture of"]:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    base = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    seen = set(base)
    words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_frequency
             and w not in seen]
    tokens = base + words[: max(0, vocab_size - len(base))]
    vocab = {t: i for i, t in enumerate(tokens)}
    # vocab= takes the dict directly (vocab_file= is silently ignored by transformers 5, see ENVIRONMENT.md)
    tok = add_ram_special_tokens(BertTokenizerFast(vocab=vocab, do_lower_case=True))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok
