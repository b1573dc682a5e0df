"""`ram-engine`: run stages, list, show and verify versions, move refs."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from storage import Store, StoreError
from tasks.engine.config import ConfigError, EngineConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The RAM data engine: versioned stages from captions to a retrained tagger.")
# Output that is not a terminal (a pipe, a file, CI logs) is not cut at 80 columns, nor at any width: paths
# and version ids stay whole on one line (tables size their columns to the content). A terminal keeps its
# own width.
UNWRAPPED = 10_000
# No console markup nor emoji codes: what is printed holds user text (keys, reject details, paths, refs, tag
# names), and rich would read `[/x]` in it as a closing tag and crash, `:smile:` as an emoji. Styles are given
# as such (`styled`).
console = Console(stderr=True, width=None if sys.stderr.isatty() else UNWRAPPED, markup=False, emoji=False)
out = Console(width=None if sys.stdout.isatty() else UNWRAPPED, markup=False, emoji=False)


def styled(label: str, style: str, rest: str = "") -> Text:
    """A styled label, then plain text."""
    return Text.assemble((label, style), rest)


class State:
    config_path: Optional[str] = None
    overrides: list[str] = []
    store_url: Optional[str] = None
    engine: str = "prefect"
    debug: bool = False
    verbose: bool = False
    used_store_url: Optional[str] = None   # the store URL the command resolved (named by access errors)


state = State()


@app.callback()
def main_options(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", metavar="FILE|NAME",
        help="YAML config, or a shipped config's name (demo, production). Default: $RAM_ENGINE_CONFIG, else "
             "./ram-engine.yaml, else the last `ram-engine demo`'s, else the shipped demo config."),
    set_: list[str] = typer.Option([], "--set", "-s", metavar="FIELD=VALUE",
                                   help="Override a field: section.field=value (repeatable)."),
    store: Optional[str] = typer.Option(None, "--store", metavar="URL", help="Store URL (overrides store.url)."),
    engine: str = typer.Option("prefect", "--engine", metavar="prefect|local",
                               help="prefect: run as Prefect flows; local: run inline."),
    debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an error."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Every log line: each training step's loss, "
                                 "the threads each stage uses, third-party libraries' messages."),
) -> None:
    state.config_path, state.overrides, state.store_url, state.engine = config, list(set_), store, engine
    state.debug, state.verbose = debug, verbose
    if engine not in ("prefect", "local"):
        raise typer.BadParameter("--engine must be 'prefect' or 'local'")
    if verbose:
        from tasks.engine.progress import set_verbose

        set_verbose(True)


# --------------------------------------------------------------------------- which config
CONFIG_ENV = "RAM_ENGINE_CONFIG"
LOCAL_CONFIG = "ram-engine.yaml"


def last_demo_file() -> Path:
    """The small state file that records the config of the last `ram-engine demo` (beside the model cache)."""
    from tasks.shared.models import cache_dir

    return cache_dir() / "last-demo.json"


def record_last_demo(config_file: str) -> None:
    path = last_demo_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"config": str(Path(config_file).resolve())}) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # the demo's own results are what matters; later commands can still pass -c
        console.print(f"note: could not record the demo's config in {path} ({exc.strerror or exc}); "
                      f"pass -c {config_file} to later commands")


def last_demo_config() -> Optional[str]:
    try:
        recorded = json.loads(last_demo_file().read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) and Path(recorded).is_file() else None


def config_choice() -> tuple[Optional[str], str]:
    """The config a command uses and why, in the order users expect: --config, $RAM_ENGINE_CONFIG,
    ./ram-engine.yaml (what `ram-engine init` writes), the last demo's, the shipped demo config."""
    if state.config_path:
        return state.config_path, "given"
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV], f"${CONFIG_ENV}"
    if Path(LOCAL_CONFIG).is_file():
        return str(Path(LOCAL_CONFIG).resolve()), f"./{LOCAL_CONFIG}"
    if last := last_demo_config():
        return last, f"the last demo's, recorded in {last_demo_file()}"
    return None, ("default: the demo config (shipped); for your own data write ./ram-engine.yaml with "
                  "`ram-engine init --source PATH`, for production pass -c production")


def get_config() -> EngineConfig:
    overrides = list(state.overrides)
    if state.store_url is not None:  # `--store ''` is refused by the config, never taken as "no --store"
        overrides.append(f"store.url={state.store_url}")
    cfg = load_config(config_choice()[0], overrides)
    state.used_store_url = cfg.store.url
    return cfg


