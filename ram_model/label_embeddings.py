"""Open-vocabulary label embeddings from CLIP's text tower (transformers CLIPModel), prompt-ensembled.

Recipe of the reference's open-set builder: the tag name is normalised ('_' → ' ', '/' → ' or ', lower
case, trailing '.' removed), put into every prompt template, texts starting with "a"/"the" get
"This is " prepended, each text embedding is L2-normalised, the mean over templates is normalised
again → one vector per tag. RAM++ description embeddings are not averaged (one row per description).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# A subset of CLIP's published ImageNet prompt templates ({article} = a/an before the name).
DEFAULT_TEMPLATES = (
    "a photo of {article} {}.",
    "a photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of the {}.",
    "a close-up photo of the {}.",
    "a good photo of the {}.",
    "a low resolution photo of the {}.",
    "a photo of a large {}.",
    "a photo of a small {}.",
    "itap of {article} {}.",
    "art of the {}.",
)


def normalise_tag(name: str) -> str:
    n = name.replace("_", " ").replace("/", " or ").lower().strip()
    return n[:-1] if n.endswith(".") else n


def prompt_texts(tag: str, templates: Sequence[str]) -> list[str]:
    name = normalise_tag(tag)
    article = "an" if name[:1] in "aeiou" and name else "a"
    out = []
    for t in templates:
        text = t.replace("{article}", article).replace("{}", name)
        if text.startswith(("a ", "an ", "the ")):
            text = "This is " + text
        out.append(text)
    return out


def _load_clip(clip, tokenizer, device):
    from transformers import AutoTokenizer, CLIPModel

    if isinstance(clip, str):
        try:
            model = CLIPModel.from_pretrained(clip)
            tok = tokenizer or AutoTokenizer.from_pretrained(clip)
        except OSError as e:
            raise OSError(f"build_label_embeddings: cannot load CLIP from {clip!r} (local folder or hub id; the "
                          f"reference uses openai/clip-vit-base-patch16). Cause: {e}") from e
    else:
        model, tok = clip, tokenizer
        if tok is None:
            raise ValueError("build_label_embeddings: pass tokenizer= with a CLIPModel instance")
    return model.to(device).eval(), tok


@torch.inference_mode()
def encode_texts(texts: Sequence[str], clip, tokenizer=None, device="cpu", batch_size: int = 256) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (len(texts), D)."""
    model, tok = _load_clip(clip, tokenizer, device)
    max_len = getattr(model.config.text_config, "max_position_embeddings", 77)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt").to(device)
        feats = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


def build_label_embeddings(tags: Sequence[str], clip_path_or_id, templates: Sequence[str] | None = None,
                           tokenizer=None, device="cpu", batch_size: int = 256) -> torch.Tensor:
    """(len(tags), D) prompt-ensembled, normalised CLIP text embeddings — RAM's label_embed for `tags`.

    clip_path_or_id: local folder / hub id of a transformers CLIPModel, or a CLIPModel instance (then
    give `tokenizer`). Feed the result to RAM(..., label_embeddings=) or model.set_tags(tags, emb).
    """
    templates = list(templates or DEFAULT_TEMPLATES)
    if not tags:
        raise ValueError("build_label_embeddings: empty tag list")
    texts = [t for tag in tags for t in prompt_texts(tag, templates)]
    emb = encode_texts(texts, clip_path_or_id, tokenizer, device, batch_size)
    emb = emb.view(len(tags), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def build_description_embeddings(descriptions: dict[str, Sequence[str]], clip_path_or_id, tokenizer=None,
                                 device="cpu", batch_size: int = 256) -> tuple[list[str], torch.Tensor]:
    """RAM++: {tag: [D descriptions]} → (tags, (len(tags)·D, dim)) normalised, tag-major, not averaged.
    Every tag needs the same number of descriptions (the model infers D from the row count)."""
    counts = {len(v) for v in descriptions.values()}
    if len(counts) != 1:
        raise ValueError(f"build_description_embeddings: tags have different description counts {sorted(counts)}")
    tags = list(descriptions)
    texts = [d for t in tags for d in descriptions[t]]
    return tags, encode_texts(texts, clip_path_or_id, tokenizer, device, batch_size)
