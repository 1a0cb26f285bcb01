"""A throwaway S3-compatible server for tests of the storage layer: moto's standalone server (a separate
process speaking the S3 HTTP API) on a free 127.0.0.1 port, with one bucket and throwaway credentials.
The whole cluster-in-a-box (tests/cluster_services.py) is heavier; these tests need only the store.

Use: ``from s3_server import s3_server`` in a test module (module-scoped fixture)."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "courier-test"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    options: object  # etl.fs.S3Options

    def uri(self, key: str, scheme: str = "s3a") -> str:
        return f"{scheme}://{self.bucket}/{key.lstrip('/')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from etl import fs

    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.fail(f"{moto} is missing: install the dev extra (moto[server])")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server on {endpoint} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        options = fs.S3Options(endpoint=endpoint, region="us-east-1", access_key="AK" + secrets.token_hex(8),
                               secret_key=secrets.token_urlsafe(24))
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name=options.region, aws_access_key_id=options.access_key,
                     aws_secret_access_key=options.secret_key).create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint, BUCKET, options)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def env_for(server: S3Server) -> dict:
    """The environment a separate process (a job, a training worker) needs to reach the server."""
    o = server.options
    return {**os.environ, "AWS_ENDPOINT_URL": o.endpoint, "AWS_ACCESS_KEY_ID": o.access_key,
            "AWS_SECRET_ACCESS_KEY": o.secret_key, "AWS_DEFAULT_REGION": o.region}
