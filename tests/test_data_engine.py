"""The whole loop on the tiny config: every stage commits, counts reconcile, lineage ties it together,
a rerun does no work, and new data is processed alone."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import pytest

from flows.data_engine import data_engine_flow
from flows.runtime import artifact_key
from storage import Store
from tasks.stages import STEPS

from tests.fixtures import DEMO_WORLD, demo_config, demo_overrides, demo_world_of

N_FIRST, PER_SHARD = DEMO_WORLD["n_images"], DEMO_WORLD["samples_per_shard"]
N_GROWN = N_FIRST + PER_SHARD


def new_tars(demo, dest: Path, n: int) -> list[str]:
    """The shared world's source plus a folder holding the tars that growing the same world to n images
    adds (its first tars are the same bytes). The shared world itself never changes, and its parts keep
    their names: a part is named after the folder its tar sits in, so a copied source would be new data."""
    grown, added = demo_world_of(dest / "grown", n), dest / "added"
    added.mkdir(parents=True)
    for tar in grown.shards:
        old = demo.world.source / tar.name
        if old.exists():
            assert old.read_bytes() == tar.read_bytes(), f"{tar.name}: a grown world changed a tar"
        else:
            shutil.copy(tar, added / tar.name)
    return [str(demo.world.source), str(added)]


def test_whole_loop_then_rerun_then_new_data(demo_loop_copy, monkeypatch, tmp_path, caplog):
    """The first run (the session's loop, copied here), a rerun of it and a run over a new shard."""
    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    cfg, first = demo_loop_copy.cfg, demo_loop_copy.results
    assert list(first) == list(STEPS)
    assert all(r.status == "written" for r in first.values())
    store = Store(cfg.store.url)
    for step, result in first.items():
        m = result.version.manifest
        assert m["rows_in"] == m["rows_out"] + m["rows_rejected"], step
        assert result.version.verify() == [], step
    assert first["ingest"].version.manifest["rows_out"] == N_FIRST
    assert first["parse"].version.manifest["rows_in"] >= N_FIRST
    clean = first["clean"].version
    assert {p.rpartition("/")[0] for p in clean.parents} == {"generated", "regions", "embeddings", "parsed", "clusters",
                                                             "labels", "models/baseline"}
    # the baseline's per-tag held-out metrics reach its manifest (clean.baseline_min_ap reads them there)
    per_tag = first["baseline"].version.manifest["per_tag_metrics"]
    assert per_tag and all(0 <= m["ap"] <= 1 for m in per_tag.values())
    assert "per_tag" not in first["baseline"].version.manifest["metrics"]
    assert first["train"].version.parents[0] == clean.ref
    assert first["ground"].version.manifest["metrics"]["regions"] > 0
    rows = {r["stage"]: r for r in first["evaluate"].version.manifest["metrics"]["ablation"]}
    assert {"parsed", "parsed+generated", "cleaned", "model:baseline", "model:ram"} <= set(rows)
    assert 0 < rows["parsed"]["precision"] <= 1 and 0 < rows["parsed"]["recall"] <= 1
    # Generation only adds labels; cleaning only removes them.
    assert rows["parsed+generated"]["labels_per_key"] >= rows["parsed"]["labels_per_key"]
    assert rows["cleaned"]["labels_per_key"] <= rows["parsed+generated"]["labels_per_key"]

    again = data_engine_flow.fn(cfg)
    assert all(r.status == "reused" and r.parts_written == 0 for r in again.values()), \
        {k: (r.status, r.parts_written) for k, r in again.items()}
    assert {k: r.version.id for k, r in again.items()} == {k: r.version.id for k, r in first.items()}
    assert "stays the baseline" not in caplog.text  # nothing changed, nothing to say
    # The baseline's config changed: it stays the baseline (the tags it generated stay valid), and the run says so.
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"calibration_min_precision": 0.7})})
    with caplog.at_level(logging.WARNING, logger="ram_engine"):
        kept = data_engine_flow.fn(changed, from_stage="baseline", until_stage="baseline")
    assert kept["baseline"].version.id == first["baseline"].version.id
    assert f"train.calibration_min_precision: {cfg.train.calibration_min_precision!r} → 0.7" in caplog.text
    assert "--set generate.baseline_name=" in caplog.text

    # New data lands: one more tar, beside the old ones. Stages with per-part work process only that part.
    grown = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={
        "source": new_tars(demo_loop_copy.demo, tmp_path / "world", N_GROWN)})})
    import flows.data_engine as engine

    order, real_run = [], engine._run
    monkeypatch.setattr(engine, "release_cached_models", lambda cfg: order.append("release"))
    monkeypatch.setattr(engine, "_run", lambda name, *a, **k: order.append(name) or real_run(name, *a, **k))
    third = data_engine_flow.fn(grown)
    # the part workers' cached models are released before training (it needs the memory), and only then
    assert order == ["ingest", "parse", "generate", "ground", "embed", "cluster", "clean", "release", "train",
                     "evaluate"]
    assert third["ingest"].version.manifest["rows_out"] == N_GROWN
    for step in ("ingest", "parse", "generate", "ground", "embed"):
        assert (third[step].parts_written, third[step].parts_reused) == (1, N_FIRST // PER_SHARD), step
    assert third["baseline"].status == "reused"  # the baseline stays fixed as data grows
    assert third["train"].version.parents[-1] == first["train"].version.ref  # fine-tuned from the latest model
    assert len(store.versions("images")) == 2
    # The report of the new evaluation shows the versions it was made from, not the older ones its
    # fine-tuned model's lineage also reaches (a mix showed no samples at all).
    from tasks.inspection.report import build_report

    page = build_report(store, third["evaluate"].version, tmp_path / "report").read_text()
    for step in ("ingest", "parse", "generate", "clean"):
        assert third[step].version.id in page and first[step].version.id not in page, step
    assert page.count('class="sample"') == 8


def test_an_incremental_run_commits_what_a_whole_run_commits(demo_loop, monkeypatch, tmp_path):
    """The same data through the loop in two histories, with one fixed baseline (a model folder): three tars then
    a fourth, against all four at once in another store. Every version is the same, byte for byte: clustering is
    a decision over all crops (the cluster step), so clean follows it instead of reusing parts clustered over less.
    """
    from tasks.shared.models import local_model_dir

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    baseline = tmp_path / "baseline"
    shutil.copytree(local_model_dir(demo_loop.store.open("models/baseline")), baseline)
    grown_source = new_tars(demo_loop.demo, tmp_path / "world", N_GROWN)

    def loop(store: Path, source):
        cfg = demo_config(demo_loop.demo, str(store), **{"generate.baseline": str(baseline)})
        cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"source": source})})
        return data_engine_flow.fn(cfg, until_stage="clean")

    loop(tmp_path / "incremental", grown_source[:1])
    incremental = loop(tmp_path / "incremental", grown_source)
    whole = loop(tmp_path / "whole", grown_source)
    assert incremental["embed"].parts_reused == N_FIRST // PER_SHARD          # old crops were not embedded again
    for step in ("ingest", "parse", "generate", "ground", "embed", "cluster", "clean"):
        a, b = incremental[step].version, whole[step].version
        assert a.id == b.id, step
        assert [(f["path"], f["sha256"]) for f in a.files()] == [(f["path"], f["sha256"]) for f in b.files()], step


