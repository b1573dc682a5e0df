"""One module per stage of the loop, each declaring itself once as `STAGE = Stage(...)`; no stage imports another.

`LOOP` is the one list of the loop's steps, in order: the name users give (`--from`, `--until`), the stage
module that runs it, and the dataset it writes under the default names. The flow (flows/data_engine.py)
binds each step's inputs; listings and reports follow this order.
"""
from __future__ import annotations

import importlib

#        step        stage module   output (default names)
LOOP = (("ingest",   "ingest",      "images"),
        ("parse",    "parse",       "parsed"),
        ("baseline", "train",       "models/baseline"),    # or `import_model`: an official checkpoint
        ("generate", "generate",    "generated"),
        ("ground",   "ground",      "regions"),
        ("embed",    "embed",       "embeddings"),
        ("cluster",  "cluster",     "clusters"),
        ("clean",    "clean",       "clean"),
        ("train",    "train",       "models/ram"),
        ("evaluate", "evaluate",    "evaluate"))

STEPS = tuple(step for step, _, _ in LOOP)
# what listings show first, in loop order (labels versions are written by parse, beside `parsed`)
OUTPUTS = ("images", "labels", *(out for _, _, out in LOOP[1:]))


def stage(module: str):
    """The `STAGE` a stage module declares (imported on demand: most stages import torch)."""
    return importlib.import_module(f"tasks.stages.{module}").STAGE
