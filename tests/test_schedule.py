"""The scheduled feature refresh under a real Airflow 3 (its own virtualenv, scripts/install_airflow.sh):
the DAG in jobs/schedules/ parses, and `airflow dags test` runs it day by day on the tiny preset —
a backfill over every simulated date, a refresh task killed mid-way and retried, a rerun of a done day
that commits nothing, and the drift branch (re-embed, re-cluster, re-attach, CTR review) when the
simulator shifts the new items' style on the last date.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

ROOT = Path(__file__).resolve().parents[1]
DAG_FILE = ROOT / "jobs" / "schedules" / "courier_refresh_dag.py"
DAG_ID = "courier_feature_refresh"
AIRFLOW = Path(os.environ.get("COURIER_AIRFLOW_VENV", ROOT / ".venv-airflow")) / "bin" / "airflow"
PY = sys.executable
TASKS = {"build_samples", "refresh_features", "recluster_due", "done", "embed_items", "build_clusters",
         "attach_features", "train_ctr", "review_model"}
from etl.catalog import CTR_TRAIN, ITEM_CLUSTERS, ITEM_EMBEDDINGS, STAGE1  # noqa: E402

TRAIN = {"batch_size": 16, "num_workers": 1, "epochs": 1, "max_steps": 6, "checkpoint_every": 100,
         "log_every": 3, "decode_threads": 1, "local_mode": True}
FEATURES = {"n_clusters": 8, "kmeans_iters": 10, "attach_batch_size": 256, "embed_batch_size": 64,
            "drift_threshold": 0.5}
CTR = {"epochs": 1, "batch_size": 128, "layers": [32, 16], "item_buckets": 4096, "user_buckets": 1024}
REVIEW = {"min_eval_rows": 50, "min_category_rows": 50}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """A fresh AIRFLOW_HOME with a sqlite metadata database; returns run(args, env) -> CompletedProcess."""
    if not AIRFLOW.exists():
        if os.environ.get("COURIER_REQUIRE_AIRFLOW") == "1":
            pytest.fail(f"{AIRFLOW} is missing: run scripts/install_airflow.sh (scripts/test.sh does)")
        pytest.skip("Airflow is not installed (scripts/install_airflow.sh)")
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYSPARK", "SPARK_"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW_VAR_COURIER_HOME": str(ROOT),
        "COURIER_RETRY_DELAY_S": "1",
        "SPARK_LOCAL_IP": "127.0.0.1",
    })

    def run(args, extra_env=None, check=True):
        proc = subprocess.run([str(AIRFLOW), *args], env={**env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=3600)
        if check and proc.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n"
                                 f"{proc.stderr[-6000:]}")
        return proc

    run(["db", "migrate"])
    return run


def test_dag_file_imports_only_airflow_and_the_standard_library():
    tree = ast.parse(DAG_FILE.read_text())
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert roots - {"__future__", "airflow", *sys.stdlib_module_names} == set()


def test_dag_parses_in_airflow(airflow):
    out = airflow(["dags", "list-import-errors", "-o", "json"]).stdout
    listed = [line for line in out.splitlines() if line.startswith("[")]  # Airflow also prints warnings
    assert listed and json.loads(listed[-1]) == [], out
    tasks = set(airflow(["tasks", "list", DAG_ID]).stdout.split())
    assert TASKS <= tasks, tasks


_BRANCH = """
import json, sys, types
sys.path.insert(0, sys.argv[1])
import courier_refresh_dag as dag_file
branch = dag_file.dag.get_task("recluster_due").python_callable
for status, conf in json.loads(sys.argv[2]):
    ti = types.SimpleNamespace(xcom_pull=lambda task_ids, status=status: json.dumps(status))
    print(branch(ti=ti, dag_run=types.SimpleNamespace(conf=conf)))
