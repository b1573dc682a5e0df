"""Stages over the store, one at a time: parse, generate, ground (resume inside a part), train."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from storage import Store, schemas
from tests.fixtures import ingest
from tasks.engine.runner import run
from tasks.stages import parse
from tests.fixtures import train_model
from tasks.engine.runner import StageError

from tests.fixtures import demo_config


@pytest.fixture(scope="module")
def base(demo_world, tmp_path_factory):
    """The demo world ingested and parsed in a store of this module's own."""
    root = tmp_path_factory.mktemp("stages")
    cfg = demo_config(demo_world, root / "store", **{"ground.batch_size": 3, "train.holdout_fraction": 0.2,
                                                     "train.init": "null"})
    store = Store(cfg.store.url)
    images = ingest(store, cfg.ingest, source=str(demo_world.world.source)).version
    parsed = run(parse.STAGE, store, cfg, {"images": images}).version
    return root, demo_world.world, cfg, store, images, parsed


def caption_generated(store: Store, images, parsed):
    """A `generated` version whose labels are the caption labels (no model): the ground stage's input."""
    from tasks.shared.lineage import key_tags
    from tasks.engine.runner import PartTask, parts_of, run_stage

    tags = key_tags(parsed)

    def process(w, task: PartTask):
        index = images.read_file(next(f["path"] for f in task.payload["part"].files if f["kind"] == "table"),
                                 columns=["key"])
        rows = [{"key": k, "parsed_tag_ids": sorted(tags.get(k, ())), "predicted_tag_ids": [],
                 "predicted_scores": [], "generated_captions": [], "generated_tag_ids": [],
                 "tag_ids": sorted(tags.get(k, ()))} for k in index.column("key").to_pylist()]
        return w.write_part(task.name, table=pa.Table.from_pylist(rows, schema=schemas.GENERATED),
                            rows_in=len(rows), source_digest=task.source_digest)

    writer = store.begin("generated", code_version="test-captions-only", config={}, parents=[images, parsed])
    return run_stage(writer, parts_of(images), process).version


def ground_run(store, ground_cfg, images, generated, parsed):
    from tasks.stages import ground

    return run(ground.STAGE, store, {"ground": ground_cfg}, {"images": images, "generated": generated, "parsed": parsed})


def test_parse_stage_records_labels_and_reconciles(base):
    _, world, cfg, store, images, parsed = base
    m = parsed.manifest
    assert m["rows_in"] == m["rows_out"] + m["rows_rejected"]
    assert any(p.startswith("labels/") for p in parsed.parents)
    assert 0 < m["metrics"]["coverage"] <= 1 and m["metrics"]["top_tags"]
    assert run(parse.STAGE, store, cfg, {"images": images}).status == "reused"


