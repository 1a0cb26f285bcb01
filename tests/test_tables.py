"""Table I/O: partition replace is one atomic commit; a failed write leaves the table as it was."""
from __future__ import annotations

import os

import pytest
from pyspark.sql import functions as F
from s3_server import s3_server  # noqa: F401 - the fixture


def test_failed_write_leaves_the_table_as_it_was(spark, cfg_factory):
    from etl.tables import TableStore

    store = TableStore(spark, cfg_factory())
    good = spark.range(10).withColumn("x", F.col("id") * 2)
    v0 = store.replace_partition(good, "t", {"dt": "2026-11-20"})
    store.replace_partition(good.limit(3), "t", {"dt": "2026-11-21"})

    @F.udf("long")
    def explode_on_seven(i):
        if i == 7:
            raise ValueError("boom")
        return i

    bad = spark.range(10).withColumn("x", explode_on_seven("id"))
    with pytest.raises(Exception, match="boom"):
        store.replace_partition(bad, "t", {"dt": "2026-11-20"})
    assert store.version("t") == v0 + 1
    assert sorted(r["x"] for r in store.read("t").where("dt = '2026-11-20'").collect()) == list(range(0, 20, 2))
    # Spark cleaned the failed task's data files itself: vacuum finds no data file that no version refers to
    # (only the writers' checksum and _SUCCESS side files, which nothing reads).
    listed = store.vacuum("t", retention_hours=0, dry_run=True)
    assert [p for p in listed if p.endswith(".parquet")] == []
    assert all(p.endswith((".crc", "_SUCCESS")) for p in listed), listed


def test_vacuum_removes_files_that_no_version_ever_referred_to(spark, cfg_factory):
    """A run that staged files and died before its commit leaves them under the table's folder."""
    from etl.tables import TableStore

    store = TableStore(spark, cfg_factory())
    store.replace_partition(spark.range(5), "t", {"dt": "2026-11-20"})
    staged = store.stage_partition(spark.range(3), "t", {"dt": "2026-11-20"})  # never committed
    orphans = {os.path.basename(a.path) for a in staged.adds}
    assert orphans
    listed = store.vacuum("t", retention_hours=0, dry_run=True)
    assert {os.path.basename(p) for p in listed if p.endswith(".parquet")} == orphans
    table = store.path("t").removeprefix("file:")
    live = {os.path.dirname(f.uri.removeprefix("file:")) for f in store.files("t")}
    store.replace_partition(spark.range(4), "t", {"dt": "2026-11-21"})
    store.replace_partition(spark.range(0), "t", {"dt": "2026-11-21"})  # emptied: its folder holds nothing live
    started = os.path.join(table, "dt=2026-11-22", "run-started")  # a run that made its folder, no file yet
    os.makedirs(started)
    removed = store.vacuum("t", retention_hours=0, dry_run=False)
    assert orphans <= {os.path.basename(p) for p in removed}
    # what an earlier vacuum removed is listed no more (delta-rs lists its tombstones), dry run or not
    assert store.vacuum("t", retention_hours=0, dry_run=True) == []
    assert store.vacuum("t", retention_hours=0, dry_run=False) == []
    assert store.read("t").count() == 5
    # the folders vacuum emptied are gone with it, the live one and the one it took nothing from stay
    folders = {os.path.join(table, d, r) for d in os.listdir(table) if d.startswith("dt=")
               for r in os.listdir(os.path.join(table, d))}
    assert folders == live | {started}
    assert os.listdir(os.path.join(table, "dt=2026-11-21")) == []  # a partition folder stays (a writer may use it)


def test_vacuum_keeps_the_files_of_versions_within_the_retention(spark, cfg_factory):
    """A partition rebuilt today removes files written long ago: the version before the rebuild still
    reads them until the retention has passed (delta-rs 1.5.0's full vacuum took them for orphans by
    their own age). An old file that no version ever referred to is still removed."""
    import time

    from etl.tables import TableStore

    store = TableStore(spark, cfg_factory())
    store.replace_partition(spark.range(5), "t", {"dt": "2026-11-20"})
    first = store.version("t")
    orphan = store.stage_partition(spark.range(3), "t", {"dt": "2026-11-21"})  # a run that died
    ten_days_ago = time.time() - 10 * 86400
    table = store.path("t").removeprefix("file:")
    for path in [f.uri.removeprefix("file:") for f in store.files("t", first)] + [
            os.path.join(table, a.path) for a in orphan.adds]:
        os.utime(path, (ten_days_ago, ten_days_ago))
    store.replace_partition(spark.range(7), "t", {"dt": "2026-11-20"})  # the rebuild: removes the old files now
    listed = store.vacuum("t", dry_run=False)  # the default retention, 168 h
    assert {os.path.basename(p) for p in listed if p.endswith(".parquet")} == {
        os.path.basename(a.path) for a in orphan.adds}
    assert store.read("t", version=first).count() == 5 and store.read("t").count() == 7


