"""The item check called directly: which events it marks, that the broadcast and the shuffle join of
the unknown-item ids agree, and that the deduplicated events reach the click check without a
second shuffle by pv_id."""
from __future__ import annotations

import datetime as dt

import pytest

AT = dt.datetime(2026, 11, 20, 8)
SCHEMA = ("event_id string, event_type string, ts timestamp, user_id string, pv_id string, query string, "
          "items array<string>, item_id string, session_id string, value string, dt string, reason string")


def ev(event_id, event_type, pv_id, items=None, item_id=None, reason=None, minute=0):
    return (event_id, event_type, AT + dt.timedelta(minutes=minute), "u1", pv_id, "q", items, item_id, None,
            f"line {event_id}", "2026-11-20", reason)


@pytest.fixture
def events(spark):
    rows = [
        ev("e1", "pv", "p1", ["i1", "i2"]),                # known items only
        ev("e2", "pv", "p2", ["i1", "zz", "yy"]),          # two unknown items: marked once, one row
        ev("e3", "click", "p1", item_id="i2", minute=1),   # click on a known item
        ev("e4", "click", "p2", item_id="zz", minute=1),   # click on an unknown item
        ev("e2", "pv", "p9", ["zz"], reason="duplicate"),  # rejected already: keeps its reason
        ev(None, "pv", "p3", ["zz"], reason="null_id"),    # rejected, no id: keeps its reason
    ]
    return spark.createDataFrame(rows, SCHEMA)


@pytest.mark.parametrize("broadcast", [True, False])
def test_unknown_items_mark_exactly_the_events_referencing_one(spark, events, broadcast):
    from etl import samples as S

    catalog = spark.createDataFrame([("i1", "2026-11-19"), ("i2", "2026-11-20"), ("i1", "2026-11-20")],
                                    "item_id string, dt string")
    unknown = S.unknown_item_events(events, catalog)
    assert sorted(r["event_id"] for r in unknown.collect()) == ["e2", "e4"]
    out = S.mark_unknown_items(events, unknown, broadcast=broadcast)
    assert out.columns == events.columns
    got = sorted((r["event_id"] or "", r["pv_id"], r["reason"]) for r in out.collect())
    assert got == [("", "p3", "null_id"), ("e1", "p1", None), ("e2", "p2", "unknown_item"),
                   ("e2", "p9", "duplicate"), ("e3", "p1", None), ("e4", "p2", "unknown_item")]


def test_an_event_is_judged_by_the_catalog_of_its_own_date(spark):
    """An item first listed on a later date stays unknown to an earlier date's events: when that date is
    re-read for a later date's click history, its events get the verdict its own build gave them."""
    from pyspark.sql import functions as F

    from etl import samples as S

    rows = [ev("a", "pv", "p1", ["i1"]), ev("b", "click", "p1", item_id="i1", minute=1),
            ev("c", "pv", "p2", ["i2"]), ev("d", "click", "p2", item_id="i2", minute=1)]
    events = spark.createDataFrame(rows, SCHEMA)  # all on 2026-11-20
    # i1 is listed the day before the events, i2 the day after.
    catalog = spark.createDataFrame([("i1", "2026-11-19"), ("i2", "2026-11-21")], "item_id string, dt string")
    assert sorted(r["event_id"] for r in S.unknown_item_events(events, catalog).collect()) == ["c", "d"]
    # The same events re-read on a later date (their dt stays theirs) keep that verdict; had they been
    # logged on 2026-11-21, i2 would be known.
    later = events.withColumn("dt", F.lit("2026-11-21"))
    assert S.unknown_item_events(later, catalog).count() == 0


def _hash_exchanges(df) -> int:
    return df._jdf.queryExecution().executedPlan().toString().count("Exchange hashpartitioning")


@pytest.mark.parametrize("static", [True, False])
def test_deduplicated_events_reach_the_click_check_without_a_shuffle(spark, events, static):
    import contextlib

    from etl import samples as S
    from etl.build import materialize
    from etl.spark import static_partitioning

    catalog = spark.createDataFrame([("i1", "2026-11-20"), ("i2", "2026-11-20")], "item_id string, dt string")
    with static_partitioning(spark) if static else contextlib.nullcontext():
        deduped = materialize(S.mark_duplicates(events))
    unknown = materialize(S.unknown_item_events(deduped, catalog))  # as the build does: its shuffle is its own
    checked = S.mark_bad_clicks(S.mark_unknown_items(deduped, unknown))
    # Under static partitioning the dedupe's rows keep their partitioning by pv_id and the item and
    # click checks run on them as they are; with adaptive execution the checkpoint records none.
    assert _hash_exchanges(checked) == 0 if static else _hash_exchanges(checked) >= 1
    assert spark.conf.get("spark.sql.adaptive.enabled") == "true"  # restored after the block
    reasons = {(r["event_id"], r["pv_id"]): r["reason"] for r in checked.collect()}
    assert reasons[("e4", "p2")] == "unknown_item" and reasons[("e3", "p1")] is None