def test_ground_resumes_inside_a_part_without_duplicates(base, tmp_path, monkeypatch):
    import tasks.stages.ground as ground

    root, world, cfg, store, images, parsed = base
    generated = caption_generated(store, images, parsed)
    # An uninterrupted run in a second store over the same inputs gives the reference bytes.
    clean_store = Store(str(tmp_path / "clean"))
    for v in (images, parsed, generated):
        for entry in store.fs.find(store.abs(f"{v.stage}/{v.id}")):
            rel = entry[len(store.root) + 1:]
            clean_store.fs.makedirs(clean_store.abs(rel).rsplit("/", 1)[0], exist_ok=True)
            clean_store.fs.put_file(entry, clean_store.abs(rel))
    for lv in [p for p in parsed.parents if p.startswith("labels/")]:
        for entry in store.fs.find(store.abs(lv)):
            rel = entry[len(store.root) + 1:]
            clean_store.fs.makedirs(clean_store.abs(rel).rsplit("/", 1)[0], exist_ok=True)
            clean_store.fs.put_file(entry, clean_store.abs(rel))
    want = ground_run(clean_store, cfg.ground, clean_store.open_ref(images.ref),
                               clean_store.open_ref(generated.ref), clean_store.open_ref(parsed.ref)).version

    calls = {"n": 0}
    real_ground_batch = ground.ground_batch

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third detector batch of the first part dies
            raise RuntimeError("simulated crash")
        return real_ground_batch(*args, **kwargs)

    monkeypatch.setattr(ground, "ground_batch", crashing)
    with pytest.raises(StageError, match="simulated crash"):
        ground_run(store, cfg.ground, images, generated, parsed)
    assert store.versions("regions") == []
    progress = [p for p in store.fs.find(store.abs("regions")) if "/_progress/" in p and p.endswith(".checkpoint.json")]
    assert len(progress) == 2  # two batches were checkpointed before the crash
    calls["n"] = -10_000
    monkeypatch.setattr(ground, "ground_batch", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1),
                                                                 real_ground_batch(*a, **k))[1])
    got = ground_run(store, cfg.ground, images, generated, parsed).version
    n_batches_rerun = calls["n"] + 10_000
    total_batches = sum(-(-p.rows_in // cfg.ground.batch_size) for p in got.parts)
    assert n_batches_rerun == total_batches - 2  # the checkpointed batches were not redone
    table = got.read_table()
    assert len(set(table.column("crop_key").to_pylist())) == table.num_rows  # no duplicate region
    assert sorted((f["path"].split("/", 2)[2], f["sha256"]) for f in got.files()) == \
        sorted((f["path"].split("/", 2)[2], f["sha256"]) for f in want.files())
    assert got.id == want.id
    assert not [p for p in store.fs.find(store.abs("regions")) if "/_progress/" in p]
    assert {s["__key__"] for s in got.iter_samples()} == set(table.column("crop_key").to_pylist())


def test_train_stage_writes_a_model_version(base, tmp_path, monkeypatch):

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    _, world, cfg, store, images, parsed = base
    result = train_model(store, cfg.model, cfg.train, parsed, images)
    v = result.version
    names = {f["name"] for f in v.files("file")}
    assert {"model.safetensors", "config.json", "tags.txt", "thresholds.txt", "metrics.json"} <= names
    assert v.manifest["metrics"]["train"]["steps"] == 3
    assert "mAP" in v.manifest["metrics"] and v.manifest["metrics"]["samples"]["train"] > 0
    assert set(v.parents) >= {parsed.ref, images.ref}
    assert train_model(store, cfg.model, cfg.train, parsed, images).status == "reused"
    from tasks.shared.models import load_model

    model = load_model(store, v.ref)
    assert model.tags == Path(world.tag_list).read_text().split()
    from tasks.stages.train import train_work_dir

    work = train_work_dir(store, cfg.train.name, v.id)
    assert work.parent.exists() and not work.exists()  # checkpoints cleaned up


def test_fine_tuning_starts_from_the_stored_files_without_loading_them(base, tmp_path, monkeypatch):
    """Fine-tuning from a stored model with the same tags copies its files as the start: the train stage
    never loads it beside the model it trains (at Swin-L that is 1.9 GB more for the whole training)."""
    import tasks.stages.train as train_mod

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    _, world, cfg, store, images, parsed = base
    start = train_model(store, cfg.model, cfg.train, parsed, images).version
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("the stored model was loaded"))
    tuned = train_model(store, cfg.model, cfg.train.model_copy(update={"init": start.ref, "steps": 1,
                                                                                  "name": "tuned"}),
                                  parsed, images).version
    assert tuned.manifest["metrics"]["train"]["steps"] == 1 and start.ref in tuned.parents
    sha = {f["name"]: f["sha256"] for f in tuned.files("file")}
    assert sha["tags.txt"] == {f["name"]: f["sha256"] for f in start.files("file")}["tags.txt"]


def test_fine_tuning_onto_new_tags_embeds_them_with_the_configured_clip(base, tmp_path, monkeypatch):
    """Tags the starting model does not know get their label embeddings from model.clip's text encoder (a
    tiny random CLIP built from config), as the reference builds them; the tags it knows keep their rows."""
    import torch
    from transformers import BertTokenizerFast, CLIPConfig, CLIPModel

    from ram_model.checkpoint import from_pretrained, save_pretrained
    from ram_model.label_embeddings import build_label_embeddings
    from tasks.shared.models import local_model_dir

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    _, world, cfg, store, images, parsed = base
    start = train_model(store, cfg.model, cfg.train, parsed, images).version
    model = from_pretrained(local_model_dir(start))
    tags = list(model.tags)
    known_rows = model.label_embed.detach().clone()
    model.set_tags(tags[:-3])                      # a start that has never seen the last three tags
    save_pretrained(model, tmp_path / "older")
    tok = BertTokenizerFast.from_pretrained(str(Path(local_model_dir(start)) / "tokenizer"))
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.sep_token_id,
                         bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=model.config.label_dim)).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    model_cfg = cfg.model.model_copy(update={"clip": str(tmp_path / "clip")})
    tuned = train_model(store, model_cfg, cfg.train.model_copy(update={
        "init": str(tmp_path / "older"), "steps": 1, "name": "tuned-clip"}), parsed, images).version
    got = from_pretrained(local_model_dir(tuned))
    assert got.tags == tags
    want = build_label_embeddings(tags[-3:], str(tmp_path / "clip"))
    assert torch.allclose(got.label_embed[-3:], want, atol=1e-6)
    assert torch.equal(got.label_embed[:-3], known_rows[:-3])
    # a CLIP whose width is not the model's label_dim is refused with the reason
    wrong = torch.nn.functional.pad(want, (0, 1))
    with pytest.raises(ValueError, match="projection width"):
        from_pretrained(tmp_path / "older").set_tags(tags, embed_new=lambda new: wrong)