def test_vacuum_on_the_object_store_lists_only_files_still_there(s3_server, tmp_path):
    """delta-rs's vacuum lists again the files an earlier vacuum removed (it keeps their tombstones): a
    second vacuum of an object-store table must not report them as removed again."""
    import pyarrow as pa
    from conftest import write_config
    from deltalake import write_deltalake

    from etl import fs
    from etl.config import load_config
    from etl.tables import TableStore

    o = s3_server.options
    tables = f"s3a://{s3_server.bucket}/vacuum/tables"
    cfg = load_config(write_config(tmp_path, {"paths": {"tables_root": tables}, "spark": {"conf": {
        "spark.hadoop.fs.s3a.endpoint": o.endpoint, "spark.hadoop.fs.s3a.endpoint.region": o.region,
        "spark.hadoop.fs.s3a.access.key": o.access_key, "spark.hadoop.fs.s3a.secret.key": o.secret_key}}}))
    options = fs.delta_storage_options(fs.options_for(cfg))
    for i, mode in enumerate(("error", "overwrite", "overwrite")):
        write_deltalake(f"{tables}/t", pa.table({"x": [i]}), mode=mode, storage_options=options)
    store = TableStore(None, cfg)  # (a vacuum of a delta-rs table needs no Spark)
    old = store.vacuum("t", retention_hours=0, dry_run=True)
    assert len(old) == 2 and all(fs.exists(f"{tables}/t/{p}", fs.options_for(cfg)) for p in old)
    assert sorted(store.vacuum("t", retention_hours=0, dry_run=False)) == sorted(old)
    assert not any(fs.exists(f"{tables}/t/{p}", fs.options_for(cfg)) for p in old)
    assert store.vacuum("t", retention_hours=0, dry_run=True) == []
    assert store.vacuum("t", retention_hours=0, dry_run=False) == []
    assert [f.num_records for f in store.files("t")] == [1] and fs.exists(store.files("t")[0].uri, fs.options_for(cfg))


def test_a_tables_root_with_glob_characters_reads_its_own_files(spark, tmp_path):
    """Spark reads a load path as a glob: a root named like /data/courier[prod] must still read its files."""
    from conftest import write_config

    from etl.config import load_config
    from etl.tables import TableStore

    folder = tmp_path / "courier[prod]{a,b}"
    folder.mkdir()
    store = TableStore(spark, load_config(write_config(folder, {})))
    store.replace_partition(spark.range(4), "t", {"dt": "2026-11-20"})
    staged = store.stage_partition(spark.range(3), "t", {"dt": "2026-11-21"})
    assert store.read_staged(staged).count() == 3
    store.commit_staged(staged)
    assert sorted(r["dt"] for r in store.read("t").collect()) == ["2026-11-20"] * 4 + ["2026-11-21"] * 3


