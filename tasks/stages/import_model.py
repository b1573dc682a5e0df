"""Stage `import`: an official RAM / RAM++ / Tag2Text checkpoint as a model version `models/<baseline_name>`
(our format, with its tag list, thresholds and tokenizer), so every stage and worker loads it from the store
and lineage names it. Imported once: the same checkpoint (by content) and companion files find the committed
version.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ram_model.checkpoint import save_pretrained

from tasks.engine.cache import cache_dir
from tasks.engine.runner import Input, PartTask, Stage
from tasks.shared.models import load_official_with_files

log = logging.getLogger("ram_engine")

STAGE_VERSION = "import-official-1"


def process(run, writer, task):
    path = run.inputs["checkpoint"]
    log.info("importing official checkpoint %s as %s", path, run.output)
    model = load_official_with_files(path, run.sections["model"])
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        save_pretrained(model, tmp)
        del model
        out = {str(p.relative_to(tmp)): str(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        return writer.write_files(task.name, out, metrics={"imported_from": os.path.basename(path)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The companion files (tag list, Chinese names, thresholds, tokenizer) enter by content; None: RAM's packaged ones.
STAGE = Stage(name="import", output=lambda generate: f"models/{generate.baseline_name}",
              inputs=(Input("checkpoint", "model"),), section="generate", also=("model",),
              reads=("model.image_size",), files=("model.tag_list", "model.tag_list_chinese", "model.thresholds",
                                                  "model.tokenizer"),
              version=STAGE_VERSION, split=lambda run: [PartTask("model", "")], process=process,
              summarize=lambda run, records: dict(records[0].metrics), one_part=True)
