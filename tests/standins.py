"""Stand-ins for the production model files, in their real formats, with seeded random weights.

No real weights can be downloaded here, so these build what a user downloads, from config:
- RAM's official checkpoint: a torch `.pth` holding {"model": state_dict} under the reference's keys and
  shapes (`official_state_dict`; tests/test_model.py matches them against the reference key listing);
- bert-base-uncased's tokenizer folder: a 30,522-token WordPiece vocab.txt with the special tokens at
  bert-base's ids (the words are RAM's tag words, not BERT's);
- a Grounding DINO transformers folder (config.json, model.safetensors, tokenizer files,
  preprocessor_config.json) with grounding-dino-tiny's configuration;
- a CLIP ViT-B/16 image-tower folder (config.json, model.safetensors).
`real=True` gives the real sizes (RAM Swin-L 384: 469M parameters; Grounding DINO tiny: 172M; CLIP
ViT-B/16); `real=False` the same formats at toy sizes for cheap tests.
"""
from __future__ import annotations

from pathlib import Path

import torch

BERT_VOCAB = 30522


def bert_tokenizer_folder(folder: Path, words) -> Path:
    from transformers import BertTokenizerFast

    from ram_model.detector import write_tiny_vocab

    write_tiny_vocab(words, folder, min_size=BERT_VOCAB)
    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
    return folder


def ram_checkpoint(path: Path, tags: list[str], real: bool, seed: int = 0, vocab_size: int = BERT_VOCAB + 2) -> Path:
    from ram_model.checkpoint import official_state_dict
    from ram_model.ram import RAM, RAMConfig

    torch.manual_seed(seed)
    config = (RAMConfig.ram("swin_l", 384, num_tags=len(tags)) if real else
              RAMConfig.tiny(num_tags=len(tags), vocab_size=vocab_size, image_size=64))
    model = RAM(config, tags=tags)
    torch.save({"model": official_state_dict(model)}, path)
    return path


def grounding_dino_folder(folder: Path, tokenizer_folder: Path, real: bool, seed: int = 0) -> Path:
    from transformers import BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection
    from transformers import GroundingDinoImageProcessorPil

    from ram_model.detector import tiny_detector_config

    tok = BertTokenizerFast.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(seed)
    # GroundingDinoConfig's defaults are grounding-dino-tiny's: Swin-T backbone, bert-base text encoder,
    # d_model 256, 6+6 layers, 900 queries
    config = GroundingDinoConfig() if real else tiny_detector_config(len(tok))
    model = GroundingDinoForObjectDetection(config)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    GroundingDinoImageProcessorPil().save_pretrained(str(folder))
    return folder


def clip_vision_folder(folder: Path, real: bool, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = (CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                               num_hidden_layers=12, num_attention_heads=12, projection_dim=512) if real else
              CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, projection_dim=16))
    CLIPVisionModelWithProjection(config).save_pretrained(str(folder))
    return folder


def production_files(root: Path, real: bool) -> dict[str, str]:
    """Every stand-in under `root` (built once; reused when present). Returns config overrides naming them."""
    from ram_model.labels import LabelSystem

    root.mkdir(parents=True, exist_ok=True)
    ref = LabelSystem.default()
    bert = root / "bert-base-uncased"
    if not (bert / "tokenizer_config.json").exists():
        bert_tokenizer_folder(bert, ref.tags)
    pth = root / "ram" / ("ram_swin_large_14m.pth" if real else "ram_tiny.pth")
    pth.parent.mkdir(parents=True, exist_ok=True)
    data = Path(__file__).resolve().parent.parent / "ram_model" / "data"
    for name in ("ram_tag_list.txt", "ram_tag_list_chinese.txt", "ram_tag_list_threshold.txt"):
        if not (pth.parent / name).exists():
            (pth.parent / name).write_bytes((data / name).read_bytes())
    if not pth.exists():
        tmp = pth.with_suffix(".tmp")
        ram_checkpoint(tmp, ref.tags, real)
        tmp.rename(pth)
    gdino = root / ("grounding-dino-tiny" if real else "grounding-dino-toy")
    if not (gdino / "preprocessor_config.json").exists():
        grounding_dino_folder(gdino, bert, real)
    clip = root / ("clip-vit-base-patch16" if real else "clip-toy")
    if not (clip / "config.json").exists():
        clip_vision_folder(clip, real)
    return {
        "generate.baseline": str(pth),
        "model.tokenizer": str(bert),
        "model.tag_list": str(pth.parent / "ram_tag_list.txt"),
        "model.tag_list_chinese": str(pth.parent / "ram_tag_list_chinese.txt"),
        "model.thresholds": str(pth.parent / "ram_tag_list_threshold.txt"),
        "model.image_size": "384" if real else "64",
        "ground.detector.model": str(gdino),
        "clean.embedder.kind": "clip",
        "clean.embedder.model": str(clip),
        "model.clip": "null",   # label embeddings of new tags: the stand-in CLIP has no text tower
    }
