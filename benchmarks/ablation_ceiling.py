"""How much room is there for cleaning to raise the ablation's mAP? The ablation of a finished demo run with one
more arm: a model per seed trained on the *true* labels (the world's ground truth, committed as a label version
with the parsed version's parts), the same budget, architecture, seeds and held-out keys as the others.

The named baseline is the parsed labels; the truth arm is the ceiling any cleaning can reach. The LAST line is
the cleaned arm's mAP gain over parsed divided by the truth arm's gain (1.0: cleaning took all the room there was).

    ram-engine demo --out /tmp/demo            # or any run with a ground truth (evaluate.ground_truth)
    python benchmarks/ablation_ceiling.py /tmp/demo/ram-engine.yaml [--set ablation.seeds=[0,1,2,3,4] ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.ablation import ablation_flow  # noqa: E402
from flows.runtime import open_store  # noqa: E402
from tasks.stages.ablation import latest_label_versions  # noqa: E402
from tasks.engine.config import load_config  # noqa: E402
from tasks.shared.labels import load_labels  # noqa: E402
from tasks.shared.lineage import labels_version, lineage  # noqa: E402
from tasks.shared.truth import ground_truth_path, load_ground_truth, normalise_truth, rekey_truth  # noqa: E402


def truth_label_version(store, cfg, parsed):
    """The ground truth as a `parsed`-stage label version: the parsed version's parts (so training pairs them with
    the same image shards), each row's tag ids replaced by the truth's."""
    images = next(v for _, v, _ in lineage(store, parsed) if v is not None and v.stage == "images")
    labels = load_labels(store, labels_version(store, parsed))
    path = ground_truth_path(cfg.evaluate, "the ceiling needs a ground truth")
    truth = rekey_truth(normalise_truth(load_ground_truth(path, cfg.evaluate.format), labels), images)
    writer = store.begin("parsed", code_version="benchmark-truth-labels",
                         config={"truth": str(path.resolve()), "from": parsed.ref}, parents=parsed.parents)
    if writer.committed is not None:
        return writer.committed
    for part, table in parsed.iter_part_tables():
        ids = [sorted(labels.id(t) for t in truth.get(k, ())) for k in table.column("key").to_pylist()]
        column = table.column_names.index("tag_ids")
        writer.write_part(part.name, table=table.set_column(column, "tag_ids", pa.array(ids, table.schema.field(column).type)),
                          rows_in=table.num_rows)
    return writer.commit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="the run's config (a demo folder's ram-engine.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field, as ram-engine --set does (e.g. ablation.holdout_fraction=0.5)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    store = open_store(cfg)
    arms = latest_label_versions(store)
    parsed, cleaned = arms["parsed"], arms["cleaned"]
    truth = truth_label_version(store, cfg, parsed)
    result = ablation_flow.fn(cfg, versions=[parsed.ref, cleaned.ref, truth.ref])
    rows = result.version.read_table().to_pylist()
    by_ref: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["metric"] == "mAP":
            by_ref.setdefault(r["labels_ref"], {})[r["seed"]] = r["value"]
    seeds = sorted(by_ref[parsed.ref])

    def gain(ref: str) -> tuple[float, float]:
        d = np.array([by_ref[ref][s] - by_ref[parsed.ref][s] for s in seeds])
        return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0

    for name, ref in (("parsed (baseline)", parsed.ref), ("cleaned", cleaned.ref), ("truth (ceiling)", truth.ref)):
        maps = np.array([by_ref[ref][s] for s in seeds])
        line = f"{name:18s} mAP {maps.mean():.3f} ± {maps.std(ddof=1):.3f} over seeds {seeds}"
        if ref != parsed.ref:
            line += "   gain over parsed %+.3f ± %.3f (paired)" % gain(ref)
        print(line)
    print(f"ablation @ {result.version.ref}")
    room = gain(truth.ref)[0]
    print(f"share of the room cleaning took (cleaned gain / truth gain): {gain(cleaned.ref)[0] / room:.3f}"
          if room > 0 else "the truth arm gains nothing over parsed: there is no room for cleaning")


if __name__ == "__main__":
    main()
