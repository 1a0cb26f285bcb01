"""Stage 1 orchestration: one date of raw log -> the Delta tables, with a report whose counts add up.

The job (`jobs/build_samples.py`) is a thin wrapper around `build_date`. All row work runs in Spark;
the driver only collects small per-reason counts.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl import samples as S
from etl.config import Config, under_root
from etl.spark import list_dir, path_exists
from etl.tables import TableStore

log = logging.getLogger(__name__)

JOB = "build_samples"
QUARANTINE_COLUMNS = ("source", "reason", "raw", "event_id", "job_run_id")


class InputError(RuntimeError):
    """The input a job was asked to read is not there (with the path that was looked for)."""


@dataclass
class DateReport:
    dt: str
    counts: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def identities(self) -> list[tuple[str, int, int]]:
        """(name, left, right) for each accounting identity; left == right when nothing was lost."""
        c = self.counts
        q = c["quarantine"]
        return [
            ("raw_rows = valid_pv + valid_click + quarantined(search_log)",
             c["raw_rows"], c["valid_pv"] + c["valid_click"] + sum(q["search_log"].values())),
            ("valid_pv = pv_samples + dropped(no_positive, no_history)",
             c["valid_pv"], c["pv_samples"] + sum(c["pv_dropped"].values())),
            ("impressions = ctr_log + neg_downsampled",
             c["impressions"], c["ctr_log"] + c["neg_downsampled"]),
            ("impressions(kept PVs) = pv_items + neg_downsampled(kept PVs) + trimmed",
             c["kept_pv_impressions"], c["pv_items"] + c["kept_pv_neg_downsampled"] + c["trimmed"]),
            ("valid_click = positive impressions",
             c["valid_click"], c["positive_impressions"]),
            ("catalog_rows = items + quarantined(catalog)",
             c["catalog_rows"], c["items"] + sum(q["catalog"].values())),
            ("items = item_images + quarantined(image)",
             c["items"], c["item_images"] + sum(q["image"].values())),
            ("pv_samples = courier_train + dropped(no_positive_image, no_history_image)",
             c["pv_samples"], c["courier_train"] + sum(c["train_dropped"].values())),
        ]

    def check(self) -> None:
        bad = [f"{name}: {left} != {right}" for name, left, right in self.identities() if left != right]
        if bad:
            raise AssertionError(f"{self.dt}: counts do not add up:\n  " + "\n  ".join(bad)
                                 + f"\ncounts: {json.dumps(self.counts)}")

    def render(self) -> str:
        c = self.counts
        lines = [f"== build_samples {self.dt} =="]
        for name, left, right in self.identities():
            lines.append(f"  [{'ok' if left == right else 'MISMATCH'}] {name}: {left} = {right}")
        for source, reasons in c["quarantine"].items():
            for reason, n in sorted(reasons.items()):
                lines.append(f"  quarantined {source}/{reason}: {n}")
        for reason, n in sorted({**c["pv_dropped"], **c["train_dropped"]}.items()):
            lines.append(f"  dropped {reason}: {n}")
        lines.append("  table versions: " + ", ".join(f"{k}=v{v}" for k, v in self.versions.items()))
        return "\n".join(lines)


def date_range(start: str, end: str | None) -> list[str]:
    d0, d1 = dt.date.fromisoformat(start), dt.date.fromisoformat(end or start)
    if d1 < d0:
        raise ValueError(f"end date {end} is before start date {start}")
    return [(d0 + dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


def _read_dated_text(spark, base: str, dates: list[str], pattern: str) -> DataFrame:
    """Text lines of base/dt=<date>/<pattern> for the given dates, with a `dt` column."""
    paths = [under_root(base, f"dt={d}") for d in dates]
    return (spark.read.option("basePath", base).option("pathGlobFilter", pattern).text(paths)
            .select("value", F.col("dt").cast("string").alias("dt")))


def _existing_dates(spark, base: str, dates: list[str]) -> list[str]:
    present = set(list_dir(spark, base))
    return [d for d in dates if f"dt={d}" in present]


def _reason_counts(df: DataFrame, *keys: str) -> dict:
    out: dict = {}
    for row in df.groupBy(*keys).count().collect():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(row[k], {})
        node[row[keys[-1]]] = row["count"]
    return out


def _sum_by_reason(groups) -> dict:
    out: dict = {}
    for reasons in groups:
        for reason, n in reasons.items():
            if reason != "ok":
                out[reason] = out.get(reason, 0) + n
    return out


def build_date(spark, cfg: Config, store: TableStore, date: str, run_id: str,
               progress: Callable[[str], None] | None = None) -> DateReport:
    """Build every stage-1 table partition of one date and return its report (counts checked).

    `progress` receives a line per table written (name, version, rows, seconds)."""
    sc = cfg.samples
    log_base = under_root(cfg.raw_root, "search_log")
    catalog_base = under_root(cfg.raw_root, "catalog")
    if not path_exists(spark, under_root(log_base, f"dt={date}")):
        raise InputError(f"no raw search log for {date}: expected files under {log_base}/dt={date}/")
    report = DateReport(dt=date)
    d = dt.date.fromisoformat(date)
    window = [(d - dt.timedelta(days=i)).isoformat() for i in range(sc.history_lookback_days, -1, -1)]
    log_dates = _existing_dates(spark, log_base, window)
    gaps = [x for x in window if x not in log_dates and x > log_dates[0]]
    if gaps:
        log.warning("%s: no raw log for date(s) %s inside the history window", date, gaps)
    elif log_dates[0] > window[0]:
        log.info("%s: the raw log starts on %s; click history is shorter before that", date, log_dates[0])

    # ---- catalog: every catalog date up to this one defines the known items ---------------------
    catalog_dates = [p[3:] for p in list_dir(spark, catalog_base) if p.startswith("dt=") and p[3:] <= date]
    if not catalog_dates:
        raise InputError(f"no item catalog on or before {date} under {catalog_base}")
    catalog = S.parse_catalog(_read_dated_text(spark, catalog_base, catalog_dates, "*.jsonl"))
    catalog = catalog.persist(StorageLevel.MEMORY_AND_DISK)
    known_items = catalog.where(F.col("reason").isNull()).select("item_id")
    todays_items = catalog.where((F.col("dt") == date) & F.col("reason").isNull())

    # ---- events: parse, dedupe, check item references and clicks -------------------------------
    raw = _read_dated_text(spark, log_base, log_dates, "*.jsonl")
    events = S.parse_events(raw)
    events = S.mark_duplicates(events)
    events = S.mark_unknown_items(events, known_items)
    events = S.mark_bad_clicks(events).persist(StorageLevel.MEMORY_AND_DISK)
    valid = S.sessionize(events.where(F.col("reason").isNull()), sc.session_gap_minutes)
    pvs = valid.where(F.col("event_type") == "pv")
    clicks = valid.where(F.col("event_type") == "click")

    # ---- samples -------------------------------------------------------------------------------
    todays_pvs = S.click_history(pvs, clicks, sc.l_click).where(F.col("dt") == date)
    labelled = S.label_pvs(todays_pvs, clicks, sc.neg_rate, sc.sampling_seed).persist(StorageLevel.MEMORY_AND_DISK)
    samples = S.pv_samples(labelled, sc.l_pv, sc.sampling_seed).persist(StorageLevel.MEMORY_AND_DISK)
    kept_samples = samples.where(F.col("drop_reason").isNull())

    # ---- images --------------------------------------------------------------------------------
    decoded = S.decode_images(todays_items, cfg.images_root, sc.image_px, sc.jpeg_quality).persist(
        StorageLevel.MEMORY_AND_DISK)

    # ---- quarantine: every rejected row of this date, with its reason ---------------------------
    quarantine = (
        events.where((F.col("dt") == date) & F.col("reason").isNotNull())
        .select(F.lit("search_log").alias("source"), "reason", F.col("value").alias("raw"), "event_id")
        .unionByName(catalog.where((F.col("dt") == date) & F.col("reason").isNotNull())
                     .select(F.lit("catalog").alias("source"), "reason", F.col("value").alias("raw"),
                             F.col("item_id").alias("event_id")))
        .unionByName(decoded.where(F.col("reason").isNotNull()).join(todays_items, on="item_id", how="inner")
                     .select(F.lit("image").alias("source"), decoded["reason"], F.col("value").alias("raw"),
                             F.col("item_id").alias("event_id")))
        .withColumn("job_run_id", F.lit(run_id))
    )

    # ---- writes: one commit per table, each replacing exactly this date's partition -------------
    def write(name: str, df: DataFrame, partition: dict | None = None) -> None:
        t0 = time.perf_counter()
        report.versions[name] = store.replace_partition(df, name, partition or {"dt": date}, JOB, run_id)
        if progress:
            rows = sum(f.num_records or 0 for f in store.files(name)
                       if f.partition_values.get("dt") == date and f.partition_values.get("job", JOB) == JOB)
            progress(f"  {date} {name}: v{report.versions[name]}, {rows} rows, {time.perf_counter() - t0:.1f}s")

    write("quarantine", quarantine, {"dt": date, "job": JOB})
    write("items", todays_items.select("item_id", "category", "title", "price", "first_seen_dt", "image_uri"))
    write("item_images",
          decoded.where(F.col("reason").isNull()).select("item_id", "image", "width", "height", "sha256"))
    write("pv_samples", kept_samples.drop("drop_reason", "n_impressions", "n_neg_dropped", "n_trimmed"))
    write("ctr_log", S.ctr_log(labelled))
    # ---- counts: one small grouped aggregate per cached frame, collected to the driver -----------
    c = report.counts
    by_kind = _reason_counts(events.where(F.col("dt") == date).fillna({"reason": "ok", "event_type": "?"}),
                             "event_type", "reason")
    c["raw_rows"] = sum(n for kinds in by_kind.values() for n in kinds.values())
    c["valid_pv"] = by_kind.get("pv", {}).get("ok", 0)
    c["valid_click"] = by_kind.get("click", {}).get("ok", 0)
    catalog_reasons = _reason_counts(catalog.where(F.col("dt") == date).fillna({"reason": "ok"}), "reason")
    image_reasons = _reason_counts(decoded.fillna({"reason": "ok"}), "reason")
    c["quarantine"] = {
        "search_log": _sum_by_reason(by_kind.values()),
        "catalog": {r: n for r, n in catalog_reasons.items() if r != "ok"},
        "image": {r: n for r, n in image_reasons.items() if r != "ok"},
    }
    c["catalog_rows"] = sum(catalog_reasons.values())
    c["items"] = catalog_reasons.get("ok", 0)
    c["item_images"] = image_reasons.get("ok", 0)
    agg = {r["drop_reason"]: r for r in samples.groupBy("drop_reason").agg(
        F.count("*").alias("pvs"), F.sum("n_impressions").alias("impressions"),
        F.sum("n_neg_dropped").alias("neg"), F.sum("n_trimmed").alias("trimmed"),
        F.sum(F.size("pv_items")).alias("pv_items"), F.sum("n_pos").alias("pos")).collect()}
    kept = agg.get(None)
    c["pv_samples"] = kept["pvs"] if kept else 0
    c["pv_dropped"] = {r: row["pvs"] for r, row in agg.items() if r is not None}
    c["impressions"] = sum(row["impressions"] for row in agg.values())
    c["neg_downsampled"] = sum(row["neg"] for row in agg.values())
    c["positive_impressions"] = sum(row["pos"] for row in agg.values())
    c["kept_pv_impressions"] = kept["impressions"] if kept else 0
    c["kept_pv_neg_downsampled"] = kept["neg"] if kept else 0
    c["trimmed"] = kept["trimmed"] if kept else 0
    c["pv_items"] = kept["pv_items"] if kept else 0
    # Rows written, from the commit's own file statistics (no re-scan).
    c["ctr_log"] = sum(f.num_records for f in store.files("ctr_log") if f.partition_values.get("dt") == date)
    # Only `samples` is still needed: free the other caches before the image-heavy courier_train step.
    for df in (events, catalog, labelled, decoded):
        df.unpersist()
    # Not cached: the rows carry ~10 JPEGs each and the in-memory columnar cache builds whole batches on
    # the heap (OutOfMemoryError at 0.25x the bench preset); the drop reasons are counted below from
    # S.courier_train_reasons, the same rows without the image bytes.
    train = S.courier_train(kept_samples, store.read("item_images"), sc.l_pv, sc.l_click)
    write("courier_train", train.where(F.col("drop_reason").isNull()).drop("drop_reason"))

    train_reasons = _reason_counts(
        S.courier_train_reasons(kept_samples, store.read("item_images"), sc.l_pv, sc.l_click)
        .fillna({"drop_reason": "ok"}), "drop_reason")
    c["courier_train"] = train_reasons.pop("ok", 0)
    c["train_dropped"] = train_reasons
    samples.unpersist()
    report.check()
    return report


def report_json(reports: list[DateReport]) -> str:
    return json.dumps([{"dt": r.dt, "counts": r.counts, "versions": r.versions} for r in reports], indent=2)
