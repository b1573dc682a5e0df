"""The production route: shipped configs found by name, `ram-engine check`, official checkpoints imported
into the store. Cheap: the stand-in files here are toy-sized in their real formats (tests/standins.py);
the real-size run is tests/test_production_e2e.py."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tasks.inspection.check import check_config
from tasks.engine.config import ConfigError, load_config, packaged_configs, resolve_config

from .standins import production_files

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory) -> dict[str, str]:
    return production_files(tmp_path_factory.mktemp("models"), real=False)


def overrides(files: dict[str, str], store: Path) -> list[str]:
    return [f"{k}={v}" for k, v in files.items()] + [f"store.url={store}", "store.storage_options={}",
                                                     "ingest.source=null"]


def invoke(*args: str):
    from flows.cli import app

    return CliRunner(env={"COLUMNS": "250"}).invoke(app, list(args))


# shipped configs --------------------------------------------------------------------------------------
def test_shipped_configs_are_found_by_name_and_validate():
    shipped = packaged_configs()
    assert {"demo", "production", "production_ram_plus"} <= set(shipped)
    for name in shipped:
        assert resolve_config(name) == resolve_config(f"{name}.yaml") == shipped[name]
        load_config(name)
    prod = load_config("production")
    assert prod.generate.baseline.endswith(".pth") and prod.model.tokenizer and prod.model.thresholds
    assert prod.ground.detector.model and prod.clean.embedder.kind == "clip" and prod.train.init == "models/baseline"
    with pytest.raises(ConfigError, match="neither a file nor a shipped config; shipped: demo, production"):
        resolve_config("producton")


def test_configs_are_in_the_wheel(tmp_path):
    """An installed wheel (and the image, which pip-installs the project) carries the configs."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("ram_data_engine-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"configs/__init__.py", "configs/demo.yaml", "configs/production.yaml",
            "configs/production_ram_plus.yaml"} <= names


def test_run_serve_and_check_say_which_config(tmp_path):
    out = invoke("--store", str(tmp_path / "s"), "check")
    assert "config: " in out.output and "demo.yaml (default: the demo config" in out.output
    out = invoke("-c", "production", "--set", f"store.url={tmp_path / 's'}", "--set", "store.storage_options={}",
                 "check")
    assert "production.yaml (given)" in out.output


# check ----------------------------------------------------------------------------------------------------
def test_check_passes_on_a_complete_configuration(toy_files, tmp_path):
    out = invoke("-c", "production", *sum((["--set", o] for o in overrides(toy_files, tmp_path / "store")), []),
                 "check")
    assert out.exit_code == 0, out.output
    text = out.output
    for what in ("store ", "generate.baseline ", "every tensor in place", "model.tokenizer ", "30524 ids",
                 "baseline tags vs parse.labels: all 4585", "ground.detector.model ", "grounding-dino",
                 "clean.embedder.model ", "training work folder ", "the configuration is ready"):
        assert what in text, what


def _problems(cfg, **kw) -> dict[str, str]:
    return {p.field: p.line() for p in check_config(cfg, **kw).problems}


