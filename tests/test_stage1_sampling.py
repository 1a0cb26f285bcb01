"""Negative down-sampling properties the count identities cannot see: the seed matters, and each
impression is decided on its own (never a whole page's negatives together)."""
from __future__ import annotations

import datetime as dt


def kept_negatives(spark, seed: int) -> dict:
    from pyspark.sql import functions as F

    from etl.samples import label_pvs

    at = dt.datetime(2026, 11, 20, 8)
    # p0's first item was clicked (mark_bad_clicks hands a PV its valid clicks' items)
    rows = [("pv", f"p{k}", "u1", at, [f"i{(k * 7 + j) % 97}" for j in range(10)], None, ["i0"] if k == 0 else [])
            for k in range(300)]
    rows.append(("click", "p0", "u1", at, None, "i0", None))
    events = spark.createDataFrame(rows, "event_type string, pv_id string, user_id string, ts timestamp, "
                                         "items array<string>, item_id string, clicked_items array<string>")
    out = label_pvs(events, 0.2, seed).select("pv_id", F.explode("impressions").alias("s"))
    return {(r["pv_id"], r["s"]["item_id"]): r["s"]["kept"] for r in out.where("s.label = 0").collect()}


def test_the_seed_changes_which_negatives_are_kept_not_how_many(spark):
    a, b = kept_negatives(spark, 17), kept_negatives(spark, 18)
    assert a == kept_negatives(spark, 17)  # a rerun keeps the same rows
    for kept in (a, b):
        assert abs(sum(kept.values()) / len(kept) - 0.2) < 0.03  # ~3000 negatives: sd 0.007
    both = sum(a[k] and b[k] for k in a)
    # Independent draws overlap on ~0.2 x 0.2 of the impressions; an ignored seed would overlap fully.
    assert both < 0.5 * sum(a.values())


def test_each_impression_is_decided_on_its_own(spark):
    kept = kept_negatives(spark, 17)
    pages: dict = {}
    for (pv_id, _), k in kept.items():
        pages.setdefault(pv_id, []).append(k)
    mixed = sum(0 < sum(ks) < len(ks) for ks in pages.values()) / len(pages)
    # Per impression at 0.2 with ~10 negatives a page: P(mixed) ~ 0.89; per page it would be 0.
    assert mixed > 0.8, mixed


def test_a_session_ends_after_a_gap_longer_than_session_gap_minutes(spark):
    from etl.samples import sessionize

    at = dt.datetime(2026, 11, 20, 8, tzinfo=dt.timezone.utc)
    # u1's gaps: exactly 30 min (same session), then 30 min + 1 us (a new one); u2 carries its own ids.
    times = {"e1": at, "e2": at + dt.timedelta(minutes=30),
             "e3": at + dt.timedelta(minutes=60, microseconds=1), "e4": at + dt.timedelta(minutes=61)}
    rows = [(e, "u1", t, None) for e, t in times.items()]
    rows += [("f1", "u2", at, "s-a"), ("f2", "u2", at + dt.timedelta(hours=5), "s-a")]
    events = spark.createDataFrame(rows, "event_id string, user_id string, ts timestamp, session_id string")
    got = {r["event_id"]: r["session_id"] for r in sessionize(events, 30).collect()}
    first, second = (f"u1:{int(times[e].timestamp())}" for e in ("e1", "e3"))  # the session's first second
    assert got == {"e1": first, "e2": first, "e3": second, "e4": second, "f1": "s-a", "f2": "s-a"}