def test_from_and_until_run_part_of_the_loop(demo_world, monkeypatch, tmp_path):
    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    cfg = demo_config(demo_world, tmp_path / "store2")
    with pytest.raises(Exception, match="run that stage first"):
        data_engine_flow.fn(cfg, from_stage="parse", until_stage="parse")
    only_ingest = data_engine_flow.fn(cfg, until_stage="ingest")
    assert list(only_ingest) == ["ingest"]
    parse_only = data_engine_flow.fn(cfg, from_stage="parse", until_stage="parse")
    assert list(parse_only) == ["parse"] and parse_only["parse"].version.parents[0] == only_ingest["ingest"].version.ref
    with pytest.raises(ValueError, match="not a stage"):
        data_engine_flow.fn(cfg, from_stage="nope")


def test_loop_runs_as_prefect_flows_with_artifacts(demo_world, prefect_api, monkeypatch, tmp_path):
    """The same loop as Prefect subflows against a Prefect server: every stage publishes its artifact."""
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("RAM_ENGINE_CACHE", str(tmp_path / "cache"))
    cfg = demo_config(demo_world, tmp_path / "store")
    results = data_engine_flow(cfg)
    assert list(results) == list(STEPS) and all(r.status == "written" for r in results.values())

    async def artifact_keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    import asyncio

    keys = asyncio.run(artifact_keys())
    # a stage's key names the stage and ends in a digest of the store's URL
    suffix = "-" + hashlib.sha256(Store(cfg.store.url).full_url("").encode()).hexdigest()[:8]
    assert {f"ram-{s}{suffix}" for s in ("images", "parsed", "models-baseline", "generated", "regions", "clean",
                                          "models-ram", "evaluate")} <= keys
    assert {"ram-images-progress", "ram-parsed-progress", "ram-models-baseline-training-progress"} <= keys
    # A second store on the same server keeps histories of its own: no stage key is shared.
    other = demo_config(demo_world, tmp_path / "other-store")
    data_engine_flow(other, until_stage="parse")
    other_keys = asyncio.run(artifact_keys()) - keys
    assert {artifact_key(s, Store(other.store.url)) for s in ("images", "parsed")} == \
        {k for k in other_keys if not k.endswith("-progress")}

    # A rerun reuses everything, and still publishes the baseline it reused.
    again = data_engine_flow(cfg)
    assert again["baseline"].status == "reused"

    async def artifacts(key):
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    assert len(asyncio.run(artifacts(f"ram-models-baseline{suffix}"))) >= 2
    evaluate = asyncio.run(artifacts(f"ram-evaluate{suffix}"))[0].data
    assert "| stage | n_keys | labels_per_key | precision | recall | f1 |" in evaluate, evaluate
    assert "[{" not in evaluate and "- markdown" not in evaluate and "_markdown" not in evaluate
    assert not re.search(r"\d\.\d{5,}", evaluate), "floats are rounded"
    assert f"store path: `{Store(cfg.store.url).full_url('evaluate/')}" in evaluate
    parsed = asyncio.run(artifacts(f"ram-parsed{suffix}"))[0].data
    top = re.search(r"\*\*top_tags\*\* \(most frequent first\): (.*)", parsed).group(1)
    counts = [int(n) for n in re.findall(r"\((\d+)\)", top)]
    assert counts == sorted(counts, reverse=True) and len(counts) > 1
    # The report is linked from the UI, with the store path of the version it shows.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runtime import publish_report

    page = tmp_path / "report" / "index.html"
    with warnings.catch_warnings():  # outside a flow run (`ram-engine report`): no deprecated artifact creation
        warnings.simplefilter("error", FutureWarning)
        assert publish_report(page, results["evaluate"].version) == f"ram-report{suffix}"
    link = asyncio.run(artifacts(f"ram-report{suffix}"))[0].data
    assert page.resolve().as_uri() in link and "evaluate/" in link
    with temporary_settings({PREFECT_API_URL: None}):
        assert not publish_report(page, results["evaluate"].version)  # no server: nothing to keep it


