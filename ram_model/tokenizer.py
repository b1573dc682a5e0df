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
    """Train a lower-cased WordPiece vocabulary on `texts` (captions, tag names) → BertTokenizerFast.

    The caption prompt "a picture of" is always part of the training text. The result carries RAM's
    [DEC]/[ENC] tokens. With `out_dir` it is also saved there
    (`BertTokenizerFast.from_pretrained(out_dir)` reloads it).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    texts = list(texts)
    if not texts:
        raise ValueError("train_wordpiece_tokenizer: no texts given")
    texts.append("a picture of")  # RAM's caption prompt must not fall apart into [UNK]s
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS)
    wp.train_from_iterator(texts, trainer)
    vocab = dict(sorted(wp.get_vocab().items(), key=lambda kv: kv[1]))
    # vocab= takes the dict directly (vocab_file= is silently ignored by transformers 5, see ENVIRONMENT.md)
    tok = add_ram_special_tokens(BertTokenizerFast(vocab=vocab, do_lower_case=True))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok
