"""Peak memory of ingest on container bombs, against reading members whole (ingest-1), in one run.

    python benchmarks/ingest_bombs.py [--member-mib 1536] [--caption-mib 256]

Builds a gzip-compressed tar holding one image member of `--member-mib` MiB of zeros (a few MiB on
disk) beside one good sample, and a plain tar whose .txt caption member is `--caption-mib` MiB. Each
case runs in a child process and reports its peak RSS (ru_maxrss of the child):
  baseline  streams the tar and reads every member whole, as ingest-1 did (`extractfile(m).read()`);
  ours      runs `tasks.stages.ingest.ingest` with the default limits (max_image_bytes 64 MiB,
            max_caption_bytes 4 MiB): the oversized member is rejected by its header, unread.
The last line is the largest ratio ours / baseline of peak RSS (lower is better).
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASELINE = """
import sys, tarfile
with tarfile.open(sys.argv[1], "r|*") as tar:
    for m in tar:
        if m.isfile():
            data = tar.extractfile(m).read()
            del data
"""

OURS = """
import sys
sys.path.insert(0, sys.argv[3])
from storage import Store
from tasks.engine.config import IngestConfig
from tasks.engine.runner import run
from tasks.stages.ingest import STAGE
v = run(STAGE, Store(sys.argv[2]), {"ingest": IngestConfig()}, {"source": sys.argv[1]}).version
m = v.manifest
reasons = sorted({r["reason"] for r in v.rejects().to_pylist()})
print(f"rows in {m['rows_in']}, out {m['rows_out']}, rejected {m['rows_rejected']} {reasons}")
"""


def small_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def build(path: Path, mode: str, big_name: str, big_bytes: int) -> None:
    with tarfile.open(path, mode, **({"compresslevel": 1} if mode == "w:gz" else {})) as tar:
        for name, data in (("ok.jpg", small_jpeg()), ("ok.txt", b"a red square"), ("bomb.jpg", small_jpeg()),
                           ("bomb.txt", b"a caption")):
            if name == big_name:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(big_name)
        info.size = big_bytes
        with open("/dev/zero", "rb") as zeros:   # streamed, never all in memory
            tar.addfile(info, zeros)


def peak_rss(code: str, *args: str) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, stdout) of a child python running `code`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"child failed ({status}): {out}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start, out.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--member-mib", type=int, default=1536)
    ap.add_argument("--caption-mib", type=int, default=256)
    args = ap.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("gzip tar, one image member of %d MiB" % args.member_mib, "bomb.tar.gz", "w:gz", "bomb.jpg",
                  args.member_mib), ("tar, one .txt caption of %d MiB" % args.caption_mib, "caption.tar", "w",
                                     "bomb.txt", args.caption_mib)]
        for title, fname, mode, big, mib in cases:
            src = Path(tmp) / fname
            build(src, mode, big, mib * 2**20)
            print(f"{title}: {src.stat().st_size / 2**20:.1f} MiB on disk")
            base_rss, base_s, _ = peak_rss(BASELINE, str(src))
            ours_rss, ours_s, out = peak_rss(OURS, str(src), str(Path(tmp) / f"store-{fname}"), str(ROOT))
            print(f"  baseline (members read whole): peak RSS {base_rss:8.1f} MiB, {base_s:6.1f} s")
            print(f"  ours (ingest, default limits): peak RSS {ours_rss:8.1f} MiB, {ours_s:6.1f} s   {out}")
            ratios.append(ours_rss / base_rss)
    print(f"largest peak-RSS ratio ours / baseline: {max(ratios):.3f}")


if __name__ == "__main__":
    main()