def announce_config() -> None:
    """Say which config a long-running command uses and why (never a silent fallback to the demo's)."""
    from tasks.engine.config import resolve_config

    path, how = config_choice()
    console.print(f"config: {resolve_config(path)} ({how})"
                  + (f", overrides: {' '.join(state.overrides)}" if state.overrides else ""))


# Options of the whole program that may also come after the command (`ram-engine check -c production`).
GLOBAL_VALUE_OPTIONS = ("--config", "-c", "--set", "-s", "--store", "--engine")
GLOBAL_FLAGS = ("--debug", "--verbose", "-v")


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with the global options found after the command moved before it, where click reads them; the
    command's own options and arguments keep their order, and nothing after `--` moves."""
    i = 0
    while i < len(args):  # find the command: the first word that is neither a global option nor its value
        a = args[i]
        if a in GLOBAL_VALUE_OPTIONS:
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            break
    if i >= len(args):
        return list(args)
    head, rest, moved = list(args[:i + 1]), [], []
    j = i + 1
    while j < len(args):
        a = args[j]
        if a == "--":
            rest += args[j:]
            break
        if a in GLOBAL_VALUE_OPTIONS and j + 1 < len(args):
            moved += args[j:j + 2]
            j += 2
            continue
        if a in GLOBAL_FLAGS or any(a.startswith(o + "=") for o in GLOBAL_VALUE_OPTIONS if o.startswith("--")):
            moved.append(a)
        else:
            rest.append(a)
        j += 1
    return head[:-1] + moved + head[-1:] + rest


def get_store(cfg: EngineConfig | None = None, *, must_exist: bool = False) -> Store:
    """The configured store; `must_exist` (inspection commands) stops with an error naming the URL when
    nothing is there, instead of showing an empty store."""
    cfg = cfg or get_config()
    store = Store(cfg.store.url, **cfg.store.storage_options)
    if must_exist and not store.exists():
        path, how = config_choice()
        where = f" (config {path}: {how})" if path else f" ({how})"
        raise StoreError(f"no store at {store.full_url('').rstrip('/')}{where}: check store.url or --store, "
                         f"or run `ram-engine run` / `ram-engine demo` to create one")
    return store


@contextmanager
def progress_bar():
    """A rich progress bar fed by stage progress callbacks (stage, done, total)."""
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        ids: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in ids:  # "<stage>" counts parts, "<stage> training" counts steps
                ids[stage] = bar.add_task(stage if stage.endswith(" training") else f"{stage} parts", total=total)
            bar.update(ids[stage], completed=done, total=total)

        yield update


def counted(n: int, noun: str) -> str:
    """'1 part', '3 parts'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_result(result) -> None:
    s = result.summary()
    out.print(styled(s["stage"], "bold", f" @ {s['version']}  ({s['status']}: {counted(s['parts_written'], 'part')} written, "
              f"{s['parts_resumed']} resumed, {s['parts_reused']} reused)  rows in {s['rows_in']} = "
              f"out {s['rows_out']} + rejected {s['rows_rejected']}"))


class ShortErrors(logging.Filter):
    """On the console, a failed Prefect task or flow logs its message without the traceback (the Prefect
    UI keeps it: the API handler runs first, on the flow-run loggers); --debug keeps tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not state.debug:
            record.exc_info, record.exc_text = None, None
        return True


def prefect_engine() -> None:
    """Before running flows: a server that dies with this run, and short errors on the console."""
    from flows.temp_server import ensure_server

    ensure_server()
    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:  # Prefect's console
        if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, ShortErrors) for f in handler.filters):
            handler.addFilter(ShortErrors())


def parse_ref(text: str) -> tuple[str, str]:
    stage, _, ref = text.partition("@")
    return stage, ref or "latest"


@app.command()
def ingest(src: Optional[List[str]] = typer.Argument(
        None, help="Sources: tars, img2dataset output folders (webdataset, parquet, files), image folders; "
                   "brace patterns and globs too.")) -> None:
    """Ingest one or several sources into a new `images` version."""
    src = list(src) if src else None
    cfg = get_config()
    with progress_bar() as update:
        if state.engine == "prefect":
            from flows.ingest import ingest_flow
            from flows.runners import with_task_runner
            from flows.runtime import console_progress
            prefect_engine()
            with console_progress(update):  # its parts on the configured runner (threads, Dask, Ray)
                result = with_task_runner(ingest_flow, cfg)(cfg, source=src)
        else:
            from tasks.engine.runner import run
            from tasks.stages.ingest import STAGE

            result = run(STAGE, get_store(cfg), cfg, {"source": src}, progress=update)
    print_result(result)


