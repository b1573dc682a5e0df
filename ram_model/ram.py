"""RAM, RAM++ and Tag2Text in one readable file (config dataclass + model).

    image ─► Swin ─► [pooled ; tokens] ─► image_proj (RAM/RAM++) ─► image_embeds (B, T, 512)
    label_embed (frozen CLIP text embeddings, N×512) ─► ReLU(wordvec_proj) ─► label queries (N, 768)
    tagging_head: 2 layers of cross-attention(queries → image_embeds) + FFN, no self-attention
    fc: shared Linear(768→1) per query (Tag2Text: per-class weights) ─► sigmoid > per-class threshold
    caption branch: tag_encoder (BERT, tags "a | b | c" cross-attending to the image) ─►
                    text_decoder (causal BERT LM cross-attending to the tag encoder) ─► "a picture of ..."

Variants (`RAMConfig.variant`):
  * "ram"      — the above; tag_encoder layers 0..1 share cross-attention+FFN weights with the tagging head.
  * "ram_plus" — no caption branch; label_embed holds D descriptions per tag (N·D×512); each image
                 re-weights a tag's descriptions by softmax(exp(reweight_scale)·cos(image, description)).
  * "tag2text" — no image_proj (the head reads 1024-d Swin tokens), learned label_embed (nn.Embedding N×768,
                 used as queries directly), per-class fc (GroupWiseLinear).
Parameter names match the reference checkpoints (see ram_model/checkpoint.py for loading them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bert import BertConfig, BertEmbeddings, BertLMHeadModel, BertModel
from .conv_encoder import ConvImageEncoder
from .generation import decode
from .losses import asymmetric_loss, caption_lm_loss, clip_distillation_loss
from .swin import SwinBlock, SwinConfig, SwinTransformer, WindowAttention, relative_position_index, shifted_window_mask

log = logging.getLogger(__name__)

VARIANTS = ("ram", "ram_plus", "tag2text")


@dataclass
class RAMConfig:
    variant: str = "ram"
    swin: SwinConfig = field(default_factory=lambda: SwinConfig.preset("swin_l", 384))
    num_tags: int = 4585
    label_dim: int = 512                 # CLIP text-embedding width (= image_proj output)
    descriptions_per_tag: int = 51       # RAM++ only
    head: BertConfig = field(default_factory=lambda: BertConfig(num_layers=2, num_heads=4, encoder_width=512))
    text: BertConfig | None = field(default_factory=BertConfig)  # caption branch; None = tagging only
    tie_head_to_tag_encoder: bool = True  # the reference shares tagging-head weights with tag_encoder layers 0..1
    tokenizer: str = "bert-base-uncased"  # local folder or hub id (bert-base-uncased vocabulary + [DEC] [ENC])
    prompt: str = "a picture of "
    max_tag_tokens: int = 40
    max_caption_tokens: int = 40
    default_threshold: float = 0.68
    # losses
    asl_gamma_neg: float = 7.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    alignment_gamma_neg: float = 4.0     # RAM++ image-text alignment ASL
    label_smoothing: float = 0.1
    balance_tag_loss: bool = True        # reference: tag loss rescaled to the caption loss' value each step
    tag_loss_weight: float = 1.0
    caption_loss_weight: float = 1.0
    distill_loss_weight: float = 1.0
    alignment_loss_weight: float = 1.0
    # inference
    cpu_autocast_bf16: bool = False      # measured in benchmarks/model.py; see docs/model.md
    channels_last: bool = False
    init_std: float = 0.02               # Linear/Embedding init (BERT's initializer_range)
    # An extra per-tag linear read-out of the global max over the image tokens, added to the head's
    # logits (not in RAM's checkpoints). A small encoder trained from scratch learns shapes through it:
    # the max keeps where a part responds most, which average-pooled features and a tiny
    # cross-attention head wash out (docs/model.md).
    max_pool_head: bool = False
    # The image encoder: "swin" (RAM's, and the only one RAM's checkpoints hold) or "conv", a small conv net
    # (ram_model/conv_encoder.py) with `conv_channels`, the tiny preset's option for a model that must learn
    # shapes on CPU (the demo's). Its input size stays `swin.image_size`, which every transform reads.
    image_encoder: str = "swin"
    conv_channels: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"RAMConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if isinstance(self.swin, dict):
            self.swin = SwinConfig(**{**self.swin, "depths": tuple(self.swin["depths"]),
                                      "num_heads": tuple(self.swin["num_heads"])})
        if isinstance(self.head, dict):
            self.head = BertConfig(**self.head)
        if isinstance(self.text, dict):
            self.text = BertConfig(**self.text)
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        if self.image_encoder not in ("swin", "conv"):
            raise ValueError(f"RAMConfig.image_encoder must be 'swin' or 'conv', got {self.image_encoder!r}")
        if self.image_encoder == "conv" and (not self.conv_channels or min(self.conv_channels) < 1):
            raise ValueError(f"RAMConfig.conv_channels must be positive channel counts, got {self.conv_channels}")
        if self.variant == "ram_plus" and self.text is not None:
            raise ValueError("RAMConfig: RAM++ has no caption branch; set text=None")
        if self.max_pool_head and self.variant == "tag2text":
            raise ValueError("RAMConfig.max_pool_head is for RAM and RAM++ (their image tokens are label_dim wide)")
        if self.variant == "tag2text" and self.text is None:
            raise ValueError("RAMConfig: Tag2Text needs its caption branch (text config)")
        # what the tagging head's cross-attention reads
        want = self.vision_width if self.variant == "tag2text" else self.label_dim
        if self.head.encoder_width != want:
            self.head = dataclasses.replace(self.head, encoder_width=want)

    @property
    def vision_width(self) -> int:
        """The width of the image encoder's tokens."""
        return self.conv_channels[-1] if self.image_encoder == "conv" else self.swin.out_dim

    @property
    def has_caption(self) -> bool:
        return self.text is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RAMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"RAMConfig: unknown fields {sorted(unknown)} in config.json")
        return cls(**d)

    # reference presets -------------------------------------------------------------------------------
    @classmethod
    def ram(cls, vit: str = "swin_l", image_size: int = 384, with_caption: bool = True, **kw) -> "RAMConfig":
        return cls(variant="ram", swin=SwinConfig.preset(vit, image_size), text=BertConfig() if with_caption else None,
                   **kw)

    @classmethod
    def ram_plus(cls, vit: str = "swin_l", image_size: int = 384, **kw) -> "RAMConfig":
        return cls(variant="ram_plus", swin=SwinConfig.preset(vit, image_size), text=None, **kw)

    @classmethod
    def tag2text(cls, vit: str = "swin_b", image_size: int = 384, num_tags: int = 3429, **kw) -> "RAMConfig":
        return cls(variant="tag2text", swin=SwinConfig.preset(vit, image_size), num_tags=num_tags, **kw)

    @classmethod
    def tiny(cls, num_tags: int = 10, vocab_size: int = 1000, variant: str = "ram", image_size: int = 64,
             with_caption: bool = True, **kw) -> "RAMConfig":
        """A few-MB model for tests and the offline demo: Swin 32-d, depths 1-1-2-1, window 4; BERT 64-d."""
        swin = SwinConfig(image_size=image_size, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                          window_size=4, drop_path=0.0)
        head = BertConfig(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                          max_position_embeddings=64, dropout=0.0)
        text = BertConfig(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                          max_position_embeddings=64, dropout=0.0)
        if variant == "ram_plus":
            text = None
        elif not with_caption and variant == "ram":
            text = None
        kw.setdefault("descriptions_per_tag", 3)
        # 0.02 leaves the tiny head's query/key products so small that it plateaus while the randomly
        # initialised encoder collapses to image-independent features; 0.1 lifts off within ~100 steps
        kw.setdefault("init_std", 0.1)
        return cls(variant=variant, swin=swin, num_tags=num_tags, label_dim=32, head=head, text=text,
                   max_tag_tokens=24, max_caption_tokens=32, tokenizer="", **kw)


