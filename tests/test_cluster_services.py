"""The cluster-in-a-box services (scripts/cluster_up.sh / cluster_down.sh) and fast failure on services
that are not there. Tests marked ``cluster`` start the real services (tests/cluster_services.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cluster_services import ROOT, read_env_file

from etl.services import ServiceUnreachable, check_http_health, check_spark_master, check_tcp


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _cluster_conf(tmp_path: Path, s3: str, master: str, mlflow: str) -> Path:
    """A cluster-shaped config pointing at the given endpoints."""
    text = (ROOT / "conf" / "cluster.local.yaml").read_text()
    env = {"COURIER_BUCKET": "b", "SPARK_MASTER_URL": master, "COURIER_SPARK_CLASSPATH": "/nonexistent/*",
           "COURIER_S3_ENDPOINT": s3, "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_TRACKING_URI": mlflow}
    for k, v in env.items():
        text = text.replace("${%s}" % k, v)
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_unreachable_services_fail_within_seconds_naming_the_endpoint(tmp_path):
    dead = f"127.0.0.1:{_closed_port()}"
    for check, endpoint in ((lambda: check_spark_master(f"spark://{dead}"), f"spark://{dead}"),
                            (lambda: check_tcp("S3 endpoint", f"http://{dead}"), f"http://{dead}"),
                            (lambda: check_http_health("MLflow tracking server", f"http://{dead}"), f"http://{dead}")):
        t0 = time.monotonic()
        with pytest.raises(ServiceUnreachable, match=endpoint.replace(".", r"\.")):
            check()
        assert time.monotonic() - t0 < 10
    check_spark_master("local[2]")  # nothing to probe


def test_a_host_only_s3_endpoint_is_probed_where_s3a_connects(tmp_path, monkeypatch):
    """S3A's documented form names a host only (s3.eu-west-2.amazonaws.com): HTTPS's port 443, or HTTP's
    80 when connection.ssl.enabled is false; a port that is not a number is a clear error too."""
    from conftest import write_config

    from etl.config import load_config
    from etl.spark import check_endpoints

    probed = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: probed.append(address) or socket.socket())
    for extra, port in (({}, 443), ({"spark.hadoop.fs.s3a.connection.ssl.enabled": "false"}, 80),
                        ({"spark.hadoop.fs.s3a.connection.ssl.enabled": False}, 80)):  # a YAML false, unquoted
        conf = {"spark.hadoop.fs.s3a.endpoint": "s3.eu-west-2.amazonaws.com", **extra}
        check_endpoints(load_config(write_config(tmp_path, {"spark": {"conf": conf}})))
        assert probed.pop() == ("s3.eu-west-2.amazonaws.com", port)
    with pytest.raises(ServiceUnreachable, match="cannot tell host and port"):
        check_tcp("S3 endpoint", "http://h:abc")


def test_jobs_with_a_dead_service_fail_fast(tmp_path):
    """get_spark (master, S3A endpoint) and setup_mlflow (tracking server) refuse a dead endpoint before
    any client retry loop; each in a fresh process, as a job would start."""
    dead = f"127.0.0.1:{_closed_port()}"
    script = ("import sys; from etl.config import load_config; cfg = load_config(sys.argv[1]); "
              "from etl.spark import get_spark; from etl.tracking import setup_mlflow; "
              "{call}")
    cases = [
        # master dead, store alive (any listening port will do for the TCP probe): the master is named
        ("get_spark(cfg)", "s3", f"spark://{dead}", "Spark master at spark://" + dead),
        ("get_spark(cfg)", f"http://{dead}", "spark://127.0.0.1:7077", "S3 endpoint (spark.hadoop.fs.s3a.endpoint) at http://" + dead),
        ("setup_mlflow(cfg)", "s3", "local[1]", "MLflow tracking server (mlflow.tracking_uri) at http://" + dead),
    ]
    with socket.socket() as alive:
        alive.bind(("127.0.0.1", 0))
        alive.listen()
        live = f"http://127.0.0.1:{alive.getsockname()[1]}"
        for call, s3, master, message in cases:
            conf = _cluster_conf(tmp_path, live if s3 == "s3" else s3, master, f"http://{dead}")
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, "-c", script.format(call=call), str(conf)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.returncode != 0, proc.stdout
            assert "ServiceUnreachable" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
            assert time.monotonic() - t0 < 60  # interpreter + imports; the probe itself is 3 s at most


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.cluster
def test_services_are_up_on_localhost_and_idempotent(cluster_services):
    env = cluster_services.env
    for key in ("SPARK_MASTER_URL", "COURIER_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "COURIER_BUCKET", "COURIER_SPARK_CLASSPATH"):
        assert env.get(key), key
    for key in ("SPARK_MASTER_URL", "COURIER_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "COURIER_SPARK_UI"):
        assert env[key].split("://", 1)[1].startswith("127.0.0.1:"), (key, env[key])
    # the credentials file is its owner's only
    assert (cluster_services.run_dir / "cluster.env").stat().st_mode & 0o077 == 0
    # Spark: master alive, 2 workers with 1 core each, bound to 127.0.0.1
    state = _get_json(cluster_services.spark_rest + "/json/")
    assert state["status"] == "ALIVE" and state["url"] == cluster_services.spark_master
    workers = [w for w in state["workers"] if w["state"] == "ALIVE"]
    assert len(workers) == 2 and all(w["cores"] == 1 and w["host"] == "127.0.0.1" for w in workers)
    # S3: the run's bucket, with the run's credentials; an object round-trips
    s3 = cluster_services.s3_client()
    s3.put_object(Bucket=cluster_services.bucket, Key="probe/x.txt", Body=b"courier")
    assert s3.get_object(Bucket=cluster_services.bucket, Key="probe/x.txt")["Body"].read() == b"courier"
    # MLflow server
    check_http_health("MLflow", cluster_services.mlflow_uri)
    # Nothing listens on a non-loopback address: every service port is bound to 127.0.0.1 only.
    ports = {int(env[k].rsplit(":", 1)[1]) for k in ("COURIER_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "COURIER_SPARK_UI")}
    ports.add(int(cluster_services.spark_master.rsplit(":", 1)[1]))
    listening = _listening_sockets()
    for port in ports:
        assert listening.get(port) == {"127.0.0.1"}, (port, listening.get(port))
    # ... each one drawn below the ephemeral range, which the kernel never hands to a connection meanwhile
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(20000 <= port < ephemeral for port in ports), ports
    # A second start finds the services healthy and changes nothing.
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cluster_up.sh"), str(cluster_services.run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already up" in proc.stdout, proc.stdout + proc.stderr
    assert read_env_file(cluster_services.run_dir / "cluster.env") == env
    print(f"idempotent cluster_up: {time.monotonic() - t0:.1f}s")


@pytest.mark.cluster
def test_a_job_on_the_loopback_standalone_master_keeps_its_ui_on_this_machine(cluster_services, tmp_path):
    """A plain-python job (as the schedule runs them) on the cluster-in-a-box's standalone master at
    127.0.0.1 launches the JVM itself: SPARK_LOCAL_IP must reach it, or its Spark UI listens on every
    interface, as for local[*]."""
    from etl.spark import on_this_machine

    assert on_this_machine(cluster_services.spark_master) and on_this_machine("spark://localhost:1,127.0.0.2:2")
    assert not on_this_machine("spark://10.0.0.5:7077") and not on_this_machine("spark://127.0.0.1:1,10.0.0.5:2")
    assert not on_this_machine("yarn") and on_this_machine("local[2]")
    conf = _cluster_conf(tmp_path, cluster_services.s3_endpoint, cluster_services.spark_master,
                         cluster_services.mlflow_uri)
    code = ("import sys\nfrom jobs.common import run_job\n"
            "def body(ctx):\n    print('JVM SPARK_LOCAL_IP=' + str(ctx.spark._jvm.System.getenv('SPARK_LOCAL_IP')))\n"
            f"sys.exit(run_job('ports', 'd', lambda p: None, body, argv=['--conf', {str(conf)!r}]))")
    env = {k: v for k, v in cluster_services.environ(PYTHONPATH=str(ROOT), PYSPARK_PYTHON=sys.executable).items()
           if k != "SPARK_LOCAL_IP"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "JVM SPARK_LOCAL_IP=127.0.0.1" in out.stdout, out.stdout[-2000:]


def _listening_sockets() -> dict[int, set[str]]:
    """port -> local addresses of listening TCP sockets (from /proc/net/tcp and tcp6)."""
    out: dict[int, set[str]] = {}
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not os.path.exists(name):
            continue
        for line in open(name).read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            addr, port = f[1].split(":")
            if v6:
                ip = "::" if set(addr) == {"0"} else ("127.0.0.1" if addr.endswith("0100007F") else addr)
            else:
                ip = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            out.setdefault(int(port, 16), set()).add(ip)
    return out


@pytest.mark.cluster
def test_a_service_that_cannot_start_fails_the_start_and_leaves_nothing_running(tmp_path):
    """A worker that exits at start: cluster_up.sh names the service, stops what it started, exits 1."""
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "cluster_up.sh"), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COURIER_WORKER_MEMORY": "not-a-size"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ERROR: spark did not come up at http://127.0.0.1:" in proc.stderr
    assert "exited" in proc.stderr
    assert "nothing left running" in proc.stderr
    assert not list((tmp_path / "run" / "pids").glob("*.pid"))
    assert not (tmp_path / "run" / "cluster.env").exists()
    print(f"failed start reported in {time.monotonic() - t0:.1f}s")


@pytest.mark.cluster
def test_delta_rs_reaches_the_object_store_from_the_config_alone(cluster_services, spark, tmp_path, monkeypatch):
    """A deployment that writes the store's endpoint and keys in its config (spark.hadoop.fs.s3a.*) and
    exports no AWS_* variable: the table layer's delta-rs calls (existence, versions, file lists, vacuum)
    take them from the config, as Spark's S3A client does."""
    import uuid

    import pyarrow as pa
    from conftest import write_config
    from deltalake import write_deltalake

    from etl import fs
    from etl.config import load_config
    from etl.tables import TableStore

    env = cluster_services.env
    tables = f"s3a://{cluster_services.bucket}/config-only-{uuid.uuid4().hex[:8]}/tables"
    cfg = load_config(write_config(tmp_path, {"paths": {"tables_root": tables}, "spark": {"conf": {
        "spark.hadoop.fs.s3a.endpoint": env["COURIER_S3_ENDPOINT"].split("://", 1)[1],  # no scheme: ssl says
        "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
        "spark.hadoop.fs.s3a.endpoint.region": env["AWS_DEFAULT_REGION"],
        "spark.hadoop.fs.s3a.access.key": env["AWS_ACCESS_KEY_ID"],
        "spark.hadoop.fs.s3a.secret.key": env["AWS_SECRET_ACCESS_KEY"]}}}))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "COURIER_S3_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    options = fs.delta_storage_options(fs.options_for(cfg))
    assert options["AWS_ENDPOINT_URL"] == env["COURIER_S3_ENDPOINT"] and options["AWS_ALLOW_HTTP"] == "true"
    path = f"{tables}/t"
    write_deltalake(path, pa.table({"x": [1, 2, 3]}), storage_options=options)
    write_deltalake(path, pa.table({"x": [4]}), mode="overwrite", storage_options=options)

    store = TableStore(spark, cfg)
    assert store.exists("t") and store.latest_version("t") == 1 and store.version("t") == 1
    assert len(store.files("t")) == 1 and len(store.files("t", version=0)) == 1
    assert store.files("t")[0].uri != store.files("t", version=0)[0].uri
    assert len(store.vacuum("t", retention_hours=0, dry_run=True)) == 1  # version 0's file, no longer referenced
    assert not store.exists("absent")
