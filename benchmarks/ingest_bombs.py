"""Peak memory and time of ingest on hostile sources (container bombs, header bombs, a huge Parquet cell, a caption
of combining marks), against what reading them plainly costs, in one run.

    python benchmarks/ingest_bombs.py [--member-mib 1536] [--caption-mib 256] [--longname-mib 512]
                                      [--cell-mib 1024] [--timeout 120]

Each case runs in a child process and reports its peak RSS (ru_maxrss of the child) and wall time:
  baseline  what the source costs read plainly: Python's stream tarfile reading every member whole (what ingest-1
            did, and what ingest-4's stream reader did for headers), pyarrow reading the Parquet file in batches,
            unicodedata.normalize on the caption. A baseline that does not end within --timeout is killed and
            reported as such.
  ours      the ingest stage (`tasks.stages.ingest.STAGE` through the runner) with the default limits (max_image_bytes 64 MiB, max_caption_bytes 4 MiB,
            max_header_bytes 1 MiB): the hostile member, header, cell or caption is rejected, counted, unread.
Cases: a gzip tar with one image member of --member-mib MiB of zeros; a tar whose .txt caption is --caption-mib MiB;
a gzip tar whose GNU long-name header holds --longname-mib MiB; a tar with a PAX header `size=` of 40 digits; an
img2dataset parquet shard (a few KiB on disk) with one image cell of --cell-mib MiB; a folder whose caption is
1 MB of combining marks. `--against DIR` runs another checkout's ingest on each case as well (the code before a change). The last line is the
largest peak RSS of ours (the goal: under ~1 GB whatever the input). Peak RSS includes the interpreter and the
imports (~300 MiB for ingest's).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASELINE_TAR = """
import sys, tarfile
with tarfile.open(sys.argv[1], "r|*") as tar:
    n = 0
    for m in tar:
        if m.isfile():
            data = tar.extractfile(m).read()
            del data
            n += 1
print(f"{n} members read")
"""

BASELINE_PARQUET = """
import sys, pyarrow.parquet as pq
pf = pq.ParquetFile(sys.argv[1])
n = sum(b.num_rows for b in pf.iter_batches(batch_size=32, use_threads=False))
print(f"{n} rows read")
"""

BASELINE_NFC = """
import sys, json, unicodedata
caption = json.loads(open(sys.argv[1] + "/captions.jsonl").readline())["caption"]
print(len(unicodedata.normalize("NFC", caption)), "characters normalised")
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


def good_members() -> list[tuple[str, bytes]]:
    return [("ok.jpg", small_jpeg()), ("ok.txt", b"a red square")]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_member_bomb(path: Path, mode: str, big_name: str, big_bytes: int) -> None:
    with tarfile.open(path, mode, **({"compresslevel": 1} if mode == "w:gz" else {})) as tar:
        for name, data in good_members() + [("bomb.jpg", small_jpeg()), ("bomb.txt", b"a caption")]:
            if name != big_name:
                add(tar, name, data)
        info = tarfile.TarInfo(big_name)
        info.size = big_bytes
        with open("/dev/zero", "rb") as zeros:   # streamed, never all in memory
            tar.addfile(info, zeros)


def build_longname(path: Path, mib: int) -> None:
    """A GNU long-name header holding `mib` MiB of name (gzip: small on disk), then its member, then a good sample."""
    size = mib * 2**20
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, size
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(header.tobuf(format=tarfile.GNU_FORMAT))
        chunk = b"n" * 2**20
        for _ in range(mib):
            out.write(chunk)
        out.write(bytes(-size % 512))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            add(tar, "long.jpg", small_jpeg())
            for name, data in good_members():
                add(tar, name, data)
        out.write(buf.getvalue())


def build_pax_size(path: Path) -> None:
    """A PAX header whose `size=` has 40 digits before an ordinary member, then a good sample."""
    record = " size=" + "9" * 40 + "\n"
    record = f"{len(record) + len(str(len(record) + 2))}{record}".encode()
    pax = tarfile.TarInfo("./PaxHeaders/pax.jpg")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add(tar, "pax.jpg", small_jpeg())
        add(tar, "pax.txt", b"a caption")
        for name, data in good_members():
            add(tar, name, data)
    path.write_bytes(pax.tobuf(format=tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512) + buf.getvalue())


BUILD_CELL = """
import sys, pyarrow as pa, pyarrow.parquet as pq
mib = int(sys.argv[2])
pq.write_table(pa.table({"key": ["000000000"], "jpg": [bytes(mib * 2**20)], "caption": ["a red square"],
                         "status": ["success"]}), sys.argv[1] + "/00000.parquet", compression="zstd")
"""


