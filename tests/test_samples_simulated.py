"""Stage 1 on the simulator's tiny preset: quarantine matches the injected faults, down-sampling rate,
and the same output whatever the number of shuffle partitions."""
from __future__ import annotations

import pytest
from conftest import write_config

from etl.config import load_config


@pytest.fixture(scope="module")
def tiny(spark, tmp_path_factory):
    from etl.build import build_date
    from sim import simulate
    from etl.tables import TableStore

    tmp = tmp_path_factory.mktemp("tiny")
    cfg = load_config(write_config(tmp, {"samples": {"image_px": 32}}))
    manifest = simulate(cfg.raw_root, cfg.images_root, cfg.truth_root, preset="tiny", seed=3, progress=None)
    store = TableStore(spark, cfg)
    reports = {d: build_date(spark, cfg, store, d, "run-tiny") for d in sorted(manifest["dates"])}
    return cfg, store, manifest, reports


def test_every_injected_fault_is_quarantined_with_its_reason(tiny):
    _, store, manifest, reports = tiny
    for date, expected in manifest["dates"].items():
        c = reports[date].counts
        assert c["raw_rows"] == expected["raw_rows"]
        assert c["valid_pv"] == expected["pv_rows"] and c["valid_click"] == expected["click_rows"]
        assert c["impressions"] == expected["impressions"]
        injected = {k: v for k, v in expected["malformed"].items() if v}
        assert c["quarantine"]["search_log"] == injected, date
        assert set(injected) == {"bad_json", "null_id", "bad_timestamp", "unknown_item", "duplicate"}
        bad_images = {k: v for k, v in expected["bad_images"].items() if v}
        assert c["quarantine"]["image"] == bad_images and len(bad_images) == 2
        assert c["items"] == expected["new_items"] == c["item_images"] + sum(bad_images.values())
        q = store.read("quarantine").where(f"dt = '{date}'").groupBy("source", "reason").count().collect()
        assert {(r["source"], r["reason"]): r["count"] for r in q} == {
            **{("search_log", k): v for k, v in injected.items()}, **{("image", k): v for k, v in bad_images.items()}}
        reports[date].check()


def test_every_catalogued_key_is_unique_within_its_partition(tiny):
    """The catalogue's keys (etl.catalog: item_id, pv_id, (pv_id, item_id)...) hold in what stage 1
    published from a log with injected duplicates, on every table that has one."""
    from pyspark.sql import functions as F

    from etl import catalog as T

    _, store, _, _ = tiny
    keyed = [t for t in T.STAGE1 if t.key]
    assert len(keyed) >= 4, keyed
    for t in keyed:
        df = store.read(t)
        assert df.count() > 0, t
        repeated = df.groupBy(*t.partition_by, *t.key).count().where(F.col("count") > 1).limit(3).collect()
        assert not repeated, (t, repeated)


def test_negative_downsampling_rate(tiny):
    _, _, _, reports = tiny
    negatives = sum(r.counts["impressions"] - r.counts["positive_impressions"] for r in reports.values())
    dropped = sum(r.counts["neg_downsampled"] for r in reports.values())
    kept_rate = 1 - dropped / negatives
    # ~4k negatives: the binomial sd of the rate is ~0.006; 0.03 is 5 sd.
    assert negatives > 3000 and abs(kept_rate - 0.2) < 0.03, kept_rate
    # Positives are never down-sampled.
    for r in reports.values():
        assert r.counts["ctr_log"] == r.counts["impressions"] - r.counts["neg_downsampled"]


def test_same_output_for_1_and_4_shuffle_partitions(spark, tiny, tmp_path):
    from etl.build import build_date
    from etl.spark import session_conf
    from etl.tables import TableStore

    cfg, store, manifest, _ = tiny
    # The first date: a later one needs its earlier dates published first (order between dates).
    first = sorted(manifest["dates"])[0]
    other = load_config(write_config(tmp_path, {"samples": {"image_px": 32}, "paths": {
        "raw_root": cfg.raw_root, "images_root": cfg.images_root}}))
    store1 = TableStore(spark, other)
    with session_conf(spark, "spark.sql.shuffle.partitions", "1"):
        build_date(spark, other, store1, first, "run-1-partition")
    for table in ("pv_samples", "ctr_log"):
        a = store.read(table).where(f"dt = '{first}'").collect()
        b = store1.read(table).where(f"dt = '{first}'").collect()
        assert len(a) > 10
        assert sorted(map(repr, a)) == sorted(map(repr, b)), table
