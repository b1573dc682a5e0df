"""A new user's first steps: `ram-engine init` on their own source, the config found without -c, global options
after the command, `run` checking before it works, and quiet logs."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.fixtures import image_bytes, write_folder_source

ROOT = Path(__file__).resolve().parent.parent
I2D = ROOT / "tests" / "data" / "img2dataset" / "resized"


def invoke(*args: str):
    from flows.cli import app

    return CliRunner(env={"COLUMNS": "250"}).invoke(app, list(args))


def cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script as a user runs it (main(): options hoisted, errors printed)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAM_ENGINE_CONFIG")}
    full |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAM_ENGINE_CACHE": str(cwd / ".cache"),
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | (env or {})
    return subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=600)


def folder_source(root: Path, n: int = 6) -> Path:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    captions = ["a red car on a road", "a green tree in a park", "a blue boat on the sea", "a dog on the grass",
                "a cat sitting on a chair", "a man riding a horse"]
    return write_folder_source(root, {f"img{i}.jpg": (image_bytes(color=colours[i % 6]), captions[i % 6])
                                      for i in range(n)})


def tar_source(path: Path, n: int = 5, caption: str = "a photo of a bird on a branch number {i}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, data in ((f"s{i}.jpg", image_bytes(color=(40 * i, 90, 200))),
                               (f"s{i}.txt", caption.format(i=i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- init on three kinds of source
@pytest.mark.parametrize("kind", ["folder", "img2dataset", "webdataset-tar"])
def test_init_looks_at_the_source_then_run_ingests_and_parses_it(kind, tmp_path, monkeypatch):
    """init says the format, the samples, the captions and the time of ingest and parse on this machine, and
    writes ./ram-engine.yaml; plain `ram-engine run` (no -c) then stops after parse, the part that needs no
    model, and `show parsed` finds the store."""
    source = {"folder": lambda: folder_source(tmp_path / "photos"),
              "img2dataset": lambda: I2D / "webdataset",
              "webdataset-tar": lambda: tar_source(tmp_path / "shards" / "000.tar")}[kind]()
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    out = invoke("init", "--source", str(source), "--samples", "3")
    assert out.exit_code == 0, out.output
    fmt = {"folder": "folder", "img2dataset": "webdataset", "webdataset-tar": "webdataset"}[kind]
    samples = {"folder": 6, "img2dataset": 8, "webdataset-tar": 5}[kind]
    assert f"format: {fmt}; {samples} sample(s)" in out.output
    assert "captions: 3 of the 3 sample(s) looked at have one" in out.output
    assert "ingest: ~" in out.output and "parse: ~" in out.output and "ms per sample" in out.output
    assert "generate, ground, embed with the real models: ~" in out.output
    written = yaml.safe_load((work / "ram-engine.yaml").read_text())
    assert written["orchestration"]["until"] == "parse" and written["store"]["url"] == "./ram-data"
    text = (work / "ram-engine.yaml").read_text()
    for model in ("generate.baseline", "ground.detector.model", "clean.embedder"):
        assert model in text   # each model the loop needs, with what to do where it is missing

    check = invoke("check")   # the full loop's models are missing; the part `run` runs needs none of them
    assert check.exit_code == 1 and "ground.detector.model" in check.output
    assert "`ram-engine run` stops after parse (orchestration.until) and needs none of these" in check.output
    run = invoke("--engine", "local", "run")
    assert run.exit_code == 0, run.output
    assert "./ram-engine.yaml" in run.output and "until: parse" in run.output
    assert "parsed" in run.output and "generated" not in run.output
    show = invoke("show", "parsed", "--rows", "1")
    assert show.exit_code == 0 and "tag ids with their names" in show.output, show.output

    again = invoke("init", "--source", str(source))   # CliRunner: main()'s error printing is not in the way
    assert again.exit_code != 0 and "exists" in str(again.exception) and "--force" in str(again.exception)


@pytest.mark.parametrize("kind", ["folder", "tar of empty .txt"])
def test_init_says_when_no_sample_has_a_caption(kind, tmp_path, monkeypatch):
    if kind == "folder":
        src = write_folder_source(tmp_path / "bare", {f"x{i}.png": (image_bytes(fmt="PNG"), None) for i in range(3)})
    else:
        src = tar_source(tmp_path / "bare" / "0.tar", n=3, caption="")
    monkeypatch.chdir(tmp_path)
    out = invoke("init", "--source", str(src), "--samples", "3")
    assert out.exit_code == 0, out.output
    assert "captions: 0 of the 3" in out.output and "none of the samples looked at has a caption" in out.output


def test_init_with_stand_ins_names_a_model_for_every_stage(tmp_path, monkeypatch):
    """--stand-ins: the demo's tiny detector, embedder and encoder, so `check` finds every model (the whole
    loop can run on a CPU)."""
    from tasks.engine.config import load_config
    from tasks.inspection.check import check_config

    src = folder_source(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    assert invoke("init", "--source", str(src), "--stand-ins", "--samples", "2").exit_code == 0
    cfg = load_config(tmp_path / "ram-engine.yaml")
    assert cfg.orchestration.until is None and cfg.ground.detector.model and cfg.clean.embedder.kind == "conv"
    report = check_config(cfg)
    assert not report.problems, [p.line() for p in report.problems]


# --------------------------------------------------------------------------- run checks first
def test_run_checks_first_and_stops_before_any_work(tmp_path):
    """The default config has no detector: `run` says so in seconds and commits nothing (it used to train a
    baseline for half an hour first)."""
    src = folder_source(tmp_path / "photos", n=3)
    store = tmp_path / "store"
    out = invoke("--engine", "local", "--store", str(store), "--set", f"ingest.source={src}",
                 "--set", "ground.detector.model=null", "run")
    assert out.exit_code == 1, out.output
    assert "ground.detector.model: (not set)" in out.output and "before any work" in out.output
    assert not (store / "images").exists()
    # --until parse needs no detector: the check covers the stages that run, and they run
    ok = invoke("--engine", "local", "--store", str(store), "--set", f"ingest.source={src}",
                "--set", "ground.detector.model=null", "run", "--until", "parse")
    assert ok.exit_code == 0, ok.output


# --------------------------------------------------------------------------- which config
def test_config_is_found_without_c(tmp_path, monkeypatch):
    """--config, then $RAM_ENGINE_CONFIG, then ./ram-engine.yaml, then the last demo's, then the shipped demo."""
    import flows.cli as cli

    def config_with_store(path: Path, store: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"store": {"url": store}}))
        return path

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recorded = tmp_path / "state" / "last-demo.json"
    monkeypatch.setattr(cli, "last_demo_file", lambda: recorded)
    cli.state.config_path, cli.state.overrides, cli.state.store_url = None, [], None
    assert cli.config_choice()[0] is None                          # nothing: the shipped demo config
    demo_cfg = config_with_store(tmp_path / "ram-demo" / "ram-engine.yaml", "./store")
    cli.record_last_demo(str(demo_cfg))
    assert cli.config_choice() == (str(demo_cfg), f"the last demo's, recorded in {recorded}")
    assert cli.get_config().store.url == str(tmp_path / "ram-demo" / "store")
    local = config_with_store(work / "ram-engine.yaml", "./here")
    assert cli.config_choice()[0] == str(local)
    env_cfg = config_with_store(tmp_path / "env.yaml", "./env-store")
    monkeypatch.setenv("RAM_ENGINE_CONFIG", str(env_cfg))
    assert cli.config_choice()[0] == str(env_cfg)
    cli.state.config_path = "production"
    assert cli.config_choice() == ("production", "given")
    cli.state.config_path = None
    demo_cfg.unlink()                                               # a recorded config that is gone is ignored
    monkeypatch.delenv("RAM_ENGINE_CONFIG")
    local.unlink()
    assert cli.config_choice()[0] is None


