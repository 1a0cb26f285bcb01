"""The whole tiny pipeline on the cluster-in-a-box (pytest -m cluster): Spark standalone master + 2
workers, the S3 object store, native Delta on it and the MLflow server with S3 artifacts.

`scripts/pipeline.sh` runs with COURIER_CONF pointing at the services (simulate -> build_samples ->
train_courier on the executors -> embed/cluster -> attach -> refresh -> train_ctr -> review), exactly as
a user runs it. Then:
* every table equals the one a local[*] run of the same stages writes on local disk with delta-rs
  (row-set hashes per table and partition). The local run embeds with the encoder the cluster trained
  (its weights fetched from the MLflow server): two trainings never give bit-equal weights (the
  reader's order follows the Parquet file names, which are random per write), while the same weights
  must give bit-equal embeddings, clusters and features on executors and on local[*];
* the row work ran on the executors of both workers (tasks per worker from Spark's event logs, which
  are what Spark's history REST API serves), the training processes included (TorchDistributor
  local_mode false);
* the registry holds the encoder, the clustering and the reviewed CTR models, with their artifacts in
  the object store;
* the second training backend runs there too: train_courier with train.backend=horovod
  (horovod.spark.run, one process per worker) from the same courier_train on the object store.
"""
from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.cluster

# The tiny stage settings (as in tests/test_end_to_end.py), 2 training processes on 2 executors.
TRAIN = {"batch_size": 16, "num_workers": 2, "epochs": 1, "max_steps": 6, "checkpoint_every": 3,
         "log_every": 3, "decode_threads": 1, "local_mode": False}
FEATURES = {"n_clusters": 8, "kmeans_iters": 10, "attach_batch_size": 256, "embed_batch_size": 64}
CTR = {"epochs": 2, "batch_size": 128, "layers": [32, 16], "item_buckets": 4096, "user_buckets": 1024}
REVIEW = {"min_eval_rows": 50, "min_category_rows": 50}
STAGE_SETTINGS = {"train": TRAIN, "features": FEATURES, "ctr": CTR, "review": REVIEW,
                  "samples": {"image_px": 32},
                  # two dates (train on the first, hold out the second) keep the run within minutes
                  "simulator": {"preset": "tiny", "seed": 7, "image_px": 32, "days": 2}}

# Tables and the columns that legitimately differ between two runs: the job run id of the rejects, and
# the registry version names (the services' MLflow server is shared by the session's tests, so the
# encoder / clustering of this run need not be version 1 there).
TABLES = ("quarantine", "items", "item_images", "pv_samples", "ctr_log", "courier_train", "item_embeddings",
          "item_clusters", "ctr_train")