def print_results(results: dict) -> None:
    table = Table("step", "stage", "version", "status", "rows in", "out", "rejected", "parts written / reused")
    table.columns[2].no_wrap = True
    for step, r in results.items():
        s = r.summary()
        table.add_row(step, s["stage"], s["version"], s["status"], str(s["rows_in"]), str(s["rows_out"]),
                      str(s["rows_rejected"]), f"{s['parts_written']} / {s['parts_reused']}")
    out.print(table)


@app.command()
def run(from_stage: Optional[str] = typer.Option(None, "--from", help="First stage (earlier ones: latest versions)."),
        until_stage: Optional[str] = typer.Option(None, "--until", help="Last stage."),
        source: Optional[str] = typer.Option(None, help="Ingest source (default: ingest.source)."),
        skip_check: bool = typer.Option(False, "--skip-check", help="Start without `check` (it opens every "
                                        "component the stages to run need, in seconds).")) -> None:
    """Run the data-engine loop (or part of it): ingest, parse, baseline, generate, ground, embed, clean,
    train, evaluate. `check` runs first, for the stages that will run: a problem stops it in seconds."""
    from flows.data_engine import data_engine_flow, step_range
    from tasks.stages import STEPS

    announce_config()
    cfg = get_config()
    until_stage = until_stage or cfg.orchestration.until
    if until_stage and not from_stage and cfg.orchestration.until == until_stage:
        console.print(f"until: {until_stage} (orchestration.until; --until STAGE for another, the models the "
                      f"later stages need: ram-engine check)")
    if not skip_check:
        from tasks.inspection.check import check_config

        first, last = step_range(from_stage, until_stage)
        report = check_config(cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"source": source})})
                              if source else cfg, stages=STEPS[first:last + 1])
        if report.problems:
            for problem in report.problems:
                console.print(styled("PROBLEM", "red", " " + problem.line()), soft_wrap=True)
            console.print(f"{len(report.problems)} problem(s) found before any work (`ram-engine check` lists "
                          f"them again): fix them, or run the stages that need nothing missing with --until STAGE")
            raise typer.Exit(1)
    kwargs = dict(from_stage=from_stage, until_stage=until_stage, source=source)
    with progress_bar() as update:
        if state.engine == "prefect":
            from flows.runtime import console_progress
            prefect_engine()
            with console_progress(update):
                results = data_engine_flow(cfg, **kwargs)
        else:
            results = data_engine_flow.fn(cfg, progress=update, **kwargs)
    print_results(results)


@app.command()
def demo(out_dir: str = typer.Option("ram-demo", "--out", help="Folder for the world, detector, store, report."),
         images: int = typer.Option(600, help="Images in the generated world."),
         seed: int = typer.Option(0, help="World seed."),
         world_only: bool = typer.Option(False, "--world-only", help="Only generate (or grow, with more --images) "
                                         "the world and write the config beside the store; run nothing."),
         noise: str = typer.Option("contextual", help="How the world's captions err: contextual (tied to the "
                                   "image, as people's captions) or independent (at random: the control).")) -> None:
    """The offline demo: a generated world with known truth, the whole loop with tiny models on CPU,
    the evaluation against the truth, and an HTML report."""
    from flows.demo import run_demo

    with progress_bar() as update:
        summary = run_demo(out_dir, n_images=images, seed=seed, engine=state.engine, config_path=state.config_path,
                           overrides=state.overrides, say=out.print, world_only=world_only, progress=update,
                           noise=noise)
    if world_only:
        record_last_demo(summary["config"])
        out.print(f"world of {images} images: {summary['world'].source}\nconfig: {summary['config']}\n"
                  f"next: ram-engine ingest (later commands use this config; recorded in {last_demo_file()})")
        return
    print_results(summary["results"])
    ev = summary["results"].get("evaluate")
    if ev is not None:
        out.print("Labels against the planted truth: each stage's label quality, and the models' mAP on held-out "
                  "keys", style="bold")
        out.print(ev.version.manifest["metrics"]["markdown"])
        out.print("Cleaning: removed tags against the truth, per reason", style="bold")
        out.print(ev.version.manifest["metrics"].get("cleaning_removal_markdown", ""))
    if not world_only and summary.get("config"):
        record_last_demo(summary["config"])
    if summary.get("ablation") is not None:
        out.print(f"Ablation on the {noise} world: held-out mAP / P / R / F1 against the truth of a model per label "
                  f"version, mean ± std over seeds", style="bold")
        out.print(summary["ablation"].manifest["metrics"]["markdown"])
    out.print(f"store: {summary['store']}\nconfig: {summary['config']} (later commands use it: ram-engine ls, show, "
              f"report, run, serve; recorded in {last_demo_file()})\nreport: {summary['report']}\n"
              f"total {summary['seconds'] / 60:.1f} min")