def test_check_names_field_path_and_remedy_for_each_problem(toy_files, tmp_path, monkeypatch):
    base = overrides(toy_files, tmp_path / "store")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    short_zh = tmp_path / "zh.txt"
    short_zh.write_text("\n".join(["猫"] * 10))
    wrong_vocab = tmp_path / "bert-small"
    from .standins import bert_tokenizer_folder

    bert_tokenizer_folder(wrong_vocab, ["cat"])
    (wrong_vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat"]) + "\n")
    (wrong_vocab / "tokenizer.json").unlink()
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    cfg = load_config("production", base + [
        f"store.url={blocker}/store",                         # cannot be created: a file is in the way
        f"model.tag_list_chinese={short_zh}",                 # 10 names for 4,585 tags
        f"model.tokenizer={wrong_vocab}",
        f"ground.detector.model={tmp_path / 'no-gdino'}",
        "clean.embedder.model=org/clip-hub-id",               # a hub id while local_files_only is true
        "orchestration.task_runner=dask", "orchestration.dask_address=tcp://127.0.0.1:9",
    ])
    found = _problems(cfg, serve=True)
    assert "cannot write to the store" in found["store.url"] and str(blocker) in found["store.url"]
    assert "Chinese" in found["model.tag_list / model.thresholds / model.tag_list_chinese"]
    assert "no such folder" in found["ground.detector.model"] and "no-gdino" in found["ground.detector.model"]
    assert "huggingface-cli download org/clip-hub-id" in found["clean.embedder.model"]
    assert "cannot connect" in found["orchestration.dask_address"]
    assert "PREFECT_API_URL" in found and "serve" in found["PREFECT_API_URL"]
    # with the Chinese names fixed, the tokenizer's size is checked against the checkpoint's caption branch
    cfg2 = load_config("production", base + [f"model.tokenizer={wrong_vocab}"])
    assert "but the checkpoint's caption branch has 30524" in _problems(cfg2)["model.tokenizer"]


def test_check_finds_a_checkpoint_that_does_not_fit(toy_files, tmp_path):
    from ram_model.checkpoint import official_state_dict
    from ram_model.ram import RAM, RAMConfig

    other = RAM(RAMConfig.tiny(num_tags=4585, vocab_size=100, with_caption=False))
    sd = official_state_dict(other)
    sd.pop("fc.weight")
    torch.save({"model": sd}, tmp_path / "broken.pth")
    (tmp_path / "not-a-checkpoint.pth").write_bytes(b"<html>404</html>")
    (tmp_path / "ten.txt").write_text("\n".join(f"t{i}" for i in range(10)))
    base = overrides(toy_files, tmp_path / "store")
    found = _problems(load_config("production", base + [f"generate.baseline={tmp_path / 'broken.pth'}"]))
    assert "model keys not in the checkpoint" in found["generate.baseline"] and "fc.weight" in found["generate.baseline"]
    found = _problems(load_config("production", base + [f"generate.baseline={tmp_path / 'not-a-checkpoint.pth'}"]))
    assert "cannot read" in found["generate.baseline"]
    found = _problems(load_config("production", base + [f"model.tag_list={tmp_path / 'ten.txt'}",
                                                        "model.tag_list_chinese=null", "model.thresholds=null"]))
    assert "per-class thresholds" in found["model.thresholds"]


def test_check_finds_a_disk_too_small_for_the_checkpoints(toy_files, tmp_path, monkeypatch):
    """The training work folder must hold the checkpoints of the model train.init names (3× its weights each,
    up to three at once, plus two copies of the weights); a smaller disk is named before the night run."""
    import shutil

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    cfg = load_config("production", overrides(toy_files, tmp_path / "store") + ["train.steps=500",
                                                                               "train.checkpoint_every_steps=100"])
    report = check_config(cfg)
    line = next(ok for ok in report.ok if ok.startswith("training work folder"))
    need = float(re.search(r"for ~([0-9.]+) GB", line).group(1)) * 1e9
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=int(need / 2)))
    found = _problems(cfg)
    assert set(found) == {"RAM_ENGINE_CACHE"}, found
    assert re.search(r"RAM_ENGINE_CACHE: .*cache/train: training .*\.pth needs ~[0-9.]+ GB there \(3 checkpoint\(s\) "
                     r"of 3× its [0-9.]+ GB of weights, and two copies of them\) and [0-9.]+ GB are free: free "
                     r"space, or set RAM_ENGINE_CACHE", found["RAM_ENGINE_CACHE"]), found["RAM_ENGINE_CACHE"]
    # one step makes one checkpoint: 5× the weights fit where 11× did not
    one = load_config("production", overrides(toy_files, tmp_path / "store") + ["train.steps=1"])
    assert _problems(one) == {}


def test_compose_worker_checks_before_serving():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    worker = text[text.index("  worker:"):]
    assert "check --serve && exec ram-engine" in worker


