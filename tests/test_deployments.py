"""Deployments: a served retrain deployment runs when ingest commits enough new samples; the emitter's
threshold; the scheduled loop's cron."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow

from flows.deployments import (EVENT_IMAGES_COMMITTED, LOOP_DEPLOYMENT, RETRAIN_DEPLOYMENT, build_deployments,
                               emit_images_committed, serve_command, store_resource_id)
from flows.runtime import artifact_key
from storage import Store
from tasks.engine.config import ConfigError, EngineConfig, load_config

from tests.fixtures import image_bytes, write_folder_source

ROOT = Path(__file__).resolve().parent.parent


@flow(name="retrain-probe")
def retrain_probe(cfg: EngineConfig, images_version: str | None = None, new_samples: int | None = None) -> dict:
    """Stands in for flows.retrain:retrain_flow: records what the trigger passed."""
    return {"store": cfg.store.url, "images_version": images_version, "new_samples": new_samples}


def source(root: Path, n: int, start: int = 0) -> Path:
    items = {f"s{i:03d}.jpg": (image_bytes(size=(30 + i, 20 + i % 5), color=(i * 11 % 256, 90, 30)),
                               f"a small square number {i}") for i in range(start, start + n)}
    return write_folder_source(root, items)


def config(tmp_path: Path, **fields) -> EngineConfig:
    overrides = [f"store.url={tmp_path / 'store'}", "ingest.part_size=3"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in fields.items()]
    return load_config(None, overrides)


@pytest.fixture
def sent(monkeypatch):
    """Record events instead of sending them."""
    import prefect.events

    import flows.runtime

    calls = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: calls.append(kw) or kw)
    monkeypatch.setattr(flows.runtime, "prefect_api_available", lambda: True)  # as if a server were configured
    return calls


def test_no_event_and_no_temporary_server_without_a_prefect_api(tmp_path, monkeypatch):
    """Outside Prefect (--engine local, no PREFECT_API_URL) an emitted event would make Prefect start a
    temporary server of its own that outlives a killed run and holds its output pipes: nothing is sent."""
    import prefect.events

    import flows.runtime
    from tests.fixtures import ingest

    monkeypatch.setattr(flows.runtime, "prefect_api_available", lambda: False)
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: pytest.fail("an event was sent"))
    cfg = config(tmp_path)
    store = Store(cfg.store.url)
    first = ingest(store, cfg.ingest, source=str(source(tmp_path / "src", 3))).version
    assert emit_images_committed(store, first, 3, threshold=1) is None


def test_emitter_applies_the_threshold(tmp_path, sent):
    from tests.fixtures import ingest

    cfg = config(tmp_path)
    store = Store(cfg.store.url)
    first = ingest(store, cfg.ingest, source=str(source(tmp_path / "src", 7))).version
    assert emit_images_committed(store, first, 7, threshold=8) is None and sent == []
    emit_images_committed(store, first, 7, threshold=7)
    assert len(sent) == 1 and sent[0]["event"] == EVENT_IMAGES_COMMITTED
    assert sent[0]["resource"]["prefect.resource.id"] == store_resource_id(store)
    assert sent[0]["payload"]["version"] == first.id and sent[0]["payload"]["new_samples"] == 7


def test_the_event_and_the_retrain_count_new_samples_alike(tmp_path, sent, monkeypatch):
    """Grow a folder source as the demo's walkthrough does: new files land inside existing parts, so the
    rewritten parts hold more rows than there are new samples. The event's `new_samples` and the served
    retrain's decision use one count (samples the latest model was not trained on): a threshold equal to
    the announced count retrains, one more does not."""
    import flows.retrain
    from flows.ingest import ingest_and_announce
    from flows.retrain import retrain_flow

    cfg = config(tmp_path)
    store = Store(cfg.store.url)
    src = source(tmp_path / "src", 12)
    first = ingest_and_announce(cfg, str(src)).version
    assert sent[-1]["payload"]["new_samples"] == 12 and sent[-1]["payload"]["new_since"] is None  # no model yet
    model = store.begin(f"models/{cfg.train.name}", code_version="test", config={}, parents=[first])
    model.write_files("weights", {"weights.bin": b"trained on the first 12"})
    model.commit()
    extra = source(tmp_path / "extra", 5, start=50)  # new files land beside the untouched old ones
    for f in extra.glob("*.jpg"):
        f.rename(src / f.name)
    with open(src / "captions.jsonl", "a") as out:
        out.write((extra / "captions.jsonl").read_text())
    grown = ingest_and_announce(cfg, str(src)).version
    rewritten = sum(p.rows_out for p in grown.parts if not p.shared_from)
    assert grown.manifest["parts_reused"] > 0 and rewritten > 5, "the case where counting by parts overcounts"
    payload = sent[-1]["payload"]
    assert payload["version"] == grown.id and payload["new_samples"] == 5 and payload["new_since"] == first.ref

    runs = []
    monkeypatch.setattr(flows.retrain, "data_engine_flow", lambda cfg, **kw: runs.append(kw) or {"ran": True})

    def retrain(threshold: int) -> dict:
        served = cfg.model_copy(update={"orchestration": cfg.orchestration.model_copy(
            update={"retrain_min_new_samples": threshold})})
        return retrain_flow.fn(served, images_version=payload["version"], new_samples=payload["new_samples"])

    assert retrain(payload["new_samples"] + 1) == {} and runs == []
    assert retrain(payload["new_samples"]) == {"ran": True}
    assert runs == [{"from_stage": "parse", "images_version": grown.id}]


def test_resource_id_is_the_same_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = store_resource_id(Store("./store"))
    monkeypatch.chdir("/")
    assert store_resource_id(Store(str(tmp_path / "store"))) == a
    assert store_resource_id(Store(str(tmp_path / "other"))) != a


def test_ingest_flow_announces_every_new_version_whatever_its_own_threshold(prefect_api, tmp_path, sent):
    """The threshold is the served deployment's (flows.retrain.retrain_flow applies it): ingest's own
    config cannot silence the event, or a threshold set on `serve` would do nothing."""
    from flows.ingest import ingest_flow

    src = source(tmp_path / "src", 4)
    result = ingest_flow(config(tmp_path, orchestration__retrain_min_new_samples=5000), source=str(src))
    assert [e["payload"]["version"] for e in sent] == [result.version.id]
    assert sent[0]["payload"]["new_samples"] == 4
    ingest_flow(config(tmp_path, orchestration__retrain_min_new_samples=5000), source=str(src))
    assert len(sent) == 1, "an already committed version is not new"


def test_bad_cron_and_missing_server_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="orchestration.schedule_cron"):
        build_deployments(config(tmp_path, orchestration__schedule_cron="'0 3 * *'"),
                          loop_flow=retrain_probe, retrain_flow=retrain_probe)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(ConfigError, match="PREFECT_API_URL"):
            serve_command(config(tmp_path))


SERVE_SCRIPT = """
import json, sys
from tasks.engine.config import EngineConfig
from flows.deployments import serve

