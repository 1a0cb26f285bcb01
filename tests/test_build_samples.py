"""Stage 1 on a hand-written log with a known answer: real Spark, real Delta (delta-rs)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import click, pv, write_catalog, write_log

D0, D1 = "2026-11-19", "2026-11-20"
ITEMS = [f"i{k}" for k in range(1, 9)]
DUP = click("b2", "2026-11-20T08:00:10Z", "u1", "p1", "i4")
# p7 (2026-11-19's log) clicked in 2026-11-20's log: a valid click that labels nothing
MIDNIGHT = click("b15", "2026-11-20T00:00:05Z", "u9", "p7", "i2")
BAD_LINES = {
    "bad_json": '{"event_id": "x1", "event_type": "pv"',
    "null_id": pv("x2", "2026-11-20T09:00:00Z", None, "p9", ["i1"]),
    "bad_timestamp": pv("x3", "yesterday", "u3", "p10", ["i1"]),
    "unknown_item": pv("x4", "2026-11-20T09:00:00Z", "u3", "p11", ["i1", "zz"]),
    "unknown_click_item": click("x5", "2026-11-20T09:00:01Z", "u3", "p5", "zz"),
    "orphan_click": click("x6", "2026-11-20T09:00:01Z", "u3", "pX", "i1"),
    "click_not_on_pv": click("x7", "2026-11-20T09:00:02Z", "u2", "p5", "i5"),
}


def write_known_log(cfg) -> None:
    # i7's image file is missing and i8's is corrupt: they are valid catalog items without a usable image.
    write_catalog(cfg, D0, ITEMS, missing={"i7"}, corrupt={"i8"}, extra_lines=["{bad catalog line"])
    write_log(cfg, D0, [pv("a0", "2026-11-19T10:00:00Z", "u1", "p0", ["i1", "i2", "i3"]),
                        click("a1", "2026-11-19T10:00:05Z", "u1", "p0", "i1"),
                        pv("a2", "2026-11-19T23:59:50Z", "u9", "p7", ["i1", "i2"]),  # clicked after midnight
                        # i9 is first listed in the next date's catalog: both events are unknown_item here,
                        # and stay so when the next date re-reads this log for u1's click history.
                        pv("a3", "2026-11-19T11:00:00Z", "u1", "p8", ["i1", "i9"]),
                        click("a4", "2026-11-19T11:00:05Z", "u1", "p8", "i9")])
    # i9 has no image file: the date adds no item_images partition, so test_rerun_is_idempotent's forced
    # rebuild sees the partitions the first build saw (a new one compiles one more pruning predicate).
    write_catalog(cfg, D1, ["i9"], missing={"i9"})
    write_log(cfg, D1, [
        pv("b1", "2026-11-20T08:00:00Z", "u1", "p1", ["i2", "i3", "i4", "i5", "i6", "i1", "i7"]),
        DUP,
        click("b3", "2026-11-20T08:00:20Z", "u1", "p1", "i5"),
        pv("b4", "2026-11-20T08:10:00Z", "u1", "p2", ["i1", "i2", "i3"]),
        # A click on p1 at exactly p2's timestamp: not history for p2 (strictly before only).
        click("b5", "2026-11-20T08:10:00Z", "u1", "p1", "i6"),
        click("b6", "2026-11-20T08:10:30Z", "u1", "p2", "i2"),
        # 49.5 minutes of inactivity: a new session.
        pv("b7", "2026-11-20T09:00:00Z", "u1", "p3", ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"]),
        click("b8", "2026-11-20T09:00:10Z", "u1", "p3", "i6"),
        click("b9", "2026-11-20T09:00:11Z", "u1", "p3", "i3"),
        pv("b10", "2026-11-20T09:05:00Z", "u1", "p4", ["i3"]),  # no click: no_positive
        pv("b11", "2026-11-20T09:00:00Z", "u2", "p5", ["i1", "i2"]),  # u2 never clicked before: no_history
        click("b12", "2026-11-20T09:00:01Z", "u2", "p5", "i1"),
        pv("b13", "2026-11-20T10:00:00Z", "u1", "p6", ["i1", "i7"]),  # the only positive has no image
        click("b14", "2026-11-20T10:00:03Z", "u1", "p6", "i7"),
        DUP,  # the same event again
        MIDNIGHT,
        *BAD_LINES.values(),
    ])


@pytest.fixture(scope="module")
def known(spark, tmp_path_factory):
    from etl.build import build_date
    from etl.config import load_config
    from etl.tables import TableStore
    from conftest import write_config

    tmp = tmp_path_factory.mktemp("known")
    # neg_rate 1.0 keeps every negative, so trim and order are checked without the sampler.
    cfg = load_config(write_config(tmp, {"samples": {"neg_rate": 1.0, "image_px": 32}}))
    write_known_log(cfg)
    store = TableStore(spark, cfg)
    reports = [build_date(spark, cfg, store, d, "run-1") for d in (D0, D1)]
    return cfg, store, reports


def rows_by(df, key):
    return {r[key]: r.asDict() for r in df.collect()}


def test_history_is_strictly_before_and_most_recent_first(known):
    _, store, _ = known
    s = rows_by(store.read("pv_samples").where("dt = '2026-11-20'"), "pv_id")
    assert s["p1"]["click_history"] == ["i1"]  # from the day before (lookback); not i9 (unknown on that day)
    assert s["p2"]["click_history"] == ["i5", "i4", "i1"]  # b5 (i6, same ts as p2) is not history
    assert s["p3"]["click_history"] == ["i2", "i6", "i5", "i4", "i1"]  # l_click = 5, distinct
    assert s["p3"]["click_history_ts"][0] > s["p3"]["click_history_ts"][1]


def test_positives_first_then_position_and_trim(known):
    _, store, reports = known
    s = rows_by(store.read("pv_samples").where("dt = '2026-11-20'"), "pv_id")
    assert s["p1"]["pv_items"] == ["i4", "i5", "i6", "i2", "i3"]
    assert s["p1"]["pv_labels"] == [1, 1, 1, 0, 0]
    assert s["p1"]["pv_positions"] == [2, 3, 4, 0, 1]
    # p3 shows 8 items, 2 clicked: both first, then 3 negatives by position; 3 trimmed.
    assert s["p3"]["pv_items"] == ["i3", "i6", "i1", "i2", "i4"]
    assert s["p3"]["pv_labels"] == [1, 1, 0, 0, 0]
    c = reports[1].counts
    assert c["trimmed"] == 2 + 3  # p1 (7 items) and p3 (8 items); p2 and p6 fit
    assert c["pv_items"] == 5 + 3 + 5 + 2


def test_sessions_split_on_inactivity_gap(known):
    _, store, _ = known
    s = rows_by(store.read("pv_samples").where("dt = '2026-11-20'"), "pv_id")
    assert s["p1"]["session_id"] == s["p2"]["session_id"]
    assert s["p3"]["session_id"] != s["p2"]["session_id"]
    assert s["p6"]["session_id"] not in (s["p1"]["session_id"], s["p3"]["session_id"])  # 55 min after p4
    assert s["p1"]["session_id"] == "u1:" + str(1795161600)  # user + first epoch second of the session


def test_drop_reasons_and_quarantine_reasons(known):
    _, store, reports = known
    c = reports[1].counts
    assert set(rows_by(store.read("pv_samples").where("dt = '2026-11-20'"), "pv_id")) == {"p1", "p2", "p3", "p6"}
    assert c["pv_dropped"] == {"no_positive": 1, "no_history": 1}
    assert c["quarantine"]["search_log"] == {
        "bad_json": 1, "null_id": 1, "bad_timestamp": 1, "unknown_item": 2, "duplicate": 1,
        "orphan_click": 1, "click_not_on_pv": 1}
    q = store.read("quarantine").where("dt = '2026-11-20'").collect()
    assert sorted(r["event_id"] for r in q if r["reason"] == "unknown_item") == ["x4", "x5"]
    assert all(r["raw"] and r["job_run_id"] == "run-1" for r in q)
    c0 = reports[0].counts
    assert c0["quarantine"]["catalog"] == {"bad_json": 1}
    assert c0["quarantine"]["image"] == {"image_missing": 1, "image_corrupt": 1}
    assert c0["items"] == 8 and c0["item_images"] == 6
    assert c0["quarantine"]["search_log"] == {"unknown_item": 2}  # a3 and a4: i9 is listed on D1 only
    assert sorted(r["event_id"] for r in store.read("quarantine").where(f"dt = '{D0}'").collect()
                  if r["reason"] == "unknown_item") == ["a3", "a4"]
    assert c["items"] == 1 and c["item_images"] == 0 and c["quarantine"]["image"] == {"image_missing": 1}  # i9


def test_dedupe_keeps_one_click(known):
    _, store, _ = known
    labels = [(r["item_id"], r["label"]) for r in
              store.read("ctr_log").where("pv_id = 'p1'").orderBy("position").collect()]
    assert labels == [("i2", 0), ("i3", 0), ("i4", 1), ("i5", 1), ("i6", 1), ("i1", 0), ("i7", 0)]


def test_counts_add_up(known):
    _, _, reports = known
    for r in reports:
        r.check()
        assert all(left == right for _, left, right in r.identities())
    c = reports[1].counts
    assert c["raw_rows"] == 16 + len(BAD_LINES)
    assert c["valid_pv"] == 6 and c["valid_click"] == 9 and c["click_on_other_date_pv"] == 1
    assert reports[0].counts["click_on_other_date_pv"] == 0
    assert c["impressions"] == 7 + 3 + 8 + 1 + 2 + 2 == c["ctr_log"]  # neg_rate 1.0 keeps all


def test_a_click_after_midnight_labels_nothing_on_either_date(known):
    """A session across midnight: p7 (23:59:50 in 2026-11-19's log) clicked at 00:00:05 in the next
    date's log. 2026-11-19 was built without it (p7: no positive) and 2026-11-20 does not label an
    earlier date's page; the click is valid and counted (the date publishes: its counts add up)."""
    _, store, reports = known
    p7 = store.read("ctr_log").where("pv_id = 'p7'").orderBy("position").collect()
    assert [(r["item_id"], r["label"], r["dt"]) for r in p7] == [("i1", 0, D0), ("i2", 0, D0)]
    assert reports[0].counts["pv_dropped"] == {"no_history": 1, "no_positive": 1}  # p0 (u1's first), p7
    q = store.read("quarantine").where("event_id = 'b15'").count()
    assert q == 0 and store.read("pv_samples").where("pv_id = 'p7'").count() == 0


def test_courier_train_masks_and_images(known):
    _, store, reports = known
    t = rows_by(store.read("courier_train").where("dt = '2026-11-20'"), "pv_id")
    assert set(t) == {"p1", "p2", "p3"}
    assert reports[1].counts["train_dropped"] == {"no_positive_image": 1}  # p6: its positive is i7
    p2 = t["p2"]
    assert p2["pv_items"] == ["i2", "i1", "i3", "", ""] and p2["pv_mask"] == [1, 1, 1, 0, 0]
    assert p2["click_history"] == ["i5", "i4", "i1", "", ""] and p2["click_mask"] == [1, 1, 1, 0, 0]
    assert all(len(b) > 0 for b in p2["pv_images"][:3]) and p2["pv_images"][3] == b""
    from etl.images import decode_jpeg

    assert decode_jpeg(p2["pv_images"][0]).shape == (32, 32, 3)
    img = rows_by(store.read("item_images"), "item_id")
    assert p2["pv_images"][0] == img["i2"]["image"]


def test_courier_train_same_rows_by_lookup_and_by_shuffle(known):
    """The broadcast look-up (images that fit) and the shuffle join give the same rows, drop reasons
    included; the built table equals them (the build took the look-up: its images are tiny)."""
    from pyspark.sql import functions as F

    from etl.samples import courier_train

    cfg, store, _ = known
    samples = store.read("pv_samples").where(F.col("dt") == D1)
    images = store.read("item_images")
    # an extra sample whose positive has no image and a history item with no catalog entry at all
    odd = samples.where(F.col("pv_id") == "p2").withColumn("sample_id", F.lit("odd")) \
        .withColumn("pv_items", F.array(F.lit("i7"), F.lit("i1"))).withColumn("pv_labels", F.array(F.lit(1), F.lit(0))) \
        .withColumn("click_history", F.array(F.lit("nope"), F.lit("i2")))
    samples = samples.unionByName(odd)

    def rows(broadcast):
        df = courier_train(samples, images, cfg.samples.l_pv, cfg.samples.l_click, broadcast_images=broadcast)
        return df.schema, sorted((r.asDict() for r in df.collect()), key=lambda r: r["sample_id"])

    (lookup_schema, by_lookup), (shuffle_schema, by_shuffle) = rows(True), rows(False)
    assert lookup_schema == shuffle_schema  # nullability included: the table refuses a changed schema
    assert by_lookup == by_shuffle and len(by_lookup) == 5
    odd_row = next(r for r in by_lookup if r["sample_id"] == "odd")
    assert odd_row["drop_reason"] == "no_positive_image"
    assert odd_row["pv_mask"][:3] == [0, 1, 0] and odd_row["click_mask"][:3] == [0, 1, 0]
    kept = {r["pv_id"]: r for r in by_lookup if r["drop_reason"] is None}
    table = rows_by(store.read("courier_train").where(F.col("dt") == D1), "pv_id")
    assert set(kept) == set(table) == {"p1", "p2", "p3"}
    assert all(kept[p][c] == table[p][c] for p in kept for c in table[p])


def test_rerun_is_idempotent(spark, known):
    from etl.build import build_date
    from etl.spark import codegen_compilations

    cfg, store, _ = known
    tables = ("pv_samples", "ctr_log", "courier_train", "items", "item_images", "quarantine")

    def snapshot():
        out = {}
        for t in tables:
            df = store.read(t).where(f"dt = '{D1}'")
            if t == "quarantine":
                df = df.drop("job_run_id")
            out[t] = sorted(map(repr, (r.asDict() for r in df.collect())))
        return out

    before, versions = snapshot(), {t: store.version(t) for t in tables}
    # Same inputs and config: nothing to do, nothing committed.
    assert build_date(spark, cfg, store, D1, "run-2").status == "unchanged"
    assert {t: store.version(t) for t in tables} == versions
    compiled = codegen_compilations(spark)
    build_date(spark, cfg, store, D1, "run-2", force=True)
    # The rebuild runs the classes generated for the first build: none is compiled again (with Spark's
    # default cache of 100 a date evicted its own classes and recompiled ~185).
    assert codegen_compilations(spark) - compiled == 0
    assert snapshot() == before
    assert {t: store.version(t) for t in tables} == {t: v + 1 for t, v in versions.items()}
    # The older version is still readable (time travel) and holds the same rows.
    assert store.read("pv_samples", version=versions["pv_samples"]).count() == store.read("pv_samples").count()
    # Other dates' partitions are untouched by the rerun.
    assert store.read("ctr_log").where(f"dt = '{D0}'").count() == 3 + 2  # p0 and p7


def test_courier_train_opens_with_a_petastorm_batch_reader(known):
    from petastorm import make_batch_reader

    from etl.images import decode_jpeg

    _, store, _ = known
    files = [f for f in store.files("courier_train") if f.partition_values["dt"] == D1]
    seen = []
    with make_batch_reader(["file://" + f.uri for f in files], num_epochs=1, reader_pool_type="thread",
                           workers_count=2, shuffle_row_groups=False) as reader:
        for batch in reader:
            assert batch.pv_images.shape[1] == 5 and batch.click_mask.shape[1] == 5
            seen += list(batch.pv_id)
            for images, mask in zip(batch.pv_images, batch.pv_mask):
                assert [decode_jpeg(b).shape for b, m in zip(images, mask) if m] == [(32, 32, 3)] * int(mask.sum())
    assert sorted(seen) == ["p1", "p2", "p3"]


def test_written_tables_match_the_catalogue(known):
    """Every stage-1 table as written: the catalogue's data columns in order, then its partition columns."""
    from deltalake import DeltaTable

    from etl import catalog

    _, store, _ = known
    for table in catalog.STAGE1:
        dt = DeltaTable(store.path(table))
        assert [f.name for f in dt.schema().fields] == [*table.columns, *table.partition_by], table
        assert list(dt.metadata().partition_columns) == list(table.partition_by), table


def test_an_earlier_dates_clicks_keep_the_verdicts_their_own_build_published(spark, tmp_path):
    """With a one-day history window, 2026-11-21 reads 2026-11-20 but not 2026-11-19. The click b15
    (in 2026-11-20's log, on p7 of 2026-11-19's) was valid when 2026-11-20 was built; re-judged here
    without p7 it would be an orphan_click and leave u9's click history. Its published verdict holds:
    b15 stays in the history. A click whose page this build reads is judged again: e1, logged just
    before midnight on a page logged just after it, was an orphan_click in 2026-11-20's build and
    enters u7's history here; x6 (no page anywhere) stays out of u3's."""
    from etl.build import build_date
    from etl.config import load_config
    from etl.tables import TableStore
    from conftest import write_config, write_jsonl

    cfg = load_config(write_config(tmp_path, {"samples": {"neg_rate": 1.0, "image_px": 32,
                                                          "history_lookback_days": 1}}))
    write_known_log(cfg)
    D2 = "2026-11-21"
    write_jsonl(Path(cfg.raw_root) / "search_log" / f"dt={D1}" / "part-00001.jsonl",
                [click("e1", "2026-11-21T00:00:03Z", "u7", "p30", "i5")])  # within ts_skew_minutes
    write_log(cfg, D2, [pv("c1", "2026-11-21T09:00:00Z", "u9", "p20", ["i3", "i4"]),
                        click("c2", "2026-11-21T09:00:05Z", "u9", "p20", "i3"),
                        pv("c3", "2026-11-21T09:00:00Z", "u3", "p21", ["i3", "i4"]),
                        click("c4", "2026-11-21T09:00:05Z", "u3", "p21", "i4"),
                        pv("c5", "2026-11-21T00:00:01Z", "u7", "p30", ["i5", "i6"]),  # e1 labels nothing here
                        pv("c6", "2026-11-21T01:00:00Z", "u7", "p31", ["i1", "i2"]),
                        click("c7", "2026-11-21T01:00:05Z", "u7", "p31", "i1")])
    store = TableStore(spark, cfg)
    reports = [build_date(spark, cfg, store, d, "run-1") for d in (D0, D1, D2)]
    assert reports[1].counts["quarantine"]["search_log"]["orphan_click"] == 2  # x6 and e1
    s = rows_by(store.read("pv_samples").where(f"dt = '{D2}'"), "pv_id")
    assert s["p20"]["click_history"] == ["i2"] and s["p20"]["pv_labels"] == [1, 0]
    assert s["p31"]["click_history"] == ["i5"]
    assert set(s) == {"p20", "p31"} and reports[2].counts["pv_dropped"] == {"no_history": 1, "no_positive": 1}
    # The date's own counts are unchanged by the earlier dates' verdicts.
    assert reports[2].counts["valid_click"] == 3 and reports[2].counts["quarantine"]["search_log"] == {}
    reports[2].check()
