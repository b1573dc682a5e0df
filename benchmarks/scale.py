"""What one more part costs at 100 / 1,000 / 10,000 parts: an increment through ingest and a later stage.

    python benchmarks/scale.py [--parts 100,1000,10000] [--keys 1000] [--stores local,s3]
                               [--code .] [--cache ~/.cache/ram-engine-scale]

For each size N the benchmark builds, once, a store holding an `images` version of N parts of `--keys` keys each
(10,000 x 1,000 = 10M keys) and the version of a later stage over it (`count`, the Stage contract's example,
tests/test_stage_contract.py), and keeps it in the cache folder (local; the S3 store is uploaded to a moto server
on loopback for each run, where a listing is a request). The `images` parts are written through the store's own
writer with small synthetic tables, under the identity the ingest of N source tars gives them (the parts' names,
source digests and config), so a real ingest reuses them; `count`'s first version is a real run of the stage.

Then, in a fresh process per measurement, the increment: one more source tar (10 small images) and
`ingest(store, cfg, source=[source folder, new tar])`, then `count` over the new images version. Printed per row:
seconds and peak memory above the process's memory before the call (VmHWM, reset before each call), and
the parts reused / written. After each measurement the new versions are removed again (the next one starts from
the same store). `--code DIR` runs the measurements against another checkout (`--code /work/main`: the code
before the fix); the cached stores are the same.

Each measurement is one run on a shared machine: compare rows of one table, not across machines.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# not this folder (benchmarks/storage.py would shadow the package); the code measured comes from PYTHONPATH
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


# --------------------------------------------------------------------------- the store, built once per size
def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), ((seed * 37) % 256, (seed * 11) % 256, 90)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_tar(path: Path, stem: str, images: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(images):
            for ext, data in (("jpg", _jpeg(i)), ("txt", f"a small red square {stem} {i}".encode())):
                info = tarfile.TarInfo(f"{stem}_{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def build(cache: Path, parts: int, keys: int) -> dict:
    """The source folder, the new tar and the local store of `parts` parts, cached per code version (a version's
    identity holds its code's: the store of one checkout is not reusable by another). Returns what was built."""
    import pyarrow as pa

    from storage import Store, digest, schemas
    from tasks.engine.config import IngestConfig
    from tasks.engine.runner import begin_run
    from tasks.stages.ingest import STAGE as INGEST
    from tests.test_stage_contract import COUNT, CountSection
    from tasks.engine.runner import run

    base = cache / f"{digest([INGEST.code_version(), COUNT.code_version()], 8)}-n{parts}-k{keys}"
    done = base / "built.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(base, ignore_errors=True)
    src, store_dir = base / "source", base / "store"
    t0 = time.perf_counter()
    for i in range(parts):   # one image per tar: the tars name the parts; the parts' rows are synthetic
        write_tar(src / f"{i:06d}.tar", f"s{i:06d}", 1)
    write_tar(base / "new" / "new.tar", "new", 10)
    store = Store(str(store_dir))
    run_, writer = begin_run(INGEST, store, {"ingest": IngestConfig()}, {"source": str(src)})
    tasks = run_.state["tasks"]
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for n, task in enumerate(tasks):
        rows = {"key": [f"k{n:06d}_{j:05d}" for j in range(keys)], "captions": [["a small red square"]] * keys,
                "width": [32] * keys, "height": [32] * keys, "format": ["jpeg"] * keys,
                "shard": [f"shards/{task.name}.tar"] * keys, "source": [f"{n:06d}.tar"] * keys,
                "source_key": [f"{j:05d}" for j in range(keys)]}
        rows |= {f.name: pa.nulls(keys, f.type) for f in schemas.IMAGES if f.name not in rows}
        writer.write_part(task.name, table=pa.Table.from_pydict(rows, schema=schemas.IMAGES), rows_in=keys,
                          samples=[{"__key__": f"k{n:06d}_00000", "jpg": TINY, "txt": "a small red square"}],
                          source_digest=task.source_digest)
    images = writer.commit(part_order=[t.name for t in tasks], extra=run_.extra)
    images_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = run(COUNT, store, {"count": CountSection(min_captions=2)}, {"images": images})
    count_s = time.perf_counter() - t0
    info = {"parts": parts, "keys": parts * keys, "folder": str(base), "plan_s": round(plan_s, 2), "images_s": round(images_s, 2),
            "count_first_s": round(count_s, 2), "images": images.id, "count": count.version.id}
    done.write_text(json.dumps(info))
    return info


TINY = b"\xff\xd8\xff\xd9"


# --------------------------------------------------------------------------- one measurement, in its own process
def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass


def measure(url: str, options: dict, source: str, new_tar: str) -> dict:
    """Run in a fresh process: ingest one more tar, then `count` over the new images version."""
    from storage import Store
    from tasks.engine.config import IngestConfig
    from tasks.engine.runner import run
    from tasks.stages.ingest import STAGE as INGEST
    from tests.test_stage_contract import COUNT, CountSection

    store = Store(url, **options)
    store.open("images")   # imports and first connection outside the measurement
    INGEST.code_version(), COUNT.code_version()   # per process, constant in the parts (seconds: every module parsed)
    import pyarrow as pa

    pa.Table.from_pylist([{"key": "x"}])   # its first call imports pandas' shims (2 s here): once per process
    out = {}
    _reset_peak()
    before, t0 = _rss_mb("VmRSS"), time.perf_counter()
    result = run(INGEST, store, {"ingest": IngestConfig()}, {"source": [source, new_tar]})
    out["ingest"] = {"s": time.perf_counter() - t0, "peak_mb": _rss_mb("VmHWM") - before,
                     "reused": result.parts_reused, "written": result.parts_written, "version": result.version.id}
    _reset_peak()
    before, t0 = _rss_mb("VmRSS"), time.perf_counter()
    result = run(COUNT, store, {"count": CountSection(min_captions=2)}, {"images": result.version})
    out["count"] = {"s": time.perf_counter() - t0, "peak_mb": _rss_mb("VmHWM") - before,
                    "reused": result.parts_reused, "written": result.parts_written, "version": result.version.id}
    return out


# --------------------------------------------------------------------------- S3 on loopback
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """A moto server on loopback in its own process (a listing is a request), with one bucket per store."""

    def __init__(self):
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                                      "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        self.options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint},
                        "skip_instance_cache": True, "use_listings_cache": False}

    def upload(self, local: Path, bucket: str) -> str:
        """The local store's files, without its part records (`_parts/`: committed versions are read from their
        manifests, and a fresh S3 store of the same versions would not need them)."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.mkdir(bucket)
        files = [p for p in local.rglob("*") if p.is_file() and "_parts" not in p.relative_to(local).parts]
        fs.put([str(p) for p in files], [f"{bucket}/store/{p.relative_to(local).as_posix()}" for p in files])
        return f"s3://{bucket}/store"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _snapshot(url: str, options: dict) -> dict:
    """The version folders and ref files of a store, to put it back after a measurement."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url, **options)
    refs = {p: fs.cat_file(p) for p in fs.find(f"{root}/_refs")}
    folders = {f"{root}/{s}/{v.rstrip('/').rsplit('/', 1)[-1]}" for s in ("images", "caption_counts")
               for v in fs.ls(f"{root}/{s}", detail=False)}
    return {"refs": refs, "folders": folders}


