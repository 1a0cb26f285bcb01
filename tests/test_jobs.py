"""The jobs as users run them: real spark-submit on the tiny preset, then read the tables back with
deltalake (delta-rs) and with Spark, and find the run in MLflow."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, write_config

EXPECTED_COLUMNS = {
    "pv_samples": ["sample_id", "user_id", "session_id", "pv_id", "query", "ts", "pv_items", "pv_labels",
                   "pv_positions", "click_history", "click_history_ts", "n_pos", "dt"],
    "ctr_log": ["user_id", "item_id", "pv_id", "session_id", "query", "position", "label", "ts", "history", "dt"],
    "courier_train": ["sample_id", "user_id", "session_id", "pv_id", "query", "ts", "pv_items", "pv_labels",
                      "pv_mask", "pv_images", "click_history", "click_mask", "click_images", "dt"],
    "item_images": ["item_id", "image", "width", "height", "sha256", "dt"],
    "items": ["item_id", "category", "title", "price", "first_seen_dt", "image_uri", "dt"],
    "quarantine": ["source", "reason", "detail", "raw", "raw_b64", "event_id", "job_run_id", "dt", "job"],
}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    conf = write_config(tmp, {"samples": {"image_px": 32}})
    sim = run([sys.executable, "jobs/simulate_search_log.py", "--conf", str(conf), "--preset", "tiny"])
    spark_submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    out = run([spark_submit, "--master", "local[2]", "jobs/build_samples.py", "--conf", str(conf),
               "--date", "2026-11-20", "--end-date", "2026-11-22"])
    return conf, sim.stdout, out.stdout


def test_spark_submit_prints_a_report_that_adds_up(submitted):
    _, sim_out, out = submitted
    assert "wrote 3 date(s) 2026-11-20..2026-11-22" in sim_out
    for date in ("2026-11-20", "2026-11-21", "2026-11-22"):
        assert f"== build_samples {date} ==" in out
    assert out.count("[ok]") == 3 * 17 and "MISMATCH" not in out  # 17 identities per date
    assert "quarantined search_log/bad_json" in out and "done: 3 date(s)" in out


def test_tables_read_back_with_deltalake(submitted):
    import pyarrow.fs as pafs
    from deltalake import DeltaTable

    from etl.config import load_config

    cfg = load_config(submitted[0])
    for table, columns in EXPECTED_COLUMNS.items():
        path = os.path.join(cfg.tables_root, table)
        dt = DeltaTable(path)
        assert [f.name for f in dt.schema().fields] == columns, table
        assert dt.metadata().partition_columns == (["dt", "job"] if table == "quarantine" else ["dt"])
        # A SubTreeFileSystem dataset (not to_pyarrow_table: see DESIGN.md on pyarrow 14 at exit).
        ds = dt.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(path, pafs.LocalFileSystem()))
        assert ds.count_rows() > 0, table
    ds = DeltaTable(os.path.join(cfg.tables_root, "pv_samples")).to_pyarrow_dataset(
        filesystem=pafs.SubTreeFileSystem(os.path.join(cfg.tables_root, "pv_samples"), pafs.LocalFileSystem()))
    sample = ds.head(20).to_pylist()
    assert all(1 in r["pv_labels"] and r["click_history"] and len(r["pv_items"]) <= 5 for r in sample)


def test_tables_read_back_with_spark_and_mlflow_has_the_run(spark, submitted):
    import mlflow

    from etl.config import load_config
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow

    cfg = load_config(submitted[0])
    store = TableStore(spark, cfg)
    for table, columns in EXPECTED_COLUMNS.items():
        df = store.read(table)
        assert df.columns == columns
        assert {r["dt"] for r in df.select("dt").distinct().collect()} == {"2026-11-20", "2026-11-21", "2026-11-22"}
    types = dict(store.read("courier_train").dtypes)
    assert types["pv_images"] == "array<binary>" and types["pv_mask"] == "array<int>"
    assert types["ts"] == "timestamp"
    setup_mlflow(cfg)
    runs = mlflow.search_runs(filter_string="tags.`courier.job` = 'build_samples'", output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["samples.neg_rate"] == "0.2"
    assert run.data.params["dates"] == "2026-11-20..2026-11-22 (3 dates)"  # a range, not a list that can outgrow a param
    assert int(run.data.tags["table_version.pv_samples.2026-11-22"]) == store.version("pv_samples")
    assert run.data.metrics["pv_samples"] > 0


def test_build_samples_tells_a_refusal_from_a_crash(submitted, tmp_path):
    """A scheduler retries a crash and sends a refusal to a person: input that cannot be published exits 1
    with one line; any other failure (here the tables root is a file) exits 3 with its traceback."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    base = [sys.executable, "jobs/build_samples.py", "--conf", str(submitted[0])]
    refused = subprocess.run([*base, "--date", "2026-11-25"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "build_samples: error: no raw search log for 2026-11-25" in refused.stderr
    assert "Traceback" not in refused.stderr
    not_a_folder = tmp_path / "tables"
    not_a_folder.write_text("a file where the tables belong")
    crashed = subprocess.run([*base, "--date", "2026-11-22", "--force", "--set", f"paths.tables_root={not_a_folder}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    assert "Traceback" in crashed.stderr and "build_samples: error: the job failed (exit 3)" in crashed.stderr
    assert not_a_folder.read_text() == "a file where the tables belong"


def test_status_file_is_one_json_line_written_whole(tmp_path):
    """--status-file (the scheduler's XCom): one JSON line; a rerun replaces it; no temporary file stays."""
    import argparse
    import json

    from jobs.common import JobContext, job_parser, status_file_argument

    p = job_parser("t")
    status_file_argument(p, "the test's status")
    path = tmp_path / "status"
    path.write_text("stale line that must go\n")
    ctx = JobContext("t", p.parse_args(["--status-file", str(path)]), cfg=None, spark=None)
    ctx.write_status({"model_version": "3", "skipped": False, "reasons": ["a", "b"]})
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"model_version": "3", "skipped": False, "reasons": ["a", "b"]}
    assert sorted(os.listdir(tmp_path)) == ["status"]
    no_flag = JobContext("t", argparse.Namespace(status_file=None), cfg=None, spark=None)
    no_flag.write_status({"x": 1})  # no --status-file: no file
    assert sorted(os.listdir(tmp_path)) == ["status"]


def test_a_crash_exits_with_the_jobs_crash_status(tmp_path):
    """review_model's exit statuses 0-2 are decisions: a crash there exits 3 (crash_status), never 1."""
    conf = write_config(tmp_path, {})
    code = ("import sys\nfrom jobs.common import run_job\n"
            "def body(ctx):\n    raise ZeroDivisionError('boom in the body')\n"
            f"sys.exit(run_job('crashy', 'd', lambda p: None, body, argv=['--conf', {str(conf)!r}], crash_status=3))")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 3, out.stderr[-3000:]
    assert "ZeroDivisionError: boom in the body" in out.stderr and "crashy: error: the job failed (exit 3)" in out.stderr
    # A config value the body refuses (here a path outside its root, as --run-name ../x meets) is a bad
    # config: one line and exit 2, as before the session starts, not a crash.
    code = ("import sys\nfrom jobs.common import run_job\nfrom etl.config import under_root\n"
            "def body(ctx):\n    under_root(ctx.cfg.checkpoints_root, '../elsewhere')\n"
            f"sys.exit(run_job('pathy', 'd', lambda p: None, body, argv=['--conf', {str(conf)!r}], crash_status=3))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "pathy: error: " in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_bad_arguments_or_config_exit_with_the_jobs_usage_status(tmp_path, capsys, monkeypatch):
    """Whatever breaks before the body (an unknown flag, a --set that makes a section a number, a config
    file that is not UTF-8) is one line and the usage status: 2, or 3 for review_model, whose 1 and 2
    are decisions (rejected, refused) that a scheduler must not read from a typo."""
    from jobs import review_model
    from jobs.common import run_job

    conf = write_config(tmp_path, {})
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"env: caf\xe9\n")

    def body(ctx):
        raise AssertionError("the body must not run")

    for argv, what in ((["--conf", str(conf), "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                       (["--conf", str(conf), "--set", "features=1", "--set", "features.n_clusters=2"], "the config"),
                       (["--conf", str(latin1)], "UnicodeDecodeError")):
        for usage_status in (2, 3):
            capsys.readouterr()
            assert run_job("j", "d", lambda p: None, body, argv=argv, usage_status=usage_status) == usage_status, argv
            err = capsys.readouterr().err
            assert what in err and "Traceback" not in err, err
    assert review_model.main(["--conf", str(conf), "--allow_first"]) == 3
    assert review_model.main(["--conf", str(latin1)]) == 3
    from jobs import train_courier  # an alias MLflow refuses: before the training, not after it

    assert train_courier.main(["--conf", str(conf), "--alias", "latest"]) == 2
    assert "'latest' cannot be a registry alias" in capsys.readouterr().err
    # A bug of the loader (not what a bad file raises) is a crash: its traceback and the crash status.
    import jobs.common

    def broken_loader(args):
        raise KeyError("a bug")

    monkeypatch.setattr(jobs.common, "load_job_config", broken_loader)
    assert run_job("j", "d", lambda p: None, body, argv=["--conf", str(conf)]) == 3  # every job's crash status
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(KeyError):
        run_job("j", "d", lambda p: None, body, argv=["--conf", str(conf)], crash_status=None)


def test_a_local_session_keeps_its_ports_on_this_machine(tmp_path):
    """A job started with plain python (as the schedule runs them) launches the JVM itself: SPARK_LOCAL_IP
    must reach the JVM's environment at launch, or the Spark UI listens on every interface."""
    conf = write_config(tmp_path, {})
    code = ("import sys\nfrom jobs.common import run_job\n"
            "def body(ctx):\n    print('JVM SPARK_LOCAL_IP=' + str(ctx.spark._jvm.System.getenv('SPARK_LOCAL_IP')))\n"
            f"sys.exit(run_job('ports', 'd', lambda p: None, body, argv=['--conf', {str(conf)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}
    env["PYSPARK_PYTHON"] = sys.executable
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "JVM SPARK_LOCAL_IP=127.0.0.1" in out.stdout


def test_a_spark_submit_without_spark_local_ip_runs_without_the_ui(tmp_path):
    """spark-submit starts the JVM before the job runs: without SPARK_LOCAL_IP in its environment the UI
    (started with the session) would listen on every interface, also with spark-submit's own --master
    local[2]. The job turns the UI off and says how to keep it; with SPARK_LOCAL_IP the UI stays on."""
    conf = write_config(tmp_path, {})
    script = tmp_path / "ui.py"
    script.write_text("import sys\nsys.path.insert(0, %r)\nfrom jobs.common import run_job\n"
                      "def body(ctx):\n    sc = ctx.spark.sparkContext\n"
                      "    print('UI=' + str(sc.uiWebUrl), 'APP=' + sc.appName)\n"
                      "sys.exit(run_job('ui', 'd', lambda p: None, body, argv=['--conf', %r]))\n"
                      % (str(ROOT), str(conf)))
    submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    env = {k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    for local_ip, ui in ((None, "UI=None"), ("127.0.0.1", "UI=http://127.0.0.1:")):
        run_env = {**env, "SPARK_LOCAL_IP": local_ip} if local_ip else env
        out = subprocess.run([submit, "--master", "local[2]", str(script)], cwd=ROOT, env=run_env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert ui in out.stdout and "APP=ui" in out.stdout, out.stdout[-2000:]  # the job's name (event logs)
        said = "the Spark UI is off for this spark-submit" in out.stdout + out.stderr  # (where logging goes)
        assert said == (local_ip is None), out.stdout[-2000:]
        assert "not the config's spark.master" not in out.stdout + out.stderr  # --master local[2] is the config's
    # Without --master spark-submit runs on its own local[*], not the config's master: said, not silent.
    out = subprocess.run([submit, str(script)], cwd=ROOT, env={**env, "SPARK_LOCAL_IP": "127.0.0.1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "running on spark-submit's master local[*], not the config's spark.master local[2]" in said


def test_the_log4j_option_stays_one_java_argument_under_a_folder_with_a_space():
    """Spark's launcher splits --driver-java-options and spark.driver.extraJavaOptions on whitespace
    outside quotes: unquoted, a checkout under "/tmp/my repo" gave java two arguments, the second taken
    for the main class. Asked of the launcher itself (it prints the java command, starts nothing)."""
    import pyspark

    from etl.spark import log4j_option

    home = os.path.dirname(pyspark.__file__)
    option = log4j_option("/tmp/my repo/conf/log4j2.properties")
    java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
    out = subprocess.run([java, "-cp", os.path.join(home, "jars", "*"), "org.apache.spark.launcher.Main",
                          "org.apache.spark.deploy.SparkSubmit", "--driver-java-options", option, "x.py"],
                         env={**os.environ, "SPARK_HOME": home, "SPARK_SCALA_VERSION": "2.12"},
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    args = out.stdout.decode().split("\0")
    assert "-Dlog4j.configurationFile=file:/tmp/my repo/conf/log4j2.properties" in args, args[:12]


def test_the_driver_keeps_the_config_s_java_options_beside_the_log4j_config(tmp_path):
    """spark-submit's --driver-java-options (scripts/pipeline.sh) replaces spark.driver.extraJavaOptions:
    the one value must carry the config's own options (a trust store for a private CA...) and the log4j
    config, unless the config names its own."""
    from etl.config import load_config
    from etl.spark import LOG4J_OPTION, driver_java_options

    def options(conf):
        return driver_java_options(load_config(write_config(tmp_path, {"spark": {"conf": conf}})))

    trust = "-Djavax.net.ssl.trustStore=/etc/ca.jks"
    assert options({"spark.driver.extraJavaOptions": trust}) == f"{trust} {LOG4J_OPTION}"
    own = "-Dlog4j.configurationFile=file:/etc/mine.properties"
    assert options({"spark.driver.extraJavaOptions": own}) == own
    assert options({}) == LOG4J_OPTION


def test_a_changed_artifact_root_under_an_existing_experiment_is_warned_about(tmp_path, caplog):
    """MLflow keeps an experiment's artifact location: a config that names another root is told so."""
    import logging

    from etl.config import load_config
    from etl.tracking import setup_mlflow

    db = f"sqlite:///{tmp_path}/mlflow.db"
    first = load_config(write_config(tmp_path, {"mlflow": {"tracking_uri": db, "artifact_root": str(tmp_path / "a")}}))
    moved = load_config(write_config(tmp_path, {"mlflow": {"tracking_uri": db, "artifact_root": str(tmp_path / "b")}}))
    with caplog.at_level(logging.WARNING, logger="etl.tracking"):
        setup_mlflow(first)
        setup_mlflow(first)
        assert not caplog.records  # created there, and still there
        setup_mlflow(moved)
    assert len(caplog.records) == 1 and f"{(tmp_path / 'a').as_uri()}, not in mlflow.artifact_root" in caplog.text