@app.command()
def init(source: str = typer.Option(..., "--source", metavar="PATH", help="Your data: a folder of images with "
                                    "captions.jsonl / captions.csv, an img2dataset output folder, or WebDataset "
                                    "tars (a glob or brace pattern too)."),
         out_file: str = typer.Option(LOCAL_CONFIG, "--out", metavar="FILE", help="The config to write."),
         stand_ins: bool = typer.Option(False, "--stand-ins", help="Name the demo's tiny models for RAM, Grounding "
                                        "DINO and CLIP, so the whole loop runs on a CPU (its labels mean little)."),
         samples: int = typer.Option(8, help="Samples to time ingest and parse on."),
         force: bool = typer.Option(False, "--force", help="Replace an existing config file.")) -> None:
    """Start a project on your own data: look at the source (format, samples, captions), time ingest and parse
    on a few samples here, and write ./ram-engine.yaml naming each model the loop needs (later commands find
    it). Without models `ram-engine run` then stops after parse; --stand-ins runs the whole loop."""
    from tasks.inspection.survey import init_config_text, survey_source, write_init_config

    path = Path(out_file)
    if path.exists() and not force:
        raise ConfigError(f"{path} exists: rerun with --force to replace it, or edit it")
    from tasks.engine.config import _set_dotted, parse_override

    data: dict = {"ingest": {"source": source}}   # the defaults, not the demo's: init is for real data
    for text in state.overrides:
        _set_dotted(data, *parse_override(text))
    cfg = EngineConfig.model_validate(data)
    console.print(f"looking at {source} (ingest and parse on {samples} samples, in a temporary store)")
    survey = survey_source(cfg, trial_samples=samples)
    for line in survey.lines():
        out.print(line, markup=False, highlight=False)
    if not survey.with_captions:
        console.print("warning: none of the samples looked at has a caption; parse makes tags from captions, so "
                      "every sample would be rejected (captions.jsonl: {\"file\": ..., \"caption\": ...})")
    written = write_init_config(path, init_config_text(source, path.resolve().parent, survey, stand_ins), force)
    out.print(f"config: {written}")
    here = path.resolve().parent == Path.cwd().resolve() and path.name == LOCAL_CONFIG
    prefix = "ram-engine" if here else f"ram-engine -c {written}"
    out.print("next: " + (f"{prefix} run  (the whole loop with the stand-ins), then {prefix} report" if stand_ins else
                          f"{prefix} run  (ingest and parse), then {prefix} show parsed; {prefix} check says "
                          f"what the later stages need"))


@app.command()
def ablate(versions: list[str] = typer.Argument(None, help="Label versions STAGE@VERSION (default: "
                                                             "ablation.versions, else the latest clean version's "
                                                             "parsed, generated and clean)"),
           images: Optional[str] = typer.Option(None, help="images@VERSION (default: the labels' own)."),
           truth: Optional[str] = typer.Option(None, help="Ground truth (default: evaluate.ground_truth).")) -> None:
    """The data-engine ablation: one model per label version and seed (same budget and architecture),
    scored on held-out keys against a ground truth; commits an `ablation` version and prints the table."""
    from flows.ablation import ablation_flow

    cfg = get_config()
    if truth:
        cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"ground_truth": truth})})
    store = get_store(cfg)
    refs = [store.open(*parse_ref(v)).ref for v in versions or []] or None
    images_ref = store.open(*parse_ref(images)).ref if images else None
    run_flow = ablation_flow if state.engine == "prefect" else ablation_flow.fn
    result = run_flow(cfg, versions=refs, images=images_ref)
    print_result(result)
    out.print(result.version.manifest["metrics"]["markdown"])


@app.command("demo-detector")
def demo_detector(out_dir: str = typer.Option("flows/demo_assets/detector", "--out"),
                  steps: int = typer.Option(3500, help="Training steps."),
                  minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes."),
                  images: int = typer.Option(2000, help="Images in the detector's training world."),
                  seed: int = typer.Option(1000, help="Seed of that world (the demo's is 0)."),
                  init: Optional[str] = typer.Option(None, help="Continue training this saved detector.")) -> None:
    """Train the demo's tiny Grounding DINO on generated boxes (how the shipped checkpoint was made)."""
    from flows.demo import train_demo_detector

    meta = train_demo_detector(Path(out_dir), n_images=images, seed=seed, steps=steps,
                               time_limit_s=minutes * 60 if minutes else None,
                               init=Path(init) if init else None, say=out.print)
    out.print(json.dumps({k: v for k, v in meta.items() if k != "categories"}, indent=1, default=float))


