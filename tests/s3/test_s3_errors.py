"""S3 set-up errors as a user meets them, through the real CLI against moto's HTTP server:
missing credentials, a missing bucket, access denied. Each is one line, exit 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import boto3
import pytest

from tests.e2e.test_cli import darkroom, one_line_error

NO_AWS_CONFIG = {
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _without_credentials(env: dict) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out.update(
        NO_AWS_CONFIG, AWS_ENDPOINT_URL=env["AWS_ENDPOINT_URL"], AWS_DEFAULT_REGION="us-east-1"
    )
    return out


def test_missing_credentials(s3_env):
    env = _without_credentials(s3_env["env"])
    run = subprocess.run(
        [sys.executable, "-m", "darkroom.cli", "score", "--storage", s3_env["uri"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    one_line_error(run, "no AWS credentials", "AWS_ACCESS_KEY_ID")


def test_missing_bucket(s3_env):
    run = darkroom("retrain", "--storage", "s3://no-such-bucket-here/x", env=s3_env["env"])
    one_line_error(run, "'no-such-bucket-here' does not exist", "--storage")


@pytest.fixture
def moto_with_auth(tmp_path):
    """A moto server that checks IAM: the first 3 requests (bucket, user, access key) go
    through unchecked, every later one needs credentials allowed by a policy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "moto did not start"
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(10)


def test_access_denied(moto_with_auth):
    admin = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    kw = {"endpoint_url": moto_with_auth, "region_name": "us-east-1", **admin}
    boto3.client("s3", **kw).create_bucket(Bucket="locked-bucket")
    iam = boto3.client("iam", **kw)
    iam.create_user(UserName="no-rights")
    key = iam.create_access_key(UserName="no-rights")["AccessKey"]
    env = {
        **NO_AWS_CONFIG,
        "AWS_ENDPOINT_URL": moto_with_auth,
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    run = darkroom("retrain", "--storage", "s3://locked-bucket/root", env=env)
    line = one_line_error(run, "access denied", "s3://locked-bucket/root")
    print(line)