def test_encoder_init_enters_the_model_version_by_its_weights(base, tmp_path, monkeypatch):
    import torch

    from ram_model.checkpoint import save_pretrained
    from ram_model.ram import RAM, RAMConfig

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    _, world, cfg, store, images, parsed = base
    tags = Path(world.tag_list).read_text().split()

    def save_encoder(seed):
        torch.manual_seed(seed)
        save_pretrained(RAM(RAMConfig.tiny(num_tags=len(tags), with_caption=False), tags=tags), tmp_path / "enc")

    model_cfg = cfg.model.model_copy(update={"encoder_init": str(tmp_path / "enc"), "with_caption": False,
                                             "max_pool_head": False, "image_encoder": "swin"})
    train_cfg = cfg.train.model_copy(update={"name": "enc-init", "caption_loss": False, "fine_tune_latest": False})
    save_encoder(0)
    first = train_model(store, model_cfg, train_cfg, parsed, images).version
    assert train_model(store, model_cfg, train_cfg, parsed, images).status == "reused"
    save_encoder(1)     # other weights under the same path: a new model, never the old one reused
    second = train_model(store, model_cfg, train_cfg, parsed, images)
    assert second.status == "written" and second.version.id != first.id
    assert second.version.manifest["config"]["model"]["encoder_init"] != first.manifest["config"]["model"]["encoder_init"]
    assert set(first.manifest["config"]["model"]["encoder_init"]) == {"content"}   # by its bytes, not its path


def test_a_frozen_encoder_trains_only_the_head(base, tmp_path, monkeypatch):
    """train.freeze_encoder: the conv encoder (its BatchNorm statistics included) and image_proj come out as
    model.encoder_init put them in; the head learns. Without it the encoder moves."""
    import torch

    from ram_model.checkpoint import from_pretrained, save_pretrained
    from ram_model.ram import RAM, RAMConfig
    from tasks.shared.models import local_model_dir

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    _, world, cfg, store, images, parsed = base
    tags = Path(world.tag_list).read_text().split()
    torch.manual_seed(0)
    encoder = RAM(RAMConfig.tiny(num_tags=len(tags), with_caption=False, image_encoder="conv",
                                 image_size=cfg.model.image_size), tags=tags)
    save_pretrained(encoder, tmp_path / "enc")
    start = {k: v for k, v in encoder.state_dict().items() if k.startswith(("visual_encoder.", "image_proj."))}
    model_cfg = cfg.model.model_copy(update={"encoder_init": str(tmp_path / "enc"), "with_caption": False,
                                             "image_encoder": "conv"})
    runs = {}
    for frozen in (True, False):
        train_cfg = cfg.train.model_copy(update={"name": f"frozen-{frozen}", "caption_loss": False, "steps": 3,
                                                 "fine_tune_latest": False, "freeze_encoder": frozen})
        version = train_model(store, model_cfg, train_cfg, parsed, images).version
        runs[frozen] = from_pretrained(local_model_dir(version)).state_dict()
    assert all(torch.equal(runs[True][k], v) for k, v in start.items())
    assert any(not torch.equal(runs[False][k], v) for k, v in start.items())
    assert not torch.equal(runs[True]["fc.weight"], encoder.state_dict()["fc.weight"])   # the head learned


