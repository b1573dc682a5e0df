"""`ram-engine init`: look at a user's source, time the first stages on a few of its samples on this
machine, and write a config that names every model the loop needs and what to do where one is missing.

The source is read with ingest's own planner and readers (tasks.stages.ingest), and the timing runs the
real ingest and parse stages on a copy of the first samples in a temporary store: what init says is what a
run will do.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tasks.engine.config import EngineConfig

FIRST_STAGES = ("ingest", "parse")
# The model stages cannot be timed without their models. CPU seconds per image measured with the real-size
# models (RAM Swin-L 384, grounding-dino-tiny at 800 px, CLIP ViT-B/16) by the production-shaped test on a
# 2-core CPU (docs/production.md): what these stages would cost on a CPU; a GPU is what they need.
REAL_MODEL_CPU_S_PER_IMAGE = {"generate": 10.8, "ground": 34.3, "embed": 46.2}


@dataclass
class Timing:
    """Seconds a stage took on this machine: a fixed start-up cost (models loaded once) and a cost per sample."""

    fixed_s: float
    per_sample_s: float
    measured_on: int

    def estimate(self, samples: int) -> float:
        return self.fixed_s + self.per_sample_s * samples


@dataclass
class Survey:
    sources: list[dict]                 # [{"source": url, "format": fmt}]
    samples: int                        # samples the source holds (from its listing: no pixels read)
    parts: int
    looked_at: int = 0                  # samples read for the trial
    with_captions: int = 0
    problems: Counter = field(default_factory=Counter)   # reject reason -> count among the samples looked at
    timings: dict[str, Timing] = field(default_factory=dict)

    def lines(self) -> list[str]:
        fmts = ", ".join(sorted({s["format"] for s in self.sources}))
        out = [f"source: {', '.join(s['source'] for s in self.sources)}",
               f"format: {fmts}; {self.samples} sample(s) in {self.parts} part(s)",
               f"captions: {self.with_captions} of the {self.looked_at} sample(s) looked at have one"]
        if self.problems:
            out.append("rejected among them: " + ", ".join(f"{r} ({n})" for r, n in self.problems.most_common()))
        for stage, t in self.timings.items():
            out.append(f"{stage}: ~{format_seconds(t.estimate(self.samples))} for {self.samples} sample(s) on this "
                       f"machine ({t.per_sample_s * 1000:.0f} ms per sample + {t.fixed_s:.1f} s start-up, "
                       f"measured on {t.measured_on})")
        per_image = sum(REAL_MODEL_CPU_S_PER_IMAGE.values())
        out.append(f"generate, ground, embed with the real models: ~{format_seconds(per_image * self.samples)} of "
                   f"CPU for {self.samples} sample(s) ({per_image:.0f} CPU s per image on a 2-core CPU, measured by "
                   f"the production-shaped test: docs/production.md); a GPU is what they need")
        return out


def format_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def survey_source(cfg: EngineConfig, trial_samples: int = 8) -> Survey:
    """What `cfg.ingest.source` holds, and ingest and parse timed on its first `trial_samples` samples."""
    from tasks.stages.ingest import SourceError, _task_keys, iter_part_samples, plan

    src = cfg.ingest.source
    if not src:
        raise SourceError("no source: give it with `ram-engine init --source PATH` (a folder of images with "
                          "captions.jsonl / captions.csv, an img2dataset output folder, or WebDataset tars)")
    tasks, described = plan(src, cfg.ingest)
    keys: set[str] = set()
    for task in tasks:
        keys.update(_task_keys(task, cfg.ingest))
    result = Survey(sources=described, samples=len(keys), parts=len(tasks))
    samples = []
    counters: Counter = Counter()
    for task in tasks:
        for raw in iter_part_samples(task, cfg.ingest, counters) or ():
            samples.append(raw)
            if len(samples) >= trial_samples:
                break
        if len(samples) >= trial_samples:
            break
    result.looked_at = len(samples)
    result.with_captions = sum(1 for s in samples if any(_text(c).strip() for c in s.captions or ()))
    result.problems.update(s.problem[0] for s in samples if s.problem)
    usable = [s for s in samples if s.problem is None and s.image is not None]
    if len(usable) >= 2:
        result.timings = time_first_stages(cfg, usable)
    return result


def _text(caption) -> str:
    return caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)


def _write_trial_folder(folder: Path, samples) -> None:
    """The samples as an image folder with a captions.jsonl: a source ingest reads like any other."""
    folder.mkdir(parents=True)
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as fh:
        for i, s in enumerate(samples):
            name = f"{i:06d}.{s.image_ext or 'jpg'}"
            (folder / name).write_bytes(s.image)
            caps = [_text(c) for c in s.captions or []]
            fh.write(json.dumps({"file": name, "captions": caps}) + "\n")


def time_first_stages(cfg: EngineConfig, samples) -> dict[str, Timing]:
    """Ingest and parse on two samples (start-up: spaCy and the label system load once per process), then on
    all of `samples` (the per-sample cost), each into a temporary store that is removed after."""
    from storage import Store
    from tasks.engine.runner import run as run_stage
    from tasks.stages import stage as stage_of

    work = Path(tempfile.mkdtemp(prefix="ram-engine-init-"))
    try:
        seconds: dict[str, list[float]] = {s: [] for s in FIRST_STAGES}
        for trial, n in enumerate((2, len(samples))):
            folder = work / f"source-{trial}"
            _write_trial_folder(folder, samples[:n])
            store = Store(str(work / f"store-{trial}"))
            trial_ingest = cfg.ingest.model_copy(update={"source": str(folder), "captions_file": None, "format": "auto"})
            t0 = time.perf_counter()
            images = run_stage(stage_of("ingest"), store, {"ingest": trial_ingest}, {"source": None}).version
            t1 = time.perf_counter()
            run_stage(stage_of("parse"), store, cfg, {"images": images})
            t2 = time.perf_counter()
            seconds["ingest"].append(t1 - t0)
            seconds["parse"].append(t2 - t1)
        n = len(samples)
        out = {}
        for stage, (first, warm) in seconds.items():
            per = warm / n   # the warm run: what each further sample costs
            out[stage] = Timing(fixed_s=max(0.0, first - 2 * per), per_sample_s=per, measured_on=n)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- the config init writes
SHIPPED_ASSETS = Path(__file__).resolve().parents[2] / "flows" / "demo_assets"


def _where(path: str, base: Path) -> str:
    """A path as the config file should hold it: relative to the file's folder when inside it."""
    if "://" in path:
        return path
    p = Path(path).resolve()
    try:
        return "./" + str(p.relative_to(base.resolve())) if p != base.resolve() else "."
    except ValueError:
        return str(p)


