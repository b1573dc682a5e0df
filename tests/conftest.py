"""Shared fixtures: stores (local and S3 on a loopback moto server), generated images and sources."""
from __future__ import annotations

import os
import socket

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