def test_ls_after_the_demo_finds_its_store_without_c(tmp_path, monkeypatch):
    """`ram-engine ls` after a demo: the demo's config, recorded, names the store (it said "no store")."""
    import flows.cli as cli
    from storage import Store

    demo = tmp_path / "ram-demo"
    Store(str(demo / "store")).begin("images", code_version="t", config={}, parents=[]).commit()
    (demo / "ram-engine.yaml").write_text("store:\n  url: ./store\n")
    monkeypatch.setattr(cli, "last_demo_file", lambda: tmp_path / "state.json")
    cli.record_last_demo(str(demo / "ram-engine.yaml"))
    monkeypatch.chdir(tmp_path)
    out = invoke("ls")
    assert out.exit_code == 0 and "images" in out.output, out.output


def test_a_folder_named_like_a_shipped_config_does_not_shadow_it(tmp_path, monkeypatch):
    """`ram-engine demo --out demo` makes ./demo; `-c demo` (and the demo's own config) must still load."""
    from tasks.engine.config import load_config, packaged_configs, resolve_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "production").mkdir()
    assert resolve_config("demo") == packaged_configs()["demo"]
    assert resolve_config("production") == packaged_configs()["production"]
    assert load_config("demo").orchestration.torch_threads == 1
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="mine is a directory"):
        load_config("mine")
    (tmp_path / "demo.yaml").write_text("store:\n  url: ./mine\n")   # a file of that name is the user's
    assert resolve_config("demo.yaml") == Path("demo.yaml")


