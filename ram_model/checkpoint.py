"""Checkpoints: the official RAM / RAM++ / Tag2Text .pth files, and our own safetensors folder.

Key mapping official → ours (the whole table; everything else has the same name and shape):

| official key                                   | ours                      | why |
|------------------------------------------------|---------------------------|-----|
| `vision_multi.*`                               | `tagging_head.*`          | legacy name in early RAM checkpoints (the reference loader renames it too) |
| `*.attn.relative_position_index`               | non-persistent buffer     | derived from the window; recomputed, dropped from files |
| `*.blocks.N.attn_mask`                         | non-persistent buffer     | derived from image size/window/shift; recomputed, dropped from files |
| `*.embeddings.position_ids`                    | non-persistent buffer     | arange(512); recomputed, dropped from files |
| `*.attn.relative_position_bias_table` (2w−1)²  | same key, resized         | bicubic interpolation when the file's window differs from the model's |

Shared tensors: `tagging_head.encoder.layer.{0,1}.{crossattention,intermediate,output}.*` are the same tensors as
`tag_encoder.encoder.layer.{0,1}.…` (RAM, Tag2Text), and `text_decoder.cls.predictions.{decoder.weight,bias}` are
`text_decoder.bert.embeddings.word_embeddings.weight` / `text_decoder.cls.predictions.decoder.bias`. Both names
exist in the state dict, as in the reference.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from .bert import BertConfig
from .labels import LabelSystem
from .ram import RAM, RAMConfig
from .swin import SwinConfig, interpolate_relative_position_bias

log = logging.getLogger(__name__)

RENAMES: list[tuple[str, str]] = [("vision_multi.", "tagging_head.")]
DERIVED_BUFFERS = ("relative_position_index", "attn_mask", "position_ids")


def is_derived(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in DERIVED_BUFFERS


def official_state_dict(model: RAM) -> dict[str, torch.Tensor]:
    """Our model's tensors under the reference names, derived buffers included (what the reference's
    state_dict() holds). Works on the meta device."""
    sd = dict(model.state_dict())
    for name, buf in model.named_buffers():
        if is_derived(name):
            sd[name] = buf
    return sd


def rename_official_key(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _read_lines(x) -> list[str] | None:
    if x is None:
        return None
    if isinstance(x, (str, Path)):
        return Path(x).read_text(encoding="utf-8").splitlines()
    return list(x)


def _count(sd, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict[str, torch.Tensor], variant: str = "auto", image_size: int = 384,
                 descriptions_per_tag: int = 51, num_tags: int | None = None) -> RAMConfig:
    """Build the RAMConfig of an official state dict from its shapes (head counts: the reference's)."""
    if variant == "auto":
        if "reweight_scale" in sd:
            variant = "ram_plus"
        elif "image_proj.weight" not in sd or "fc.W" in sd or "label_embed.weight" in sd:
            variant = "tag2text"
        else:
            variant = "ram"
    pe = sd.get("visual_encoder.patch_embed.proj.weight")
    if pe is None:
        raise ValueError("load_official: no visual_encoder.patch_embed.proj.weight — not a RAM-family checkpoint")
    depths = tuple(_count(sd, f"visual_encoder.layers.{s}.blocks.") for s in range(_count(sd, "visual_encoder.layers.")))
    heads = tuple(sd[f"visual_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1]
                  for s in range(len(depths)))
    rows = sd["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    file_window = (int(round(rows ** 0.5)) + 1) // 2
    window = {224: 7, 384: 12}.get(image_size, file_window)
    swin = SwinConfig(image_size=image_size, patch_size=pe.shape[-1], embed_dim=pe.shape[0], depths=depths,
                      num_heads=heads, window_size=window)
    hq = sd["tagging_head.encoder.layer.0.crossattention.self.query.weight"]
    hi = sd["tagging_head.encoder.layer.0.intermediate.dense.weight"]
    H = hq.shape[0]
    head = BertConfig(hidden_size=H, num_layers=_count(sd, "tagging_head.encoder.layer."), num_heads=4,
                      intermediate_size=hi.shape[0])
    text = None
    if "tag_encoder.embeddings.word_embeddings.weight" in sd:
        we = sd["tag_encoder.embeddings.word_embeddings.weight"]
        text = BertConfig(vocab_size=we.shape[0], hidden_size=we.shape[1],
                          num_layers=_count(sd, "tag_encoder.encoder.layer."), num_heads=max(1, we.shape[1] // 64),
                          intermediate_size=sd["tag_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                          max_position_embeddings=sd["tag_encoder.embeddings.position_embeddings.weight"].shape[0])
        head.vocab_size = text.vocab_size
    if variant == "tag2text":
        n = sd["label_embed.weight"].shape[0]
        return RAMConfig(variant=variant, swin=swin, num_tags=n, head=head, text=text)
    le = sd["label_embed"]
    per = descriptions_per_tag if variant == "ram_plus" else 1
    n = num_tags if num_tags is not None else le.shape[0] // per
    if n * per != le.shape[0]:
        raise ValueError(f"load_official: label_embed has {le.shape[0]} rows, not {n}·{per} (tags·descriptions)")
    return RAMConfig(variant=variant, swin=swin, num_tags=n, label_dim=le.shape[1], descriptions_per_tag=per,
                     head=head, text=text)


def load_official(path_or_state_dict, variant: str = "auto", config: RAMConfig | None = None,
                  image_size: int = 384, tags: Sequence[str] | str | Path | None = None,
                  thresholds: Sequence[float] | str | Path | None = None, tokenizer=None,
                  strict: bool = True, map_location="cpu") -> RAM:
    """Load an official RAM / RAM++ / Tag2Text checkpoint (torch .pth with a "model" key, or a raw state dict).

    variant: "auto" (from the keys), "ram", "ram_plus" or "tag2text". config: our RAMConfig to build
    (default: inferred from the tensors at `image_size`, relative-position tables interpolated to its
    window). tags / thresholds: lists or text files (one per line), e.g. reference ram_tag_list.txt and
    ram_tag_list_threshold.txt. Every tensor must find its place with its shape (strict); a model built
    without caption branch skips tag_encoder.* / text_decoder.* on purpose.
    """
    sd = read_official_state(path_or_state_dict, map_location)
    config, tag_list, thr = _card_of_state(sd, variant, config, image_size, tags, thresholds)
    # Built without a random init when every weight comes from the file (the init would be overwritten).
    skeleton_keys = _state_keys(config, tag_list, tokenizer)
    if skeleton_keys <= set(sd):
        model = RAM.without_init(config, device=map_location, tags=tag_list, tokenizer=tokenizer)
    else:
        model = RAM(config, tags=tag_list, tokenizer=tokenizer).to(map_location)
    own = model.state_dict()
    skipped = []
    if not config.has_caption:
        skipped = [k for k in sd if k.startswith(("tag_encoder.", "text_decoder."))]
        sd = {k: v for k, v in sd.items() if k not in skipped}
    fit_window_tables(sd, own)
    problems, mismatched = state_dict_problems(sd, own)
    if problems:
        msg = (f"load_official ({config.variant}, swin embed {config.swin.embed_dim}): " + "; ".join(problems) +
               ". Check the variant (ram / ram_plus / tag2text), vit and tag count.")
        if strict:
            raise ValueError(msg)
        log.warning(msg)
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in mismatched}, strict=False)
    if skipped:
        log.info("load_official: skipped %d caption-branch tensors (model built without caption branch)", len(skipped))
    model.class_threshold.copy_(torch.tensor(thr))
    return model


def read_official_state(path_or_state_dict, map_location="cpu") -> dict[str, torch.Tensor]:
    """An official checkpoint's tensors under our names (memory-mapped when read from a zip-format file)."""
    if isinstance(path_or_state_dict, dict):
        ckpt = path_or_state_dict
    else:
        ckpt = read_checkpoint(path_or_state_dict, map_location)
    sd = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict) else ckpt
    return {rename_official_key(k): v for k, v in sd.items() if not is_derived(k)}


def official_card(path_or_state_dict, variant: str = "auto", config: RAMConfig | None = None,
                  image_size: int = 384, tags: Sequence[str] | str | Path | None = None,
                  thresholds: Sequence[float] | str | Path | None = None) -> ModelCard:
    """The config, tag list and per-class thresholds load_official gives an official checkpoint (same
    arguments), read from its tensors' shapes without building the model: a memory-mapped file costs next
    to no memory here, where loading it costs the model's size."""
    return _card_of_state(read_official_state(path_or_state_dict), variant, config, image_size, tags, thresholds)


def _card_of_state(sd: dict[str, torch.Tensor], variant: str, config: RAMConfig | None, image_size: int,
                   tags, thresholds) -> ModelCard:
    """official_card of a state dict already read by read_official_state (load_official has one in hand)."""
    tag_list = _read_lines(tags)
    if config is None:
        config = infer_config(sd, variant, image_size, num_tags=len(tag_list) if tag_list else None)
    elif variant != "auto" and config.variant != variant:
        raise ValueError(f"load_official: variant {variant!r} but config.variant {config.variant!r}")
    thr = _read_lines(thresholds)
    if tag_list is None and thr is None and config.variant in ("ram", "ram_plus"):
        # the reference always applies its tag list and per-class threshold file to its own checkpoints
        tag_list, thr = reference_tags_and_thresholds(config.num_tags)
    if tag_list is None:
        tag_list = [f"tag_{i}" for i in range(config.num_tags)]     # RAM's names for unnamed tags
    if len(tag_list) != config.num_tags:
        raise ValueError(f"load_official: {len(tag_list)} tags given but the checkpoint has {config.num_tags}")
    if thr is not None:
        values = [float(x) for x in thr if str(x).strip() != ""]
        if len(values) != config.num_tags:
            raise ValueError(f"load_official: {len(values)} thresholds for {config.num_tags} tags")
    elif config.variant == "tag2text":
        values = tag2text_default_thresholds(tag_list).tolist()
    else:
        values = [config.default_threshold] * config.num_tags
    return ModelCard(config, list(tag_list), values)


def fit_window_tables(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Resize the file's relative-position tables to the model's window (in place)."""
    for k, v in list(sd.items()):
        if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            window = int(round(own[k].shape[0] ** 0.5) + 1) // 2
            sd[k] = interpolate_relative_position_bias(v, window)


def state_dict_problems(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """What keeps a file's tensors from filling a model (missing, unknown, other shapes), and the mismatched keys.
    `own` may live on the meta device (a check without memory)."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(sd) & set(own) if tuple(sd[k].shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} model keys not in the checkpoint, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint keys unknown to the model, e.g. {unexpected[:5]}")
    if mismatched:
        problems.append("shape mismatches: " + ", ".join(f"{k} file {tuple(sd[k].shape)} vs model "
                                                          f"{tuple(own[k].shape)}" for k in mismatched[:5]))
    return problems, mismatched


def read_checkpoint(path, map_location="cpu") -> dict:
    """A torch checkpoint's dict; memory-mapped when the file allows it (a 3 GB RAM .pth is not read
    into memory twice)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped: read them whole
            raise RuntimeError(f"load_official: cannot read {path} as a torch checkpoint: {e}") from e
    except Exception as e:
        raise RuntimeError(f"load_official: cannot read {path} as a torch checkpoint: {e}") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"load_official: cannot read {path} as a torch checkpoint: {e}") from e


def reference_tags_and_thresholds(num_tags: int) -> tuple[list[str] | None, list[str] | None]:
    """RAM's packaged tag list and per-class thresholds when a checkpoint has its 4,585 tags, else (None, None)."""

    ref = LabelSystem.default()
    if num_tags != len(ref):
        return None, None
    log.info("load_official: RAM's reference tag list and per-class thresholds (ram_model/data)")
    return list(ref.tags), [repr(x) for x in ref.thresholds]


def _state_keys(config: RAMConfig, tags, tokenizer) -> set[str]:
    """The parameter names a model of `config` holds (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return set(RAM(config, tags=tags, tokenizer=tokenizer).state_dict())


TAG2TEXT_THRESHOLD = 0.68
TAG2TEXT_PERSON_THRESHOLD = {"person": 0.7, "man": 0.7, "woman": 0.7}
# reference default delete_tag_index (by name): counting words and ambiguous tags never emitted
TAG2TEXT_DELETED = ("quarter", "back", "two", "three", "four", "five", "one")


def tag2text_default_thresholds(tags: Sequence[str]) -> torch.Tensor:
    """Tag2Text's inference defaults as thresholds: 0.68, person/man/woman 0.7, and the reference's
    deleted tags disabled with a threshold above 1 (sigmoid never exceeds it)."""
    thr = torch.full((len(tags),), TAG2TEXT_THRESHOLD)
    for i, t in enumerate(tags):
        if t in TAG2TEXT_PERSON_THRESHOLD:
            thr[i] = TAG2TEXT_PERSON_THRESHOLD[t]
        elif t in TAG2TEXT_DELETED:
            thr[i] = 2.0
    return thr


# our own format ------------------------------------------------------------------------------------------
def _deduplicated_state(model: RAM) -> dict[str, torch.Tensor]:
    """The state dict with each shared (tied) tensor once, under its first name in sorted order: the
    same weights always give the same file bytes."""
    sd = model.state_dict()
    groups: dict[tuple, list[str]] = {}
    for name in sorted(sd):
        t = sd[name]
        ident = (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        groups.setdefault(ident, []).append(name)
    return dict(sorted((names[0], sd[names[0]].contiguous()) for names in groups.values()))


def save_pretrained(model: RAM, directory: str | Path) -> None:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "model.safetensors.tmp"
    tensors = _deduplicated_state(model)
    # No alias map in the header: safetensors writes metadata in hash order, which would change the bytes;
    # loading finds the shared names from the model itself.
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2), encoding="utf-8")
    (d / "tags.txt").write_text("\n".join(model.tags), encoding="utf-8")
    (d / "thresholds.txt").write_text("\n".join(repr(float(x)) for x in model.class_threshold.cpu()), encoding="utf-8")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(d / "tokenizer"))


MODEL_CARD_FILES = ("config.json", "tags.txt", "thresholds.txt")


class ModelCard(NamedTuple):
    config: RAMConfig
    tags: list[str]
    thresholds: list[float]


def read_model_card(directory: str | Path) -> ModelCard:
    """A save_pretrained folder's config, tag list and per-class thresholds, without its weights (what a
    stage that only maps tags or reads thresholds needs: a few KB instead of the 1.9 GB model)."""
    d = Path(directory)
    for name in MODEL_CARD_FILES:
        if not (d / name).exists():
            raise FileNotFoundError(f"{d / name} is missing (save_pretrained writes {', '.join(MODEL_CARD_FILES)})")
    config = RAMConfig.from_dict(json.loads((d / "config.json").read_text(encoding="utf-8")))
    tags = (d / "tags.txt").read_text(encoding="utf-8").split("\n")
    thresholds = [float(x) for x in (d / "thresholds.txt").read_text(encoding="utf-8").split("\n")]
    if len(tags) != len(thresholds):
        raise ValueError(f"{d}: tags.txt has {len(tags)} tags but thresholds.txt {len(thresholds)} values")
    return ModelCard(config, tags, thresholds)


def from_pretrained(directory: str | Path, map_location="cpu") -> RAM:
    d = Path(directory)
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"from_pretrained: {d / 'model.safetensors'} is missing (written by save_pretrained)")
    config, tags, thresholds = read_model_card(d)
    tokenizer = None
    if (d / "tokenizer").exists():
        from transformers import BertTokenizerFast

        tokenizer = BertTokenizerFast.from_pretrained(str(d / "tokenizer"))
    # no random init: every weight is in the file (load_model is strict)
    model = RAM.without_init(config, device=map_location, tags=tags, thresholds=thresholds, tokenizer=tokenizer)
    read_weights_into(model, d / "model.safetensors")
    return model.eval()   # ready for inference (BatchNorm's running statistics, no dropout); train() to fine-tune


def read_weights_into(model: RAM, path: str | Path) -> None:
    """Every tensor of a save_pretrained file copied into its place in `model`, one at a time: the weights
    are never held twice (a whole-file state dict next to the model would double a Swin-L's 1.9 GB). Strict:
    the file's names must be the model's (each tied tensor once) with the model's shapes."""
    from safetensors import safe_open

    places = model.state_dict()      # detached views of the parameters: copying into them fills the model
    expected = set(_deduplicated_state(model))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = set(f.keys())
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise ValueError(f"{path}: the weights do not match the model of its config.json "
                             f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                             f"unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}); the file was not written "
                             f"by save_pretrained for this config")
        with torch.no_grad():
            for name in sorted(names):
                tensor = f.get_tensor(name)
                if tensor.shape != places[name].shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's config.json "
                                     f"gives {tuple(places[name].shape)}")
                places[name].copy_(tensor)
                del tensor


IMAGE_ENCODER_PREFIXES = ("visual_encoder.", "image_proj.")


def load_image_encoder(model: RAM, directory: str | Path) -> int:
    """Copy the image encoder (Swin + image_proj) of a model saved by save_pretrained into `model`, leaving
    its tagging head as it is: a pretrained encoder under a new head, as RAM starts from a pretrained
    backbone. Returns the number of tensors copied. Raises when the file is missing or its encoder does
    not fit `model`'s (another Swin size or image size), naming the first mismatching tensors."""
    from safetensors import safe_open

    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"load_image_encoder: {path} is missing; model.encoder_init must name a folder "
                                f"written by save_pretrained (e.g. `ram-engine demo-encoder`)")
    with safe_open(str(path), framework="pt", device="cpu") as f:   # the encoder's tensors only, not the head's
        saved = {k: f.get_tensor(k) for k in f.keys() if k.startswith(IMAGE_ENCODER_PREFIXES)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(IMAGE_ENCODER_PREFIXES)}
    missing = sorted(set(own) - set(saved))
    wrong = sorted(k for k in set(own) & set(saved) if own[k].shape != saved[k].shape)
    unexpected = sorted(set(saved) - set(own))
    if missing or wrong or unexpected or not saved:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("other shape", [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}"
                                                                for k in wrong])) if keys)
        raise ValueError(f"load_image_encoder: the image encoder in {path} does not fit this model "
                         f"({detail or 'no encoder tensors in the file'}); model.preset, model.image_encoder and "
                         f"model.image_size must match the encoder's (its config.json)")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)
    return len(saved)