def init_config_text(source: str, config_dir: Path, survey: Survey | None, stand_ins: bool) -> str:
    """The YAML `ram-engine init` writes: the source, a store beside the config, and each model the later
    stages need, with what to do where it is missing. Without stand-ins `ram-engine run` stops after parse
    (orchestration.until), the part of the loop that needs no model; with them, the demo's tiny models stand
    in for RAM, Grounding DINO and CLIP, so the whole loop runs on a CPU (its labels mean little: the
    stand-ins learned the demo's generated shapes, not your images)."""
    about = "\n".join(f"#   {line}" for line in survey.lines()) if survey else "#   (not surveyed)"
    src = _where(source, config_dir)
    head = f"""# Written by `ram-engine init`. Relative paths are relative to this file's folder.
# Every field and its default: tasks/engine/config.py; the models: docs/production.md.
# What init found:
{about}
store:
  url: ./ram-data               # the versioned store (an s3://bucket/prefix works too, with storage_options)
ingest:
  source: {json.dumps(src)}
"""
    if not stand_ins:
        return head + """parse:
  labels: ram                   # RAM's 4,585 tags; or a tag-list file / a label system folder of your own
# The later stages need models that are not here yet. Until you name them, `ram-engine run` stops after
# parse (orchestration.until below); `ram-engine check` says what is missing. Each one:
#   generate.baseline       RAM's official checkpoint (ram_swin_large_14m.pth) with model.preset: ram,
#                           model.image_size: 384 and model.tokenizer (a bert-base-uncased folder);
#                           missing: a baseline is trained from scratch on your parsed labels (slow on a CPU)
#   ground.detector.model   a Grounding DINO folder: huggingface-cli download IDEA-Research/grounding-dino-tiny
#                           --local-dir models/grounding-dino-tiny; missing: the ground stage cannot run
#   clean.embedder          kind: baseline (default, the baseline's own encoder) or kind: clip with model: a
#                           CLIP folder (openai/clip-vit-base-patch16)
#   evaluate.ground_truth   optional: true tags of some keys (JSONL, Parquet or OpenImages CSV)
# Or try the whole loop now with tiny stand-in models: ram-engine init --source ... --stand-ins --force
orchestration:
  until: parse                  # remove once the models above are set: then `run` runs the whole loop
"""
    assets = {k: _where(str(SHIPPED_ASSETS / k), config_dir) for k in ("detector", "embedder", "encoder")}
    return head + f"""parse:
  labels: ram                   # RAM's 4,585 tags; a smaller tag list of your own trains faster
# Tiny stand-ins (the offline demo's models) for RAM, Grounding DINO and CLIP: the whole loop runs on a
# CPU, but they learned the demo's generated shapes, not your images. Replace each for real results:
#   ground.detector.model -> a Grounding DINO folder; clean.embedder -> kind: clip with a CLIP folder;
#   generate.baseline -> RAM's official checkpoint (see configs/production.yaml).
model:
  preset: tiny
  image_size: 64
  image_encoder: conv
  max_pool_head: true
  with_caption: false
  encoder_init: {json.dumps(assets['encoder'])}
generate:
  baseline_steps: 100
  caption: false
  num_beams: 1
ground:
  detector:
    model: {json.dumps(assets['detector'])}
    shortest_edge: 128
    longest_edge: 128
clean:
  embedder:
    kind: conv
    model: {json.dumps(assets['embedder'])}
  min_crops: 2
train:
  init: models/baseline
  steps: 100
  batch_size: 8
orchestration:
  torch_threads: 1
"""


def write_init_config(path: Path, text: str, force: bool) -> Path:
    from tasks.engine.config import ConfigError

    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give --out the name of a file to write")
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; rerun with --force to replace it, or edit it")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
