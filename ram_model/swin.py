"""Swin Transformer image encoder of RAM, written for checkpoint compatibility with the reference.

Module and parameter names follow the reference state dict (`visual_encoder.*` in
`reference/ram_*_state_dict.txt`): patch_embed.{proj,norm}, layers.S.blocks.I.{norm1,attn,norm2,mlp},
layers.S.downsample.{norm,reduction}, norm. The derived buffers `relative_position_index` and
`attn_mask` are registered non-persistent: they are functions of the configuration, the reference
loader drops them from checkpoints too, and they change with the window / image size.

The encoder returns RAM's token layout: [mean of the final tokens ; final tokens], i.e.
(B, 1 + (H/32)·(W/32), C_out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SwinConfig:
    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1

    @property
    def out_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @classmethod
    def preset(cls, name: str, image_size: int = 384) -> "SwinConfig":
        """The reference variants: swin_b / swin_l at 224 (window 7) or 384 (window 12)."""
        if image_size not in (224, 384):
            raise ValueError(f"SwinConfig.preset: image_size must be 224 or 384 for the reference presets, got {image_size}")
        window = 7 if image_size == 224 else 12
        if name == "swin_b":
            return cls(image_size=image_size, embed_dim=128, num_heads=(4, 8, 16, 32), window_size=window)
        if name == "swin_l":
            return cls(image_size=image_size, embed_dim=192, num_heads=(6, 12, 24, 48), window_size=window)
        raise ValueError(f"SwinConfig.preset: unknown vit {name!r}; expected 'swin_b' or 'swin_l'")


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the (2·window−1)² bias table, row-major over (dy, dx)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), both offsets in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def interpolate_relative_position_bias(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """Resize a (2w−1)², heads bias table to another window with bicubic interpolation.

    The reference uses scipy's removed interp2d; a bicubic resize over the (2w−1)×(2w−1) grid of
    relative offsets is the same idea and keeps the centre (zero offset) aligned because both grids
    span the same symmetric range.
    """
    rows, heads = table.shape
    old = int(math.isqrt(rows))
    if old * old != rows:
        raise ValueError(f"relative_position_bias_table has {rows} rows, not a square (2w-1)^2")
    new = 2 * new_window - 1
    if old == new:
        return table
    grid = table.t().reshape(1, heads, old, old).float()
    out = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=True)
    return out.reshape(heads, new * new).t().contiguous().to(table.dtype)


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shifted_window_mask(H: int, W: int, w: int, shift: int) -> torch.Tensor:
    """(nW, w², w²) additive mask: −100 between tokens that came from different regions after the roll."""
    img = torch.zeros(1, H, W, 1)
    region = 0
    for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
        for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = region
            region += 1
    win = window_partition(img, w).squeeze(-1)  # (nW, w²)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def bias(self) -> torch.Tensor:
        n = self.window * self.window
        b = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return b.reshape(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        Bw, N, C = x.shape
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias().to(q.dtype).unsqueeze(0)  # (1, heads, N, N)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            # windows are batch-major: view as (B, nW, ...) so the (nW, heads, N, N) mask broadcasts over
            # the batch instead of being copied B times
            nW = mask.shape[0]
            q, k, v = (t.reshape(Bw // nW, nW, *t.shape[1:]) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask.to(q.dtype)[:, None])
            out = out.reshape(Bw, *out.shape[2:])
        return self.proj(out.transpose(1, 2).reshape(Bw, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp_ratio: float, dp: float):
        super().__init__()
        if resolution <= window:  # one window covers the map: no shifting (as in Swin)
            window, shift = resolution, 0
        self.resolution, self.window, self.shift, self.dp = resolution, window, shift, dp
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift > 0:
            self.register_buffer("attn_mask", shifted_window_mask(resolution, resolution, window, shift), persistent=False)
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H = W = self.resolution
        h = self.norm1(x).view(B, H, W, C)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, self.window), self.attn_mask), self.window, H, W)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(h.reshape(B, L, C), self.dp, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.dp, self.training)


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat in Swin's order (x00, x10, x01, x11) → LayerNorm(4C) → Linear(4C→2C, no bias)."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        r = self.resolution
        x = x.view(B, r, r, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(B, -1, 4 * C)))


class SwinStage(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, mlp_ratio, dps, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, dps[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        res = cfg.image_size // cfg.patch_size
        if cfg.image_size % (cfg.patch_size * 2 ** (len(cfg.depths) - 1)) != 0:
            raise ValueError(f"SwinConfig.image_size {cfg.image_size} must be divisible by patch_size·2^(stages-1)")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        dps = torch.linspace(0, cfg.drop_path, sum(cfg.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for s, depth in enumerate(cfg.depths):
            r = res // 2**s
            if r % min(cfg.window_size, r) != 0:
                raise ValueError(f"Swin stage {s}: resolution {r} is not a multiple of window {cfg.window_size}")
            start = sum(cfg.depths[:s])
            self.layers.append(SwinStage(cfg.embed_dim * 2**s, r, depth, cfg.num_heads[s], cfg.window_size,
                                         cfg.mlp_ratio, dps[start:start + depth], s < len(cfg.depths) - 1))
        self.norm = nn.LayerNorm(cfg.out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"SwinTransformer expects {self.cfg.image_size}×{self.cfg.image_size} images, got "
                             f"{tuple(images.shape[-2:])}; resize with ram_model.transforms.ImageTransform")
        x = self.patch_embed(images)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