@app.command("demo-embedder")
def demo_embedder(out_dir: str = typer.Option("flows/demo_assets/embedder", "--out"),
                  steps: int = typer.Option(600, help="Training steps."),
                  minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes."),
                  images: int = typer.Option(2000, help="Images in the embedder's training world."),
                  seed: int = typer.Option(1000, help="Seed of that world (the demo's is 0).")) -> None:
    """Train the demo's crop embedder (its stand-in for CLIP) on true object crops of another world."""
    from flows.demo import train_demo_embedder

    meta = train_demo_embedder(Path(out_dir), n_images=images, seed=seed, steps=steps,
                               time_limit_s=minutes * 60 if minutes else None, say=out.print)
    out.print(json.dumps({k: v for k, v in meta.items() if k != "categories"}, indent=1, default=float))


@app.command("demo-encoder")
def demo_encoder(out_dir: str = typer.Option("flows/demo_assets/encoder", "--out"),
                 steps: int = typer.Option(3000, help="Training steps."),
                 minutes: Optional[float] = typer.Option(None, help="Stop after this many minutes."),
                 images: int = typer.Option(2000, help="Images in the encoder's training world."),
                 seed: int = typer.Option(1000, help="Seed of that world (the demo's is 0)."),
                 image_size: int = typer.Option(64, help="Input size (the demo's model.image_size)."),
                 image_encoder: str = typer.Option("conv", help="conv (the demo's model.image_encoder) or swin.")
                 ) -> None:
    """Pretrain the demo tagger's image encoder (its stand-in for a pretrained Swin) on another world's truth."""
    from flows.demo import train_demo_encoder

    if image_encoder not in ("conv", "swin"):
        raise typer.BadParameter(f"--image-encoder must be conv or swin, got {image_encoder!r}")
    meta = train_demo_encoder(Path(out_dir), n_images=images, seed=seed, steps=steps, image_size=image_size,
                              image_encoder=image_encoder,
                              time_limit_s=minutes * 60 if minutes else None, say=out.print)
    out.print(json.dumps({k: v for k, v in meta.items() if k != "categories"}, indent=1, default=float))


@app.command()
def report(target: Optional[str] = typer.Argument(None, help="STAGE[@VERSION] (default: the latest evaluate, "
                                                              "else clean)"),
           out_dir: str = typer.Option("ram-report", "--out", help="Folder for index.html and figures."),
           truth: Optional[str] = typer.Option(None, help="Ground truth to mark wrong tags (default: "
                                                          "evaluate.ground_truth).")) -> None:
    """Render a static HTML report (PNG figures) of a version and its lineage."""
    from tasks.inspection.report import build_report

    cfg = get_config()
    store = get_store(cfg)
    if target:
        version = store.open(*parse_ref(target))
    else:
        version = next((store.open(s) for s in ("evaluate", "clean") if store.versions(s)), None)
        if version is None:
            raise StoreError(f"no evaluate or clean version in {store.url}; name a version: ram-engine report STAGE@V")
    path = build_report(store, version, out_dir, truth_path=truth or cfg.evaluate.ground_truth,
                        ablation=ablation_of(store, version))
    if state.engine == "prefect":
        from flows.runtime import publish_report

        if key := publish_report(path, version):
            out.print(f"linked from the Prefect artifact {key}")
    out.print(f"report: {path}")


def ablation_of(store: Store, version):
    """The latest `ablation` version made from labels in `version`'s lineage (its verdict leads the report), or
    None."""
    from tasks.shared.lineage import lineage

    if not store.versions("ablation"):
        return None
    latest = store.open("ablation")
    made_from = {v.ref for _, v, _ in lineage(store, version) if v is not None}
    return latest if set(latest.parents) & made_from else None


@app.command()
def serve() -> None:
    """Register and serve the deployments: the scheduled loop and the event-triggered retrain
    (needs PREFECT_API_URL: a running Prefect server)."""
    from flows.deployments import serve_command

    announce_config()
    serve_command(get_config())


