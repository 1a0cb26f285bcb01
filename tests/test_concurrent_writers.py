"""Concurrent writers: jobs committing to the same table at once all land (or one retries after a clear
conflict), and the table is never corrupted, on both engines.

- delta-rs: six real processes commit at the same instant (four new partitions, two replaces of the same
  partition); the files were written beforehand, so the race is on the Delta log itself.
- delta-spark: threads of one driver replace partitions at once (the way two jobs of one Spark
  application race; on S3 the default S3SingleDriverLogStore makes exactly those commits atomic).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F
from s3_server import s3_server  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]
D0, NEW_DATES = "2026-11-20", ["2026-11-21", "2026-11-22", "2026-11-23", "2026-11-24"]

_CHILD = """
import pickle, sys, time, logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from etl.config import load_config
from etl.tables import TableStore
job = pickle.load(open(sys.argv[1], "rb"))
store = TableStore(None, load_config(job["conf"]))  # the commit needs no Spark: the files exist already
late = time.time() - job["start_at"]
while time.time() < job["start_at"]:
    time.sleep(0.001)
store._commit("t", job["adds"], job["schema"], ["dt"], [("dt", "=", job["dt"])], {"job": job["name"]})
print("LATE" if late > 0 else "ON_TIME", flush=True)
"""


def test_delta_rs_commits_from_concurrent_processes_all_land(spark, cfg_factory, tmp_path):
    from etl.tables import TableStore, commit_metadata

    cfg = cfg_factory()
    store = TableStore(spark, cfg)
    store.replace_partition(spark.range(3).withColumn("w", F.lit("seed")), "t", {"dt": D0})
    writers = [(f"new{i}", d, 10 + i) for i, d in enumerate(NEW_DATES)] + [("same_a", D0, 5), ("same_b", D0, 7)]
    schema = store._arrow_schema(spark.range(1).withColumn("w", F.lit("x")), partition_cols=["dt"])
    start_at = time.time() + 20  # after every child has imported deltalake (seconds on a busy machine)
    procs, adds_of = [], {}
    for name, dt, rows in writers:
        df = spark.range(rows).withColumn("w", F.lit(name))
        adds = store._write_files(df, "t", f"dt={dt}/run-{name}", {"dt": dt})
        adds_of[name] = sorted(a.path for a in adds)
        job = tmp_path / f"{name}.pkl"
        job.write_bytes(pickle.dumps({"conf": cfg.source, "adds": adds, "schema": schema, "dt": dt,
                                      "start_at": start_at, "name": name}))
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, str(job)], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
    outs = [p.communicate(timeout=300) for p in procs]
    for (name, _, _), p, (out, err) in zip(writers, procs, outs):
        assert p.returncode == 0, (name, err[-3000:])
    print("children on time:", sum("ON_TIME" in o for o, _ in outs), "of", len(outs),
          "| conflicts retried:", sum(e.count("retrying") for _, e in outs))
    # every commit landed exactly once: version 0 (seed) + one per writer, no version lost or doubled
    history = store.history("t")
    assert store.version("t") == len(writers) and len(history) == len(writers) + 1
    jobs = {h["version"]: commit_metadata(h).get("job") for h in history}
    assert sorted(j for j in jobs.values() if j) == sorted(w[0] for w in writers)
    # each new partition holds exactly its writer's rows; the twice-replaced one holds exactly one
    # writer's files and rows (the later commit), never a mix and never the seed rows
    df = store.read("t")
    got = {r["dt"]: (r["n"], sorted(r["ws"])) for r in
           df.groupBy("dt").agg(F.count(F.lit(1)).alias("n"), F.collect_set("w").alias("ws")).collect()}
    for name, dt, rows in writers[:4]:
        assert got[dt] == (rows, [name])
    assert got[D0] in ((5, ["same_a"]), (7, ["same_b"]))
    winner = got[D0][1][0]
    d0_files = sorted(f.uri.split("/t/", 1)[1] for f in store.files("t") if f.partition_values["dt"] == D0)
    assert d0_files == adds_of[winner]
    # the loser's replace landed too, one version earlier, as a whole
    loser = "same_b" if winner == "same_a" else "same_a"
    loser_version = next(v for v, j in jobs.items() if j == loser)
    before = store.read("t", version=loser_version).where(F.col("dt") == D0)
    assert {r["w"] for r in before.collect()} == {loser}


def test_conflicts_are_retried_a_bounded_number_of_times(spark, cfg_factory):
    from deltalake.exceptions import CommitFailedError

    from etl.tables import COMMIT_ATTEMPTS, CommitConflict, TableStore

    store = TableStore(spark, cfg_factory())
    calls = []

    def always_conflicts():
        calls.append(1)
        raise CommitFailedError("Transaction failed: a concurrent transaction deleted the same data")

    with pytest.raises(CommitConflict, match=r"table 't': the commit conflicted with concurrent writers 4 times"):
        store._retry_conflicts("t", always_conflicts)
    assert len(calls) == COMMIT_ATTEMPTS == 4

    def conflicts_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("io.delta.exceptions.ConcurrentAppendException: Files were added to partition [dt=x]")
        return "done"

    calls.clear()
    assert store._retry_conflicts("t", conflicts_once) == "done" and len(calls) == 2

    def broken():
        calls.append(1)
        raise ValueError("not a conflict")

    calls.clear()
    with pytest.raises(ValueError):
        store._retry_conflicts("t", broken)
    assert len(calls) == 1  # anything else is not retried


def native_main(out: Path) -> None:
    """Child process: a Delta-enabled local session; threads replace partitions of one table at once."""
    import threading

    sys.path.insert(0, str(ROOT))
    from etl.config import load_config
    from etl.spark import get_spark
    from etl.tables import TableStore, commit_metadata

    cfg = load_config(out / "spark-delta.yaml")
    spark = get_spark(cfg, "concurrent-writers")
    store = TableStore(spark, cfg)
    store.replace_partition(spark.range(3).withColumn("w", F.lit("seed")), "t", {"dt": D0})
    writers = [(f"new{i}", d, 10 + i) for i, d in enumerate(NEW_DATES[:2])] + [("same_a", D0, 5), ("same_b", D0, 7)]
    frames = {n: spark.range(r).withColumn("w", F.lit(n)) for n, _, r in writers}
    barrier, errors, versions = threading.Barrier(len(writers)), [], {}

    def write(name, dt):
        try:
            barrier.wait()
            versions[name] = store.replace_partition(frames[name], "t", {"dt": dt}, job=name)
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(f"{name}: {type(e).__name__}: {e}"[:2000])

    threads = [threading.Thread(target=write, args=(n, d)) for n, d, _ in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    df = store.read("t")
    rows = {r["dt"]: [r["n"], sorted(r["ws"])] for r in
            df.groupBy("dt").agg(F.count(F.lit(1)).alias("n"), F.collect_set("w").alias("ws")).collect()}
    hist = [{"version": h["version"], "job": commit_metadata(h).get("job")} for h in store.history("t")]
    (out / "result.json").write_text(json.dumps({"errors": errors, "rows": rows, "history": hist,
                                                 "version": store.version("t"),
                                                 "returned": versions}))
    spark.stop()


def test_delta_spark_concurrent_partition_replaces_all_land(tmp_path):
    from test_engine_parity import delta_classpath, write_engine_configs

    write_engine_configs(tmp_path, delta_classpath())
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["errors"] == []
    assert res["version"] == 4 and sorted(h["version"] for h in res["history"]) == [0, 1, 2, 3, 4]
    assert sorted(h["job"] for h in res["history"] if h["job"]) == ["new0", "new1", "same_a", "same_b"]
    # each write returned the version of its own commit, not the newest one when it asked
    assert res["returned"] == {h["job"]: h["version"] for h in res["history"] if h["job"]}
    assert res["rows"][NEW_DATES[0]] == [10, ["new0"]] and res["rows"][NEW_DATES[1]] == [11, ["new1"]]
    assert res["rows"][D0] in ([5, ["same_a"]], [7, ["same_b"]])  # one writer's rows, whole


if __name__ == "__main__":
    native_main(Path(sys.argv[1]))


def test_delta_rs_commits_race_safely_on_the_object_store(s3_server):
    """The store gives delta-rs the put-if-absent its S3 commits rely on (no lock service configured):
    a second `If-None-Match: *` put of a key is refused, and eight appends released together each land
    as their own version, none lost."""
    import threading

    import boto3
    import pyarrow as pa
    from botocore.exceptions import ClientError
    from deltalake import DeltaTable, write_deltalake

    o = s3_server.options
    s3 = boto3.client("s3", endpoint_url=o.endpoint, region_name=o.region, aws_access_key_id=o.access_key,
                      aws_secret_access_key=o.secret_key)
    s3.put_object(Bucket=s3_server.bucket, Key="cas/k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=s3_server.bucket, Key="cas/k", Body=b"second", IfNoneMatch="*")
    assert s3.get_object(Bucket=s3_server.bucket, Key="cas/k")["Body"].read() == b"first"

    opts = {"AWS_ENDPOINT_URL": o.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": o.region,
            "AWS_ACCESS_KEY_ID": o.access_key, "AWS_SECRET_ACCESS_KEY": o.secret_key}
    uri = f"s3://{s3_server.bucket}/race/t"
    write_deltalake(uri, pa.table({"x": [0]}), storage_options=opts)
    n, errors = 8, []
    barrier = threading.Barrier(n)

    def append(i):
        barrier.wait()
        try:
            write_deltalake(uri, pa.table({"x": [i + 1]}), mode="append", storage_options=opts)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e)[:300])

    threads = [threading.Thread(target=append, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = DeltaTable(uri, storage_options=opts)
    assert errors == [] and table.version() == n
    assert sorted(table.to_pyarrow_dataset().to_table().column("x").to_pylist()) == list(range(n + 1))