# import of an official checkpoint ----------------------------------------------------------------------
def import_baseline(store, cfg):
    from tasks.engine.runner import run
    from tasks.stages.import_model import STAGE

    return run(STAGE, store, cfg, {"checkpoint": cfg.generate.baseline})


def test_official_baseline_is_imported_once_with_its_files(toy_files, tmp_path):
    from ram_model.labels import LabelSystem
    from storage import Store
    from tasks.engine.cache import clear_worker_cache
    from tasks.shared.models import load_model

    cfg = load_config("production", overrides(toy_files, tmp_path / "store"))
    store = Store(str(tmp_path / "store"))
    first = import_baseline(store, cfg)
    assert first.status == "written"
    again = import_baseline(store, cfg)
    assert again.status == "reused" and again.version.id == first.version.id
    clear_worker_cache()
    model = load_model(store, again.version.ref)
    ref = LabelSystem.default()
    assert model.tags == ref.tags
    assert torch.allclose(model.class_threshold, torch.tensor(ref.thresholds))
    assert len(model.get_tokenizer()) == 30524 and model.get_tokenizer().convert_tokens_to_ids("[ENC]") == 30523
    assert not again.version.verify()


def test_model_card_reads_tags_and_thresholds_without_the_weights(toy_files, tmp_path, monkeypatch):
    """A process that only maps tags or reads thresholds (the CLI preparing embed and clean) fetches the
    model's config, tag list and thresholds, never its weights."""
    from ram_model.checkpoint import read_model_card, save_pretrained
    from ram_model.labels import LabelSystem
    from ram_model.ram import RAM
    from storage import Store, StoreError
    from tasks.engine.cache import clear_worker_cache
    from tasks.shared.models import load_model, model_card

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    cfg = load_config("production", overrides(toy_files, tmp_path / "store"))
    store = Store(str(tmp_path / "store"))
    version = import_baseline(store, cfg).version
    clear_worker_cache()
    card = model_card(store, "models/baseline")
    ref = LabelSystem.default()
    assert card.tags == list(ref.tags) and card.thresholds == pytest.approx(ref.thresholds)
    assert card.config.swin.image_size == cfg.model.image_size
    fetched = {p.name for p in (tmp_path / "cache" / "models").rglob("*") if p.is_file()}
    assert fetched == {"config.json", "tags.txt", "thresholds.txt"}          # no model.safetensors
    with pytest.raises(StoreError, match="no file named nope.bin"):
        version.download(str(tmp_path / "x"), names=["nope.bin"])
    # a save_pretrained folder: read in place; a card file missing is named
    model = load_model(store, "models/baseline")
    save_pretrained(model, tmp_path / "folder")
    assert model_card(store, str(tmp_path / "folder")).tags == card.tags
    (tmp_path / "folder" / "thresholds.txt").unlink()
    with pytest.raises(FileNotFoundError, match="thresholds.txt is missing"):
        read_model_card(tmp_path / "folder")
    # an official checkpoint outside the store: read from its tensors' shapes, no model built
    official = load_model(store, cfg.generate.baseline)
    clear_worker_cache()
    with monkeypatch.context() as m:
        m.setattr(RAM, "__init__", lambda *a, **k: pytest.fail("model_card built a model"))
        from_file = model_card(store, cfg.generate.baseline)
    assert from_file.config == official.config and from_file.tags == official.tags
    assert from_file.thresholds == pytest.approx(official.class_threshold.tolist())
    with pytest.raises(StoreError, match="neither a store ref"):
        model_card(store, str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_quick():
    """benchmarks/gpu.py is the one prepared GPU script; CI proves it runs (toy sizes on CPU)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    for what in ("tagging", "Grounding DINO", "training step"):
        assert any(what in line and "images/s" in line for line in lines) or what == "tagging", what
    batch_lines = [line for line in lines if line.lstrip().startswith("batch ") and "of bound" in line]
    assert len(batch_lines) == 5, batch_lines   # 3 tagging + 2 detector batches (the training line is its own)
    assert lines[-1].startswith("RAM tagging at the largest batch:") and "of the physical bound" in lines[-1]