def test_cli_inspects_versions(demo_loop_copy):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, results = demo_loop_copy.cfg, demo_loop_copy.results
    runner = CliRunner(env={"COLUMNS": "250"})  # rich tables at full width
    store = ["--store", cfg.store.url]
    clean = results["clean"].version
    out = runner.invoke(app, store + ["ls"])
    assert out.exit_code == 0 and "clean" in out.output and "models/baseline" in out.output
    out = runner.invoke(app, store + ["show", f"clean@{clean.id[:6]}"])
    assert out.exit_code == 0 and "rows in" in out.output and "removed_reasons" in out.output
    assert runner.invoke(app, store + ["verify", f"clean@{clean.id}"]).exit_code == 0
    out = runner.invoke(app, store + ["lineage", f"clean@{clean.id}"])
    assert out.exit_code == 0 and "images/" in out.output and "labels/" in out.output
    out = runner.invoke(app, store + ["diff", "parsed", f"generated@{results['generate'].version.id}"])
    assert out.exit_code == 0 and "keys in common" in out.output
    out = runner.invoke(app, store + ["ref", f"clean@{clean.id}", "prod"])
    assert out.exit_code == 0 and Store(cfg.store.url).open("clean", "prod").id == clean.id
    bad = runner.invoke(app, ["--set", "ingest.part_size=0", "ls"])
    assert bad.exit_code != 0 and "ingest.part_size" in str(bad.exception or bad.output)


