"""Open-vocabulary box detector for the grounding stage: Grounding DINO.

Default backend: transformers' `GroundingDinoForObjectDetection`, loaded from a local folder or a
hub id. Optional backend: the `groundingdino-py` package (imported lazily; it needs its own
environment, see docs/ground_clean.md).

The detector takes a batch of images, each with its own list of tags, and returns per image a list
of `Detection(tag_index, box, score)`: `tag_index` indexes that image's tag list, `box` is
x0, y0, x1, y1 in source pixels. A tag list longer than the text encoder's token budget is split
into chunks that are run separately and merged.

Also here: `build_tiny_detector` (a random-weight model with a small WordPiece vocabulary, for
tests and the offline demo), `train_detector` (short training on generated boxes) and
`evaluate_detector` (recall@1 and crop precision on samples with known boxes).
"""
from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .devices import resolve_device
from .settings import DetectorConfig  # noqa: F401  (the config section; re-exported where it is used)

# Token ids the transformers model hard-codes (bert-base-uncased positions): a custom vocabulary
# must put these tokens at exactly these ids.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, DOT_ID, QMARK_ID = 0, 100, 101, 102, 103, 1012, 1029


class Detection(NamedTuple):
    tag_index: int                          # index into the image's tag list
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels
    score: float




def clean_tag(tag: str) -> str:
    """Tags go into a '. '-separated prompt: lower-case them and drop the separators they may contain."""
    t = tag.strip().lower().replace(".", " ").replace("?", " ")
    t = " ".join(t.split())
    if not t:
        raise ValueError(f"tag {tag!r} is empty once '.' and '?' are removed; it cannot go into a detector prompt")
    return t


def prompt_text(tags: Sequence[str]) -> str:
    """The prompt string the tags make: ["cat", "dog"] -> "cat . dog ."."""
    return "".join(f"{clean_tag(t)} . " for t in tags).strip()


@dataclass
class _Chunk:
    image_index: int
    input_ids: list[int]
    spans: list[tuple[int, int, int]]   # (tag_index, first token, end token) per tag in this chunk