def test_replace_partition_and_time_travel(spark, cfg_factory):
    from etl.tables import TableError, TableStore

    store = TableStore(spark, cfg_factory())
    store.replace_partition(spark.range(5), "t", {"dt": "2026-11-20"})
    store.replace_partition(spark.range(2), "t", {"dt": "2026-11-20"})
    store.replace_partition(spark.range(0), "t", {"dt": "2026-11-21"})  # empty partition: no files
    assert store.read("t").count() == 2
    assert store.read("t", version=0).count() == 5
    assert {f.partition_values["dt"] for f in store.files("t")} == {"2026-11-20"}
    assert sum(f.num_records for f in store.files("t")) == 2
    assert store.read("t", version=0, partitions={"dt": ["2026-11-20", "2026-11-23"]}).count() == 5
    assert store.read("t", partitions={"dt": ["2026-11-21"]}).count() == 0
    # no file read, the same schema as a read of files (nullability included: writers compare schemas)
    assert store.read("t", partitions={"dt": ["2026-11-21"]}).schema == store.read("t").schema
    with pytest.raises(TableError, match="not the string"):
        store.read("t", partitions={"dt": "2026-11-20"})
    with pytest.raises(TableError, match=r"\['id'\] not among its partition columns"):
        store.read("t", partitions={"id": ["1"]})
    table = store.path("t").removeprefix("file:")
    folders = {d: sorted(os.listdir(os.path.join(table, d))) for d in os.listdir(table) if d.startswith("dt=")}
    with pytest.raises(TableError, match="schema differs"):
        store.replace_partition(spark.range(2).withColumn("y", F.lit(1)), "t", {"dt": "2026-11-22"})
    with pytest.raises(TableError, match=r"rows with dt in \['2026-11-24'\], outside the partitions"):
        store.replace_partitions(spark.range(2).withColumn("dt", F.lit("2026-11-24")), "t", by="dt",
                                 values=["2026-11-23"])
    # a failed write leaves no copy of its data behind (a scheduler retrying it daily added one each day)
    assert {d: sorted(os.listdir(os.path.join(table, d))) for d in os.listdir(table) if d.startswith("dt=")} \
        in (folders, {**folders, "dt=2026-11-22": []})
    with pytest.raises(TableError, match="does not exist"):
        store.read("missing_table")
    with pytest.raises(TableError, match="bad table name"):
        store.path("../escape")


def test_a_write_returns_its_own_commit_s_version_when_another_writer_committed_after_it(spark, cfg_factory):
    """The version a write returns tags lineage (features' runs, the refresh): another writer's commit
    landing right after this write's must not be taken for it."""
    from etl.tables import TableStore, commit_metadata

    cfg = cfg_factory()
    store, other = TableStore(spark, cfg), TableStore(spark, cfg)
    store.replace_partition(spark.range(3), "t", {"dt": "2026-11-20"}, job="seed")
    commit_once = store._commit_once

    def commit_then_another_writer(name, *args):
        commit_once(name, *args)
        if name == "t":
            other.replace_partition(spark.range(1), "t", {"dt": "2026-11-22"}, job="other")
        else:
            other.overwrite(spark.range(1), name, job="other")

    other.overwrite(spark.range(2), "u", job="seed")
    store._commit_once = commit_then_another_writer
    version = store.overwrite(spark.range(5), "u", job="mine")
    jobs = {h["version"]: commit_metadata(h).get("job") for h in store.history("u")}
    assert jobs[version] == "mine" and jobs[version + 1] == "other" and store.read("u", version=version).count() == 5
    for write in (lambda: store.replace_partition(spark.range(5), "t", {"dt": "2026-11-21"}, job="mine"),
                  lambda: store.replace_partitions(spark.range(5).withColumn("dt", F.lit("2026-11-21")), "t",
                                                   by="dt", values=["2026-11-21"], job="mine"),
                  lambda: store.commit_staged(store.stage_partition(spark.range(5), "t", {"dt": "2026-11-21"}),
                                              job="mine")):
        version = write()
        jobs = {h["version"]: commit_metadata(h).get("job") for h in store.history("t")}
        assert jobs[version] == "mine" and jobs[version + 1] == "other"
        assert store.read("t", version=version).where("dt = '2026-11-21'").count() == 5