def test_global_options_work_after_the_command(tmp_path):
    """`ram-engine check -c production` used to answer "No such option: -c"."""
    from flows.cli import hoist_global_options as hoist

    assert hoist(["check", "-c", "production", "--serve"]) == ["-c", "production", "check", "--serve"]
    assert hoist(["show", "x@1", "--rows", "0", "--store", "s", "--debug"]) == \
        ["--store", "s", "--debug", "show", "x@1", "--rows", "0"]
    assert hoist(["--set", "a=1", "ls", "--set=b=2"]) == ["--set", "a=1", "--set=b=2", "ls"]
    assert hoist(["ls", "--", "-c"]) == ["ls", "--", "-c"]
    proc = cli(["ls", "--store", str(tmp_path / "nowhere")], cwd=tmp_path)
    assert proc.returncode == 2 and "no store at" in proc.stderr and "No such option" not in proc.stderr


def test_help_shows_flags_without_a_type():
    out = invoke("--help")
    assert out.exit_code == 0
    assert "<bool>" not in out.output and "--debug" in out.output and "FILE|NAME" in out.output
    assert "<bool>" not in invoke("check", "--help").output


# --------------------------------------------------------------------------- quiet by default
def test_trainer_step_lines_only_at_verbose(caplog, monkeypatch):
    from tasks.engine import progress

    progress.quiet_by_default()
    trainer = logging.getLogger("ram_model.trainer")
    monkeypatch.setattr(progress, "_verbose", [False])
    with caplog.at_level(logging.INFO, logger="ram_model"):
        trainer.info("step %d/%d loss", 3, 300)
        trainer.info("resumed from %s", "x")
    assert [r.getMessage() for r in caplog.records] == ["resumed from x"]
    caplog.clear()
    monkeypatch.setattr(progress, "_verbose", [True])
    with caplog.at_level(logging.INFO, logger="ram_model"):
        trainer.info("step %d/%d loss", 3, 300)
    assert [r.getMessage() for r in caplog.records] == ["step 3/300 loss"]


def test_threads_line_once_per_process_and_choice(caplog, monkeypatch):
    from tasks.engine import progress

    monkeypatch.setattr(progress, "_threads_said", set())
    with caplog.at_level(logging.INFO, logger="ram_engine"):
        for _ in range(3):
            progress.apply_torch_threads(1)
    assert sum("torch uses" in r.getMessage() for r in caplog.records) == 1