class GroundingDinoDetector:
    """Grounding DINO through transformers. Call `detect(images, tags_per_image)`."""

    def __init__(self, model, tokenizer, image_processor, cfg: DetectorConfig):
        self.device = str(resolve_device(cfg.device))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg
        model_max = int(model.config.max_text_len)
        self.max_tokens = min(cfg.max_text_tokens or model_max, model_max)
        self._token_cache: dict[str, list[int]] = {}

    # ---- loading ----
    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> "GroundingDinoDetector":
        if cfg.backend != "transformers":
            raise ValueError("GroundingDinoDetector is the transformers backend; use load_detector(cfg) for others")
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection, GroundingDinoImageProcessorPil
        src = cfg.require_model()
        try:
            model = GroundingDinoForObjectDetection.from_pretrained(src, local_files_only=cfg.local_files_only)
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=cfg.local_files_only)
            processor = GroundingDinoImageProcessorPil.from_pretrained(src, local_files_only=cfg.local_files_only)
        except OSError as e:
            hint = ("it is not a local folder and local_files_only=True forbids downloading; set detector.model to a "
                    "folder holding config.json, the weights, the tokenizer and preprocessor_config.json, or set "
                    "local_files_only: false on a machine that is online")
            raise OSError(f"cannot load the Grounding DINO detector from {src!r}: {e}\n{hint}") from e
        processor.size = {"shortest_edge": cfg.shortest_edge, "longest_edge": cfg.longest_edge}
        return cls(model, tokenizer, processor, cfg)

    def save(self, folder: str | Path) -> Path:
        """Write weights, config, tokenizer and image processor so `from_config` can load the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        return folder

    # ---- prompts ----
    def _tag_tokens(self, tag: str) -> list[int]:
        ids = self._token_cache.get(tag)
        if ids is None:
            ids = self.tokenizer(clean_tag(tag), add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"tag {tag!r} tokenises to nothing")
            self._token_cache[tag] = ids
        return ids

    def chunk_prompt(self, tags: Sequence[str], image_index: int = 0) -> list[_Chunk]:
        """Split one image's tags into prompts of at most `max_tokens` tokens ([CLS] t1 . t2 . ... [SEP])."""
        chunks: list[_Chunk] = []
        ids, spans = [CLS_ID], []
        for ti, tag in enumerate(tags):
            tok = self._tag_tokens(tag)
            need = len(tok) + 1  # the tag and its "."
            if 2 + need > self.max_tokens:
                tok = tok[: self.max_tokens - 3]  # a single over-long tag is truncated, not dropped
                need = len(tok) + 1
            if len(ids) + need + 1 > self.max_tokens:
                chunks.append(_Chunk(image_index, ids + [SEP_ID], spans))
                ids, spans = [CLS_ID], []
            spans.append((ti, len(ids), len(ids) + len(tok)))
            ids = ids + tok + [DOT_ID]
        if spans:
            chunks.append(_Chunk(image_index, ids + [SEP_ID], spans))
        return chunks

    # ---- inference ----
    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")

    @staticmethod
    def text_batch(chunks: Sequence[_Chunk]) -> dict[str, torch.Tensor]:
        n = max(len(c.input_ids) for c in chunks)
        ids = torch.zeros(len(chunks), n, dtype=torch.long)
        mask = torch.zeros(len(chunks), n, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : len(c.input_ids)] = torch.tensor(c.input_ids)
            mask[i, : len(c.input_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], tags_per_image: Sequence[Sequence[str]]) -> list[list[Detection]]:
        if len(images) != len(tags_per_image):
            raise ValueError(f"detect: {len(images)} images but {len(tags_per_image)} tag lists")
        chunks = [c for i, tags in enumerate(tags_per_image) for c in self.chunk_prompt(tags, i)]
        out: list[list[Detection]] = [[] for _ in images]
        pixels = None
        bs = self.cfg.batch_size
        for s in range(0, len(chunks), bs):
            batch = chunks[s: s + bs]
            # Images are preprocessed per batch of chunks: one image may appear in several chunks.
            idx = [c.image_index for c in batch]
            pixels = self.preprocess([images[i] for i in idx])
            text = self.text_batch(batch)
            dev = self.device
            res = self.model(pixel_values=pixels["pixel_values"].to(dev), pixel_mask=pixels["pixel_mask"].to(dev),
                             **{k: v.to(dev) for k, v in text.items()})
            probs = res.logits.sigmoid().float().cpu()      # [B, Q, max_text_len]
            boxes = res.pred_boxes.float().cpu()             # [B, Q, 4] cx, cy, w, h relative to the image
            for b, c in enumerate(batch):
                w, h = images[c.image_index].size
                out[c.image_index].extend(self._decode(probs[b], boxes[b], c, w, h))
        for dets in out:
            dets.sort(key=lambda d: (d.tag_index, -d.score))
        return out

    def _decode(self, probs: torch.Tensor, boxes: torch.Tensor, chunk: _Chunk, w: int, h: int) -> list[Detection]:
        # Per query and tag: the best score over the tag's tokens (the original model's phrase scoring).
        tag_scores = torch.stack([probs[:, a:e].max(dim=1).values for _, a, e in chunk.spans], dim=1)  # [Q, T]
        keep = tag_scores.max(dim=1).values > self.cfg.box_threshold
        if not keep.any():
            return []
        xyxy = torch.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                            boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], dim=1)
        xyxy = (xyxy * torch.tensor([w, h, w, h], dtype=xyxy.dtype)).clamp(min=0)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(max=w)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(max=h)
        dets = []
        for q in keep.nonzero().flatten().tolist():
            bx = tuple(float(v) for v in xyxy[q])
            if bx[2] - bx[0] < 1 or bx[3] - bx[1] < 1:
                continue  # degenerate after clipping: nothing to crop
            for j, (ti, _, _) in enumerate(chunk.spans):
                s = float(tag_scores[q, j])
                if s > self.cfg.text_threshold:
                    dets.append(Detection(ti, bx, s))
        return dets


def load_detector(cfg: DetectorConfig):
    """The detector the config names: transformers by default, groundingdino-py when asked."""
    if cfg.backend == "transformers":
        return GroundingDinoDetector.from_config(cfg)
    return GroundingDinoPyDetector(cfg)