"""


def test_the_branch_re_clusters_on_drift_on_request_and_for_a_run_that_built_its_clusters(airflow):
    """A run cleared after its re-cluster built the clusters (say train_ctr failed) measures its drift
    against those clusters, typically below the threshold: it must still take the re-cluster path (its
    build is then a no-op, its re-attach, training and review run), not end green at `done`."""
    cases = [({"recluster_due": True, "recluster_built": False}, {}), ({"recluster_due": False}, {}),
             ({"recluster_due": False, "recluster_built": True}, {}), ({"recluster_due": False}, {"recluster": True})]
    proc = subprocess.run([str(AIRFLOW.parent / "python"), "-c", _BRANCH, str(DAG_FILE.parent), json.dumps(cases)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["embed_items", "done", "embed_items", "embed_items"]


def _job(script, conf, *args):
    proc = subprocess.run([PY, str(ROOT / "jobs" / script), "--conf", str(conf), *args], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYSPARK_PYTHON": PY})
    assert proc.returncode == 0, f"{script} {args} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _row_hashes(spark, cfg, tables, drop=("job_run_id",)):
    from pyspark.sql import functions as F

    from etl.tables import TableStore

    store = TableStore(spark, cfg)
    out = {}
    for name in tables:
        df = store.read(name)
        cols = sorted(c for c in df.columns if c not in drop)
        out[name] = sorted(r[0] for r in df.select(F.sha2(F.to_json(F.struct(*cols)), 256)).collect())
    return out


def _versions(spark, cfg, tables):
    from etl.tables import TableStore

    store = TableStore(spark, cfg)
    return {t: store.version(t) for t in tables}


def _status_lines(output: str, key: str) -> list[dict]:
    """The JSON objects with `key` that tasks printed (the refresh's and the review's status lines),
    found inside Airflow's log lines."""
    decoder, out = json.JSONDecoder(), []
    for line in output.splitlines():
        start = line.find('{"')
        if start < 0:
            continue
        try:
            obj, _ = decoder.raw_decode(line[start:])
        except ValueError:
            continue
        if isinstance(obj, dict) and key in obj:
            out.append(obj)
    return out