if __name__ == "__main__":
    cfg = EngineConfig.model_validate(json.load(open(sys.argv[1])))
    serve(cfg, loop_flow="flows.ingest:ingest_flow", retrain_flow="tests.test_deployments:retrain_probe",
          print_starting_message=False)
"""


def _wait(what: str, fn, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_served_retrain_deployment_runs_when_ingest_commits(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.ingest import ingest_flow

    api_url, home = prefect_api
    cfg = config(tmp_path, orchestration__retrain_min_new_samples=3, orchestration__schedule_cron="'30 2 * * *'")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    script = tmp_path / "serve_ram.py"
    script.write_text(SERVE_SCRIPT)
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT_HOME=home,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, str(script), str(cfg_file)], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        with get_client(sync_client=True) as client:
            def deployment(flow_name, name):
                try:
                    return client.read_deployment_by_name(f"{flow_name}/{name}")
                except Exception:
                    assert server.poll() is None, "serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:]
                    return None

            retrain = _wait("the retrain deployment", lambda: deployment("retrain-probe", RETRAIN_DEPLOYMENT), 60)
            loop = _wait("the loop deployment", lambda: deployment("ingest", LOOP_DEPLOYMENT), 30)
            registered = time.monotonic() - t0
            assert [s.schedule.cron for s in loop.schedules] == ["30 2 * * *"]
            assert loop.parameters["cfg"]["store"]["url"] == cfg.store.url
            time.sleep(5)  # the triggers service may miss an event sent right after the automation appears

            t1 = time.monotonic()
            result = ingest_flow(cfg, source=str(source(tmp_path / "src", 4)))

            def completed_run():
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain.id])))
                return next((r for r in runs if r.state and r.state.is_final()), None)

            run = _wait("a finished flow run of the retrain deployment", completed_run, 60)
            triggered = time.monotonic() - t1
            assert run.state.is_completed(), f"retrain run ended {run.state.type}: {run.state.message}"
            assert run.parameters["images_version"] == result.version.id
            assert run.parameters["new_samples"] == 4  # the template keeps the payload's type
            assert run.parameters["cfg"]["store"]["url"] == cfg.store.url
            print(f"deployments registered {registered:.1f}s after serve started; retrain run finished "
                  f"{triggered:.1f}s after ingest began")

            # A run of the served loop deployment: our stage logs and progress, with rate and ETA, reach
            # the run's logs in the Prefect API (the UI's log tab), a progress artifact and the console.
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
            from prefect.deployments import run_deployment

            served = run_deployment(f"ingest/{LOOP_DEPLOYMENT}", timeout=120, parameters={
                "cfg": cfg.model_dump(mode="json"), "source": str(source(tmp_path / "src2", 6))})
            assert served.state.is_completed(), f"served ingest ended {served.state.type}: {served.state.message}"

            DONE = re.compile(r"images: (\d+)/\1 parts \(100 %\), [0-9.e+-]+ parts/s, ETA 0:00:00$")

            def run_logs():
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[served.id])))
                messages = [entry.message for entry in logs]
                return messages if any(DONE.match(m) for m in messages) else None

            messages = _wait("our log lines in the run's Prefect logs", run_logs, 30)
            progress = [m for m in messages if m.startswith("images: ")]
            assert re.fullmatch(r"images: 0/\d+ parts \(0 %\), ETA: measuring", progress[0]), messages
            assert DONE.match(progress[-1]), progress
            assert any("emitted ram.images.committed" in m for m in messages), messages
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[served.id])))
            bars = [a for a in artifacts if a.type == "progress"]
            assert bars and float(bars[0].data) == 100.0, [(a.key, a.type, a.data) for a in artifacts]
            summary = next(a for a in artifacts if a.key == artifact_key("images", Store(cfg.store.url)))
            assert "store path: `" in summary.data and "/images/" in summary.data
            console = (tmp_path / "serve.log").read_text()
            assert re.search(r"images: \d+/\d+ parts \(100 %\), .* ETA 0:00:00", console), console[-3000:]
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
