"""Crop embedders for the cleaning stage: a callable `images -> np.ndarray [N, D]` float32, L2-normalised.

- `EncoderEmbedder` (default): the baseline tagger's own image encoder. Any torch module that maps
  pixel values [N, 3, S, S] to tokens [N, T, D] or a pooled [N, D] works; RAM's encoder puts its
  average-pooled token first, so the default pooling takes token 0.
- `ClipEmbedder` (option): CLIP's image tower (`CLIPVisionModelWithProjection`) from a local folder
  or a hub id; the projected image embedding.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from .conv_encoder import conv_blocks
from .devices import resolve_device
from .settings import EmbedderConfig  # noqa: F401  (the config section; re-exported where it is used)
from .fit import fit_in_memory

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CropEmbedder(Protocol):
    dim: int

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...




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
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size: int | None = None):
        """`image_size`: the encoder's input size where `cfg.image_size` is None (the baseline's own)."""
        self.cfg = cfg or EmbedderConfig()
        self.size = self.cfg.image_size or image_size
        if self.size is None:
            raise ValueError("embedder.image_size is not set and no encoder input size was given")
        self.device = str(resolve_device(self.cfg.device))
        self.encoder = encoder
        if isinstance(encoder, torch.nn.Module):
            encoder.eval().to(self.device)
        self.mean, self.std = mean, std
        self.dim = int(self._embed([Image.new("RGB", (8, 8))]).shape[1])

    @torch.no_grad()
    def _embed(self, images):
        x = self.encoder(to_pixels(images, self.size, self.mean, self.std).to(self.device))
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
        if not cfg.model and model is None:
            raise ValueError("EmbedderConfig.model must name a CLIP folder or hub id when kind is 'clip'")
        self.cfg = cfg
        self.device = str(resolve_device(cfg.device))
        if model is None:
            from transformers import CLIPVisionModelWithProjection
            try:
                model = CLIPVisionModelWithProjection.from_pretrained(cfg.model, local_files_only=cfg.local_files_only)
            except OSError as e:
                raise OSError(f"cannot load the CLIP image tower from {cfg.model!r} (embedder.model): {e}; give a local "
                              "folder, or set local_files_only: false on an online machine") from e
        self.model = model.eval().to(self.device)
        self.size = int(model.config.image_size)
        self.dim = int(model.config.projection_dim)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        outs = []
        for i in range(0, len(images), self.cfg.batch_size):
            px = to_pixels(images[i: i + self.cfg.batch_size], self.size, CLIP_MEAN, CLIP_STD).to(self.device)
            outs.append(_l2(self.model(pixel_values=px).image_embeds))
        return np.concatenate(outs)


def build_embedder(cfg: EmbedderConfig, baseline_encoder: torch.nn.Module | None = None,
                   image_size: int | None = None) -> CropEmbedder:
    """The embedder the config names. kind 'baseline' needs the baseline model's image encoder (and its input
    size where the config leaves `image_size` unset)."""
    if cfg.kind in ("clip", "conv") and not cfg.model:
        raise ValueError(f"EmbedderConfig.model must name a folder (or a CLIP hub id) when kind is {cfg.kind!r}")
    if cfg.kind == "clip":
        return ClipEmbedder(cfg)
    if cfg.kind == "conv":   # a shipped ConvCropEncoder: embeds at its own input size
        encoder = ConvCropEncoder.from_pretrained(cfg.model)
        return EncoderEmbedder(encoder, cfg.model_copy(update={"image_size": encoder.image_size}))
    if baseline_encoder is None:
        raise ValueError("embedder.kind is 'baseline' but no baseline image encoder was given; pass the tagger's "
                         "encoder or set embedder.kind: clip with embedder.model")
    return EncoderEmbedder(baseline_encoder, cfg, image_size=image_size)


# ---------------------------------------------------------------- a small pretrained stand-in for CLIP

CONV_CONFIG_FILE = "config.json"
CONV_WEIGHTS_FILE = "model.safetensors"
CONV_ARCHITECTURE = "conv-crop-encoder"


class ConvCropEncoder(torch.nn.Module):
    """A small conv net mapping crops [N, 3, S, S] to embeddings [N, D]: conv-BN-ReLU blocks with 2x2
    max-pooling, then a global max pool (a shape is where its edges respond most) and a linear map.
    The offline demo's stand-in for CLIP's pretrained image tower (`clean.embedder.kind: conv`),
    trained once by `ram-engine demo-embedder` on another generated world and shipped."""

    def __init__(self, image_size: int = 48, channels: Sequence[int] = (32, 64, 96, 128), dim: int = 64):
        super().__init__()
        self.config = {"architecture": CONV_ARCHITECTURE, "image_size": int(image_size),
                       "channels": [int(c) for c in channels], "dim": int(dim)}
        self.features = conv_blocks(channels)
        self.proj = torch.nn.Linear(int(channels[-1]), dim)

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(pixels).amax(dim=(2, 3)))

    def save_pretrained(self, folder) -> None:
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / CONV_WEIGHTS_FILE))
        (folder / CONV_CONFIG_FILE).write_text(json.dumps(self.config, indent=1))

    @classmethod
    def from_pretrained(cls, folder) -> "ConvCropEncoder":
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = json.loads((folder / CONV_CONFIG_FILE).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"embedder.model {folder}: no {CONV_CONFIG_FILE}; train one with "
                                    f"`ram-engine demo-embedder --out {folder}`") from None
        if config.get("architecture") != CONV_ARCHITECTURE:
            raise ValueError(f"embedder.model {folder}: {CONV_CONFIG_FILE} is not a {CONV_ARCHITECTURE} "
                             f"(architecture {config.get('architecture')!r})")
        model = cls(config["image_size"], config["channels"], config["dim"])
        model.load_state_dict(load_file(str(folder / CONV_WEIGHTS_FILE)))
        return model.eval()


def train_crop_embedder(model: ConvCropEncoder, crops: Sequence[Image.Image], labels: Sequence[int],
                        num_classes: int, *, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                        seed: int = 0, time_limit_s: float | None = None, log_every: int = 250, log=print) -> dict:
    """Train a crop encoder so that crops of one class embed close together: a cosine classifier over
    the L2-normalised embedding (the geometry the cleaning stage clusters in). Light augmentation:
    flips and a random crop of 80-100 % of each side."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    size = model.image_size
    classifier = torch.nn.Linear(model.config["dim"], num_classes, bias=False)
    opt = torch.optim.AdamW(list(model.parameters()) + list(classifier.parameters()), lr=lr, weight_decay=0.05)
    y_all = torch.as_tensor(list(labels), dtype=torch.long)

    def augment(im: Image.Image) -> Image.Image:
        w, h = im.size
        cw, ch = max(1, int(w * rng.uniform(0.8, 1.0))), max(1, int(h * rng.uniform(0.8, 1.0)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im

    def step_loss(step: int) -> torch.Tensor:
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = rng.integers(0, len(crops), batch_size)
        emb = torch.nn.functional.normalize(model(to_pixels([augment(crops[i]) for i in idx], size)), dim=-1)
        logits = 10.0 * emb @ torch.nn.functional.normalize(classifier.weight, dim=-1).t()
        return torch.nn.functional.cross_entropy(logits, y_all[idx])

    return fit_in_memory(model, opt, step_loss, steps=steps, name="embedder", time_limit_s=time_limit_s,
                         log_every=log_every, log=log, digits=3)


def nearest_centroid_accuracy(embeddings: np.ndarray, labels: Sequence[int], train: np.ndarray,
                              train_labels: Sequence[int]) -> float:
    """Share of embeddings whose nearest class centroid (cosine, from `train`) is their own class."""
    y, ty = np.asarray(labels), np.asarray(train_labels)
    classes = sorted(set(ty.tolist()))
    cent = np.stack([train[ty == c].mean(0) for c in classes])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    pred = np.asarray(classes)[np.argmax(embeddings @ cent.T, axis=1)]
    return float((pred == y).mean()) if len(y) else 0.0
