"""Image → tensor transform without torchvision (PIL / numpy / torch).

Evaluation as in the reference: RGB → resize to (S, S) bilinear (aspect not kept) → [0,1] → ImageNet
mean/std. The reference trains with CLIP mean/std instead; `ImageTransform(..., stats="clip")` gives that.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTransform:
    """Image -> normalised float tensor [3, size, size].

    train=False: resize to size x size (RAM's eval transform). train=True: first a random resized crop
    (area in `scale`, aspect 3/4..4/3) and a horizontal flip with p 0.5, drawn from Python's `random`,
    which the training stream seeds per sample so augmentation replays exactly on resume.
    """

    def __init__(self, image_size: int, stats: str = "imagenet", train: bool = False,
                 scale: tuple[float, float] = (0.5, 1.0)):
        if stats not in ("imagenet", "clip"):
            raise ValueError(f"ImageTransform: stats must be 'imagenet' or 'clip', got {stats!r}")
        if image_size <= 0:
            raise ValueError(f"ImageTransform: image_size must be > 0, got {image_size}")
        self.size = image_size
        self.train = train
        self.scale = scale
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if stats == "imagenet" else (CLIP_MEAN, CLIP_STD)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def to_pil(self, img) -> Image.Image:
        if isinstance(img, Image.Image):
            return img.convert("RGB")
        if isinstance(img, torch.Tensor):
            img = img.detach().cpu()
            if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
                img = img.permute(1, 2, 0)
            img = img.numpy()
            if img.dtype != np.uint8:  # float tensors are taken as [0,1]
                img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        if isinstance(img, np.ndarray):
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
                raise ValueError(f"ImageTransform: expected an HxWxC image array, got shape {img.shape}")
            if img.dtype != np.uint8:
                img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, -1)
            return Image.fromarray(img).convert("RGB")
        raise TypeError(f"ImageTransform: unsupported image type {type(img).__name__}; give PIL, numpy or torch")

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        area = w * h
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = np.exp(random.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
                return x0, y0, x0 + cw, y0 + ch
        return 0, 0, w, h

    def __call__(self, img) -> torch.Tensor:
        pil = self.to_pil(img)
        if self.train:
            pil = pil.crop(self._crop_box(*pil.size))
            if random.random() < 0.5:
                pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pil = pil.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def batch(self, images: Sequence) -> torch.Tensor:
        return torch.stack([self(im) for im in images])