def test_backfill_retry_rerun_and_drift_branch(airflow, spark, tmp_path):
    import mlflow

    from etl.config import load_config
    from sim import simulate
    from etl.tracking import setup_mlflow

    conf = write_config(tmp_path, {"train": TRAIN, "features": FEATURES, "ctr": CTR, "review": REVIEW})
    cfg = load_config(conf)
    manifest = simulate(cfg.raw_root, cfg.images_root, cfg.truth_root, preset="tiny", seed=7, image_px=32,
                        style_drift_from="2026-11-22", progress=None)
    dates = sorted(manifest["dates"])
    assert dates == ["2026-11-20", "2026-11-21", "2026-11-22"]

    # The state a deployment starts from: the first day built, an encoder (@champion) and its clusters (@current).
    _job("build_samples.py", conf, "--date", dates[0])
    _job("train_courier.py", conf, "--alias", "champion")
    _job("embed_items.py", conf)
    _job("build_clusters.py", conf)

    env = {"AIRFLOW_VAR_COURIER_CONF": str(conf), "COURIER_DAG_START": dates[0],
           "COURIER_FAULT_KILL_AT": "committed:item_embeddings", "COURIER_FAULT_MARKER": str(tmp_path / "killed-once")}

    def day(date):
        return airflow(["dags", "test", DAG_ID, f"{date}T02:30:00+00:00"], env)

    runs = {}
    for d in dates:  # the backfill, day by day in order (max_active_runs=1)
        runs[d] = day(d)
        assert "state=success" in (runs[d].stdout + runs[d].stderr), (runs[d].stdout + runs[d].stderr)[-6000:]
    out = {d: r.stdout + r.stderr for d, r in runs.items()}

    # The refresh of the first day that had new items was killed after its first commit, then retried.
    assert (tmp_path / "killed-once").exists()
    assert "new_state=up_for_retry" in out[dates[1]]

    # Every day's refresh printed its status line; the drift branch ran only on the drifted day.
    status = {d: [s for s in _status_lines(o, "recluster_due") if s.get("date") == d] for d, o in out.items()}
    assert all(status[d] for d in dates), {d: o[-3000:] for d, o in out.items()}
    last = {d: s[-1] for d, s in status.items()}
    assert last[dates[1]]["new_items"] > 0 and not last[dates[1]]["recluster_due"], last
    assert last[dates[2]]["recluster_due"] and last[dates[2]]["drift_far_share"] > FEATURES["drift_threshold"], last
    for d in dates[:2]:
        assert "Following branch {'done'}" in out[d]
    assert "Following branch {'embed_items'}" in out[dates[2]]

    # Re-clustered: a second courier-clusters version holds @current, and every ctr_train day uses it.
    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    current = client.get_model_version_by_alias("courier-clusters", "current")
    assert int(current.version) == 2
    # A retry of that build (it moved @current, then failed, say, logging its metrics) has nothing to do.
    key = current.tags.get("build_key")
    assert key, current.tags
    assert (f"v2 was built for {key!r}: courier-clusters@current is v2 already; nothing to build"
            in _job("build_clusters.py", conf, "--build-key", key))
    # That run cleared and run again: its refresh says a clustering was built for it (the branch then
    # re-clusters again); no other run's key finds one (every day's status above said so too).
    assert all(not s["recluster_built"] for s in last.values()), last
    _job("refresh_features.py", conf, "--date", dates[2], "--build-key", key, "--status-file", str(tmp_path / "s"))
    again = json.loads((tmp_path / "s").read_text())
    assert again["recluster_built"] and again["noop"], again
    assert sorted(int(v.version) for v in client.search_model_versions("name='courier-clusters'")) == [1, 2]
    from etl.tables import TableStore

    store = TableStore(spark, cfg)
    ctr_train = store.read("ctr_train").select("dt", "feature_version", "item_id", "item_cluster_id").toPandas()
    assert sorted(ctr_train["dt"].unique()) == dates
    assert ctr_train["feature_version"].nunique() == 1 and ctr_train["feature_version"].iloc[0].endswith(
        f"courier-clusters-v{current.version}")
    assert len(ctr_train) == store.read("ctr_log").count()  # every impression once

    # The CTR gate ran on the new features like on any challenger: its decision is recorded and
    # @champion moved only if it was promoted (here no champion exists yet, so it is refused).
    review = _status_lines(out[dates[2]], "decision")
    assert review and review[-1]["decision"] in ("promoted", "rejected", "refused"), out[dates[2]][-4000:]
    trained = _status_lines(out[dates[2]], "model_version")  # the review took the version train_ctr made
    assert trained and review[-1]["challenger"] == trained[-1]["model_version"], out[dates[2]][-4000:]
    try:
        champion = client.get_model_version_by_alias("ctr-model", "champion").version
    except mlflow.exceptions.MlflowException:
        champion = None
    assert (champion is not None) == (review[-1]["decision"] == "promoted")

    # A rerun of a done day commits nothing: every table keeps its version.
    every = STAGE1 + (ITEM_EMBEDDINGS, ITEM_CLUSTERS, CTR_TRAIN)
    before = _versions(spark, cfg, every)
    rerun = day(dates[1])
    assert "state=success" in (rerun.stdout + rerun.stderr)
    assert _versions(spark, cfg, every) == before
    again = [s for s in _status_lines(rerun.stdout + rerun.stderr, "recluster_due") if s.get("date") == dates[1]]
    assert again and again[-1]["noop"] and again[-1]["committed"] == {}
    assert again[-1]["drift_far_share"] == last[dates[1]]["drift_far_share"]  # a retry sees the same drift

    # The backfill's stage-1 tables equal one build_samples run over the whole range (the README pipeline).
    (tmp_path / "ref").mkdir()
    ref_conf = write_config(tmp_path / "ref", {"paths": {"raw_root": cfg.raw_root, "images_root": cfg.images_root}})
    ref = load_config(ref_conf)  # the same raw log and images, its own tables
    _job("build_samples.py", ref_conf, "--date", dates[0], "--end-date", dates[-1])
    assert _row_hashes(spark, cfg, STAGE1) == _row_hashes(spark, ref, STAGE1)
