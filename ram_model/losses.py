"""RAM's training losses: asymmetric tagging loss, CLIP image-feature distillation, caption LM loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 7.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al.) as RAM uses it: negative SUM over batch × classes.

    Negatives: probability shifted by `clip` (easy negatives with p < clip cost nothing) and focused by
    (p_m)^gamma_neg; positives by (1−p)^gamma_pos. The focusing weight carries no gradient.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"asymmetric_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    x = logits.float()
    y = targets.float()
    p = torch.sigmoid(x)
    p_neg = 1 - p
    if clip and clip > 0:
        p_neg = (p_neg + clip).clamp(max=1)
    loss = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            pt = p * y + p_neg * (1 - y)
            w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        loss = loss * w
    return -loss.sum()


def clip_distillation_loss(image_cls: torch.Tensor, clip_image_embeds: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the projected pooled image token and (unnormalised) CLIP image features."""
    if image_cls.shape != clip_image_embeds.shape:
        raise ValueError(f"clip_distillation_loss: image token {tuple(image_cls.shape)} vs CLIP features "
                         f"{tuple(clip_image_embeds.shape)}; CLIP ViT-B/16 gives 512-d features")
    return F.l1_loss(image_cls.float(), clip_image_embeds.float())


def caption_lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy: logits (B,L,V) predict labels shifted by one; −100 labels are ignored."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    tgt = labels[:, 1:].reshape(-1)
    return F.cross_entropy(pred, tgt, ignore_index=-100, label_smoothing=label_smoothing)
