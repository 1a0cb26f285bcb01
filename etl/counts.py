"""Stage 1's accounting: every count of a date, taken from frames already computed (small grouped
aggregates over the materialized frames, collected to the driver) or from the staged files' own
statistics, and the identities they must satisfy before anything is published (`DateReport.identities`). Counts
are anchored outside the code they check: raw lines are counted from the files' bytes, not by the
parser."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl import catalog as T

# The reason the counts' grouped aggregates give a row that passed (its `reason` is null).
PASSED = "ok"


class VerifyError(RuntimeError):
    """A date's counts do not add up; nothing of it was committed."""


@dataclass
class DateReport:
    dt: str
    status: str = "built"  # built | unchanged
    counts: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    note: str = ""

    def identities(self) -> list[tuple[str, int, int]]:
        """(name, left, right) for each accounting identity; left == right when nothing was lost."""
        if self.status != "built":
            return []
        c = self.counts
        q = c["quarantine"]
        t = c["table_rows"]
        qt = c["quarantine_table"]
        keys = sorted({(s, r) for s in q for r in q[s]} | {(s, r) for s in qt for r in qt[s]})
        agree = sum(q.get(s, {}).get(r, 0) == qt.get(s, {}).get(r, 0) for s, r in keys)
        return [
            ("raw_lines(files) = raw_rows(parsed)", c["raw_lines"], c["raw_rows"]),
            ("raw_rows = valid_pv + valid_click + quarantined(search_log)",
             c["raw_rows"], c["valid_pv"] + c["valid_click"] + sum(q["search_log"].values())),
            ("valid_pv = pv_samples + dropped(no_positive, no_history)",
             c["valid_pv"], c["pv_samples"] + sum(c["pv_dropped"].values())),
            ("impressions = ctr_log(table) + neg_downsampled",
             c["impressions"], t["ctr_log"] + c["neg_downsampled"]),
            ("impressions(kept PVs) = pv_items + neg_downsampled(kept PVs) + trimmed",
             c["kept_pv_impressions"], c["pv_items"] + c["kept_pv_neg_downsampled"] + c["trimmed"]),
            ("PVs with a click at or after them in their history = 0", c["history_not_before_pv"], 0),
            ("valid_click = positive impressions + clicks on another date's PV",
             c["valid_click"], c["positive_impressions"] + c["click_on_other_date_pv"]),
            ("catalog_lines(files) = catalog_rows(parsed)", c["catalog_lines"], c["catalog_rows"]),
            ("catalog_rows = items + quarantined(catalog)",
             c["catalog_rows"], c["items"] + sum(q["catalog"].values())),
            ("items = item_images + quarantined(image)",
             c["items"], c["item_images"] + sum(q["image"].values())),
            ("pv_samples = courier_train + dropped(no_positive_image, no_history_image)",
             c["pv_samples"], c["courier_train"] + sum(c["train_dropped"].values())),
            ("pv_samples(table) = pv_samples", t["pv_samples"], c["pv_samples"]),
            ("courier_train(table) = courier_train", t["courier_train"], c["courier_train"]),
            ("items(table) = items", t["items"], c["items"]),
            ("item_images(table) = item_images", t["item_images"], c["item_images"]),
            ("quarantine(table) = quarantined(all sources)",
             t["quarantine"], sum(n for reasons in q.values() for n in reasons.values())),
            ("quarantine(table) by (source, reason) = quarantined: reasons that agree", len(keys), agree),
        ]

    def mismatches(self) -> list[str]:
        return [f"{name}: {left} != {right}" for name, left, right in self.identities() if left != right]

    def check(self) -> None:
        bad = self.mismatches()
        if bad:
            raise VerifyError(f"{self.dt}: counts do not add up:\n  " + "\n  ".join(bad))

    def render(self) -> str:
        if self.status != "built":
            return f"== build_samples {self.dt} ==\n  {self.status}: {self.note}"
        c = self.counts
        lines = [f"== build_samples {self.dt} =="]
        for source, f in c["files"].items():
            lines.append(f"  read {source}: {f['files']} file(s), {f['bytes']} bytes, {f['lines']} lines; "
                         f"ignored {len(f['ignored'])} {f['ignored'] or ''}".rstrip())
        if c.get("ignored_catalog_folders"):
            lines.append(f"  ignored catalog folder(s), not dt=YYYY-MM-DD: {c['ignored_catalog_folders']}")
        for name, left, right in self.identities():
            lines.append(f"  [{'ok' if left == right else 'MISMATCH'}] {name}: {left} = {right}")
        for source, reasons in c["quarantine"].items():
            for reason, n in sorted(reasons.items()):
                lines.append(f"  quarantined {source}/{reason}: {n}")
        for reason, n in sorted({**c["pv_dropped"], **c["train_dropped"]}.items()):
            lines.append(f"  dropped {reason}: {n}")
        lines.append(f"  repeated_on_page (an item listed again on the same page, first position kept): "
                     f"{c['repeated_on_page']}")
        if self.note:
            lines.append(f"  {self.note}")
        lines.append("  table versions: " + ", ".join(f"{k}=v{v}" for k, v in self.versions.items()))
        return "\n".join(lines)


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
            if reason != PASSED:
                out[reason] = out.get(reason, 0) + n
    return out