class GroundingDinoPyDetector:
    """The optional `groundingdino-py` backend (original IDEA-Research code). Same `detect` contract.

    groundingdino-py replaces torch with a CUDA build and needs transformers < 5, so it lives in its own
    environment; nothing imports it unless `backend: groundingdino` is configured.
    """

    def __init__(self, cfg: DetectorConfig):
        try:
            from groundingdino.models import build_model
            from groundingdino.util.inference import predict
            from groundingdino.util.slconfig import SLConfig
            import groundingdino.datasets.transforms as gd_transforms
            try:  # its location moved between releases
                from groundingdino.util.utils import clean_state_dict
            except ImportError:
                from groundingdino.util.misc import clean_state_dict
        except ImportError as e:
            raise ImportError(
                "detector.backend is 'groundingdino' but the groundingdino-py package is not importable "
                f"({e}). Install it in its own environment (pip install 'ram-data-engine[groundingdino]'; it "
                "brings its own torch and needs transformers<5) or set detector.backend: transformers.") from e
        if not cfg.gd_config_file:
            raise ValueError("detector.gd_config_file must name groundingdino-py's model config (.py) for backend 'groundingdino'")
        self.cfg = cfg
        self._predict = predict
        self._transform = gd_transforms.Compose([
            gd_transforms.RandomResize([cfg.shortest_edge], max_size=cfg.longest_edge),
            gd_transforms.ToTensor(),
            gd_transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        args = SLConfig.fromfile(cfg.gd_config_file)
        self.device = str(resolve_device(cfg.device))
        args.device = self.device
        if cfg.gd_text_encoder:  # a local BERT folder: the model then builds offline
            args.text_encoder_type = cfg.gd_text_encoder
        model = build_model(args)
        ckpt = torch.load(cfg.require_model(), map_location="cpu")
        model.load_state_dict(clean_state_dict(ckpt.get("model", ckpt)), strict=False)
        self.model = model.eval().to(self.device)

    def detect(self, images, tags_per_image):
        out = []
        for im, tags in zip(images, tags_per_image):
            tensor, _ = self._transform(im.convert("RGB"), None)
            names = [clean_tag(t) for t in tags]
            boxes, logits, phrases = self._predict(self.model, tensor, prompt_text(tags), self.cfg.box_threshold,
                                                   self.cfg.text_threshold, device=self.device)
            w, h = im.size
            dets = []
            for b, s, p in zip(boxes.tolist(), logits.tolist(), phrases):
                # the package returns matched phrases as text: map each back to the tags it names
                for ti, name in enumerate(names):
                    if name == p or name in p.split(" "):
                        cx, cy, bw, bh = b
                        dets.append(Detection(ti, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                                                   (cy + bh / 2) * h), float(s)))
            out.append(sorted(dets, key=lambda d: (d.tag_index, -d.score)))
        return out


# ---------------------------------------------------------------- tiny model for tests and the demo

_SPECIALS = {PAD_ID: "[PAD]", UNK_ID: "[UNK]", CLS_ID: "[CLS]", SEP_ID: "[SEP]", MASK_ID: "[MASK]",
             DOT_ID: ".", QMARK_ID: "?"}


def write_tiny_vocab(words: Iterable[str], folder: str | Path, min_size: int = QMARK_ID + 1) -> Path:
    """A WordPiece vocab.txt with the special tokens at bert-base ids, the given words, and letters and
    digits (plus their ## forms) so any word still tokenises; padded with [unusedN] to `min_size`."""
    words = sorted({w for t in words for w in clean_tag(t).split()})
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789-'")
    pieces += ["##" + p for p in pieces]
    entries = [p for p in dict.fromkeys(words + pieces) if p not in _SPECIALS.values()]
    size = max(QMARK_ID + 1, min_size, len(entries) + len(_SPECIALS) + 1)
    vocab = [None] * size
    for i, t in _SPECIALS.items():
        vocab[i] = t
    it = iter(entries)
    for i in range(size):
        if vocab[i] is None:
            vocab[i] = next(it, None) or f"[unused{i}]"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder / "vocab.txt"


def tiny_detector_config(vocab_size: int, num_queries: int = 40):
    """The demo's tiny Grounding DINO (~2M params): Swin patch 4 embed 32 depths 1-1-2-1 window 4,
    1-layer BERT of width 64, d_model 64, 1 encoder and 2 decoder layers, two-stage, aux loss."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig
    backbone = SwinConfig(image_size=128, patch_size=4, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                          window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=256)
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=64, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=num_queries, num_feature_levels=4, two_stage=True, auxiliary_loss=True, max_text_len=256)


def build_tiny_detector(vocab: str | Path | Iterable[str], cfg: DetectorConfig | None = None, seed: int = 0,
                        image_size: int = 128, num_queries: int = 40) -> GroundingDinoDetector:
    """A random-weight tiny detector, built offline. `vocab` is a folder holding vocab.txt, or the tag
    list whose words make the vocabulary (written to a temporary folder)."""
    from transformers import BertTokenizerFast, GroundingDinoForObjectDetection, GroundingDinoImageProcessorPil
    if isinstance(vocab, (str, Path)) and Path(vocab).is_dir():
        folder = Path(vocab)
        if not (folder / "vocab.txt").exists():
            raise FileNotFoundError(f"build_tiny_detector: {folder} holds no vocab.txt")
    else:
        if isinstance(vocab, (str, Path)):
            raise FileNotFoundError(f"build_tiny_detector: vocab folder {vocab} does not exist (or pass a tag list)")
        folder = Path(tempfile.mkdtemp(prefix="tiny-gdino-vocab-"))
        write_tiny_vocab(vocab, folder)
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    for tid, tok in _SPECIALS.items():
        if tokenizer.convert_tokens_to_ids(tok) != tid:
            raise ValueError(f"vocab in {folder}: token {tok!r} must have id {tid} (Grounding DINO hard-codes it)")
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(tiny_detector_config(len(tokenizer), num_queries))
    processor = GroundingDinoImageProcessorPil(size={"shortest_edge": image_size, "longest_edge": image_size})
    cfg = cfg or DetectorConfig(model="<tiny>", shortest_edge=image_size, longest_edge=image_size,
                                box_threshold=0.25, text_threshold=0.2, batch_size=8)
    return GroundingDinoDetector(model, tokenizer, processor, cfg)


# ---------------------------------------------------------------- training (demo)

def _proposal_loss(model, outputs, labels, label_maps, text_mask) -> torch.Tensor:
    """Loss on the top-k encoder proposals with gradient kept (the original Grounding DINO's two-stage
    loss). transformers 5.x computes its encoder loss on detached boxes, so `enc_output`,
    `enc_output_norm` and `encoder_output_bbox_embed` would otherwise never learn."""
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss
    cfg = model.config
    cls = outputs.enc_outputs_class                   # [B, HW, max_text_len]
    coords = outputs.enc_outputs_coord_logits         # [B, HW, 4], not detached
    k = min(cfg.num_queries, cls.shape[1])
    top = torch.topk(cls.max(-1).values, k, dim=1).indices
    logits = torch.gather(cls, 1, top.unsqueeze(-1).expand(-1, -1, cls.shape[-1]))
    boxes = torch.gather(coords, 1, top.unsqueeze(-1).expand(-1, -1, 4)).sigmoid()
    matcher = GroundingDinoHungarianMatcher(class_cost=cfg.class_cost, bbox_cost=cfg.bbox_cost, giou_cost=cfg.giou_cost)
    crit = GroundingDinoImageLoss(matcher=matcher, focal_alpha=cfg.focal_alpha, losses=["labels", "boxes"])
    d = crit({"logits": logits, "pred_boxes": boxes, "label_maps": label_maps, "text_mask": text_mask}, labels)
    return 2.0 * d["loss_ce"] + cfg.bbox_loss_coefficient * d["loss_bbox"] + cfg.giou_loss_coefficient * d["loss_giou"]


def _targets(sample: dict, device) -> dict:
    w, h = sample["image"].size
    b = torch.tensor(sample["boxes"], dtype=torch.float32).reshape(-1, 4)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                          (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], dim=1)
    return {"class_labels": torch.tensor(sample["labels"], dtype=torch.long, device=device),
            "boxes": cxcywh.to(device)}


def train_detector(detector: GroundingDinoDetector, samples: Sequence[dict], steps: int, batch_size: int = 8,
                   lr: float = 3e-4, weight_decay: float = 1e-4, grad_clip: float = 0.1, proposal_loss: bool = True,
                   flip: bool = True, seed: int = 0, time_limit_s: float | None = None, log_every: int = 0,
                   log=print) -> dict[str, Any]:
    """Train the detector on samples with known boxes; returns {"steps", "seconds", "loss_first", "loss_last"}.

    Each sample: {"image": PIL image, "tags": [prompt tags], "boxes": [[x0, y0, x1, y1] pixels],
    "labels": [index into tags per box]}. Boxes go to the model as normalised cx, cy, w, h and labels as
    the class index within the prompt. Stops after `steps` or `time_limit_s`, whichever comes first.
    """
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask
    if not samples:
        raise ValueError("train_detector: no samples")
    for i, s in enumerate(samples[:50]):
        if len(s["boxes"]) != len(s["labels"]) or any(not 0 <= l < len(s["tags"]) for l in s["labels"]):
            raise ValueError(f"train_detector: sample {i} needs one label (an index into its tags) per box")
    model, dev = detector.model, detector.device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    t0, losses, step = time.perf_counter(), [], 0
    while step < steps and (time_limit_s is None or time.perf_counter() - t0 < time_limit_s):
        # cosine decay over whichever budget runs out first: steps or time
        progress = step / steps
        if time_limit_s:
            progress = max(progress, (time.perf_counter() - t0) / time_limit_s)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        batch = [samples[rng.randrange(len(samples))] for _ in range(batch_size)]
        if flip:  # horizontal flip: boxes mirror
            batch = [_flip(s) if rng.random() < 0.5 else s for s in batch]
        chunks = []
        for i, s in enumerate(batch):
            cs = detector.chunk_prompt(s["tags"], i)
            if len(cs) != 1:
                raise ValueError(f"train_detector: a training prompt must fit one chunk ({detector.max_tokens} tokens); "
                                 f"{len(s['tags'])} tags do not")
            chunks.extend(cs)
        pix = detector.preprocess([s["image"] for s in batch])
        text = {k: v.to(dev) for k, v in detector.text_batch(chunks).items()}
        labels = [_targets(s, dev) for s in batch]
        out = model(pixel_values=pix["pixel_values"].to(dev), pixel_mask=pix["pixel_mask"].to(dev), labels=labels, **text)
        loss = out.loss
        if proposal_loss:
            lm = build_label_maps(out.logits, text["input_ids"])
            tm = build_text_mask(out.logits, text["attention_mask"])
            loss = loss + _proposal_loss(model, out, labels, lm, tm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            log(f"detector step {step}/{steps} loss {np.mean(losses[-log_every:]):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    n = max(1, min(20, len(losses) // 5))
    return {"steps": step, "seconds": time.perf_counter() - t0,
            "loss_first": float(np.mean(losses[:n])), "loss_last": float(np.mean(losses[-n:]))}


def _flip(s: dict) -> dict:
    w = s["image"].size[0]
    return {**s, "image": s["image"].transpose(Image.FLIP_LEFT_RIGHT),
            "boxes": [[w - b[2], b[1], w - b[0], b[3]] for b in s["boxes"]]}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluate_detector(detector, samples: Sequence[dict], iou: float = 0.5) -> dict[str, float]:
    """recall@1: share of (image, tag with a true box) whose best box for that tag overlaps one of the
    tag's true boxes with IoU >= `iou`; `found`: share of those tags with any box above threshold."""
    hits = found = total = 0
    for s0 in range(0, len(samples), detector.cfg.batch_size):
        batch = samples[s0: s0 + detector.cfg.batch_size]
        dets = detector.detect([s["image"] for s in batch], [s["tags"] for s in batch])
        for s, ds in zip(batch, dets):
            for ti in set(s["labels"]):
                total += 1
                mine = [d for d in ds if d.tag_index == ti]
                if not mine:
                    continue
                found += 1
                best = max(mine, key=lambda d: d.score)
                truth = [b for b, l in zip(s["boxes"], s["labels"]) if l == ti]
                hits += any(box_iou(best.box, t) >= iou for t in truth)
    return {"recall_at_1": hits / max(1, total), "found": found / max(1, total), "pairs": float(total)}
