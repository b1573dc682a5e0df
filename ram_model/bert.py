"""BLIP-style BERT blocks used by RAM's tagging head, tag encoder and text decoder.

Parameter names follow the reference checkpoints (BLIP's modified BERT): embeddings.{word_embeddings,
position_embeddings,LayerNorm}, encoder.layer.N.{attention,crossattention}.{self.{query,key,value},
output.{dense,LayerNorm}}, encoder.layer.N.intermediate.dense, encoder.layer.N.output.{dense,LayerNorm},
and for the LM head cls.predictions.{transform.{dense,LayerNorm},decoder,bias}. There is no token-type
embedding and no pooler (neither exists in the reference). A layer can be built without self-attention
(RAM's tagging head: cross-attention + FFN only).

The decoder keeps a key/value cache so greedy and beam search cost one token per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BertConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    encoder_width: int = 768  # width of the states cross-attention reads


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"BERT attention: hidden size {hidden} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        return x.view(B, L, self.heads, C // self.heads).transpose(1, 2)

    def forward(self, x, kv=None, mask=None, cache: dict | None = None, prefix: str = "", causal: bool = False):
        """x (B,Lq,C); kv: states to attend (None = self-attention); mask: additive (B,1,Lq|1,Lk) or None.

        cache: for self-attention the past keys/values are concatenated in; for cross-attention the
        projected keys/values are computed once and reused.
        """
        q = self.split(self.query(x))
        if kv is None:  # self-attention
            k, v = self.split(self.key(x)), self.split(self.value(x))
            if cache is not None:
                if prefix + "k" in cache:
                    k = torch.cat([cache[prefix + "k"], k], dim=2)
                    v = torch.cat([cache[prefix + "v"], v], dim=2)
                cache[prefix + "k"], cache[prefix + "v"] = k, v
        elif cache is not None and prefix + "k" in cache:
            k, v = cache[prefix + "k"], cache[prefix + "v"]
        else:
            k, v = self.split(self.key(kv)), self.split(self.value(kv))
            if cache is not None:
                cache[prefix + "k"], cache[prefix + "v"] = k, v
        if k.shape[0] != q.shape[0]:  # batch-shared queries (tagging head): broadcast
            q = q.expand(k.shape[0], -1, -1, -1)
        if causal:
            Lq, Lk = q.shape[2], k.shape[2]
            causal_mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
            causal_add = torch.zeros(Lq, Lk, dtype=q.dtype, device=q.device).masked_fill(~causal_mask, float("-inf"))
            mask = causal_add if mask is None else mask + causal_add
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        B, H, L, D = out.shape
        return out.transpose(1, 2).reshape(B, L, H * D)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden: int, in_dim: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg.hidden_size, cfg.num_heads, kv_width, cfg.dropout)
        self.output = BertSelfOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout)

    def forward(self, x, kv=None, mask=None, cache=None, prefix="", causal=False):
        return self.output(self.self(x, kv, mask, cache, prefix, causal), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, self_attention: bool = True, cross_attention: bool = True):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size) if self_attention else None
        self.crossattention = BertAttention(cfg, cfg.encoder_width) if cross_attention else None
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps, cfg.dropout)

    def forward(self, x, mask=None, enc=None, enc_mask=None, cache=None, causal=False):
        if self.attention is not None:
            x = self.attention(x, None, mask, cache, "s", causal)
        if self.crossattention is not None:
            if enc is None:
                raise ValueError("BertLayer: this layer cross-attends but no encoder_hidden_states were given")
            x = self.crossattention(x, enc, enc_mask, cache, "c")
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig, self_attention: bool, cross_attention: bool):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, self_attention, cross_attention) for _ in range(cfg.num_layers))

    def forward(self, x, mask=None, enc=None, enc_mask=None, caches=None, causal=False):
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, enc, enc_mask, None if caches is None else caches[i], causal)
        return x


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0):
        L = input_ids.shape[1]
        if past_length + L > self.position_ids.shape[1]:
            raise ValueError(f"BERT input of {past_length + L} tokens exceeds max_position_embeddings "
                             f"{self.position_ids.shape[1]}")
        pos = self.position_ids[:, past_length:past_length + L]
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)))


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, L) 1/0 mask → additive (B, 1, 1, L) mask, or None."""
    if attention_mask is None:
        return None
    m = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


class BertModel(nn.Module):
    """Encoder stack; `embeddings` is None for the tagging head (it takes query embeddings directly)."""

    def __init__(self, cfg: BertConfig, with_embeddings: bool = True, self_attention: bool = True,
                 cross_attention: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg) if with_embeddings else None
        self.encoder = BertEncoder(cfg, self_attention, cross_attention)

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                inputs_embeds=None, causal=False, caches=None, past_length=0):
        if inputs_embeds is None:
            if self.embeddings is None or input_ids is None:
                raise ValueError("BertModel: pass input_ids (model with embeddings) or inputs_embeds")
            x = self.embeddings(input_ids, past_length)
        else:
            x = inputs_embeds
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        mask = padding_mask(attention_mask, dtype)
        enc_mask = padding_mask(encoder_attention_mask, dtype)
        return self.encoder(x, mask, encoder_hidden_states, enc_mask, caches, causal)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        # The reference exposes the output bias twice (`bias` and `decoder.bias`): one tensor, two names.
        self.bias = self.decoder.bias

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)

    def forward(self, x):
        return self.predictions(x)


class BertLMHeadModel(nn.Module):
    """Causal text decoder with cross-attention; LM weight tied to its own input word embeddings."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg, with_embeddings=True, self_attention=True, cross_attention=True)
        self.cls = BertOnlyMLMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                caches=None, past_length=0):
        h = self.bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                      causal=True, caches=caches, past_length=past_length)
        return self.cls(h)
