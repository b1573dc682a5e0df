"""GPU readiness: throughput of the production models next to their physical bound, in one script.

Measures, with random weights at the real sizes (built from config; nothing downloaded):
  * RAM Swin-L 384 tagging, bf16, batch 1 / 64 / 256 (images/s);
  * Grounding DINO tiny (grounding-dino-tiny's config) at 800x800 with a 10-tag prompt, bf16, batch 1 / 8 / 32;
  * a RAM Swin-L 384 training step (tag + caption losses, AdamW, bf16 autocast), batch 32 (images/s).
Each figure is printed next to the physical bound: FLOPs per image (counted by torch's FlopCounterMode)
against the device's dense bf16 peak (--peak-tflops; H200: ~790). RAM Swin-L 384 is ~104 GFLOPs per image
for tagging, so an H200 bounds it at ~7,600 images/s; the goals are >= 3,000 tagging images/s and >= 50
Grounding DINO images/s on one H200. The LAST line is the tagging throughput at the largest batch as a
fraction of that bound.

    python benchmarks/gpu.py                          # one GPU, under 8 minutes
    python benchmarks/gpu.py --device cpu --quick     # CPU, toy sizes: proves the script runs (CI)
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Seconds per call of `fn` (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def peak_flops(device: torch.device, given_tflops: float | None) -> tuple[float, str]:
    """The bound's denominator: the given dense bf16 peak, else a large bf16 matmul measured here."""
    if given_tflops:
        return given_tflops * 1e12, f"given peak {given_tflops:.0f} TFLOP/s"
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    dt = timed(lambda: a @ a, device, reps=10 if device.type == "cuda" else 3)
    return 2 * n**3 / dt, f"measured bf16 matmul {2 * n**3 / dt / 1e12:.2f} TFLOP/s"


def caption_tokenizer(quick: bool):
    """A bert-base-uncased-shaped tokenizer (30,522 WordPiece ids + [DEC] [ENC]) built offline from RAM's tag
    words; toy-sized with --quick."""
    import tempfile

    from transformers import BertTokenizerFast

    from ram_model.detector import write_tiny_vocab
    from ram_model.labels import LabelSystem
    from ram_model.tokenizer import add_ram_special_tokens

    folder = tempfile.mkdtemp(prefix="bench-vocab-")
    write_tiny_vocab(LabelSystem.default().tags[:50 if quick else None], folder, min_size=0 if quick else 30522)
    return add_ram_special_tokens(BertTokenizerFast.from_pretrained(folder))


def ram_model(quick: bool, with_caption: bool, tokenizer=None):
    from ram_model.ram import RAM, RAMConfig

    torch.manual_seed(0)
    vocab = len(tokenizer) if tokenizer is not None else 400
    if quick:
        config = RAMConfig.tiny(num_tags=4585, vocab_size=vocab, image_size=64, with_caption=with_caption)
        return RAM(config, tokenizer=tokenizer), 64
    config = RAMConfig.ram("swin_l", 384, with_caption=with_caption)
    return RAM.without_init(config, tokenizer=tokenizer), 384   # random values do not change the speed


def bench_tagging(device, peak, quick: bool, compile_: bool) -> tuple[float, float]:
    model, size = ram_model(quick, with_caption=False)
    model = model.to(device).eval()
    model.config.channels_last = device.type == "cuda"
    step = torch.compile(model) if compile_ else model
    per_image = flops_of(lambda: model(torch.randn(1, 3, size, size, device=device))) / 1
    bound = peak / per_image
    print(f"RAM {'tiny' if quick else 'Swin-L 384'} tagging: {per_image / 1e9:.1f} GFLOP/image, "
          f"bound {bound:,.0f} images/s")
    best = 0.0
    for bs in ((1, 2, 4) if quick else (1, 64, 256)):
        x = torch.randn(bs, 3, size, size, device=device)
        if model.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode(), autocast(device):
                torch.sigmoid(step(x).float())

        reps = 3 if quick else (20 if bs == 1 else 5)
        ips = bs / timed(run, device, reps=reps, warmup=2)
        best = ips
        print(f"  batch {bs:>3}: {ips:,.1f} images/s  ({ips / bound:.3f} of bound)")
    del model, step
    return best, bound


