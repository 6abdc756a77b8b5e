"""A real S3 endpoint for the tests: moto's HTTP server on 127.0.0.1, one fresh bucket per test.

Nothing is mocked in process: darkroom's boto3 client talks HTTP to the server through
AWS_ENDPOINT_URL, exactly as it would talk to MinIO or AWS. ``s3_faulty`` puts a
fault-injecting proxy (tests/s3/fault_proxy.py) between the two: a broken network, for real.
"""

from __future__ import annotations

import uuid

import boto3
import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint():
    """Starts moto's threaded HTTP server on a free port of 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert port != 0, "moto did not report the port it bound"
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Points boto3 at the moto server and creates a fresh bucket.

    Yields a dict: endpoint, bucket, prefix, uri (``s3://bucket/prefix``), env (the AWS
    variables, for subprocesses) and client (a plain boto3 client, independent of darkroom).
    """
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": moto_endpoint}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # A profile or a real-AWS setting of the developer must not leak into the tests.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"darkroom-test-{uuid.uuid4().hex[:12]}"
    prefix = "root/sub"
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    yield {
        "endpoint": moto_endpoint,
        "bucket": bucket,
        "prefix": prefix,
        "uri": f"s3://{bucket}/{prefix}",
        "env": env,
        "client": client,
    }


def list_keys(client, bucket: str, prefix: str = "") -> dict[str, dict]:
    """Every object under ``prefix`` as full key -> listing entry (plain boto3)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj
    return out


@pytest.fixture
def fault_proxy(moto_endpoint):
    """A FaultProxy (tests/s3/fault_proxy.py) in front of the session's moto server; no faults
    until the test sets them (``configure(rate=..., seed=...)``, ``fail_keys``)."""
    from tests.s3.fault_proxy import FaultProxy

    with FaultProxy(moto_endpoint) as proxy:
        yield proxy


@pytest.fixture
def s3_faulty(s3_env, fault_proxy, monkeypatch):
    """``s3_env`` with darkroom's boto3 talking through ``fault_proxy`` (AWS_ENDPOINT_URL);
    ``client`` still talks to moto directly, to set up and check what is really stored.

    Yields s3_env's dict with endpoint, env and proxy set to the proxy's.
    """
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    env = {**s3_env["env"], "AWS_ENDPOINT_URL": fault_proxy.url}
    yield {**s3_env, "endpoint": fault_proxy.url, "env": env, "proxy": fault_proxy}
