"""pytest plugin: the cluster-in-a-box services (scripts/cluster_up.sh) for tests marked ``cluster``.

``cluster_services`` (session scope) starts the object store, the Spark standalone cluster and the MLflow
server into a fresh run folder, yields a ``ClusterServices`` and stops everything at the end of the
session (cluster_down.sh checks that nothing is left running). The services' settings reach a job through
its environment: run jobs as subprocesses with ``env=services.environ()`` and ``--conf services.conf_path``
(the test process's own Spark session is a local one; one process holds one SparkContext).

Set ``COURIER_TEST_CLUSTER_DIR=/some/dir`` to reuse services across pytest runs while iterating: they are
started there if needed (cluster_up.sh is idempotent) and left running afterwards.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONF = ROOT / "conf" / "cluster.local.yaml"
UP_TIMEOUT_S = 600  # cluster_up.sh bounds each service itself; this only guards against the unexpected
DOWN_TIMEOUT_S = 120


def read_env_file(path: Path) -> dict[str, str]:
    """The ``export K='V'`` lines of a cluster.env as a dict (comments and blank lines skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


@dataclass(frozen=True)
class ClusterServices:
    run_dir: Path
    env: dict = field(repr=False)  # cluster.env's variables (credentials included: never print them)
    conf_path: Path = CLUSTER_CONF

    @property
    def spark_rest(self) -> str:
        """The Spark master's web UI base URL (``/json/``: workers, running applications)."""
        return self.env["COURIER_SPARK_UI"]

    @property
    def spark_master(self) -> str:
        return self.env["SPARK_MASTER_URL"]

    @property
    def s3_endpoint(self) -> str:
        return self.env["COURIER_S3_ENDPOINT"]

    @property
    def bucket(self) -> str:
        return self.env["COURIER_BUCKET"]

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def environ(self, **extra: str) -> dict[str, str]:
        """This process's environment with the services' variables (for subprocess jobs)."""
        return {**os.environ, **self.env, **extra}

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])


def _script(name: str, run_dir: Path, timeout: int) -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / name), str(run_dir)], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/{name} {run_dir} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(proc.stdout, end="")


@pytest.fixture(scope="session")
def cluster_services(tmp_path_factory):
    reuse = os.environ.get("COURIER_TEST_CLUSTER_DIR")
    run_dir = Path(reuse) if reuse else tmp_path_factory.mktemp("cluster")
    _script("cluster_up.sh", run_dir, UP_TIMEOUT_S)
    try:
        yield ClusterServices(run_dir=run_dir.resolve(), env=read_env_file(run_dir / "cluster.env"))
    finally:
        if not reuse:
            _script("cluster_down.sh", run_dir, DOWN_TIMEOUT_S)