@app.command()
def check(serve_: bool = typer.Option(False, "--serve", help="Also check the Prefect API that `serve` needs.")) -> None:
    """Open every component the config names (store, source, label system, models, detector, embedder,
    task runner) and print one line per problem with the config field, the path and what to do; exit 1
    on any problem."""
    from tasks.inspection.check import check_config

    announce_config()
    report = check_config(get_config(), serve=serve_)
    for line in report.ok:
        out.print(styled("ok", "green", f"      {line}"), soft_wrap=True)
    for problem in report.problems:
        console.print(styled("PROBLEM", "red", f" {problem.line()}"), soft_wrap=True)
    if report.problems:
        console.print(f"{len(report.problems)} problem(s): fix them before a run")
        until = get_config().orchestration.until
        if until:  # a project `init` started: say whether the part of the loop `run` runs is ready already
            from tasks.stages import STEPS

            if until in STEPS and not check_config(get_config(), stages=STEPS[:STEPS.index(until) + 1]).problems:
                console.print(f"`ram-engine run` stops after {until} (orchestration.until) and needs none of these: "
                              f"it can run now")
        raise typer.Exit(1)
    out.print("the configuration is ready")


labels_app = typer.Typer(help="Label systems (tag lists with synonyms and thresholds).", no_args_is_help=True)
app.add_typer(labels_app, name="labels")


@labels_app.command("build")
def labels_build(parsed: str = typer.Argument(..., help="PARSED_VERSION: parsed@VERSION or a version id"),
                 top_k: int = typer.Option(4585, help="Tags to keep, most frequent first."),
                 min_count: int = typer.Option(1, help="Minimum occurrences of a kept tag."),
                 export: Optional[str] = typer.Option(None, help="Also write the tag list and synonyms here.")) -> None:
    """Build a label system from a parsed corpus: count, keep the top K, merge synonyms."""
    from tasks.shared.labels import build_labels, load_labels

    store = get_store()
    stage, ref_ = parse_ref(parsed if "@" in parsed or parsed.startswith("parsed") else f"parsed@{parsed}")
    version = build_labels(store, store.open(stage, ref_), top_k=top_k, min_count=min_count)
    labels = load_labels(store, version)
    out.print(f"labels@{version.id}: {len(labels)} tags, {len(labels.synonyms)} synonyms "
              f"(use it with --set parse.labels=<folder> after --export, or as a lineage parent)")
    if export:
        labels.save(export)
        out.print(f"written to {export}")


@app.command("ls")
def list_versions(stage: Optional[str] = typer.Argument(None, help="Stage to list; all stages when omitted.")) -> None:
    """List committed versions."""
    from tasks.stages import OUTPUTS

    store = get_store(must_exist=True)
    found = store.stages()
    if stage and stage not in found:
        raise StoreError(f"no committed version of {stage!r} in {store.url}; stages there: {', '.join(found) or '(none)'}")
    # The loop's order (images first, evaluate last), then anything else by name.
    order = [s for s in OUTPUTS if s in found] + [s for s in found if s not in OUTPUTS]
    stages = [stage] if stage else order
    table = Table("stage", "version", "created", "rows in", "out", "rejected", "parents", "refs")
    table.columns[1].no_wrap = True
    for name in stages:
        refs = store.refs(name)
        for v in store.versions(name):
            m = v.manifest
            tags = ", ".join(r for r, vid in refs.items() if vid == v.id)
            table.add_row(name, v.id, m["created"][:19], str(m["rows_in"]), str(m["rows_out"]),
                          str(m["rows_rejected"]), ", ".join(m["parents"]), tags)
    out.print(table)