def test_generate_stage_reconciles_and_names_a_missing_shard(base, tmp_path, monkeypatch):
    from tasks.stages import generate

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    _, world, cfg, store, images, parsed = base
    baseline = train_model(store, cfg.model, cfg.train, parsed, images).version
    gen_cfg = cfg.generate.model_copy(update={"max_length": 10, "num_beams": 1})
    v = run(generate.STAGE, store, {"generate": gen_cfg, "parse": cfg.parse},
            {"images": images, "parsed": parsed, "baseline": baseline.ref}).version
    m = v.manifest
    assert m["rows_in"] == 24 and m["rows_in"] == m["rows_out"] + m["rows_rejected"]
    for row in v.read_table().to_pylist():
        assert set(row["parsed_tag_ids"]) <= set(row["tag_ids"])
        assert set(row["predicted_tag_ids"]) <= set(row["tag_ids"])
    # A shard that vanished is a clear error naming the part, never a silent gap.
    shard = images.files("shard")[0]["path"]
    store.fs.mv(store.abs(shard), store.abs(shard) + ".moved")
    try:
        with pytest.raises(StageError, match="part-"):
            run(generate.STAGE, store, {"generate": gen_cfg.model_copy(update={"threshold": 0.5}), "parse": cfg.parse},
                {"images": images, "parsed": parsed, "baseline": baseline.ref})
    finally:
        store.fs.mv(store.abs(shard) + ".moved", store.abs(shard))


def test_training_never_writes_storage_options_to_disk(base, tmp_path, monkeypatch):
    """A config's storage options may hold keys: the trainer's job.json and cache never contain them."""
    import tasks.stages.train as train_mod

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    _, world, cfg, store, images, parsed = base
    secret = "SECRET-KEY-d41d8cd98f00"
    keyed = Store(store.url, secret_access_key=secret)
    seen = {}
    original = train_mod.run_training

    def spy(job_path, storage_options=None, progress=None):
        original(job_path, storage_options, progress=progress)
        seen["options"] = storage_options
        seen["files"] = {str(p): p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()}

    monkeypatch.setattr(train_mod, "run_training", spy)
    cfg2 = cfg.train.model_copy(update={"steps": 2})
    train_model(keyed, cfg.model, cfg2, parsed, images)
    assert seen["options"] == {"secret_access_key": secret}  # handed over in memory
    assert any(p.endswith("job.json") for p in seen["files"])
    assert [p for p, data in seen["files"].items() if secret.encode() in data] == []


def test_a_new_tar_makes_ground_write_one_part(base, tmp_path):
    """Tag types are the label system's: a new tar whose captions use a colour as a noun ("an orange")
    neither makes that colour an object nor re-grounds the parts already grounded."""
    import shutil

    from tests.fixtures import image_bytes
    from tests.test_ingest import write_tar_source

    root, world, cfg, _, _, _ = base
    src = tmp_path / "source"
    src.mkdir()
    for tar in sorted(Path(world.source).glob("*.tar")):
        shutil.copy(tar, src / tar.name)
    store = Store(str(tmp_path / "store"))
    images = ingest(store, cfg.ingest, source=str(src)).version
    parsed = run(parse.STAGE, store, cfg, {"images": images}).version
    first = ground_run(store, cfg.ground, images, caption_generated(store, images, parsed), parsed)
    assert first.parts_written == len(images.parts) == 3
    # the new tar: a majority of "orange" used as a noun, which a vote over the corpus turned into an object
    write_tar_source(src / "00009.tar", [
        (f"00009{i:04d}", {"jpg": image_bytes(size=(128, 128), color=(250, 140, 0)),
                           "txt": b"an orange on the sand\nthe oranges on the grass"}) for i in range(40)])
    images2 = ingest(store, cfg.ingest, source=str(src)).version
    parsed2 = run(parse.STAGE, store, cfg, {"images": images2}).version
    assert [p for p in parsed2.parents if p.startswith("labels/")] == \
        [p for p in parsed.parents if p.startswith("labels/")]
    second = ground_run(store, cfg.ground, images2, caption_generated(store, images2, parsed2), parsed2)
    assert second.parts_written == 1 and second.parts_reused == 3
    assert "orange" not in set(second.version.read_table().column("tag").to_pylist())


@pytest.mark.slow
def test_torchrun_ranks_build_their_sample_streams_through_the_store(base, tmp_path, monkeypatch):
    """train.nproc_per_node=2: each torchrun worker opens the store (options from its environment, never
    job.json) and streams its rank's samples through storage's reader; the model version is written."""

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAM_ENGINE_THREADS", "1")
    _, world, cfg, store, images, parsed = base
    train_cfg = cfg.train.model_copy(update={"nproc_per_node": 2, "steps": 2, "batch_size": 2,
                                             "name": "ddp", "calibrate_thresholds": False})
    v = train_model(store, cfg.model, train_cfg, parsed, images).version
    assert v.manifest["metrics"]["train"]["steps"] == 2
    assert v.manifest["metrics"]["samples"]["train"] > 0