def test_a_page_keeps_the_click_logged_on_its_own_date_over_an_earlier_date_s_copy(spark):
    """A page logged on D (timed just before midnight, within the skew) clicked twice on one item: once in
    D-1's log (it labels nothing: a date's labels come from its own log) and once in D's. The earlier
    click ranked first, so D's click was quarantined as duplicate_click and the page lost its positive
    (clicked_items empty, the page dropped as no_positive, the item a negative in ctr_log)."""
    from etl import samples as S

    def at(seconds):
        return dt.datetime(2026, 11, 19, 23, 58) + dt.timedelta(seconds=seconds)

    rows = [("d4", "pv", at(0), "u1", "px", "q", ["a", "b"], None, None, "pv", "2026-11-20", None),
            ("y3", "click", at(10), "u1", "px", "q", None, "a", None, "c", "2026-11-19", None),
            ("d5", "click", at(20), "u1", "px", "q", None, "a", None, "c", "2026-11-20", None)]
    out = {r["event_id"]: r for r in S.mark_bad_clicks(spark.createDataFrame(rows, SCHEMA)).collect()}
    assert out["d5"]["reason"] is None and out["d5"]["pv_on_other_date"] is False
    assert out["y3"]["reason"] == "duplicate_click"
    assert out["d4"]["clicked_items"] == ["a"]


def test_a_history_click_at_or_after_its_page_is_counted_so_verify_fails(spark):
    """The leakage guard: sample_counts counts the PVs whose click history holds a click at or after
    the PV's own time; verify requires 0 (the strictly-before rule of click_history, checked on the data)."""
    from etl import counts as K

    t = dt.datetime(2026, 11, 20, 8)
    rows = [  # (pv ts, history click times)
        (t, [t - dt.timedelta(minutes=5)]),  # fine
        (t, [t]),  # a click at the PV's own time
        (t, [t - dt.timedelta(minutes=1), t + dt.timedelta(seconds=3)]),  # a later click
        (t, []),
    ]
    samples = spark.createDataFrame(
        [(ts, hist, None, 2, 0, 0, ["i1"], 1, 0) for ts, hist in rows],
        "ts timestamp, click_history_ts array<timestamp>, drop_reason string, n_impressions int, "
        "n_neg_dropped int, n_trimmed int, pv_items array<string>, n_pos int, repeated_on_page int")
    assert K.sample_counts(samples)["history_not_before_pv"] == 2


@pytest.mark.parametrize("ts, parsed", [
    ("2026-11-20T08:00:00Z", dt.datetime(2026, 11, 20, 8)),
    ("2026-11-20 08:00:00", dt.datetime(2026, 11, 20, 8)),                          # no zone: UTC
    ("2026-11-20T09:00:00.250+01:00", dt.datetime(2026, 11, 20, 8, 0, 0, 250000)),
    ("2026-11-20T08:00", dt.datetime(2026, 11, 20, 8)),
    ("2026-11-20", None),   # a date alone: Spark's cast would make it midnight
    ("2026-11", None),      # ... the 1st of the month
    ("08:00:00", None),     # a time alone: Spark's cast would put it on the day the build runs
    ("T08:00:00", None),
    ("2026-11-20T08", None),
    ("yesterday", None),
])
def test_a_timestamp_is_a_date_with_a_time_of_day(spark, ts, parsed):
    """What Spark's cast reads besides a timestamp (a date alone, a time alone on today's date) is a
    bad_timestamp, not a made-up instant: the same line gets the same verdict on any day."""
    import json

    from etl import samples as S

    line = json.dumps({"event_id": "e1", "event_type": "pv", "ts": ts, "user_id": "u1", "pv_id": "p1",
                       "query": "q", "items": ["i1"]})
    raw = spark.createDataFrame([(line, "2026-11-20", "part-0.json")], "value string, dt string, file string")
    row = S.parse_events(raw, ts_skew_minutes=10).first()
    assert row["ts"] == parsed
    assert row["reason"] == (None if parsed else "bad_timestamp")


def test_a_blank_id_is_a_missing_one(spark):
    """Logged-out traffic logs user_id "" (one user with every such page's clicks), some systems
    session_id "" (one session): a blank id is null_id, a blank session_id reads as none (derived)."""
    import json

    from etl import samples as S

    def pv_line(event_id, **ids):
        return json.dumps({"event_id": event_id, "event_type": "pv", "ts": "2026-11-20T08:00:00Z", "user_id": "u1",
                           "pv_id": "p1", "query": "q", "items": ["i1"], **ids})

    lines = [pv_line("e1", user_id=""), pv_line("e2", pv_id="  "), pv_line("", pv_id="p2"),
             pv_line("e4", session_id=""), pv_line("e5", session_id="s5"),
             json.dumps({"event_id": "e6", "event_type": "click", "ts": "2026-11-20T08:00:01Z", "user_id": "u1",
                         "pv_id": "p1", "item_id": ""})]
    raw = spark.createDataFrame([(line, "2026-11-20", "part-0.json") for line in lines],
                                "value string, dt string, file string")
    got = [(r["reason"], r["session_id"]) for r in S.parse_events(raw, ts_skew_minutes=10).collect()]
    assert got == [("null_id", None), ("null_id", None), ("null_id", None), (None, None), (None, "s5"),
                   ("null_id", None)]
    catalog = [json.dumps({"item_id": "", "image_uri": "a.png"}), json.dumps({"item_id": "i2", "image_uri": ""}),
               json.dumps({"item_id": "i3", "image_uri": "c.png"})]
    raw = spark.createDataFrame([(line, "2026-11-20", "items.jsonl") for line in catalog],
                                "value string, dt string, file string")
    assert sorted((r["item_id"], r["reason"]) for r in S.parse_catalog(raw).collect()) == [
        ("", "null_id"), ("i2", "null_id"), ("i3", None)]
