"""Tagging-forward throughput of RAM (swin_b 384, random weights) on CPU, against torch's own matmul.

Prints images/s and achieved FLOP/s for batch 1 and 8; FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention). The LAST line is the
batch-8 FLOP/s as a fraction of a large fp32 matmul's FLOP/s measured in the same run (before and
after the model runs; the higher figure is used).

    python benchmarks/model.py [--threads N] [--bf16]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ram_model.ram import RAM, RAMConfig


def matmul_flops_per_s(n: int = 2048, reps: int = 10, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--bf16", action="store_true", help="also time CPU bf16 autocast")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RAM(RAMConfig.ram("swin_b", 384, with_caption=False)).eval()
    peak = matmul_flops_per_s()
    print(f"threads {torch.get_num_threads()}; torch fp32 matmul 2048³: {peak / 1e9:.1f} GFLOP/s")
    x1 = torch.randn(1, 3, 384, 384)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(x1)
    flops_per_image = fc.get_total_flops()
    print(f"tagging forward swin_b 384, 4585 tags: {flops_per_image / 1e9:.1f} GFLOP/image")
    frac = {}
    modes = [("fp32", False)] + ([("bf16", True)] if args.bf16 else [])
    for name, bf16 in modes:
        model.config.cpu_autocast_bf16 = bf16
        for bs in (1, 8):
            x = torch.randn(bs, 3, 384, 384)
            model.tag_probs(x[:1])  # warm-up
            t = time.perf_counter()
            model.tag_probs(x)
            dt = time.perf_counter() - t
            fl = flops_per_image * bs / dt
            frac[(name, bs)] = fl / peak
            print(f"{name} batch {bs}: {bs / dt:.2f} images/s, {fl / 1e9:.1f} GFLOP/s, "
                  f"{fl / peak:.2f} of fp32 matmul")
    # the machine is shared: take the better of the matmul figures before and after (conservative fraction)
    peak2 = matmul_flops_per_s()
    if peak2 > peak:
        print(f"torch fp32 matmul after the runs: {peak2 / 1e9:.1f} GFLOP/s (used as reference)")
    best = max(peak, peak2)
    print(f"fraction of matmul FLOP/s at batch 8 (fp32): {frac[('fp32', 8)] * peak / best:.2f}")


if __name__ == "__main__":
    main()