@app.command()
def show(target: str = typer.Argument(..., help="STAGE[@VERSION|PREFIX|REF]"),
         rows: int = typer.Option(5, help="Sample rows to print."),
         as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")) -> None:
    """Manifest summary, counts, schema and sample rows of a version."""
    from tasks.shared.lineage import display_metrics, format_value, tag_names_for, with_tag_names
    from tasks.stages.evaluate import ablation_columns

    stage, ref = parse_ref(target)
    store = get_store(must_exist=True)
    v = store.open(stage, ref)
    m = v.manifest
    if as_json:
        out.print_json(json.dumps({k: val for k, val in m.items() if k != "schema_ipc"}))
        return
    out.print(styled(f"{stage}@{v.id}", "bold", f"  created {m['created']}  code {m['code_version']}"))
    out.print(f"parents: {', '.join(m['parents']) or '(none)'}")
    tabular = has_table(m)
    if tabular:
        out.print(f"rows in {m['rows_in']} = out {m['rows_out']} + rejected {m['rows_rejected']}; "
                  f"{counted(len(m['parts']), 'part')} ({m['parts_written']} written, {m['parts_reused']} shared "
                  f"with earlier versions), {counted(len(m['files']), 'file')}, "
                  f"{sum(f['bytes'] for f in m['files'])} bytes")
        out.print(styled("schema", "bold", "\n" + m["schema"]))
    else:  # a model or a label system: files, no rows (its "rows 0 -> 0" and empty schema said nothing)
        out.print(f"{counted(len(m['parts']), 'part')} ({m['parts_written']} written, {m['parts_reused']} shared "
                  f"with earlier versions), {counted(len(m['files']), 'file')}, "
                  f"{sum(f['bytes'] for f in m['files'])} bytes, no table: "
                  + ", ".join(f["path"].rsplit("/", 1)[-1] for f in m["files"][:12])
                  + (" …" if len(m["files"]) > 12 else ""), highlight=False)
    out.print(f"path: {store.full_url(f'{v.stage}/{v.id}')}")
    if m.get("metrics"):
        out.print(styled("metrics", "bold", " (counters: most frequent first)"))
        for key, kind, value in display_metrics(store, v, top=10):
            if kind == "counter":
                value = ", ".join(f"{k}: {format_value(n)}" for k, n in value)
            elif kind == "table":
                cols = ablation_columns(value)
                t = Table(*cols)
                for r in value:
                    t.add_row(*(format_value(r.get(c, "")) for c in cols))
                out.print(f"  {key}:")
                out.print(t)
                continue
            out.print(f"  {key}: {value}", markup=False, highlight=False)
    if rows and tabular:
        table = v.read_table().slice(0, rows)
        names = tag_names_for(store, v) if any(c in table.column_names for c in ("tag_ids", "tag_id")) else None
        out.print(styled("sample rows", "bold", " (tag ids with their names)" if names else ""))
        for row in table.to_pylist():
            out.print("  " + json.dumps(_shortened(with_tag_names(row, names)), ensure_ascii=False, default=str),
                      markup=False, highlight=False, soft_wrap=True)  # one row, one line
        rejects = v.rejects().slice(0, rows)
        if rejects.num_rows:
            out.print("sample rejects", style="bold")
            for row in rejects.to_pylist():
                out.print(f"  {row['key']}: {row['reason']} ({row['field']}) {row['detail'] or ''}"[:300])


def has_table(manifest: dict) -> bool:
    """Whether a version holds rows (Parquet parts or rejects); models and label systems hold files only."""
    return bool(manifest["rows_in"] or any(f.get("kind") in ("table", "rejects") for f in manifest["files"]))


def _shortened(value, max_items: int = 20, max_chars: int = 160):
    """A row for the screen: long strings and lists cut (marked with …), floats rounded to 4 digits, so each
    row stays valid JSON and short."""
    if isinstance(value, dict):
        return {k: _shortened(v, max_items, max_chars) for k, v in value.items()}
    if isinstance(value, list):
        items = [_shortened(v, max_items, max_chars) for v in value[:max_items]]
        return items + [f"… {len(value) - max_items} more"] if len(value) > max_items else items
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > max_chars:
        return value[:max_chars] + "…"
    if isinstance(value, float):
        return round(value, 4)
    return value


@app.command()
def verify(target: Optional[str] = typer.Argument(None, help="STAGE@VERSION; every version when omitted")) -> None:
    """Check every file of a version against the sha256 in its manifest (without a target: every version,
    and every manifest and ref file of the store)."""
    store = get_store(must_exist=True)
    damaged = [] if target else store.damaged()
    versions = [store.open(*parse_ref(target))] if target else [v for s in store.stages() for v in store.versions(s)]
    failed = len(damaged)
    for problem in damaged:
        console.print(styled("DAMAGED", "red", f" {problem}"))
    for v in versions:
        problems = v.verify()
        failed += bool(problems)
        for p in problems:
            console.print(styled("CORRUPT", "red", f" {p}"))
        if problems:
            console.print(f"{v.stage}@{v.id}: {len(problems)} of {len(v.files())} files fail verification")
        else:
            out.print(f"{v.stage}@{v.id}: all {len(v.files())} files match their checksums")
    if failed:
        raise typer.Exit(1)


@app.command()
def ref(target: str = typer.Argument(..., help="STAGE@VERSION to point at"),
        name: str = typer.Argument(..., help="Ref name, e.g. prod")) -> None:
    """Point a named ref (e.g. `prod`) at a committed version."""
    stage, version_ref = parse_ref(target)
    store = get_store(must_exist=True)
    v = store.open(stage, version_ref)
    store.set_ref(stage, name, v.id)
    out.print(f"{stage}@{name} -> {v.id}")


@app.command()
def delete(target: str = typer.Argument(..., help="STAGE@VERSION")) -> None:
    """Delete a version; files that other versions reuse stay, so no other version breaks."""
    stage, ref_ = parse_ref(target)
    store = get_store()
    v = store.open(stage, ref_)
    removed, kept = store.delete_version(stage, v.id)
    out.print(f"{stage}@{v.id} deleted: {removed} files removed, {kept} kept (other versions use them)")


@app.command("lineage")
def lineage_command(target: str = typer.Argument(..., help="STAGE@VERSION")) -> None:
    """The versions a version was made from, down to the source."""
    from tasks.shared.lineage import lineage

    stage, version_ref = parse_ref(target)
    store = get_store(must_exist=True)
    for depth, v, ref_text in lineage(store, store.open(stage, version_ref)):
        detail = ""
        if v is not None:
            m = v.manifest
            size = (f"rows {m['rows_in']} -> {m['rows_out']} (+{m['rows_rejected']} rejected)" if has_table(m)
                    else f"{counted(len(m['files']), 'file')}, no table")
            detail = f"  {size}  {m['created'][:19]}"
        out.print("  " * depth + ("└─ " if depth else "") + ref_text + detail)


@app.command("diff")
def diff_command(a: str = typer.Argument(..., help="STAGE@A"), b: str = typer.Argument(..., help="STAGE@B"),
                 top: int = typer.Option(30, help="Tags to show.")) -> None:
    """Tags added or removed from A to B, per tag, with counts of keys."""
    from tasks.shared.lineage import diff_tags, tag_names_for

    store = get_store(must_exist=True)
    va, vb = store.open(*parse_ref(a)), store.open(*parse_ref(b))
    d = diff_tags(va, vb)
    names = tag_names_for(store, vb) or tag_names_for(store, va)

    def name(tag_id: int) -> str:
        return names[tag_id] if names and 0 <= tag_id < len(names) else f"#{tag_id}"

    out.print(f"{va.ref} -> {vb.ref}: {d.keys_common} keys in common ({d.keys_a} in A, {d.keys_b} in B); "
              f"labels {d.labels_a} -> {d.labels_b}; +{sum(d.added.values())} / -{sum(d.removed.values())}")
    table = Table("tag", "id", "added", "removed", "net")
    for tag_id in sorted(set(d.added) | set(d.removed), key=lambda t: -(d.added[t] + d.removed[t]))[:top]:
        table.add_row(name(tag_id), str(tag_id), f"+{d.added[tag_id]}", f"-{d.removed[tag_id]}",
                      f"{d.added[tag_id] - d.removed[tag_id]:+d}")
    out.print(table)


def _plain_flags_in_help() -> None:
    """typer's help prints a flag's type (`--debug <bool>`) as if it took a value: a flag shows no type."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_flags_plain", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._flags_plain = True
    TyperOption.display_type_rich = display_type_rich


_plain_flags_in_help()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    # Progress of long work (stages, training steps) at INFO; RAM_ENGINE_LOG=WARNING quiets it.
    for name in ("ram_engine", "ram_model"):
        logging.getLogger(name).setLevel(os.environ.get("RAM_ENGINE_LOG", "INFO"))
    from tasks.engine.progress import quiet_by_default

    quiet_by_default()
    # Global options may follow the command too: `ram-engine check -c production`.
    sys.argv[1:] = hoist_global_options(sys.argv[1:])
    # Prefect's temporary local server can take a while to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.temp_server import quiet_prefect

    quiet_prefect()
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - every error is one line here; --debug shows the traceback
        if state.debug:
            raise
        console.print(styled("error:", "red", f" {error_line(exc)} (the full traceback: rerun with --debug)"),
                      soft_wrap=True)
        sys.exit(2)


def error_line(exc: BaseException) -> str:
    """What the user is told about an error: a store that cannot be reached as configured (credentials,
    access, bucket) named as such, our own errors as they say it, anything else as what it is, on one line
    (a configuration error keeps one line per field)."""
    from flows.temp_server import ServerStartError
    from storage.fs import StoreIOError, access_problem
    from tasks.engine.runner import StageError

    url = state.used_store_url or state.store_url or ""
    problem = access_problem(exc, url) if url else None
    if problem is not None:
        return str(problem)
    if isinstance(exc, ConfigError):
        return str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (StoreError, StageError, StoreIOError, ServerStartError, ValueError, OSError)):
        return text
    return f"unexpected {type(exc).__name__}: {text}. This is a bug in ram-engine: please report it with the traceback"


if __name__ == "__main__":
    main()
