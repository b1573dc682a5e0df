"""Crop embedders for the cleaning stage: a callable `images -> np.ndarray [N, D]` float32, L2-normalised.

- `EncoderEmbedder` (default): the baseline tagger's own image encoder. Any torch module that maps
  pixel values [N, 3, S, S] to tokens [N, T, D] or a pooled [N, D] works; RAM's encoder puts its
  average-pooled token first, so the default pooling takes token 0.
- `ClipEmbedder` (option): CLIP's image tower (`CLIPVisionModelWithProjection`) from a local folder
  or a hub id; the projected image embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CropEmbedder(Protocol):
    dim: int

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass
class EmbedderConfig:
    kind: str = "baseline"            # "baseline" (the tagger's image encoder) | "clip"
    model: str | None = None          # clip: local folder or hub id
    image_size: int = 224             # baseline: input size of the encoder
    pool: str = "first"               # baseline: "first" token (RAM's pooled token) | "mean" over tokens
    batch_size: int = 32
    device: str = "cpu"
    local_files_only: bool = True

    def validate(self) -> None:
        if self.kind not in ("baseline", "clip"):
            raise ValueError(f"EmbedderConfig.kind must be 'baseline' or 'clip', got {self.kind!r}")
        if self.pool not in ("first", "mean"):
            raise ValueError(f"EmbedderConfig.pool must be 'first' or 'mean', got {self.pool!r}")
        if self.kind == "clip" and not self.model:
            raise ValueError("EmbedderConfig.model must name a CLIP folder or hub id when kind is 'clip'")
        if self.batch_size < 1 or self.image_size < 8:
            raise ValueError("EmbedderConfig.batch_size must be >= 1 and image_size >= 8")


def to_pixels(images: Sequence[Image.Image], size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Resize to size x size (crops are already tight boxes: no centre crop) and normalise."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
                    for im in images])
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _l2(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32, copy=False)


class EncoderEmbedder:
    """The baseline model's image encoder as a crop embedder."""

    def __init__(self, encoder: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], cfg: EmbedderConfig | None = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.cfg = cfg or EmbedderConfig()
        self.cfg.validate()
        self.encoder = encoder
        if isinstance(encoder, torch.nn.Module):
            encoder.eval().to(self.cfg.device)
        self.mean, self.std = mean, std
        self.dim = int(self._embed([Image.new("RGB", (8, 8))]).shape[1])

    @torch.no_grad()
    def _embed(self, images):
        x = self.encoder(to_pixels(images, self.cfg.image_size, self.mean, self.std).to(self.cfg.device))
        if isinstance(x, (tuple, list)):
            x = x[0]
        if hasattr(x, "last_hidden_state"):
            x = x.last_hidden_state
        if x.ndim == 3:
            x = x[:, 0] if self.cfg.pool == "first" else x.mean(dim=1)
        elif x.ndim != 2:
            raise ValueError(f"the image encoder returned shape {tuple(x.shape)}; expected [N, T, D] or [N, D]")
        return _l2(x)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        bs = self.cfg.batch_size
        return np.concatenate([self._embed(images[i: i + bs]) for i in range(0, len(images), bs)])


class ClipEmbedder:
    """CLIP's image tower: the projected image embedding."""

    def __init__(self, cfg: EmbedderConfig, model=None):
        cfg.validate()
        self.cfg = cfg
        if model is None:
            from transformers import CLIPVisionModelWithProjection
            try:
                model = CLIPVisionModelWithProjection.from_pretrained(cfg.model, local_files_only=cfg.local_files_only)
            except OSError as e:
                raise OSError(f"cannot load the CLIP image tower from {cfg.model!r} (embedder.model): {e}; give a local "
                              "folder, or set local_files_only: false on an online machine") from e
        self.model = model.eval().to(cfg.device)
        self.size = int(model.config.image_size)
        self.dim = int(model.config.projection_dim)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        outs = []
        for i in range(0, len(images), self.cfg.batch_size):
            px = to_pixels(images[i: i + self.cfg.batch_size], self.size, CLIP_MEAN, CLIP_STD).to(self.cfg.device)
            outs.append(_l2(self.model(pixel_values=px).image_embeds))
        return np.concatenate(outs)


def build_embedder(cfg: EmbedderConfig, baseline_encoder: torch.nn.Module | None = None) -> CropEmbedder:
    """The embedder the config names. kind 'baseline' needs the baseline model's image encoder."""
    cfg.validate()
    if cfg.kind == "clip":
        return ClipEmbedder(cfg)
    if baseline_encoder is None:
        raise ValueError("embedder.kind is 'baseline' but no baseline image encoder was given; pass the tagger's "
                         "encoder or set embedder.kind: clip with embedder.model")
    return EncoderEmbedder(baseline_encoder, cfg)