# ctr_log_digest names the ctr_log files, which each run writes under names of its own.
RUN_SPECIFIC = {"quarantine": ("job_run_id",), "item_embeddings": ("encoder_version",),
                "item_clusters": ("feature_version",), "ctr_train": ("feature_version", "ctr_log_digest")}


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def cluster_config(services, tmp_path: Path) -> Path:
    """The services' config with the tiny settings, every root under a fresh prefix of the bucket."""
    conf = yaml.safe_load(Path(services.conf_path).read_text())
    prefix = f"s3a://{services.bucket}/test-{uuid.uuid4().hex[:8]}"
    paths = {"data_root": str(tmp_path / "cluster-data"), "raw_root": f"{prefix}/raw",
             "images_root": f"{prefix}/raw/images", "truth_root": f"{prefix}/truth",
             "tables_root": f"{prefix}/tables", "checkpoints_root": f"{prefix}/checkpoints"}
    events = tmp_path / "spark-events"
    events.mkdir()
    conf = _deep_update(conf, {**STAGE_SETTINGS, "paths": paths, "spark": {"conf": {
        # One event log per application: what Spark's history REST API serves, kept after the app ends.
        "spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri()}}})
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


# ---- row-set hashes ----------------------------------------------------------------------------------
def table_hashes(spark, cfg, tables=TABLES) -> dict:
    """{table: {partition values: sorted xxhash64 of every row}}: equal dicts = equal row sets. The
    registry version columns are left out of the hash; each table must hold exactly one of them."""
    from pyspark.sql import functions as F

    from etl.tables import TableStore

    store = TableStore(spark, cfg)
    out = {}
    for name in tables:
        df = store.read(name)
        skipped = RUN_SPECIFIC.get(name, ())
        cols = [c for c in df.columns if c not in skipped]
        for c in skipped:
            if c.endswith("_version"):
                assert df.select(c).distinct().count() == 1, f"{name}.{c}: more than one version"
        parts = [c for c in ("dt", "job") if c in df.columns]
        rows = df.select(F.concat_ws("/", *[F.col(c).cast("string") for c in parts]).alias("p"),
                         F.xxhash64(*cols).alias("h")).collect()
        by_part = defaultdict(list)
        for r in rows:
            by_part[r["p"]].append(int(r["h"]))
        out[name] = {p: sorted(h) for p, h in sorted(by_part.items())}
    return out


def _hashes_in_subprocess(conf: Path, env: dict) -> dict:
    """table_hashes under another config (the cluster's: its own Spark session, S3A and native Delta)."""
    code = ("import json, sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]\n"
            "from etl.config import load_config\nfrom etl.spark import get_spark\n"
            "import test_cluster_pipeline as T\n"
            "cfg = load_config(sys.argv[1]); spark = get_spark(cfg, app_name='table_hashes')\n"
            "print('HASHES ' + json.dumps(T.table_hashes(spark, cfg)))\nspark.stop()\n")
    r = subprocess.run([sys.executable, "-c", code, str(conf), str(ROOT), str(ROOT / "tests")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("HASHES "))
    return json.loads(line[len("HASHES "):])


# ---- where the tasks ran -----------------------------------------------------------------------------
def tasks_per_worker(events_dir: Path) -> dict:
    """{application name: Counter(worker UI port -> tasks finished on executors of that worker)}, the
    applications of one name added up."""
    out = {}
    for app, _, tasks in applications(events_dir):
        out.setdefault(app, Counter()).update(tasks)
    return out


def applications(events_dir: Path) -> list:
    """[(application name, start time ms, Counter(worker UI port -> tasks))], one per event log, by start.

    The executors of both workers are on 127.0.0.1: a worker is told apart by the port of its web UI,
    which is in each executor's log URLs (SparkListenerExecutorAdded)."""
    out = []
    for path in glob.glob(str(events_dir / "*")):
        app, started, worker_of, tasks = None, 0, {}, Counter()
        with open(path) as fh:
            for line in fh:
                e = json.loads(line)
                kind = e.get("Event")
                if kind == "SparkListenerApplicationStart":
                    app, started = e["App Name"], e["Timestamp"]
                elif kind == "SparkListenerExecutorAdded":
                    urls = " ".join(e["Executor Info"].get("Log Urls", {}).values())
                    m = re.search(r"//[^/:]+:(\d+)/", urls)
                    worker_of[e["Executor ID"]] = m.group(1) if m else e["Executor Info"]["Host"]
                elif kind == "SparkListenerTaskEnd":
                    tasks[worker_of.get(e["Task Info"]["Executor ID"], "driver")] += 1
        out.append((app, started, tasks))
    return sorted(out, key=lambda a: a[1])


# ---- the test ----------------------------------------------------------------------------------------
def test_tiny_pipeline_on_the_cluster_equals_local(cluster_services, spark, tmp_path):
    import mlflow

    conf = cluster_config(cluster_services, tmp_path)
    env = cluster_services.environ(COURIER_CONF=str(conf), COURIER_PRESET="tiny", PYTHONUNBUFFERED="1")
    log = tmp_path / "pipeline.log"
    with open(log, "w") as fh:
        r = subprocess.run(["bash", "scripts/pipeline.sh"], cwd=ROOT, env=env, stdout=fh,
                           stderr=subprocess.STDOUT, timeout=3600)  # minutes idle; far more on busy cores
    out = log.read_text()
    assert r.returncode == 0, out[-6000:]
    assert f"Spark master: {cluster_services.spark_master}" in out

    # The same stages on local[*] with delta-rs on local disk (the session's Spark), embedding with the
    # encoder the cluster trained.
    encoder = _fetch_cluster_encoder(cluster_services, env, tmp_path)
    local_cfg = _local_reference(spark, conf, tmp_path, encoder)
    local = table_hashes(spark, local_cfg)
    remote = _hashes_in_subprocess(conf, env)
    for name in TABLES:
        assert remote[name].keys() == local[name].keys(), name
        for part in local[name]:
            assert len(remote[name][part]) == len(local[name][part]), (name, part)
            assert remote[name][part] == local[name][part], f"{name} {part}: different rows"

    # Row work on the executors of both workers (the master's REST view names them by their UI port),
    # for the Spark jobs of every stage, the training processes included.
    with urllib.request.urlopen(cluster_services.spark_rest + "/json/", timeout=10) as resp:
        workers = {w["webuiaddress"].rsplit(":", 1)[1] for w in json.load(resp)["workers"] if w["state"] == "ALIVE"}
    assert len(workers) == 2, workers
    per_app = tasks_per_worker(tmp_path / "spark-events")
    for app in ("build_samples", "train_courier", "embed_items", "build_clusters", "attach_features"):
        counts = per_app.get(app)
        assert counts, f"no event log of {app}: {sorted(per_app)}"
        assert set(counts) == workers and min(counts.values()) > 0, (app, counts)

    # The registry on the MLflow server, artifacts in the object store.
    # The server for both tracking and registry: the local reference above set the process's registry
    # URI to its own sqlite store.
    client = mlflow.MlflowClient(tracking_uri=cluster_services.mlflow_uri, registry_uri=cluster_services.mlflow_uri)
    enc = client.get_model_version_by_alias("courier-encoder", "champion")
    assert client.get_run(enc.run_id).info.artifact_uri.startswith("s3://")
    assert client.get_model_version_by_alias("courier-clusters", "current")
    assert client.get_model_version_by_alias("ctr-model", "champion")
    assert "registry review" in out and "Done. Tables (Delta): s3a://" in out

    # The second training backend on the executors: horovod.spark.run, 2 processes over gloo, from the
    # same courier_train on the object store.
    hv_log = tmp_path / "horovod.log"
    with open(hv_log, "w") as fh:
        r = subprocess.run([sys.executable, "jobs/train_courier.py", "--conf", str(conf), "--set", "train.backend=horovod",
                            "--set", "train.max_steps=2", "--run-name", "horovod-on-the-cluster"], cwd=ROOT, env=env,
                           stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
    hv = hv_log.read_text()
    assert r.returncode == 0, hv[-6000:]
    assert "on 2 horovod worker(s)" in hv and "done: 2 steps" in hv, hv[-3000:]
    last_train = [tasks for app, _, tasks in applications(tmp_path / "spark-events") if app == "train_courier"][-1]
    assert set(last_train) == workers and min(last_train.values()) > 0, last_train  # a process per worker


def local_config(cluster_conf: Path, root: Path) -> Path:
    """The cluster run's config with every stage setting kept and only the deployment changed: local
    paths, local[2] Spark without the cluster's conf, delta-rs, a sqlite MLflow store, training
    processes on the driver."""
    conf = yaml.safe_load(cluster_conf.read_text())
    conf["paths"] = {"data_root": str(root / "data")}
    conf["spark"] = {"master": "local[2]", "shuffle_partitions": conf["spark"].get("shuffle_partitions", 4),
                     "driver_memory": "2g"}
    conf["tables"] = {"engine": "delta-rs"}
    conf["mlflow"] = {"experiment": conf["mlflow"].get("experiment", "courier")}
    conf["train"] = {**conf["train"], "local_mode": True}
    conf.pop("env", None)
    path = root / "local.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def _fetch_cluster_encoder(services, env: dict, tmp_path: Path) -> Path:
    """The weights of courier-encoder@champion on the services' MLflow server (S3 artifacts), fetched
    in a child process that has the run's credentials."""
    code = ("import sys, mlflow\nfrom etl.contracts import CHAMPION, ENCODER_MODEL\n"
            "from etl.registry import ENCODER_STATE_ARTIFACT\n"
            "mlflow.set_tracking_uri(sys.argv[1])\n"
            "v = mlflow.MlflowClient().get_model_version_by_alias(ENCODER_MODEL, CHAMPION)\n"
            "print('ENCODER ' + mlflow.artifacts.download_artifacts(run_id=v.run_id, "
            "artifact_path=ENCODER_STATE_ARTIFACT.format(version=v.version), dst_path=sys.argv[2]))\n")
    out = tmp_path / "cluster-encoder"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", code, services.mlflow_uri, str(out)], env={**env, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return Path(next(x for x in r.stdout.splitlines() if x.startswith("ENCODER "))[len("ENCODER "):])


def _local_reference(spark, cluster_conf: Path, tmp_path: Path, encoder: Path):
    """simulate -> build_samples -> (the cluster's encoder registered) -> embed -> clusters -> attach on
    local disk through the session's local Spark and delta-rs, in process (the jobs' own functions)."""
    from etl.build import build_date
    from etl.config import load_config
    from sim import simulate
    from etl.tables import TableStore
    from etl.tracking import start_run
    from features import pipeline as P
    from training.launch import register_encoder

    root = tmp_path / "local"
    root.mkdir()
    cfg = load_config(local_config(cluster_conf, root))
    sim = cfg.simulator
    simulate(cfg.raw_root, cfg.images_root, cfg.truth_root, preset="tiny", seed=sim.seed, start_date=sim.start_date,
             days=sim.days, malformed_rate=sim.malformed_rate, bad_image_rate=sim.bad_image_rate,
             image_px=sim.image_px, style_drift_from=sim.style_drift_from, progress=None)
    dates = sorted(json.loads(Path(cfg.raw_root, "manifest.json").read_text())["dates"])
    store = TableStore(spark, cfg)
    for d in dates:
        build_date(spark, cfg, store, d, "local-reference")
    with start_run(cfg, "reference-encoder") as run:  # the cluster's weights, registered locally
        register_encoder(cfg, str(encoder), run.info.run_id, data_version=store.version("courier_train"),
                         dates=dates[:-1], alias="champion")  # the cluster's run held out the latest date
    with start_run(cfg, "reference-features") as run:
        P.embed_items(spark, cfg, store, None, run.info.run_id)
        P.build_clusters(spark, cfg, store, run.info.run_id)
        P.attach_dates(spark, cfg, store, dates, run.info.run_id)
    return cfg
