"""Engine parity: delta-rs (the embedded default) and native delta-spark give the same tables.

Both engines write the same frames through ``TableStore``; for every table and partition the row sets
are equal (an order-independent hash over every column), each engine reads the other's tables (latest
and pinned versions), a partition replace is exactly one commit on both, and time travel returns the
earlier content on both.

The native engine needs the Delta jars on the driver's class path at JVM launch, so the Spark work runs
in a child process (``python tests/test_engine_parity.py OUT_DIR``) with its own local session; the
test asserts on the JSON it writes. The jars come from scripts/cluster_jars.sh (Maven Central, cached).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATES = ("2026-11-20", "2026-11-21", "2026-11-22")


def delta_classpath() -> str:
    jars = subprocess.run(["bash", str(ROOT / "scripts" / "cluster_jars.sh")], check=True, capture_output=True,
                          text=True, timeout=600).stdout.strip()
    return os.path.dirname(jars.split(",")[0]) + "/*"


def write_engine_configs(out: Path, classpath: str, master: str = "local[2]") -> dict[str, Path]:
    """One config per engine, same session settings (the Delta extension is harmless for delta-rs)."""
    import yaml

    paths = {}
    for engine in ("delta-rs", "spark-delta"):
        conf = {"paths": {"data_root": str(out / engine)},
                "spark": {"master": master, "shuffle_partitions": 2, "driver_memory": "1g",
                          "conf": {"spark.driver.extraClassPath": classpath,
                                   "spark.executor.extraClassPath": classpath}},
                "tables": {"engine": engine}}
        paths[engine] = out / f"{engine}.yaml"
        paths[engine].write_text(yaml.safe_dump(conf))
    return paths


def sample_frame(spark, seed: int, n: int):
    """A frame with the column types the project's tables use (strings, ints, doubles, arrays,
    timestamps, binary), nulls included; content depends on seed."""
    from pyspark.sql import functions as F

    return (spark.range(n)
            .withColumn("user_id", F.concat(F.lit("u"), (F.col("id") * seed % 7).cast("string")))
            .withColumn("score", F.when(F.col("id") % 5 == 0, None).otherwise(F.col("id") / (seed + 1.0)))
            .withColumn("items", F.array(F.lit(f"i{seed}"), F.col("id").cast("string")))
            .withColumn("labels", F.array((F.col("id") % 2).cast("int"), F.lit(seed)))
            .withColumn("ts", F.timestamp_seconds(F.lit(1795000000) + F.col("id") * 61 + seed))
            .withColumn("image", F.encode(F.concat(F.lit("img-"), F.col("id").cast("string")), "utf-8")))


def _hash_aggs():
    """Row count and an order-independent hash of the row multiset over every column (two sums of a
    64-bit row hash, so that one collision cannot hide a difference)."""
    from pyspark.sql import functions as F

    def aggs(df):
        h = F.xxhash64(*[F.col(c) for c in sorted(df.columns)])
        return [F.count(F.lit(1)).alias("n"), F.sum(h.cast("decimal(38,0)")).alias("s"),
                F.sum((h % 1000003).cast("decimal(38,0)") * (h % 999983)).alias("s2")]
    return aggs


def row_set_hash(df) -> list:
    r = df.agg(*_hash_aggs()(df)).first()
    return [int(r["n"]), f"{r['s']}:{r['s2']}"]


def per_partition(df, col: str = "dt") -> dict:
    """{partition value: row_set_hash of its rows} in one pass."""
    return {r[col]: [int(r["n"]), f"{r['s']}:{r['s2']}"] for r in df.groupBy(col).agg(*_hash_aggs()(df)).collect()}


def main(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from pyspark.sql import functions as F

    from etl import catalog as T
    from etl.config import load_config
    from etl.spark import get_spark
    from etl.publish import PublishLog
    from etl.tables import TableError, TableStore, commit_metadata
    from test_tables import file_codecs

    confs = {e: Path(out / f"{e}.yaml") for e in ("delta-rs", "spark-delta")}
    cfgs = {e: load_config(p) for e, p in confs.items()}
    spark = get_spark(cfgs["spark-delta"], "engine-parity")
    stores = {e: TableStore(spark, c) for e, c in cfgs.items()}
    result: dict = {"engines": {}}
    for engine, store in stores.items():
        versions = [store.replace_partition(sample_frame(spark, 1, 40), "t", {"dt": DATES[0]}),
                    store.replace_partition(sample_frame(spark, 2, 30), "t", {"dt": DATES[1]}),
                    store.replace_partition(sample_frame(spark, 3, 25), "t", {"dt": DATES[0]})]
        # several partitions in one commit (a date range), one of them emptied
        multi = sample_frame(spark, 4, 20).withColumn(
            "dt", F.when(F.col("id") % 2 == 0, DATES[1]).otherwise(DATES[2]))
        versions.append(store.replace_partitions(multi, "m", "dt", [DATES[1], DATES[2]], job="j",
                                                 extra_metadata={"refresh_date": DATES[2]}))
        versions.append(store.replace_partitions(multi.where(f"dt = '{DATES[2]}'"), "m", "dt", [DATES[1], DATES[2]]))
        versions.append(store.overwrite(sample_frame(spark, 5, 12), "u"))
        versions.append(store.overwrite(sample_frame(spark, 6, 9), "u"))
        files = store.files("t")
        # A partition value with a quote would widen native Delta's replaceWhere to other rows: refused on
        # both engines, before anything is written.
        refused = []
        for write in (lambda: store.replace_partition(sample_frame(spark, 8, 3), "t", {"dt": "x' OR '1'='1"}),
                      lambda: store.replace_partitions(sample_frame(spark, 8, 3).withColumn("dt", F.lit(DATES[0])),
                                                       "m", "dt", [DATES[0]], fixed={"k": "a'b"})):
            try:
                write()
            except TableError as e:
                refused.append("not allowed in a path" in str(e))
        # courier_train carries its catalogued codec (etl.catalog) on both engines, staged or replaced.
        ct = sample_frame(spark, 7, 10).select(*[F.col("user_id").alias(c) for c in T.COURIER_TRAIN.columns])
        store.commit_staged(store.stage_partition(ct, T.COURIER_TRAIN, {"dt": DATES[0]}))
        store.replace_partition(ct, T.COURIER_TRAIN, {"dt": DATES[1]})
        # A run that died after staging and before its commit: a vacuum lists and removes its files
        # (native Delta stages in _staging/, a folder Delta's own vacuum skips).
        dead = store.stage_partition(ct, T.COURIER_TRAIN, {"dt": DATES[2]})
        dead_files = {f.name for f in Path(dead.folder.split(":", 1)[-1]).rglob("*.parquet")}
        # a run that has made its staging folder and written no file yet: not a dead run's, kept
        starting = Path(dead.folder.split(":", 1)[-1]).parent / "run-starting"
        starting.mkdir()
        listed = {os.path.basename(p) for p in store.vacuum(T.COURIER_TRAIN, retention_hours=0, dry_run=True)}
        store.vacuum(T.COURIER_TRAIN, retention_hours=0, dry_run=False)
        left = list(Path(dead.folder.split(":", 1)[-1]).rglob("*.parquet"))
        result["engines"][engine] = {
            "codecs": {n: file_codecs(store, n) for n in ("t", T.COURIER_TRAIN)},
            "versions": versions,
            "history_len": {n: len(store.history(n)) for n in ("t", "m", "u")},
            "quotes_refused": refused,
            # what the writer put in each commit, read back the same way from either engine's log
            "m_metadata": sorted([h["version"], *map(commit_metadata(h).get, ("job", "refresh_date", "partition"))]
                                 for h in store.history("m")),
            "t": per_partition(store.read("t")),
            "t_v0": per_partition(store.read("t", version=0)),
            "t_v1": per_partition(store.read("t", version=1)),
            # only the partitions asked for, of a pinned version too
            "t_v1_one": per_partition(store.read("t", version=1, partitions={"dt": [DATES[1], DATES[2]]})),
            "m": per_partition(store.read("m")),
            "m_v0": per_partition(store.read("m", version=0)),
            "u": row_set_hash(store.read("u")),
            "u_v0": row_set_hash(store.read("u", version=0)),
            "files_rows": {d: sum(f.num_records for f in files if f.partition_values["dt"] == d) for d in DATES},
            "columns": store.read("t").columns,
            "dead_run": {"staged": len(dead_files), "listed": dead_files <= listed, "left": len(left),
                         "rows_after": store.read(T.COURIER_TRAIN).count(), "starting_kept": starting.is_dir()},
        }
        # Once a publish log exists, a stage-1 table it does not list (its first build died before
        # publishing) has no version to read on either engine: an error, never its unpublished rows.
        PublishLog(store.root, spark).append({"tables": {}, "dates": {}})
        try:
            result["engines"][engine]["unpublished_read"] = store.read(T.COURIER_TRAIN).count()
        except TableError as e:
            result["engines"][engine]["unpublished_read"] = str(e)
    # each engine reads the other's tables, latest and pinned
    cross = {}
    for reader, writer in (("delta-rs", "spark-delta"), ("spark-delta", "delta-rs")):
        other = TableStore(spark, load_config(confs[reader], {"paths": {"data_root": str(out / writer)}}))
        assert other.native == (reader == "spark-delta")
        cross[f"{reader}_reads_{writer}"] = {
            "t": per_partition(other.read("t")), "t_v0": per_partition(other.read("t", version=0)),
            "m": per_partition(other.read("m")), "u": row_set_hash(other.read("u")),
            "version": other.version("t"),
        }
    result["cross"] = cross
    result["legacy"] = legacy_table(spark, stores["delta-rs"],
                                    TableStore(spark, load_config(confs["spark-delta"],
                                                                  {"paths": {"data_root": str(out / "delta-rs")}})))

    def written(seed, n, dt):
        return row_set_hash(sample_frame(spark, seed, n).withColumn("dt", F.lit(dt)))

    result["expected"] = {"t": {DATES[0]: written(3, 25, DATES[0]), DATES[1]: written(2, 30, DATES[1])},
                          "t_v0": {DATES[0]: written(1, 40, DATES[0])}}
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    spark.stop()


def legacy_table(spark, rs_store, native_store) -> dict:
    """A table an earlier release's delta-rs engine wrote (its writer's keys loose in commitInfo): what
    Spark's Delta makes of it before and after jobs/upgrade_tables.py's rewrite."""
    from test_tables import write_loose_key_table

    write_loose_key_table(rs_store.path("legacy"))
    out = {}
    try:
        out["before"] = native_store.read("legacy").count()
    except Exception as e:  # noqa: BLE001 - what Spark's Delta says is the result
        out["before"] = f"{type(e).__name__}: {e}"
    out["upgraded"] = rs_store.upgrade_commit_info()
    out["rows"] = [native_store.read("legacy", version=v).count() for v in (0, 1, 2)] + [
        native_store.read("legacy").count()]
    history = spark.sql(f"DESCRIBE HISTORY delta.`{native_store.path('legacy')}`").orderBy("version").collect()
    out["history"] = [[h["version"], h["operation"], h["userMetadata"]] for h in history]
    return out


def test_delta_rs_and_delta_spark_give_the_same_tables(tmp_path):
    confs = write_engine_configs(tmp_path, delta_classpath())
    assert set(confs) == {"delta-rs", "spark-delta"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    rs, native = res["engines"]["delta-rs"], res["engines"]["spark-delta"]
    # every table and partition, latest and pinned versions: the same row sets on both engines
    for key in ("t", "t_v0", "t_v1", "t_v1_one", "m", "m_v0", "u", "u_v0", "files_rows", "columns", "codecs"):
        assert rs[key] == native[key], key
    assert rs["codecs"] == {"t": ["SNAPPY"], "courier_train": ["ZSTD"]}
    # a dead run's staged files: listed by a vacuum and removed, the committed rows untouched, on both engines
    for engine in (rs, native):
        assert engine["dead_run"] == {"staged": engine["dead_run"]["staged"], "listed": True, "left": 0,
                                      "rows_after": 20, "starting_kept": True} and engine["dead_run"]["staged"] > 0, \
            engine["dead_run"]
        assert "courier_train' has no published version yet" in str(engine["unpublished_read"])
    # ... and the content written (not merely equal to each other)
    exp = res["expected"]
    assert rs["t"] == exp["t"] and rs["t_v0"] == exp["t_v0"]
    assert rs["t_v1"] == {**exp["t_v0"], DATES[1]: exp["t"][DATES[1]]}
    assert rs["t_v1_one"] == {DATES[1]: exp["t"][DATES[1]]}
    assert set(rs["m"]) == {DATES[2]} and set(rs["m_v0"]) == {DATES[1], DATES[2]}  # DATES[1] emptied
    assert rs["u"] != rs["u_v0"] and rs["u"][0] == 9 and rs["u_v0"][0] == 12
    assert rs["files_rows"] == {DATES[0]: 25, DATES[1]: 30, DATES[2]: 0}
    # one commit per write on both engines: versions 0, 1, 2 of t; 0, 1 of m and u
    assert rs["versions"] == native["versions"] == [0, 1, 2, 0, 1, 0, 1]
    assert rs["history_len"] == native["history_len"] == {"t": 3, "m": 2, "u": 2}
    assert rs["quotes_refused"] == native["quotes_refused"] == [True, True]
    partition = json.dumps({"dt": [DATES[1], DATES[2]]})
    assert rs["m_metadata"] == native["m_metadata"] == [[0, "j", DATES[2], partition], [1, None, None, partition]]
    # an earlier release's delta-rs table: Spark's Delta fails on its log, reads every version once upgraded
    legacy = res["legacy"]
    assert "MALFORMED_RECORD_IN_PARSING" in str(legacy["before"]), legacy["before"]
    assert legacy["upgraded"] == {"legacy": [0, 1]} and legacy["rows"] == [2, 2, 4, 4], legacy
    assert [h[0] for h in legacy["history"]] == [0, 1, 2], legacy["history"]
    assert json.loads(legacy["history"][0][2]) == {"job": "build_samples", "run_id": "r0", "partition": '{"dt": "a"}'}
    # each engine reads the other's tables
    for key, seen in res["cross"].items():
        writer = native if key.endswith("spark-delta") else rs
        assert seen["t"] == writer["t"] and seen["t_v0"] == writer["t_v0"], key
        assert seen["m"] == writer["m"] and seen["u"] == writer["u"] and seen["version"] == 2, key


def s3_main(out: Path) -> None:
    """Child process on the cluster-in-a-box (conf/cluster.local.yaml, its environment set): native Delta
    on s3a:// through the standalone cluster; the delta-rs engine reads the same tables from the store."""
    sys.path.insert(0, str(ROOT))
    from pyspark.sql import functions as F

    from etl.config import load_config
    from etl.spark import get_spark
    from etl.tables import TableStore

    root = f"s3a://{os.environ['COURIER_BUCKET']}/parity/tables"
    cfg = load_config(ROOT / "conf" / "cluster.local.yaml", {"paths": {"tables_root": root}})
    spark = get_spark(cfg, "engine-parity-s3")
    native = TableStore(spark, cfg)
    rs = TableStore(spark, load_config(ROOT / "conf" / "cluster.local.yaml",
                                       {"paths": {"tables_root": root}, "tables": {"engine": "delta-rs"}}))
    versions = [native.replace_partition(sample_frame(spark, 1, 40), "t", {"dt": DATES[0]}),
                native.replace_partition(sample_frame(spark, 2, 30), "t", {"dt": DATES[1]}),
                native.replace_partition(sample_frame(spark, 3, 25), "t", {"dt": DATES[0]})]

    def written(seed, n, dt):
        return row_set_hash(sample_frame(spark, seed, n).withColumn("dt", F.lit(dt)))

    # executors registered with the driver (the driver itself is listed too)
    executors = len(spark.sparkContext._jsc.sc().statusTracker().getExecutorInfos()) - 1
    result = {
        "versions": versions, "exists": native.exists("t"), "history_len": len(native.history("t")),
        "native": per_partition(native.read("t")), "native_v0": per_partition(native.read("t", version=0)),
        "rs": per_partition(rs.read("t")), "rs_v0": per_partition(rs.read("t", version=0)),
        "files": sorted([f.uri.split("://")[0], f.partition_values["dt"], f.num_records] for f in native.files("t")),
        "expected": {DATES[0]: written(3, 25, DATES[0]), DATES[1]: written(2, 30, DATES[1])},
        "expected_v0": {DATES[0]: written(1, 40, DATES[0])},
        "master": spark.sparkContext.master, "executors": executors,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    spark.stop()


@pytest.mark.cluster
def test_native_delta_on_the_object_store(cluster_services, tmp_path):
    proc = subprocess.run([sys.executable, __file__, "--s3", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=cluster_services.environ(PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["master"] == cluster_services.spark_master and res["executors"] == 2  # one per worker
    assert res["versions"] == [0, 1, 2] and res["history_len"] == 3 and res["exists"]
    assert res["native"] == res["rs"] == res["expected"]
    assert res["native_v0"] == res["rs_v0"] == res["expected_v0"]
    rows = {}
    for scheme, dt, n in res["files"]:
        assert scheme == "s3a"
        rows[dt] = rows.get(dt, 0) + n
    assert rows == {DATES[0]: 25, DATES[1]: 30}
    # the objects are in the run's bucket, under the table's folder, with its Delta log
    keys = [o["Key"] for o in cluster_services.s3_client().list_objects_v2(
        Bucket=cluster_services.bucket, Prefix="parity/tables/t/_delta_log/")["Contents"]]
    assert {k.rsplit("/", 1)[1] for k in keys} >= {f"{v:020d}.json" for v in (0, 1, 2)}


if __name__ == "__main__":
    if sys.argv[1] == "--s3":
        s3_main(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