def input_counts(inputs, date: str) -> dict:
    """Files read and ignored per source, and their lines counted from the bytes (the anchor)."""
    today_files = inputs.log_files[date]
    files = {
        kind: {"files": len(di.read), "bytes": sum(inputs.scans[f.path].size for f in di.read),
               "lines": sum(inputs.scans[f.path].lines for f in di.read),
               "ignored": [f.name for f in di.ignored]}
        for kind, di in (("search_log", today_files), ("catalog", inputs.catalog_files.get(date)))
        if di is not None}
    return {"files": files, "raw_lines": files["search_log"]["lines"],
            "catalog_lines": files.get("catalog", {}).get("lines", 0),
            "ignored_catalog_folders": inputs.ignored_catalog_folders}


def event_counts(events: DataFrame, date: str) -> dict:
    """Parsed rows per file, valid events, and every quarantine reason of the search log, from one
    grouped aggregate (file x event type x reason)."""
    groups = (events.where(F.col("dt") == date).fillna({"reason": PASSED, "event_type": "?"})
              .fillna(False, subset=["pv_on_other_date"])
              .groupBy("file", "event_type", "reason", "pv_on_other_date").count().collect())
    by_kind: dict = {}
    rows_by_file: dict = {}
    other_date = 0
    for r in groups:
        kinds = by_kind.setdefault(r["event_type"], {})
        kinds[r["reason"]] = kinds.get(r["reason"], 0) + r["count"]
        # input_file_name() is a URI: a name with a space or brackets comes percent-encoded ('+' is left as is)
        name = unquote(r["file"]) if r["file"] is not None else None
        rows_by_file[name] = rows_by_file.get(name, 0) + r["count"]
        other_date += r["count"] if r["pv_on_other_date"] else 0
    return {
        "raw_rows": sum(rows_by_file.values()),
        "rows_by_file": rows_by_file,
        "valid_pv": by_kind.get("pv", {}).get(PASSED, 0),
        "valid_click": by_kind.get("click", {}).get(PASSED, 0),
        "click_on_other_date_pv": other_date,  # valid, in click histories, labels nothing (mark_bad_clicks)
        "quarantine": {"search_log": _sum_by_reason(by_kind.values())},
    }


def item_counts(catalog: DataFrame, decoded: DataFrame, date: str) -> tuple[dict, int]:
    """Catalog rows, items and item images of the date, and every quarantine reason of the catalog
    and the images, from one grouped aggregate over both; and the bytes of the date's item images
    (what courier_train would broadcast)."""
    groups = (catalog.where(F.col("dt") == date).select(F.lit("catalog").alias("source"), "reason",
                                                         F.lit(0).cast("long").alias("bytes"))
              .unionByName(decoded.select(F.lit("image").alias("source"), "reason",
                                          F.length("image").cast("long").alias("bytes")))
              .fillna({"reason": PASSED})
              .groupBy("source", "reason").agg(F.count("*").alias("count"), F.sum("bytes").alias("bytes"))
              .collect())
    reasons = {"catalog": {}, "image": {}}
    image_bytes = 0
    for r in groups:
        reasons[r["source"]][r["reason"]] = r["count"]
        if r["source"] == "image" and r["reason"] == PASSED:
            image_bytes = r["bytes"] or 0
    return {
        "quarantine": {source: {r: n for r, n in by.items() if r != PASSED} for source, by in reasons.items()},
        "catalog_rows": sum(reasons["catalog"].values()),
        "items": reasons["catalog"].get(PASSED, 0),
        "item_images": reasons["image"].get(PASSED, 0),
    }, image_bytes


def sample_counts(samples: DataFrame) -> dict:
    """PVs kept and dropped (per reason), impressions, negatives down-sampled, trimmed, from one aggregate."""
    agg = {r["drop_reason"]: r for r in samples.groupBy("drop_reason").agg(
        F.count("*").alias("pvs"), F.sum("n_impressions").alias("impressions"),
        F.sum("n_neg_dropped").alias("neg"), F.sum("n_trimmed").alias("trimmed"),
        F.sum(F.size("pv_items")).alias("pv_items"), F.sum("n_pos").alias("pos"),
        F.sum("repeated_on_page").alias("repeated"),
        # no click at or after the PV may be in its history (the page's own clicks, later ones: leakage)
        F.sum(F.exists("click_history_ts", lambda t: t >= F.col("ts")).cast("int")).alias("late")).collect()}
    kept = agg.get(None)
    return {
        "pv_samples": kept["pvs"] if kept else 0,
        "pv_dropped": {r: row["pvs"] for r, row in agg.items() if r is not None},
        "impressions": sum(row["impressions"] for row in agg.values()),
        "repeated_on_page": sum(row["repeated"] for row in agg.values()),
        "neg_downsampled": sum(row["neg"] for row in agg.values()),
        "positive_impressions": sum(row["pos"] for row in agg.values()),
        "kept_pv_impressions": kept["impressions"] if kept else 0,
        "kept_pv_neg_downsampled": kept["neg"] if kept else 0,
        "trimmed": kept["trimmed"] if kept else 0,
        "pv_items": kept["pv_items"] if kept else 0,
        "history_not_before_pv": sum(row["late"] or 0 for row in agg.values()),
    }


def staged_counts(store, staged: dict) -> dict:
    """Rows of every staged table from its files' own statistics (Parquet footers), no re-scan; the
    quarantine's reasons from its staged files (a small table), not from the frame that made them."""
    table_rows = {name: s.rows for name, s in staged.items()}
    return {"table_rows": table_rows,
            "ctr_log": table_rows[T.CTR_LOG],  # the impression-grain rows written (an MLflow metric)
            "quarantine_table": _reason_counts(store.read_staged(staged[T.QUARANTINE]), "source", "reason")}