def test_a_null_partition_value_is_not_read_as_the_string_none(spark, cfg_factory):
    """Another writer can leave a partition value null: a partition filter for "None" matched it (its
    value went through str()), where Spark's Delta, filtering the column, does not."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from etl.tables import TableStore

    store = TableStore(spark, cfg_factory())
    write_deltalake(store.path("n"), pa.table({"x": [1, 2, 3], "dt": [None, "a", "None"]}), partition_by=["dt"])
    assert store.read("n", partitions={"dt": ["None"]}).collect() == [(3, "None")]
    assert store.read("n", partitions={"dt": ["a", "None"]}).count() == 2
    assert sorted(store.read("n").collect(), key=lambda r: r.x) == [(1, None), (2, "a"), (3, "None")]


def test_writes_to_a_catalogued_table_are_checked_against_its_contract(spark, cfg_factory):
    from etl import catalog
    from etl.tables import TableError, TableStore

    store = TableStore(spark, cfg_factory())
    row = ("i1", "dress", "t", 9.5, "2026-11-20", "file:///x.jpg")
    good = spark.createDataFrame([row], list(catalog.ITEMS.columns))
    store.replace_partition(good, catalog.ITEMS, {"dt": "2026-11-20"})
    with pytest.raises(TableError, match=r"missing column\(s\) \['image_uri'\]"):
        store.replace_partition(good.drop("image_uri"), catalog.ITEMS, {"dt": "2026-11-21"})
    with pytest.raises(TableError, match=r"column\(s\) \['extra'\] not in the contract"):
        store.replace_partitions(good.withColumn("extra", F.lit(1)).withColumn("dt", F.lit("2026-11-21")),
                                 catalog.ITEMS, by="dt", values=["2026-11-21"])
    # Nothing of the refused writes reached the table; an optional column is allowed where declared.
    assert [r["dt"] for r in store.read(catalog.ITEMS).collect()] == ["2026-11-20"]
    assert catalog.CTR_TRAIN.problems([*catalog.CTR_TRAIN.columns, "item_vector", "dt"]) == []


def test_catalogue_entries_survive_copy_and_pickle_with_their_contract():
    """Reports deep-copy their table keys (dataclasses.asdict) and Spark pickles closures: a Table must
    come back as the same name with the same contract."""
    import copy
    import pickle

    from etl import catalog
    from features.pipeline import Report

    for t in (copy.deepcopy(catalog.CTR_TRAIN), pickle.loads(pickle.dumps(catalog.CTR_TRAIN))):
        assert isinstance(t, catalog.Table) and t == "ctr_train"
        assert (t.columns, t.partition_by, t.optional) == (catalog.CTR_TRAIN.columns, ("dt",), catalog.CTR_TRAIN.optional)
    for t in (copy.deepcopy(catalog.COURIER_TRAIN), pickle.loads(pickle.dumps(catalog.COURIER_TRAIN))):
        assert t == "courier_train" and t.compression == "zstd" and t.key == ("pv_id",)
    assert '"item_embeddings": 3' in Report("embed_items", versions={catalog.ITEM_EMBEDDINGS: 3}).to_json()


def file_codecs(store, name: str) -> list:
    """The Parquet codecs of every column chunk of a table's current files (sorted, distinct)."""
    import pyarrow.parquet as pq

    from etl.tables import _local_path

    seen = set()
    for f in store.files(name):
        meta = pq.ParquetFile(_local_path(f.uri)).metadata
        seen.update(meta.row_group(g).column(i).compression
                    for g in range(meta.num_row_groups) for i in range(meta.num_columns))
    return sorted(seen)


def test_each_table_gets_its_catalogued_parquet_codec(spark, cfg_factory):
    """courier_train's files are zstd whichever write path made them (staged then committed, as stage 1
    does, or a direct partition replace); a table without a codec keeps Spark's default (snappy); the
    rows read back are the rows written."""
    from etl import catalog
    from etl.tables import TableStore

    assert catalog.COURIER_TRAIN.compression == "zstd" and catalog.ITEMS.compression is None
    store = TableStore(spark, cfg_factory())
    rows = spark.range(40).select(*[F.concat(F.lit(f"{c}-"), F.col("id").cast("string")).alias(c)
                                    for c in catalog.COURIER_TRAIN.columns])
    store.commit_staged(store.stage_partition(rows, catalog.COURIER_TRAIN, {"dt": "2026-11-20"}))
    store.replace_partition(rows.limit(7), catalog.COURIER_TRAIN, {"dt": "2026-11-21"})
    assert file_codecs(store, catalog.COURIER_TRAIN) == ["ZSTD"]
    back = store.read(catalog.COURIER_TRAIN)
    assert sorted(r["pv_id"] for r in back.where("dt = '2026-11-20'").collect()) == sorted(
        f"pv_id-{i}" for i in range(40))
    assert back.where("dt = '2026-11-21'").count() == 7
    store.replace_partition(spark.range(5), "t", {"dt": "2026-11-20"})
    assert file_codecs(store, "t") == ["SNAPPY"]


def test_commit_metadata_reads_what_the_writer_put_and_nothing_else():
    """userMetadata (this store on either engine, and Spark's writers); the loose keys of an older delta-rs
    commit; never Delta's own commitInfo fields (Spark's `job` is a struct)."""
    from etl.tables import commit_metadata

    assert commit_metadata({"version": 3, "operation": "WRITE",
                            "userMetadata": '{"job": "refresh_features", "run_id": "", "refresh_date": "d"}'}) == \
        {"job": "refresh_features", "refresh_date": "d"}
    loose = {"operation": "WRITE", "job": "build_samples", "partition": '{"dt": "d"}', "operationMetrics": {"n": 1}}
    assert commit_metadata(loose) == {"job": "build_samples", "partition": '{"dt": "d"}'}
    assert commit_metadata({"operation": "MERGE", "job": {"jobId": "7"}, "userMetadata": None}) == {}
    assert commit_metadata({"operation": "WRITE", "job": {"jobId": "7"}}) == {}
    assert commit_metadata({"userMetadata": "not json"}) == {}