def test_no_third_party_progress_bars_by_default(tmp_path):
    """transformers' bars read HF_HUB_DISABLE_PROGRESS_BARS at import: the CLI sets it before any import."""
    code = ("import os; from tasks.engine.progress import quiet_by_default; quiet_by_default(); "
            "from transformers.utils import logging as l; print(l.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


# --------------------------------------------------------------------------- bugs of the inspection commands
def _commit(store, stage: str, parents=(), files: dict | None = None):
    w = store.begin(stage, code_version="t", config={"stage": stage}, parents=parents)
    if files:
        w.write_files("model", files)
    return w.commit()


def test_lineage_names_a_direct_parent_reached_through_another(tmp_path):
    """A model's parents are clean and images; clean's lineage reaches the same images first. The model's own
    line must still say it was made from images (the walk used to compute "shown above" before walking)."""
    from storage import Store
    from tasks.shared.lineage import lineage

    store = Store(str(tmp_path / "s"))
    images = _commit(store, "images")
    clean = _commit(store, "clean", [images])
    model = _commit(store, "models/ram", [clean, images], files={"config.json": b"{}"})
    lines = [(depth, text) for depth, _, text in lineage(store, model)]
    assert lines == [(0, model.ref), (1, clean.ref), (2, images.ref), (1, f"{images.ref} (shown above)")]


def test_show_and_lineage_of_a_model_say_files_not_rows(tmp_path):
    from storage import Store

    store = Store(str(tmp_path / "s"))
    images = _commit(store, "images")
    model = _commit(store, "models/ram", [images], files={"config.json": b"{}", "tags.txt": b"cat\ndog\n"})
    shown = invoke("--store", store.url, "show", f"models/ram@{model.id}")
    assert shown.exit_code == 0, shown.output
    assert "rows in 0" not in shown.output and "schema" not in shown.output
    assert "2 files" in shown.output and "config.json" in shown.output and "tags.txt" in shown.output
    line = invoke("--store", store.url, "lineage", f"models/ram@{model.id}").output
    assert "2 files, no table" in line and "rows 0 -> 0" not in line


def test_show_says_which_truth_an_mAP_is_against(tmp_path):
    from storage import Store
    from tasks.shared.lineage import display_metrics

    store = Store(str(tmp_path / "s"))
    w = store.begin("models/ram", code_version="t", config={}, parents=[])
    w.write_files("model", {"config.json": b"{}"})
    model = w.commit(metrics={"mAP": 0.702})
    w = store.begin("evaluate", code_version="t", config={}, parents=[])
    evaluate = w.commit(metrics={"ablation": [{"stage": "cleaned", "mAP": 0.746}]})
    assert [n for n, _, _ in display_metrics(store, model)] == [
        "mAP (held-out keys, against the noisy labels it trained on; evaluate: against the truth)"]
    assert [n for n, _, _ in display_metrics(store, evaluate)][0].startswith("against the ground truth")


# --------------------------------------------------------------------------- the README, followed as written
def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def bash_blocks(section: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", section, re.S)


@pytest.mark.slow
def test_a_new_user_follows_the_readme_from_a_clone_to_their_own_photos(tmp_path):
    """A fresh `git clone` of this repository; the README's "Your own data" section: a photos/ folder laid out
    as it shows (captions.jsonl, a sub-folder), then its commands exactly as written, in a new project folder.
    Each must succeed, and the store must end with the photos ingested and parsed and a report written. (The
    clone runs on this environment's installed dependencies: the set-up command itself is CI's.)"""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
    section = readme_section("Your own data")
    assert "photos/" in section and "captions.jsonl" in section and "kitchen/pan.png" in section
    project = tmp_path / "project"
    photos = project / "photos"
    (photos / "kitchen").mkdir(parents=True)
    captions = ["two dogs running on a beach", "a red car parked on a street", "a cat sleeping on a sofa",
                "a man riding a horse in a field", "a boat on a lake near a tree", "a pan on a stove in a kitchen"]
    rows = []
    for i, caption in enumerate(captions):
        name = "kitchen/pan.png" if "pan" in caption else f"photo_{i}.jpg"
        (photos / name).write_bytes(image_bytes(size=(96, 72), color=(30 * i, 120, 200 - 30 * i),
                                                fmt="PNG" if name.endswith(".png") else "JPEG"))
        rows.append(json.dumps({"file": name, "caption": caption}))
    (photos / "captions.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")

    bin_dir = str(Path(sys.executable).parent)   # `ram-engine` as installed beside this Python
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAM_ENGINE_", "PREFECT_"))}
    env |= {"PYTHONPATH": str(clone), "PATH": bin_dir + os.pathsep + env.get("PATH", ""), "OMP_NUM_THREADS": "1",
            "HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    (tmp_path / "home").mkdir()
    commands = [line.split("#", 1)[0].strip() for block in bash_blocks(section) for line in block.splitlines()]
    commands = [c for c in commands if c]
    assert [c.split()[1] for c in commands] == ["init", "run", "show", "report"], commands
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        if command.startswith("ram-engine init"):
            assert f"format: folder; {len(captions)} sample(s)" in proc.stdout
        if command.startswith("ram-engine show"):
            assert "dog" in proc.stdout and "kitchen" in proc.stdout
    from storage import Store

    store = Store(str(project / "ram-data"))
    assert store.open("images").manifest["rows_out"] == len(captions)
    assert store.open("parsed").manifest["rows_out"] == len(captions)
    assert "generated" not in store.stages()              # the config init wrote stops after parse
    assert (project / "ram-report" / "index.html").is_file()


def test_the_documented_duckdb_rejects_one_liner_runs_with_and_without_rejects(tmp_path):
    """The README's DuckDB rejects one-liner failed ("No files found") on every version without rejects: a
    version with none has no _rejects/ folder. The documented one (docs/store.md) runs on both."""
    duckdb = pytest.importorskip("duckdb")
    import glob

    import pyarrow as pa

    from storage import Store

    row = next(line for line in (ROOT / "docs" / "store.md").read_text().splitlines() if line.startswith("| DuckDB |"))
    one_liner = next(code for code in re.findall(r"`([^`]+)`", row) if "_rejects" in code and "duckdb.sql" in code)
    store = Store(str(tmp_path / "s"))
    schema = pa.schema([("key", pa.string())])
    found = {}
    for name, rejects in (("clean-run", []), ("with-rejects", [{"key": "k2", "reason": "too-small", "detail": "1x1",
                                                               "source": "a.tar:k2", "field": "image"}])):
        w = store.begin("t", code_version=name, config={}, parents=[], schema=schema)
        w.write_part("p0", table=pa.table({"key": ["k1"]}, schema=schema), rejects=rejects or None,
                     rows_in=1 + len(rejects))
        v = w.commit()
        folder = store.full_url(f"{v.stage}/{v.id}")
        result = eval(one_liner.replace("V/", folder + "/"), {"duckdb": duckdb, "glob": glob})
        found[name] = None if result is None else result.fetchall()
    assert found["clean-run"] is None
    assert [r[0] for r in found["with-rejects"]] == ["k2"]


def test_report_command_finds_the_ablation_of_its_lineage(tmp_path):
    """`ram-engine report` (not only the demo) puts the ablation's verdict first: the latest ablation made from
    labels in the reported version's lineage; none from another lineage."""
    from flows.cli import ablation_of
    from storage import Store

    store = Store(str(tmp_path / "s"))
    images = _commit(store, "images")
    clean = _commit(store, "clean", [images])
    evaluate = _commit(store, "evaluate", [clean, images])
    assert ablation_of(store, evaluate) is None
    ablation = _commit(store, "ablation", [clean, images])
    assert ablation_of(store, evaluate).id == ablation.id
    lone = store.begin("images", code_version="other", config={}, parents=[]).commit()   # another lineage
    assert ablation_of(store, lone) is None