def random_label_embeddings(tags: Sequence[str], dim: int, per_tag: int = 1) -> torch.Tensor:
    """Deterministic unit vectors per tag name (seeded by a hash of the name): a non-zero, tag-stable
    stand-in where no CLIP text embedding is available. Returns (len(tags)·per_tag, dim)."""
    rows = []
    for t in tags:
        seed = int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal((per_tag, dim)).astype(np.float32)
        rows.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return torch.from_numpy(np.concatenate(rows, 0)) if rows else torch.zeros(0, dim)


class GroupWiseLinear(nn.Module):
    """Per-class linear read-out (Tag2Text): logit_c = <W_c, h_c> + b_c."""

    def __init__(self, num_class: int, hidden: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(1, num_class, hidden))
        self.b = nn.Parameter(torch.empty(1, num_class))
        bound = 1 / math.sqrt(hidden)
        nn.init.uniform_(self.W, -bound, bound)
        nn.init.uniform_(self.b, -bound, bound)

    def forward(self, x):
        return (self.W * x).sum(-1) + self.b


class RAM(nn.Module):
    def __init__(self, config: RAMConfig, tags: Sequence[str] | None = None, thresholds=None,
                 label_embeddings: torch.Tensor | None = None, tokenizer=None):
        super().__init__()
        self.config = c = config
        self.visual_encoder = (ConvImageEncoder(c.conv_channels) if c.image_encoder == "conv"
                               else SwinTransformer(c.swin))
        vision_width = c.vision_width
        H = c.head.hidden_size
        if c.variant == "tag2text":
            self.label_embed = nn.Embedding(c.num_tags, H)
            self.fc = GroupWiseLinear(c.num_tags, H)
        else:
            self.image_proj = nn.Linear(vision_width, c.label_dim)
            rows = c.num_tags * (c.descriptions_per_tag if c.variant == "ram_plus" else 1)
            # frozen CLIP text embeddings; random unit rows until real ones are set (never zeros: issue #211)
            self.label_embed = nn.Parameter(torch.empty(rows, c.label_dim), requires_grad=False)
            self.wordvec_proj = nn.Linear(c.label_dim, H) if c.label_dim != H else nn.Identity()
            self.fc = nn.Linear(H, 1)
            if c.variant == "ram_plus":
                self.reweight_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            if c.max_pool_head:
                self.max_pool_fc = nn.Linear(c.label_dim, c.num_tags)
        self.tagging_head = BertModel(c.head, with_embeddings=False, self_attention=False, cross_attention=True)
        if c.has_caption:
            te_cfg = dataclasses.replace(c.text, encoder_width=vision_width if c.variant == "tag2text" else c.label_dim)
            self.tag_encoder = BertModel(te_cfg, with_embeddings=True, self_attention=True, cross_attention=True)
            self.text_decoder = BertLMHeadModel(dataclasses.replace(c.text, encoder_width=c.text.hidden_size))
            if c.tie_head_to_tag_encoder:
                self._tie_head_to_tag_encoder()
        self.register_buffer("class_threshold", torch.full((c.num_tags,), c.default_threshold), persistent=False)
        self.tags: list[str] = list(tags) if tags is not None else [f"tag_{i}" for i in range(c.num_tags)]
        if len(self.tags) != c.num_tags:
            raise ValueError(f"RAM: {len(self.tags)} tags given but config.num_tags = {c.num_tags}")
        self.tokenizer = tokenizer
        self.apply(lambda m: self._init_module(m, c.init_std))
        if self.class_threshold.device.type != "meta":
            with torch.no_grad():
                if c.variant == "tag2text":
                    nn.init.normal_(self.label_embed.weight, std=0.02)
                elif label_embeddings is not None:
                    self.label_embed.copy_(self._check_embeddings(label_embeddings, c.num_tags))
                else:
                    self.label_embed.copy_(random_label_embeddings(self.tags, c.label_dim, self._per_tag()))
            if thresholds is not None:
                self.class_threshold.copy_(torch.as_tensor(thresholds, dtype=torch.float32))

    @classmethod
    def without_init(cls, config: RAMConfig, device="cpu", tags: Sequence[str] | None = None, thresholds=None,
                     tokenizer=None) -> "RAM":
        """The model with uninitialised weights, for loading a checkpoint that sets every parameter next: built
        on the meta device and then allocated on `device`, so no random init is computed only to be
        overwritten (trunc_normal_ over ~360M values at swin_l). Derived buffers and thresholds are set."""
        with torch.device("meta"):
            model = cls(config, tags=tags, tokenizer=tokenizer)
        # to_empty() gives every module its own new tensor: note the tied parameters to tie them again
        places: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    places.setdefault(id(p), []).append((module, name))
        model.to_empty(device=device)
        for (first, first_name), *others in places.values():
            for module, name in others:
                setattr(module, name, getattr(first, first_name))
        model._reset_derived_buffers()
        if thresholds is not None:
            with torch.no_grad():
                model.class_threshold.copy_(torch.as_tensor(thresholds, dtype=torch.float32))
        return model

    def _reset_derived_buffers(self) -> None:
        """Recompute every non-persistent buffer (what checkpoint files do not hold) after to_empty()."""

        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, WindowAttention):
                    m.relative_position_index.copy_(relative_position_index(m.window))
                elif isinstance(m, SwinBlock) and m.attn_mask is not None:
                    m.attn_mask.copy_(shifted_window_mask(m.resolution, m.resolution, m.window, m.shift))
                elif isinstance(m, BertEmbeddings):
                    m.position_ids.copy_(torch.arange(m.position_ids.shape[1]).unsqueeze(0))
            self.class_threshold.fill_(self.config.default_threshold)

    # construction helpers -----------------------------------------------------------------------------
    def _per_tag(self) -> int:
        return self.config.descriptions_per_tag if self.config.variant == "ram_plus" else 1

    @staticmethod
    def _init_module(m: nn.Module, std: float):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _tie_head_to_tag_encoder(self):
        c = self.config
        same = (c.head.hidden_size == c.text.hidden_size and c.head.intermediate_size == c.text.intermediate_size
                and c.head.num_layers <= c.text.num_layers)
        if not same:
            raise ValueError("RAMConfig.tie_head_to_tag_encoder needs head and text configs of equal hidden and "
                             "intermediate sizes (and head layers ≤ text layers); set it False otherwise")
        te = self.tag_encoder.encoder.layer
        for i, hl in enumerate(self.tagging_head.encoder.layer):
            # share the matrices; each side keeps its own head count (reference: 4 vs 12 heads, same weights)
            for name in ("query", "key", "value"):
                setattr(hl.crossattention.self, name, getattr(te[i].crossattention.self, name))
            hl.crossattention.output = te[i].crossattention.output
            hl.intermediate = te[i].intermediate
            hl.output = te[i].output

    def _check_embeddings(self, emb: torch.Tensor, num_tags: int) -> torch.Tensor:
        emb = torch.as_tensor(emb, dtype=torch.float32)
        per = self._per_tag()
        if emb.ndim == 3:
            emb = emb.reshape(-1, emb.shape[-1])
        if emb.shape != (num_tags * per, self.config.label_dim):
            raise ValueError(f"label embeddings must be ({num_tags}·{per}, {self.config.label_dim}) "
                             f"(tags·descriptions, label_dim), got {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise ValueError("label embeddings contain NaN/inf")
        zero = (emb.norm(dim=-1) == 0).nonzero().flatten()
        if len(zero):
            raise ValueError(f"label embeddings: rows {zero[:10].tolist()} are zero; zero label queries cannot be "
                             "fine-tuned (reference issue #211). Build them with build_label_embeddings().")
        return emb

    # vocabulary -------------------------------------------------------------------------------------------
    def set_tags(self, tags: Sequence[str], embeddings: torch.Tensor | None = None, thresholds=None,
                 embed_new: Callable[[list[str]], torch.Tensor] | None = None) -> None:
        """Swap the tag list without retraining.

        RAM / RAM++: `embeddings` are the new label embeddings (N×label_dim, RAM++ N·D×label_dim); when
        omitted, tags already in the current list keep their rows and new tags get `embed_new(new tags)`
        (one label_dim row per tag, e.g. CLIP text embeddings from build_label_embeddings; RAM++ uses the row
        for each of a tag's D description slots), or without it deterministic random unit vectors
        (trainable by fine-tuning wordvec_proj/head, but without CLIP's open-vocabulary meaning).
        Tag2Text: learned rows and per-class fc weights of kept tags are carried over; new tags start
        randomly initialised. `thresholds`: N floats; default keeps the old threshold of kept tags and
        `config.default_threshold` for new ones.
        """
        tags = list(tags)
        if len(set(tags)) != len(tags) and self.config.variant != "tag2text":
            raise ValueError("set_tags: duplicate tag names")
        c = self.config
        old = {t: i for i, t in enumerate(self.tags)}
        keep = [(j, old[t]) for j, t in enumerate(tags) if t in old]
        dev = self.class_threshold.device
        N, per = len(tags), self._per_tag()
        with torch.no_grad():
            if c.variant == "tag2text":
                H = c.head.hidden_size
                new_emb = nn.Embedding(N, H).to(dev)
                nn.init.normal_(new_emb.weight, std=0.02)
                new_fc = GroupWiseLinear(N, H).to(dev)
                for j, i in keep:
                    new_emb.weight[j] = self.label_embed.weight[i]
                    new_fc.W[0, j] = self.fc.W[0, i]
                    new_fc.b[0, j] = self.fc.b[0, i]
                self.label_embed, self.fc = new_emb, new_fc
            else:
                if embeddings is not None:
                    emb = self._check_embeddings(embeddings, N)
                else:
                    emb = random_label_embeddings(tags, c.label_dim, per)
                    cur = self.label_embed.detach().cpu().view(-1, per, c.label_dim)
                    emb = emb.view(N, per, c.label_dim)
                    for j, i in keep:
                        emb[j] = cur[i]
                    new = [j for j, t in enumerate(tags) if t not in old]
                    if new and embed_new is not None:
                        rows = torch.as_tensor(embed_new([tags[j] for j in new]), dtype=torch.float32).cpu()
                        if rows.shape != (len(new), c.label_dim):
                            raise ValueError(f"set_tags: embed_new gave {tuple(rows.shape)} for {len(new)} new tags; "
                                             f"expected ({len(new)}, {c.label_dim}): is the CLIP model's projection "
                                             f"width the model's label_dim?")
                        emb[new] = rows.unsqueeze(1).expand(-1, per, -1)
                    emb = emb.reshape(N * per, c.label_dim)
                    if new and embed_new is None:
                        log.warning("set_tags: %d new tags get random label embeddings (no CLIP text embeddings "
                                    "given); build them with build_label_embeddings() for open-vocabulary use",
                                    N - len(keep))
                self.label_embed = nn.Parameter(emb.to(dev, self.label_embed.dtype), requires_grad=False)
                if c.max_pool_head:   # kept tags keep their read-out rows; new ones start at zero
                    new_fc = nn.Linear(c.label_dim, N).to(dev)
                    nn.init.zeros_(new_fc.weight)
                    nn.init.zeros_(new_fc.bias)
                    for j, i in keep:
                        new_fc.weight[j] = self.max_pool_fc.weight[i]
                        new_fc.bias[j] = self.max_pool_fc.bias[i]
                    self.max_pool_fc = new_fc
            thr = torch.full((N,), c.default_threshold)
            for j, i in keep:
                thr[j] = self.class_threshold[i]
            if thresholds is not None:
                thr = torch.as_tensor(thresholds, dtype=torch.float32)
                if thr.shape != (N,):
                    raise ValueError(f"set_tags: {thr.numel()} thresholds for {N} tags")
            self.class_threshold = thr.to(dev)
        self.tags = tags
        self.config = dataclasses.replace(c, num_tags=N)

    # image side ---------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) → image_embeds (B, 1+T, E); token 0 is the pooled token (CLIP space for RAM/RAM++)."""
        x = self.visual_encoder(images)
        return x if self.config.variant == "tag2text" else self.image_proj(x)

    def label_queries(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Tagging-head queries: (1, N, H) shared by the batch, or (B, N, H) for RAM++ (image-dependent)."""
        c = self.config
        if c.variant == "tag2text":
            return self.label_embed.weight.unsqueeze(0)
        if c.variant == "ram":
            return F.relu(self.wordvec_proj(self.label_embed)).unsqueeze(0)
        # RAM++: per-image softmax over each tag's descriptions, weighted by cosine with the pooled image token
        D = c.descriptions_per_tag
        emb = self.label_embed.to(image_embeds.dtype)
        img = F.normalize(image_embeds[:, 0, :], dim=-1)
        sim = (img @ emb.t()) * self.reweight_scale.exp()                   # (B, N·D)
        w = sim.view(img.shape[0], -1, D).softmax(dim=-1)                     # (B, N, D)
        desc = torch.einsum("bnd,nde->bne", w, emb.view(-1, D, emb.shape[-1]))
        return F.relu(self.wordvec_proj(desc))

    def tag_logits_from_embeds(self, image_embeds: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        q = self.label_queries(image_embeds) if queries is None else queries
        h = self.tagging_head(inputs_embeds=q, encoder_hidden_states=image_embeds)
        logits = self.fc(h)
        logits = logits.squeeze(-1) if logits.ndim == 3 else logits
        if self.config.max_pool_head:
            logits = logits + self.max_pool_fc(image_embeds[:, 1:].amax(dim=1))
        return logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tag logits (B, N)."""
        return self.tag_logits_from_embeds(self.encode_image(images))

    tag_logits = forward  # the name the training loop's evaluation calls

    # inference ------------------------------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cpu" and self.config.cpu_autocast_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        dev = self.class_threshold.device
        images = images.to(dev, torch.float32)
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    @torch.inference_mode()
    def tag_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Sigmoid scores (B, N) in float32."""
        images = self._prep(images)
        with self._autocast(images.device):
            logits = self(images)
        return torch.sigmoid(logits.float())

    @torch.inference_mode()
    def embed_and_tag_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image embeddings (B, 1+T, E) and the sigmoid tag scores (B, N), float32, from one encoder pass
        (crop cleaning with the baseline as embedder needs both; the Swin is nearly all the cost)."""
        images = self._prep(images)
        with self._autocast(images.device):
            embeds = self.encode_image(images)
            logits = self.tag_logits_from_embeds(embeds)
        return embeds.float(), torch.sigmoid(logits.float())

    @torch.inference_mode()
    def tag(self, images: torch.Tensor, thresholds: torch.Tensor | float | None = None
            ) -> tuple[list[list[int]], list[list[float]]]:
        """Per image: tag ids with score > threshold (strict, in tag-list order) and their scores."""
        return self._hits(self.tag_probs(images), thresholds)

    def _hits(self, probs: torch.Tensor, thresholds=None) -> tuple[list[list[int]], list[list[float]]]:
        thr = self.class_threshold if thresholds is None else torch.as_tensor(thresholds, device=probs.device)
        hits = probs > thr
        ids, scores = [], []
        for b in range(probs.shape[0]):
            idx = hits[b].nonzero().flatten()
            ids.append(idx.tolist())
            scores.append(probs[b, idx].tolist())
        return ids, scores

    @torch.inference_mode()
    def tag_and_caption(self, images: torch.Tensor, thresholds: torch.Tensor | float | None = None,
                        num_beams: int = 3, max_length: int = 30, min_length: int = 10,
                        repetition_penalty: float = 1.0) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """`tag` and then `caption` on the predicted tags, from one pass of the image encoder (calling the two
        would encode every image twice: the Swin is most of the cost). Returns tag ids, scores, captions."""
        self._require_caption()
        images = self._prep(images)
        with self._autocast(images.device):
            embeds = self.encode_image(images)
            logits = self.tag_logits_from_embeds(embeds)
        ids, scores = self._hits(torch.sigmoid(logits.float()), thresholds)
        names = [[self.tags[i] for i in row] for row in ids]
        return ids, scores, self._captions_from_embeds(embeds, names, num_beams, max_length, min_length,
                                                       repetition_penalty)

    def tag_names(self, ids: Sequence[Sequence[int]]) -> list[list[str]]:
        return [[self.tags[i] for i in row] for row in ids]

    # caption branch ------------------------------------------------------------------------------------
    def get_tokenizer(self):
        if self.tokenizer is None:
            if not self.config.tokenizer:
                raise ValueError("RAM: no tokenizer attached and config.tokenizer is empty; pass tokenizer= "
                                 "(e.g. train_wordpiece_tokenizer(captions)) or set config.tokenizer")
            from .tokenizer import load_tokenizer  # lazy: transformers (~3 s) only when a tokenizer is loaded
            self.tokenizer = load_tokenizer(self.config.tokenizer)
        tok = self.tokenizer
        if len(tok) != self.config.text.vocab_size:
            raise ValueError(f"RAM: tokenizer has {len(tok)} ids but config.text.vocab_size = "
                             f"{self.config.text.vocab_size}")
        return tok

    def _require_caption(self):
        if not self.config.has_caption:
            raise ValueError(f"RAM variant {self.config.variant!r} built without caption branch (config.text=None)")

    def _token_ids(self, name: str) -> int:
        tok = self.get_tokenizer()
        return tok.convert_tokens_to_ids(name)

    def tokenize_tags(self, tag_lists: Sequence[Sequence[str]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tag-encoder input: "t1 | t2 | …" padded to max_tag_tokens, first token → [ENC] (reference layout)."""
        tok = self.get_tokenizer()
        texts = [" | ".join(t) for t in tag_lists]
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.config.max_tag_tokens,
                  return_tensors="pt")
        ids = enc.input_ids.to(device)
        ids[:, 0] = self._token_ids("[ENC]")
        return ids, enc.attention_mask.to(device)

    def tokenize_captions(self, captions: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder input for training: prompt + caption, padded to the longest (≤ max_caption_tokens),
        first token → [DEC]. Feed the result to training_losses(caption_ids=, caption_mask=)."""
        tok = self.get_tokenizer()
        texts = [self.config.prompt + c for c in captions]
        enc = tok(texts, padding="longest", truncation=True, max_length=self.config.max_caption_tokens,
                  return_tensors="pt")
        ids = enc.input_ids
        ids[:, 0] = self._token_ids("[DEC]")
        return ids.to(device or "cpu"), enc.attention_mask.to(device or "cpu")

    def prompt_length(self) -> int:
        return len(self.get_tokenizer()(self.config.prompt).input_ids) - 1

    def _tag_states(self, image_embeds, tag_lists):
        ids, mask = self.tokenize_tags(tag_lists, image_embeds.device)
        ones = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        return self.tag_encoder(ids, mask, encoder_hidden_states=image_embeds, encoder_attention_mask=ones)

    @torch.inference_mode()
    def caption(self, images: torch.Tensor, tags: Sequence[Sequence[str]] | None = None, num_beams: int = 3,
                max_length: int = 30, min_length: int = 10, repetition_penalty: float = 1.0) -> list[str]:
        """Captions conditioned on tags (predicted ones when `tags` is None). Beam search by default,
        greedy with num_beams=1. `max_length` / `min_length` count the prompt tokens, as in the reference (HF
        generate); the search follows transformers 4.36.2's rules, the reference's (ram_model/generation.py)."""
        self._require_caption()
        images = self._prep(images)
        with self._autocast(images.device):
            embeds = self.encode_image(images)
            if tags is None:
                probs = torch.sigmoid(self.tag_logits_from_embeds(embeds).float())
                hits = probs > self.class_threshold
                tags = [[self.tags[i] for i in hits[b].nonzero().flatten().tolist()] for b in range(len(hits))]
        return self._captions_from_embeds(embeds, tags, num_beams, max_length, min_length, repetition_penalty)

    def _captions_from_embeds(self, embeds: torch.Tensor, tags: Sequence[Sequence[str]], num_beams: int,
                              max_length: int, min_length: int, repetition_penalty: float) -> list[str]:
        if len(tags) != embeds.shape[0]:
            raise ValueError(f"caption: {len(tags)} tag lists for {embeds.shape[0]} images")
        with self._autocast(embeds.device):
            states = self._tag_states(embeds, tags)
            out = self.generate(states, num_beams, max_length, min_length, repetition_penalty)
        tok = self.get_tokenizer()
        texts = tok.batch_decode(out, skip_special_tokens=True)
        prompt = self.config.prompt.strip()
        return [t[len(prompt):].strip() if t.startswith(prompt) else t.strip() for t in texts]

    def generate(self, enc_states: torch.Tensor, num_beams: int = 3, max_length: int = 30, min_length: int = 10,
                 repetition_penalty: float = 1.0) -> torch.Tensor:
        """Decode from "[DEC] a picture of" cross-attending to `enc_states` (B, L, H); returns (B, ≤max_length).
        The rules are transformers 4.36.2's, which the reference runs (ram_model/generation.py)."""
        tok = self.get_tokenizer()
        prompt = tok(self.config.prompt, return_tensors="pt").input_ids[:, :-1]  # drop [SEP]
        prompt[:, 0] = self._token_ids("[DEC]")
        seqs, _ = decode(self.text_decoder, enc_states, prompt, tok.sep_token_id, tok.pad_token_id, num_beams,
                         max_length, min_length, repetition_penalty)
        return seqs

    # training --------------------------------------------------------------------------------------------
    def training_losses(self, images: torch.Tensor, tag_targets: torch.Tensor, caption_ids: torch.Tensor | None = None,
                        caption_mask: torch.Tensor | None = None, clip_image_embeds: torch.Tensor | None = None,
                        caption_tag_targets: torch.Tensor | None = None,
                        clip_text_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses of one batch; "loss" is the total to backpropagate, the other keys are its components.

        images (B,3,S,S); tag_targets (B,N) multi-hot float. caption_ids/mask from tokenize_captions()
        (prompt + caption, first token [DEC]); the tag encoder reads the tags of `caption_tag_targets`
        (reference: parse tags) or else of tag_targets. clip_image_embeds (B,512): CLIP ViT-B/16 image
        features for the L1 distillation of the pooled token (RAM/RAM++). clip_text_embeds (B,512): CLIP
        text embeddings of the captions for RAM++'s image-text alignment loss.
        """
        c = self.config
        if tag_targets.shape != (images.shape[0], c.num_tags):
            raise ValueError(f"training_losses: tag_targets {tuple(tag_targets.shape)}, expected "
                             f"({images.shape[0]}, {c.num_tags})")
        embeds = self.encode_image(images)
        logits = self.tag_logits_from_embeds(embeds)
        out: dict[str, torch.Tensor] = {}
        out["tag"] = asymmetric_loss(logits, tag_targets, c.asl_gamma_neg, c.asl_gamma_pos, c.asl_clip)
        if clip_image_embeds is not None:
            if c.variant == "tag2text":
                raise ValueError("training_losses: Tag2Text has no CLIP-space image token to distil")
            out["distill"] = clip_distillation_loss(embeds[:, 0, :], clip_image_embeds.to(embeds.dtype))
        if clip_text_embeds is not None:
            if c.variant != "ram_plus":
                raise ValueError("training_losses: the image-text alignment loss is RAM++ only")
            q = F.relu(self.wordvec_proj(F.normalize(clip_text_embeds.to(embeds.dtype), dim=-1))).unsqueeze(0)
            align_logits = self.tag_logits_from_embeds(embeds, queries=q)  # (B_img, B_txt)
            eye = torch.eye(images.shape[0], device=images.device)
            out["alignment"] = asymmetric_loss(align_logits, eye, c.alignment_gamma_neg, 0.0, c.asl_clip)
        if caption_ids is not None:
            self._require_caption()
            ids = caption_ids.clone()
            ids[:, 0] = self._token_ids("[DEC]")
            src = caption_tag_targets if caption_tag_targets is not None else tag_targets
            tag_lists = [[self.tags[i] for i in (row > 0.5).nonzero().flatten().tolist()] for row in src]
            states = self._tag_states(embeds, tag_lists)
            labels = ids.masked_fill(caption_mask == 0, -100) if caption_mask is not None else ids.clone()
            labels[:, :self.prompt_length()] = -100
            lm_logits = self.text_decoder(ids, attention_mask=caption_mask, encoder_hidden_states=states)
            out["caption"] = caption_lm_loss(lm_logits, labels, c.label_smoothing)
        tag_term = out["tag"]
        if "caption" in out and c.balance_tag_loss:
            # reference: the summed ASL is rescaled to the caption loss' value (gradient × t2t/tag)
            tag_term = out["tag"] / (out["tag"] / out["caption"]).detach()
        total = c.tag_loss_weight * tag_term
        if "caption" in out:
            total = total + c.caption_loss_weight * out["caption"]
        if "distill" in out:
            total = total + c.distill_loss_weight * out["distill"]
        if "alignment" in out:
            total = total + c.alignment_loss_weight * out["alignment"]
        out["loss"] = total
        return out

    def trainable_parameters(self):
        """Parameters with requires_grad (label_embed of RAM/RAM++ stays frozen), shared ones once."""
        return [p for p in self.parameters() if p.requires_grad]
