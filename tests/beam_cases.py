"""The decoders and inputs of the recorded beam-search reference (tests/data/reference/beam_search_4.36.2.json).

Each checkpoint is a small random RAM text decoder (BLIP's BertLMHeadModel layout) whose every tensor is
drawn from numpy's PCG64 generator, seeded per checkpoint, in sorted key order (a tensor tied under two
names is drawn once, under its first name), so the same weights are rebuilt on any machine and in any
environment: tests/data/reference/make_beam_search_reference.py builds them beside transformers 4.36.2 to
record the reference's outputs, tests/test_generation.py builds them again to compare ours. The recorded file
holds a digest of the weights and inputs: a change here fails the test instead of comparing other numbers.
Imports nothing of pytest or transformers (the recording environment has neither to spare).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from ram_model.bert import BertConfig, BertLMHeadModel

# the decoder's shape (the reference's med_config.json, shrunk) and the token ids of a BERT-style vocabulary
DECODER = dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
               max_position_embeddings=64, dropout=0.0, encoder_width=64)
PAD, SEP, DEC = 0, 3, 998          # [PAD], [SEP] (the decoder's end of sentence), [DEC] (bos, = vocab − 2)
PROMPT = [DEC, 40, 41, 42]         # "[DEC] a picture of" (the reference drops the prompt's [SEP])
TAG_TOKENS = 40                    # the tag encoder's padded length (max_length 40), what the decoder attends
WEIGHT_STD = 0.3


def build_decoder(seed: int, eos_bias: float = 0.0) -> BertLMHeadModel:
    """The checkpoint of `seed`: LayerNorm weights 1 + N(0, 0.1²) and biases N(0, 0.1²), every other tensor
    N(0, WEIGHT_STD²); then `eos_bias` added to the output bias of [SEP] (to make captions end early)."""
    model = BertLMHeadModel(BertConfig(**DECODER)).eval()
    rng = np.random.default_rng(seed)
    seen: set[int] = set()
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name in sorted(state):
            t = state[name]
            if not isinstance(t, torch.nn.Parameter) or id(t) in seen:
                continue
            seen.add(id(t))
            noise = torch.from_numpy(rng.standard_normal(tuple(t.shape)).astype(np.float32))
            if "LayerNorm" in name:
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                t.copy_(WEIGHT_STD * noise)
        model.cls.predictions.bias[SEP] += eos_bias
    return model


def build_states(seed: int) -> torch.Tensor:
    """Tag-encoder output for one image (1, TAG_TOKENS, hidden): N(0, 1), as after the encoder's LayerNorm."""
    rng = np.random.default_rng(10_000 + seed)
    return torch.from_numpy(rng.standard_normal((1, TAG_TOKENS, DECODER["hidden_size"])).astype(np.float32))


def digest(model: BertLMHeadModel, states: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the decoder's tensors (sorted keys) and the input states."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.is_floating_point():
            h.update(name.encode() + t.detach().contiguous().numpy().tobytes())
    h.update(states.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class PromptTokenizer:
    """What RAM.generate asks of its tokenizer (the prompt's ids, [DEC], [SEP], [PAD], the vocabulary size),
    with the ids above, so that RAM.generate itself runs the recorded cases."""
    sep_token_id, pad_token_id = SEP, PAD

    def __len__(self):
        return DECODER["vocab_size"]

    def __call__(self, text, return_tensors=None):
        if text != "a picture of ":
            raise ValueError(f"PromptTokenizer knows the caption prompt only, got {text!r}")
        return type("Encoding", (), {"input_ids": torch.tensor([PROMPT + [SEP]])})

    def convert_tokens_to_ids(self, token):
        return {"[DEC]": DEC}[token]