def test_inspection_output_tells_the_truth(demo_loop, tmp_path):
    """ls in loop order and an error for a missing store; show ranks counters by count and names tag ids;
    lineage lists each version once; a Version's repr is one short line."""
    import re

    from typer.testing import CliRunner

    from flows.cli import app

    cfg, results = demo_loop.cfg, demo_loop.results
    runner = CliRunner()
    store = ["--store", cfg.store.url]
    out = runner.invoke(app, store + ["ls"])
    first_seen = []
    for line in out.output.splitlines():
        name = line.split("│")[1].strip() if "│" in line else ""
        if name and name != "stage" and name not in first_seen:
            first_seen.append(name)
    assert first_seen == ["images", "labels", "parsed", "models/baseline", "generated", "regions", "embeddings",
                          "clusters", "clean", "models/ram", "evaluate"]
    # Output that is no terminal is not wrapped (at 80 columns or any width): the longest parents cell stays whole.
    evaluate = results["evaluate"].version
    assert len(evaluate.parents) >= 6 and any(", ".join(evaluate.parents) in l for l in out.output.splitlines())
    # A store that does not exist is an error that names it, not an empty table.
    import subprocess
    import sys

    missing = tmp_path / "no-such-store"
    proc = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "--store", str(missing), "ls"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"no store at {missing}" in proc.stderr.replace("\n", "")
    assert not missing.exists()

    parsed = results["parse"].version
    out = runner.invoke(app, store + ["show", f"parsed@{parsed.id}", "--rows", "0"])
    line = next(l for l in out.output.splitlines() if l.strip().startswith("top_tags:"))
    counts = [int(n) for n in re.findall(r": (\d+)", line.split("top_tags:", 1)[1])]
    assert counts == sorted(counts, reverse=True) and len(counts) > 1
    true_top = max(parsed.manifest["metrics"]["top_tags"].items(), key=lambda kv: kv[1])
    assert f"{true_top[0]}: {true_top[1]}" in line.split(",")[0]
    n_parts = len(parsed.manifest["parts"])
    assert f"{n_parts} part{'s' if n_parts != 1 else ''} (" in out.output
    model = results["train"].version   # a one-part stage: "1 part", not "1 parts"
    assert len(model.manifest["parts"]) == 1
    assert "1 part (" in runner.invoke(app, store + ["show", f"{model.stage}@{model.id}", "--rows", "0"]).output
    for stage, version in (("generated", results["generate"].version), ("clean", results["clean"].version)):
        # enough rows to include one with predicted scores (the tiny baseline predicts nothing for some keys)
        n = 3
        if stage == "generated":
            scored = version.read_table(columns=["predicted_scores"]).column(0).to_pylist()
            n = max(n, next(i for i, s in enumerate(scored) if s) + 1)
        out = runner.invoke(app, store + ["show", f"{stage}@{version.id}", "--rows", str(n)])
        rows = [json.loads(l) for l in out.output.splitlines() if l.startswith("  {")]
        assert rows and all("tags" in r and len(r["tags"]) == len(r["tag_ids"]) for r in rows), out.output
        assert all(isinstance(t, str) and not t.startswith("#") for r in rows for t in r["tags"])
        scores = [x for r in rows for x in r.get("predicted_scores", [])]
        assert all(x == round(x, 4) for x in scores) and (stage != "generated" or scores)  # no 17-digit floats

    clean = results["clean"].version
    out = runner.invoke(app, store + ["lineage", f"clean@{clean.id}"])
    nodes = [l.strip().lstrip("└─ ").split()[0] for l in out.output.splitlines() if "(shown above)" not in l]
    assert len(nodes) == len(set(nodes)), out.output
    assert sum("(shown above)" in l for l in out.output.splitlines()) <= len(nodes)
    assert repr(clean) == f"Version('{clean.ref}', rows_out={clean.manifest['rows_out']}, " \
                          f"parts={len(clean.manifest['parts'])})"


def test_labels_build_from_a_parsed_version(demo_loop_copy):
    from tasks.shared.labels import build_labels, load_labels

    cfg, results = demo_loop_copy.cfg, demo_loop_copy.results
    store = Store(cfg.store.url)
    parsed = results["parse"].version
    version = build_labels(store, parsed, top_k=5)
    labels = load_labels(store, version)
    assert len(labels) == 5 and version.parents == [parsed.ref]
    from collections import Counter

    counts = Counter(t for tags in parsed.read_table(columns=["tags"]).column(0).to_pylist() for t in tags)
    kept_min = min(counts[t] for t in labels.tags)
    assert all(n <= kept_min for t, n in counts.items() if t not in labels.tags)  # the most frequent were kept