def write_loose_key_table(path: str) -> None:
    """A table as an earlier release's delta-rs engine left it: three commits whose commitInfo holds the
    writer's keys loose (a partitioned append, a partition replace, and a commit without those keys)."""
    import pyarrow as pa
    from deltalake import CommitProperties, write_deltalake

    for i, (mode, meta) in enumerate((("append", {"job": "build_samples", "run_id": "r0", "partition": '{"dt": "a"}'}),
                                      ("overwrite", {"job": "build_samples", "run_id": "", "partition": '{"dt": "a"}'}),
                                      ("append", {}))):
        write_deltalake(path, pa.table({"x": [i, 10 + i], "dt": ["a", "a"]}), mode=mode, partition_by=["dt"],
                        predicate="dt = 'a'" if mode == "overwrite" else None,
                        commit_properties=CommitProperties(custom_metadata=meta))


def test_upgrade_moves_an_earlier_release_s_loose_commit_keys_into_user_metadata(spark, tmp_path):
    """jobs/upgrade_tables.py: the loose keys move into userMetadata (what commit_metadata reads stays the
    same), every other log line and the data stay as they were, a dry run writes nothing, a rerun finds
    nothing. Spark's Delta reading the result is checked in test_engine_parity."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, write_config
    from etl.config import load_config
    from etl.tables import TableStore, commit_metadata

    conf = write_config(tmp_path)
    store = TableStore(spark, load_config(conf))
    write_loose_key_table(store.path("legacy"))
    store.replace_partition(spark.range(3), "current", {"dt": "a"}, job="build_samples", run_id="r9")
    log_dir = os.path.join(store.path("legacy"), "_delta_log")

    def log_files():
        return {n: open(os.path.join(log_dir, n)).read() for n in sorted(os.listdir(log_dir)) if n.endswith(".json")}

    def metadata():  # oldest first (history() lists the newest first)
        return [commit_metadata(h) for h in sorted(store.history("legacy"), key=lambda h: h["version"])]

    def times():  # Spark's Delta takes each commit's time from its log file's
        return {n: os.stat(os.path.join(log_dir, n)).st_mtime_ns for n in sorted(os.listdir(log_dir))
                if n.endswith(".json")}

    for k, name in enumerate(sorted(times())):
        os.utime(os.path.join(log_dir, name), (1_700_000_000 + k * 3600, 1_700_000_000 + k * 3600))
    before, meta_before, times_before = log_files(), metadata(), times()
    assert '"job":"build_samples"' in before["00000000000000000000.json"]  # loose, as the earlier release wrote it
    rows_before = sorted(store.read("legacy").collect())
    assert store.upgrade_commit_info(dry_run=True) == {"legacy": [0, 1]} and log_files() == before
    job = subprocess.run([sys.executable, "jobs/upgrade_tables.py", "--conf", str(conf)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "legacy: rewrote the commit info of 2 commit(s), versions 0..1" in job.stdout, job.stdout
    after = log_files()
    assert after["00000000000000000002.json"] == before["00000000000000000002.json"]  # no loose key: untouched
    for name in ("00000000000000000000.json", "00000000000000000001.json"):
        old, new = before[name].splitlines(), after[name].splitlines()
        info = next(json.loads(line)["commitInfo"] for line in new if "commitInfo" in line)
        assert not {"job", "run_id", "partition"} & set(info) and "operationMetrics" in info
        # the add / remove / metadata lines byte for byte
        assert [x for x in old if "commitInfo" not in x] == [x for x in new if "commitInfo" not in x]
    assert metadata() == meta_before
    assert meta_before == [{"job": "build_samples", "run_id": "r0", "partition": '{"dt": "a"}'},
                               {"job": "build_samples", "partition": '{"dt": "a"}'}, {}]
    assert sorted(store.read("legacy").collect()) == rows_before and len(rows_before) == 4
    assert store.upgrade_commit_info() == {}  # a rerun: nothing left to do, "current" never touched
    assert times() == times_before  # the commits keep their times (history, timestampAsOf)
