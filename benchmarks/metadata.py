"""What validating a manifest (storage/records.py) costs against parsing its JSON, by manifest size.

Every manifest read (`Store.read_manifest`: listings, `open`, lineage, reuse) parses the JSON and then
validates it; the named baseline is the JSON parse alone (`json.loads`, what was done before). Each line
prints both times and their ratio, measured in one run:

    python benchmarks/metadata.py [--parts 10 1000 10000]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import records  # noqa: E402


def manifest(n_parts: int) -> dict:
    """A manifest as `VersionWriter.commit` writes it: three files per part (table, shard, rejects)."""
    parts = []
    for i in range(n_parts):
        files = [{"path": f"clean/v1/{folder}/p{i:05d}.{ext}", "kind": kind, "rows": 100, "bytes": 1000,
                  "sha256": hashlib.sha256(f"{i}-{kind}".encode()).hexdigest()}
                 for folder, ext, kind in (("parts", "parquet", "table"), ("shards", "tar", "shard"),
                                           ("_rejects", "parquet", "rejects"))]
        parts.append({"name": f"p{i:05d}", "files": files, "rows_in": 100, "rows_out": 90, "rows_rejected": 10,
                      "source_digest": "s", "config_digest": "c", "metrics": {"kept": 90}, "shared_from": None})
    return {"format": 1, "stage": "clean", "version": "v1", "parents": ["regions/abc"], "config": {},
            "config_digest": "c", "input_digest": None, "code_version": "t", "created": "2026-01-01T00:00:00+00:00",
            "duration_s": 1.0, "rows_in": 100 * n_parts, "rows_out": 90 * n_parts, "rows_rejected": 10 * n_parts,
            "parts_written": n_parts, "parts_reused": 0, "schema": "key: string", "schema_ipc": "ff" * 100,
            "metrics": {}, "parts": parts, "files": [f for p in parts for f in p["files"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[10, 1000, 10000])
    args = parser.parse_args()
    for n in args.parts:
        text = json.dumps(manifest(n))
        reps = max(1, 2000 // n)
        start = time.perf_counter()
        for _ in range(reps):
            doc = json.loads(text)
        parsed = time.perf_counter()
        for _ in range(reps):
            records.parse_manifest(doc, "clean", "v1")
        validated = time.perf_counter()
        load_ms, check_ms = (parsed - start) / reps * 1e3, (validated - parsed) / reps * 1e3
        print(f"{n:6d} parts, {len(text) / 1e6:6.2f} MB: json.loads {load_ms:8.1f} ms, validation {check_ms:8.1f} ms, "
              f"validation / json.loads = {check_ms / load_ms:.2f}")


if __name__ == "__main__":
    main()