def test_report_from_the_store(demo_loop, tmp_path):
    from tasks.inspection.report import build_report

    cfg, results, world = demo_loop.cfg, demo_loop.results, demo_loop.demo.world
    store = Store(cfg.store.url)
    index = build_report(store, results["evaluate"].version, tmp_path / "report", truth_path=str(world.ground_truth))
    html = index.read_text()
    for stage in ("images", "parsed", "generated", "regions", "clean", "evaluate"):
        assert stage in html
    assert "parsed+generated" in html and "cleaned" in html  # the evaluation table
    pngs = list((tmp_path / "report").rglob("*.png"))
    assert len(pngs) >= 5
    # It leads with the evaluation and the per-tag changes; removed tags carry their stored reason.
    assert html.index('id="evaluation"') < html.index('id="changes"') < html.index('id="samples"')
    assert "figures/tag_changes.png" in html and 'class="changes"' in html
    metrics = results["clean"].version.manifest["metrics"]
    for reason in ("outlier", "baseline-disagrees", "no-box"):
        assert (f'<span class="reason">({reason})</span>' in html) == (metrics.get(reason, 0) > 0), reason
    # Crops of every clustered tag, not only the first few.
    crops = results["clean"].version.read_table("crops").to_pylist()
    clustered = {r["tag_id"] for r in crops if r["cluster"] >= 0}
    assert html.split('id="crops"')[1].count("<h3>") == len(clustered)


def test_retrain_flow_runs_the_loop_over_the_announced_version(demo_loop_copy, prefect_api):
    """What the deployment trigger runs: the loop from parse on, over the version the event named."""
    from flows.retrain import retrain_flow

    cfg, results = demo_loop_copy.cfg, demo_loop_copy.results
    images = results["ingest"].version
    # The served config's threshold decides: nothing is new since models/ram was trained on these images.
    assert retrain_flow(cfg, images_version=images.id, new_samples=images.manifest["rows_out"]) == {}
    eager = cfg.model_copy(update={"orchestration": cfg.orchestration.model_copy(
        update={"retrain_min_new_samples": 0})})
    out = retrain_flow(eager, images_version=images.id, new_samples=images.manifest["rows_out"])
    assert "ingest" not in out and list(out)[0] == "parse"
    assert out["parse"].version.parents[0] == images.ref
    assert all(r.status == "reused" for r in out.values())  # nothing new: every version is reused


def test_ablate_trains_a_model_per_label_version_and_seed(demo_loop_copy, tmp_path, monkeypatch):
    """`ram-engine ablate` on a run with a ground truth: models per (version, seed), scored on held-out
    keys, an `ablation` version with per-seed rows and mean ± std; a crashed run resumes; a rerun reuses."""
    import tasks.engine.runner as runner_module
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, results, world = demo_loop_copy.cfg, demo_loop_copy.results, demo_loop_copy.demo.world
    store = Store(cfg.store.url)
    refs = ["parsed", f"clean@{results['clean'].version.id[:8]}"]   # latest, and a version prefix
    args = ["--engine", "local"] + [a for o in demo_overrides(demo_loop_copy.demo, cfg.store.url)
                                    for a in ("--set", o)]
    args += ["--set", "ablation.seeds=[0, 1]", "--set", "ablation.steps=2"]
    runner = CliRunner(env={"COLUMNS": "250"})

    real_run, calls = runner_module.run, []

    def crash_on_third(stage, *a, **k):   # the ablation's trainings run the train stage through the runner
        if stage.name == "train":
            calls.append(a[1]["train"].seed)
            if len(calls) == 3:
                raise RuntimeError("simulated crash in the third training")
        return real_run(stage, *a, **k)

    monkeypatch.setattr(runner_module, "run", crash_on_third)
    crashed = runner.invoke(app, args + ["ablate", *refs])
    monkeypatch.setattr(runner_module, "run", real_run)
    assert crashed.exit_code != 0 and "simulated crash" in str(crashed.exception)
    assert store.versions("ablation") == [] and len(store.versions("models/ablation-parsed")) == 2
    out = runner.invoke(app, args + ["ablate", *refs])
    assert out.exit_code == 0, out.output + str(out.exception)
    version = store.versions("ablation")[-1]
    m = version.manifest["metrics"]
    assert [(r["labels"], r["seed"]) for r in m["per_seed"]] == [("parsed", 0), ("parsed", 1), ("cleaned", 0),
                                                                 ("cleaned", 1)]
    assert len(store.versions("models/ablation-parsed")) == 2 and len(store.versions("models/ablation-cleaned")) == 2
    for row in m["per_seed"]:
        assert 0 <= row["mAP"] <= 1 and {"object_f1", "attribute_f1", "scene_f1"} <= set(row)
    assert [r["labels"] for r in m["summary"]] == ["parsed", "cleaned"]
    assert "mAP_std" in m["summary"][0] and "mAP_gain" in m["summary"][1]
    assert "| parsed | 2 |" in out.output                            # the printed table
    # under it, how many held-out keys the figures rest on (the test world's few, with the warning), held out by
    # the ablation's own fraction (the demo config's), which its models trained without
    assert cfg.ablation.holdout_fraction == 0.33 != cfg.train.holdout_fraction
    trained = store.versions("models/ablation-parsed")[-1].manifest["config"]["train"]   # what its models ran with
    assert trained["holdout_fraction"] == 0.33 and m["heldout_keys"] < 100
    assert (f"Scored on {m['heldout_keys']} held-out keys with ground truth (ablation.holdout_fraction 0.33). "
            "Fewer than 100") in " ".join(out.output.split())
    table = version.read_table()
    assert table.num_rows == len([k for r in m["per_seed"] for k in r if k not in ("labels", "labels_ref", "seed",
                                                                                   "model")])
    assert {p.split("/")[0] for p in version.parents} == {"images", "parsed", "clean"}
    # the demo's budget: every model keeps the shipped encoder frozen (ablation.freeze_encoder)
    assert trained["freeze_encoder"] is True
    # the two models trained before the crash were reused, not trained again
    assert sorted(v.id for v in store.versions("models/ablation-parsed")) == \
        sorted({r["model"].split("/")[-1] for r in m["per_seed"] if r["labels"] == "parsed"})
    again = runner.invoke(app, args + ["ablate", *refs])
    assert again.exit_code == 0 and "reused" in again.output and len(store.versions("ablation")) == 1
    # the report carries the table and the plot
    from tasks.inspection.report import build_report

    index = build_report(store, results["evaluate"].version, tmp_path / "report",
                         truth_path=str(world.ground_truth), ablation=version)
    html = index.read_text()
    assert 'id="ablation"' in html and "figures/ablation.png" in html and (tmp_path / "report" / "figures" /
                                                                            "ablation.png").stat().st_size > 0
    assert 'id="cleaning-removal"' in html and "baseline-disagrees" in html
    assert f"Scored on {m['heldout_keys']} held-out keys" in html