def _restore(url: str, options: dict, snap: dict) -> None:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url, **options)
    for stage in ("images", "caption_counts"):
        for v in fs.ls(f"{root}/{stage}", detail=False):
            if v.rstrip("/") not in snap["folders"]:
                fs.rm(v, recursive=True)
    for path, data in snap["refs"].items():
        fs.pipe_file(path, data)


def _env(code: Path) -> dict:
    return os.environ | {"PYTHONPATH": f"{code}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


def run_build(code: Path, cache: Path, parts: int, keys: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--build", "--parts", str(parts), "--keys", str(keys), "--cache",
                           str(cache)], env=_env(code), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_measurement(code: Path, url: str, options: dict, built: Path, timeout: float | None) -> dict:
    snap = _snapshot(url, options)
    env = _env(code)
    args = json.dumps([url, options, str(built / "source"), str(built / "new" / "new.tar")])
    profile = ["-m", "cProfile", "-o", os.environ["SCALE_PROFILE"]] if os.environ.get("SCALE_PROFILE") else []
    try:
        proc = subprocess.run([sys.executable, *profile, __file__, "--measure", args], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        _restore(url, options, snap)
        return {"timeout": timeout}
    _restore(url, options, snap)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="100,1000,10000")
    ap.add_argument("--keys", type=int, default=1000, help="keys per part")
    ap.add_argument("--stores", default="local,s3")
    ap.add_argument("--code", default=str(ROOT), help="the checkout whose storage/ and tasks/ are measured")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ram-engine-scale"))
    ap.add_argument("--timeout", type=float, help="stop a measurement (ingest + count) after this many seconds")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*json.loads(args.measure))))
        return
    if args.build:
        print(json.dumps(build(Path(args.cache), int(args.parts), args.keys)))
        return
    sys.path.insert(0, str(ROOT))
    cache = Path(args.cache)
    code = Path(args.code).resolve()
    s3 = S3() if "s3" in args.stores.split(",") else None
    rows = []
    try:
        for n in (int(p) for p in args.parts.split(",")):
            info = run_build(code, cache, n, args.keys)
            built = Path(info["folder"])
            print(f"# {n} parts, {info['keys']:,} keys: source planned in {info['plan_s']} s, images parts written in "
                  f"{info['images_s']} s, count's first run {info['count_first_s']} s (local)", flush=True)
            for where in args.stores.split(","):
                if where == "local":
                    url, options = str(built / "store"), {}
                    m = run_measurement(code, url, options, built, args.timeout)
                else:
                    t0 = time.perf_counter()
                    url, options = s3.upload(built / "store", f"scale-{n}"), s3.options
                    print(f"# uploaded to S3 in {time.perf_counter() - t0:.1f} s", flush=True)
                    m = run_measurement(code, url, options, built, args.timeout)
                row = (n, info["keys"], where, info["count_first_s"] if where == "local" else None, m)
                rows.append(row)
                print(_row(*row), "" if "timeout" in m else
                      f"  versions: images {m['ingest']['version']}, count {m['count']['version']}", flush=True)
    finally:
        if s3:
            s3.close()
    print()
    print(f"code: {code}")
    print(HEADER)
    for row in rows:
        print(_row(*row))


HEADER = ("| parts | keys | store | count first run s | ingest +1 s | ingest peak MB | ingest reused/written "
          "| count +1 s | count peak MB | count reused/written |\n|---|---|---|---|---|---|---|---|---|---|")


def _row(n: int, keys: int, where: str, first: float | None, m: dict) -> str:
    if "timeout" in m:
        return f"| {n:,} | {keys:,} | {where} | {first if first is not None else '-'} | stopped after {m['timeout']:.0f} s (ingest + count) |"
    i, c = m["ingest"], m["count"]
    return (f"| {n:,} | {keys:,} | {where} | {first if first is not None else '-'} | {i['s']:.2f} | "
            f"{i['peak_mb']:.0f} | {i['reused']}/{i['written']} | {c['s']:.2f} | {c['peak_mb']:.0f} | "
            f"{c['reused']}/{c['written']} |")


if __name__ == "__main__":
    main()