def build_cell(folder: Path, mib: int) -> None:
    folder.mkdir()
    subprocess.run([sys.executable, "-c", BUILD_CELL, str(folder), str(mib)], check=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["000000001"], "jpg": [small_jpeg()], "caption": ["a red square"],
                             "status": ["success"]}), folder / "00001.parquet")


def build_marks(folder: Path) -> None:
    folder.mkdir()
    (folder / "marks.jpg").write_bytes(small_jpeg())
    (folder / "ok.jpg").write_bytes(small_jpeg())
    caption = "a" + "\u0301\u0316" * 250_000            # 1 MB of UTF-8, under max_caption_bytes (4 MiB)
    (folder / "captions.jsonl").write_text(json.dumps({"file": "marks.jpg", "caption": caption}) + "\n"
                                           + json.dumps({"file": "ok.jpg", "caption": "a red square"}) + "\n")


def peak_rss(code: str, timeout: float, *args: str) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, stdout) of a child python running `code`; stdout says so if it was killed."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"OMP_NUM_THREADS": "1"})
        killed = False
        while True:   # reaped here (not by Popen.wait), so that its rusage can be read
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout and not killed:
                proc.kill()
                killed = True
            time.sleep(0.05)
        proc.returncode = status   # reaped: Popen must not wait for it again
        out.seek(0)
        text = out.read().decode(errors="replace").strip().splitlines()
    seconds = time.perf_counter() - start
    if killed:
        return usage.ru_maxrss / 1024, seconds, f"did not end in {timeout:.0f} s: killed"
    if status:
        return usage.ru_maxrss / 1024, seconds, f"failed ({status}): {' | '.join(text[-3:])}"
    return usage.ru_maxrss / 1024, seconds, text[-1] if text else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--member-mib", type=int, default=1536)
    ap.add_argument("--caption-mib", type=int, default=256)
    ap.add_argument("--longname-mib", type=int, default=512)
    ap.add_argument("--cell-mib", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--against", help="another checkout (e.g. `git worktree add /tmp/old <commit>`): its ingest runs "
                                      "each case too, as a second baseline")
    args = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [
            (f"gzip tar, one image member of {args.member_mib} MiB",
             lambda p: build_member_bomb(p, "w:gz", "bomb.jpg", args.member_mib * 2**20), "bomb.tar.gz", BASELINE_TAR),
            (f"tar, one .txt caption of {args.caption_mib} MiB",
             lambda p: build_member_bomb(p, "w", "bomb.txt", args.caption_mib * 2**20), "caption.tar", BASELINE_TAR),
            (f"gzip tar, a GNU long-name header of {args.longname_mib} MiB", lambda p: build_longname(p, args.longname_mib),
             "longname.tar.gz", BASELINE_TAR),
            ("tar, a PAX header size= of 40 digits", build_pax_size, "pax.tar", BASELINE_TAR),
            (f"img2dataset parquet, one image cell of {args.cell_mib} MiB", lambda p: build_cell(p, args.cell_mib),
             "cell", BASELINE_PARQUET),
            ("image folder, a caption of 1 MB of combining marks", build_marks, "marks", BASELINE_NFC),
        ]
        for title, build, name, baseline in cases:
            src = tmp / name
            build(src)
            on_disk = sum(p.stat().st_size for p in ([src] if src.is_file() else src.rglob("*")))
            print(f"{title}: {on_disk / 2**10:.0f} KiB on disk", flush=True)
            target = str(src / "00000.parquet") if name == "cell" else str(src)
            base_rss, base_s, base_out = peak_rss(baseline, args.timeout, target)
            ours_rss, ours_s, out = peak_rss(OURS, args.timeout, str(src), str(tmp / f"store-{name}"), str(ROOT))
            print(f"  baseline: peak RSS {base_rss:8.1f} MiB, {base_s:6.1f} s   {base_out}")
            if args.against:
                old_rss, old_s, old_out = peak_rss(OURS, args.timeout, str(src), str(tmp / f"old-store-{name}"),
                                                   str(Path(args.against).resolve()))
                print(f"  against : peak RSS {old_rss:8.1f} MiB, {old_s:6.1f} s   {old_out}")
            print(f"  ours    : peak RSS {ours_rss:8.1f} MiB, {ours_s:6.1f} s   {out}", flush=True)
            worst = max(worst, ours_rss)
    print(f"largest peak RSS of ours: {worst:.0f} MiB")


if __name__ == "__main__":
    main()