def test_ablate_says_what_is_missing(demo_loop_copy, tmp_path):
    from tasks.engine.runner import run
    from tasks.stages.ablation import STAGE

    cfg, results = demo_loop_copy.cfg, demo_loop_copy.results
    store = Store(cfg.store.url)
    images, parsed = results["ingest"].version, results["parse"].version

    def ablate(evaluate, labels):
        return run(STAGE, store, cfg.model_copy(update={"evaluate": evaluate}), {"images": images, "labels": labels})

    with pytest.raises(Exception, match="evaluate.ground_truth"):
        ablate(cfg.evaluate.model_copy(update={"ground_truth": None}), {"parsed": parsed})
    foreign = tmp_path / "truth.jsonl"
    foreign.write_text('{"key": "not-a-key", "tags": ["ball"]}\n')
    with pytest.raises(Exception, match="no held-out key"):
        ablate(cfg.evaluate.model_copy(update={"ground_truth": str(foreign)}), {"parsed": parsed})
    with pytest.raises(Exception, match="no labels version"):
        ablate(cfg.evaluate, {"images": images})
    with pytest.raises(Exception, match="no label versions"):
        ablate(cfg.evaluate, {})


def test_new_samples_accumulate_until_the_served_threshold(demo_loop_copy, tmp_path):
    """Samples are counted against the images the latest model was trained on, so versions below the
    threshold add up instead of being forgotten."""
    from flows.deployments import samples_since_last_training
    from tests.fixtures import ingest

    cfg, results = demo_loop_copy.cfg, demo_loop_copy.results
    store = Store(cfg.store.url)
    trained_on = results["ingest"].version
    assert samples_since_last_training(store, trained_on, "models/ram") == (0, trained_on.ref)
    counts = []
    assert N_FIRST == trained_on.manifest["rows_out"]
    for n in (N_FIRST + PER_SHARD, N_FIRST + 2 * PER_SHARD):  # two growths of one shard each
        version = ingest(store, cfg.ingest, source=new_tars(demo_loop_copy.demo, tmp_path / f"world-{n}", n)).version
        counts.append(samples_since_last_training(store, version, "models/ram"))
    assert counts == [(PER_SHARD, trained_on.ref), (2 * PER_SHARD, trained_on.ref)]
    assert samples_since_last_training(store, version, "models/never-trained") == (version.manifest["rows_out"], None)
