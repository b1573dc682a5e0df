"""Shared fixtures: stores (local and S3 on a loopback moto server), a Prefect server, the demo world and
one completed loop over it (read-only, or a private copy)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

# Never reach for a hub or a Prefect Cloud; keep Prefect's state inside the test run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """An S3 server on loopback (moto's server mode) for the whole test session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    yield endpoint
    server.stop()


@pytest.fixture
def s3_store_url(moto_server, request):
    """A fresh bucket per test; returns (url, storage_options)."""
    import boto3

    bucket = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_server},
               "skip_instance_cache": True, "use_listings_cache": False}
    return f"s3://{bucket}/store", options


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """The store on a local folder and on S3 (moto on loopback)."""
    from storage import Store

    if request.param == "local":
        return Store(str(tmp_path / "store"))
    url, options = request.getfixturevalue("s3_store_url")
    return Store(url, **options)




@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect test server for the whole session (~11 s); yields (API URL, PREFECT_HOME)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    previous = os.environ.get("PREFECT_HOME")
    home = os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value(), home
    finally:
        os.environ.pop("PREFECT_HOME") if previous is None else os.environ.update(PREFECT_HOME=previous)


# --------------------------------------------------------------------------- the demo world and one whole loop
@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    """The one demo world + random tiny detector (tests/fixtures.py: DEMO_WORLD). Tests only read it:
    one that needs a grown or changed source copies it first."""
    from tests.fixtures import make_demo_world

    return make_demo_world(tmp_path_factory.mktemp("demo-world"))


@dataclass
class CompletedLoop:
    """One whole loop over the demo world: its config, each stage's result, the world."""

    cfg: object               # tasks.engine.config.EngineConfig
    results: dict             # stage name -> StageResult, as the run that wrote the store returned them
    demo: object              # tests.fixtures.DemoWorld

    @property
    def store(self):
        from storage import Store

        return Store(self.cfg.store.url)


@pytest.fixture(scope="session")
def demo_loop_session(demo_world, tmp_path_factory):
    """The whole loop run once for the session (plain functions, no Prefect). Use `demo_loop` to read it
    and `demo_loop_copy` to change it; this one is for session/module fixtures that only read."""
    from flows.data_engine import data_engine_flow
    from tests.fixtures import demo_config

    cfg = demo_config(demo_world, str(tmp_path_factory.mktemp("demo-loop") / "store"))
    previous = os.environ.get("RAM_ENGINE_CACHE")
    os.environ["RAM_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("demo-loop-cache"))
    try:
        results = data_engine_flow.fn(cfg)
    finally:
        os.environ.pop("RAM_ENGINE_CACHE") if previous is None else os.environ.update(RAM_ENGINE_CACHE=previous)
    return CompletedLoop(cfg, results, demo_world)


def _unchanged(loop: CompletedLoop, before: dict, who: str) -> None:
    from tests.fixtures import tree_state

    after = tree_state(Path(loop.cfg.store.url), loop.demo.world.root)
    changed = sorted(set(before) ^ set(after) | {p for p in before if p in after and before[p] != after[p]})
    assert not changed, f"{who} changed the shared demo loop (use demo_loop_copy to change it): {changed[:5]}"


@pytest.fixture
def demo_loop(demo_loop_session, request):
    """The session's completed loop, read-only: the test fails if it changed a file of the store or world."""
    from tests.fixtures import tree_state

    before = tree_state(Path(demo_loop_session.cfg.store.url), demo_loop_session.demo.world.root)
    yield demo_loop_session
    _unchanged(demo_loop_session, before, request.node.nodeid)


@pytest.fixture
def demo_loop_copy(demo_loop_session, tmp_path, request):
    """A private copy of the completed loop's store (hard links, see copy_store), with the config and
    results pointing at it: for tests that write versions or refs, or run stages again."""
    from dataclasses import replace

    from storage import Store
    from tests.fixtures import copy_store, tree_state

    shared = demo_loop_session
    before = tree_state(Path(shared.cfg.store.url), shared.demo.world.root)
    url = tmp_path / "loop-copy" / "store"
    copy_store(Path(shared.cfg.store.url), url)
    cfg = shared.cfg.model_copy(update={"store": shared.cfg.store.model_copy(update={"url": str(url)})})
    store = Store(str(url))
    results = {k: replace(r, version=store.open_ref(r.version.ref)) for k, r in shared.results.items()}
    yield CompletedLoop(cfg, results, shared.demo)
    _unchanged(shared, before, request.node.nodeid)


@pytest.fixture(autouse=True)
def _no_discovered_config(monkeypatch, tmp_path_factory):
    """A developer's own last demo (recorded under ~/.cache/ram-engine) or $RAM_ENGINE_CONFIG must not change
    which config a test's command uses; tests of that discovery point it at their own files."""
    import flows.cli

    monkeypatch.delenv("RAM_ENGINE_CONFIG", raising=False)
    empty = tmp_path_factory.getbasetemp() / "no-recorded-demo" / "last-demo.json"
    monkeypatch.setattr(flows.cli, "last_demo_file", lambda: empty)