def bench_detector(device, peak, quick: bool) -> None:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    from ram_model.detector import tiny_detector_config

    torch.manual_seed(0)
    config = tiny_detector_config(vocab_size=30522) if quick else GroundingDinoConfig()
    with torch.device(device):  # built on the device: its init runs there (seconds on a GPU)
        model = GroundingDinoForObjectDetection(config).eval()
    size = 128 if quick else 800
    text_len = 32  # a 10-tag prompt: "dog . cat . ... ." plus [CLS]/[SEP]

    def inputs(bs):
        ids = torch.randint(1000, 2000, (bs, text_len), device=device)
        ids[:, 0], ids[:, -1] = 101, 102
        ids[:, 3::3] = 1012  # tag separators "."
        return {"pixel_values": torch.randn(bs, 3, size, size, device=device), "input_ids": ids,
                "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                "pixel_mask": torch.ones(bs, size, size, dtype=torch.long, device=device)}

    x1 = inputs(1)
    with torch.inference_mode():
        per_image = flops_of(lambda: model(**x1))
    bound = peak / per_image
    print(f"Grounding DINO {'toy' if quick else 'tiny'} at {size}x{size}: {per_image / 1e9:.1f} GFLOP/image, "
          f"bound {bound:,.0f} images/s")
    for bs in ((1, 2) if quick else (1, 8, 32)):
        x = inputs(bs)

        def run():
            with torch.inference_mode(), autocast(device):
                model(**x)

        ips = bs / timed(run, device, reps=2 if quick else 5, warmup=1)
        print(f"  batch {bs:>3}: {ips:,.1f} images/s  ({ips / bound:.3f} of bound)")
    del model


def bench_training(device, peak, quick: bool) -> None:
    tok = caption_tokenizer(quick)
    model, size = ram_model(quick, with_caption=True, tokenizer=tok)
    if not quick:  # a real step needs finite weights: a cheap init instead of the slow truncated normal
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.ndim > 1 else p.zero_()
        model._reset_derived_buffers()
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5, fused=device.type == "cuda")
    bs = 4 if quick else 32
    tags = model.tags
    x = torch.randn(bs, 3, size, size, device=device)
    targets = torch.zeros(bs, model.config.num_tags, device=device)
    targets[:, :8] = 1.0
    caption_ids, caption_mask = model.tokenize_captions([f"a {tags[i]} and a {tags[i + 1]} on a table"
                                                         for i in range(bs)], device)

    def step():
        with autocast(device):
            loss = model.training_losses(x, targets, caption_ids=caption_ids, caption_mask=caption_mask)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    per_image = flops_of(step) / bs
    bound = peak / per_image
    ips = bs / timed(step, device, reps=2 if quick else 5, warmup=1)
    print(f"RAM {'tiny' if quick else 'Swin-L 384'} training step (tag + caption, AdamW, bf16), batch {bs}: "
          f"{ips:,.1f} images/s; {per_image / 1e9:.0f} GFLOP/image, bound {bound:,.0f} images/s "
          f"({ips / bound:.3f} of bound)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes and batches (CPU, CI)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of the device (default on CUDA: 790, an H200; else measured)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the tagger")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu --quick")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak_given = args.peak_tflops or (790.0 if device.type == "cuda" else None)
    peak, how = peak_flops(device, peak_given)
    print(f"device: {name}; {how}")
    best, bound = bench_tagging(device, peak, args.quick, args.compile)
    bench_detector(device, peak, args.quick)
    bench_training(device, peak, args.quick)
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"RAM tagging at the largest batch: {best:,.1f} images/s = {best / bound:.3f} of the physical bound "
          f"({bound:,.0f} images/s)")


if __name__ == "__main__":
    main()
