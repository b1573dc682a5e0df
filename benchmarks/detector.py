"""Benchmark: CPU images/s of Grounding DINO (transformers) with random weights.

--size real: the IDEA-Research/grounding-dino-tiny architecture (Swin-T backbone, BERT-base text
encoder, d_model 256, 6 encoder / 6 decoder layers, 900 queries; transformers' GroundingDinoConfig
defaults), images resized to shortest edge 800 as the real processor does. Expect seconds per image.
--size tiny: the demo's tiny detector (build_tiny_detector) at 128 px.

    python benchmarks/detector.py --size real --iters 2
    python benchmarks/detector.py --size tiny --iters 20
    python benchmarks/detector.py --train 300   # train the tiny detector for 300 s on generated shapes, report R@1

The last line printed is images/s at the largest batch.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ram_model.detector import DetectorConfig, GroundingDinoDetector, build_tiny_detector, write_tiny_vocab  # noqa: E402

TAGS = ["dog", "cat", "person", "car", "tree", "bicycle", "traffic light", "bench", "umbrella", "boat"]


def real_detector(shortest_edge: int) -> GroundingDinoDetector:
    from transformers import (BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessorPil)
    folder = Path(tempfile.mkdtemp(prefix="gdino-bench-vocab-"))
    write_tiny_vocab(TAGS, folder, min_size=30522)  # bert-base vocabulary size, same special-token ids
    tok = BertTokenizerFast.from_pretrained(folder)
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(GroundingDinoConfig())  # the grounding-dino-tiny architecture
    proc = GroundingDinoImageProcessorPil(size={"shortest_edge": shortest_edge, "longest_edge": 1333})
    return GroundingDinoDetector(model, tok, proc, DetectorConfig(model="<random>", shortest_edge=shortest_edge))


def image(i: int, size=(640, 480)) -> Image.Image:
    rng = np.random.default_rng(i)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = rng.integers(0, size[0] - 100), rng.integers(0, size[1] - 100)
        d.rectangle((int(x), int(y), int(x) + 90, int(y) + 80), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im


SHAPES = ["circle", "square", "triangle", "bar", "ring", "cross"]


def shape_scene(i: int, size: int = 128) -> dict:
    """A 128 px scene: textured background, 1-3 non-overlapping shapes of 22-48 px in random colours.
    Returns a train_detector sample whose prompt is every shape name."""
    rng = np.random.default_rng(i)
    bg = rng.integers(0, 256, 3)
    arr = np.clip(bg + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(20):
            s = int(rng.integers(22, 49))
            x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            b = [x, y, x + s, y + s]
            if all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in boxes):
                break
        else:
            continue
        c = tuple(int(v) for v in (255 - bg + rng.integers(-60, 60, 3)).clip(0, 255))
        k = int(rng.integers(len(SHAPES)))
        if k == 0:
            d.ellipse(b, fill=c)
        elif k == 1:
            d.rectangle(b, fill=c)
        elif k == 2:
            d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=c)
        elif k == 3:
            b = [x, y + s // 3, x + s, y + 2 * s // 3]
            d.rectangle(b, fill=c)
        elif k == 4:
            d.ellipse(b, outline=c, width=max(3, s // 6))
        else:
            d.rectangle([x + s // 3, y, x + 2 * s // 3, y + s], fill=c)
            d.rectangle([x, y + s // 3, x + s, y + 2 * s // 3], fill=c)
        boxes.append(b)
        labels.append(k)
    return {"image": im, "tags": SHAPES, "boxes": boxes, "labels": labels}


def train_run(seconds: float, threads: int) -> None:
    from ram_model.detector import evaluate_detector, train_detector
    torch.set_num_threads(threads)
    train = [shape_scene(i) for i in range(2000)]
    held = [shape_scene(100_000 + i) for i in range(200)]
    det = build_tiny_detector(SHAPES)
    det.cfg.box_threshold, det.cfg.text_threshold = 0.2, 0.2
    print(f"tiny detector, {len(train)} generated scenes, {len(SHAPES)} shape tags, training {seconds:.0f} s", flush=True)
    r = train_detector(det, train, steps=1_000_000, time_limit_s=seconds, batch_size=8, lr=3e-4, log_every=200)
    ev = evaluate_detector(det, held)
    print(f"trained {r['steps']} steps in {r['seconds']:.0f} s ({r['steps'] / r['seconds']:.1f} steps/s), loss "
          f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}", flush=True)
    print(f"held-out ({len(held)} scenes): tags found {ev['found']:.3f}, recall@1 (IoU>=0.5) {ev['recall_at_1']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("--iters", type=int, default=2, help="timed batches per batch size (after one warm-up)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", type=float, default=0, help="train the tiny detector for this many seconds instead")
    args = ap.parse_args()
    if args.train:
        train_run(args.train, args.threads)
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.size == "real":
        det, img_size = real_detector(800), (640, 480)
    else:
        det, img_size = build_tiny_detector(TAGS), (128, 128)
    det.cfg.batch_size = 64
    params = sum(p.numel() for p in det.model.parameters())
    print(f"{args.size}: {params / 1e6:.1f}M params, built in {time.perf_counter() - t0:.1f} s; images {img_size}, "
          f"prompt of {len(TAGS)} tags, {args.threads} torch thread(s)", flush=True)
    det.detect([image(0, img_size)], [TAGS])  # warm-up
    last = None
    for bs in (int(b) for b in args.batches.split(",")):
        times = []
        for it in range(args.iters):
            ims = [image(100 * bs + it * bs + j, img_size) for j in range(bs)]
            t = time.perf_counter()
            det.detect(ims, [TAGS] * bs)
            times.append(time.perf_counter() - t)
        per = np.median(times) / bs
        last = (bs, 1 / per)
        print(f"batch {bs}: {per:.3f} s/image, {1 / per:.2f} images/s (median of {args.iters})", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(f"images/s at batch {last[0]}: {last[1]:.3f}")


if __name__ == "__main__":
    main()
