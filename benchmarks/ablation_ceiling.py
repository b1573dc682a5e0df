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
    by_ref: dict[str, dict[str, dict[int, float]]] = {}   # labels ref -> metric -> seed -> value
    for r in rows:
        by_ref.setdefault(r["labels_ref"], {}).setdefault(r["metric"], {})[r["seed"]] = r["value"]
    seeds = sorted(by_ref[parsed.ref]["mAP"])

    def gain(ref: str, metric: str = "mAP") -> tuple[float, float]:
        """Mean ± sample std of the per-seed paired differences from parsed (each seed trains every arm)."""
        d = np.array([by_ref[ref][metric][s] - by_ref[parsed.ref][metric][s] for s in seeds])
        return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0

    for name, ref in (("parsed (baseline)", parsed.ref), ("cleaned", cleaned.ref), ("truth (ceiling)", truth.ref)):
        line = name.ljust(18)
        for metric in ("mAP", "f1"):
            v = np.array([by_ref[ref][metric][s] for s in seeds])
            line += f" {metric} {v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"
        if ref != parsed.ref:
            g, sd = gain(ref)
            line += f"   mAP gain over parsed {g:+.3f} ± {sd:.3f} (paired; > 2 std: {'yes' if g > 2 * sd else 'no'})"
        print(line)
    print(f"seeds {seeds}; {result.version.manifest['metrics'].get('heldout_keys')} held-out keys; "
          f"ablation @ {result.version.ref}")
    for metric in ("f1", "mAP"):   # the last line is the mAP share (the docstring's promise)
        room = gain(truth.ref, metric)[0]
        share = gain(cleaned.ref, metric)[0] / room if room > 0 else None
        print(f"share of the {metric} room cleaning took (cleaned gain / truth gain): {share:.3f}" if share is not None
              else f"the truth arm gains no {metric} over parsed: there is no room for cleaning")


if __name__ == "__main__":
    main()
