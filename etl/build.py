"""Stage 1 orchestration: one date of raw log -> the Delta tables, verified before they are published.

`build_date` reads as: gather the inputs (every file read or reported, earlier dates published, a
fingerprint) -> stop when the fingerprint equals the published one (`unchanged`) -> compute (every
table's rows staged as uncommitted files, counts taken) -> verify (every identity, with counts
anchored outside the code they check) -> commit (all tables of the date published as a unit, see
etl.publish). A date that does not add up commits nothing. All row work runs in Spark; the driver
collects per-reason counts, file listings and today's image paths.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F

from etl import catalog as T
from etl import fs
from etl import counts as K
from etl import samples as S
from etl.config import Config, under_root
from etl.counts import DateReport, VerifyError
from etl.inputs import (InputError, discover, fingerprint, image_files, plan_images,
                        scan_files)
from etl.publish import PublishError, PublishLog, pause_hook, recover
from etl.spark import file_open_cost, glob_escape, list_dir, static_partitioning
from etl.tables import TableStore

log = logging.getLogger(__name__)

JOB = "build_samples"
# Part of every date's fingerprint: bump it when a rule changes what the same input builds.
# 3: a click labels only a PV of its own date's log; MPO and key-colour PNG images; an event is judged by
# the catalog of its own date; a local image's change time is part of the fingerprint.
# 4: an earlier date's click whose page lies outside the history window keeps its published verdict.
# 5: of a page's valid clicks on one item, the one in the page's own date's log is kept (it labels).
# 6: a blank id (user_id "", ...) is null_id, a blank session_id reads as none (the session is derived).
# 7: 1-bit and 16-bit greyscale images with a key colour (PNG tRNS) are composited on white too.
RULES_VERSION = 7
# The raw log's folder under raw_root, and the quarantine `source` of its rows.
SEARCH_LOG = "search_log"
# The most unknown-item event ids, or earlier dates' click verdicts, sent to every executor (~50 MB);
# more are joined by a shuffle.
MAX_BROADCAST_IDS = 1_000_000

__all__ = ["JOB", "DateReport", "InputError", "PublishError", "VerifyError", "build_date", "log_date", "log_reports",
           "report_json"]


def materialize(df: DataFrame) -> DataFrame:
    """df computed once, its lineage cut: a local checkpoint kept on the executors (memory, spilling to
    disk). Later steps read these rows instead of re-running the plan: the mark_* steps join events
    with themselves, so without it each use re-parses the input (in Python) and re-runs the windows,
    and every action re-analyses a plan of ~1e5 characters. A lost executor loses its blocks: the date
    then fails (nothing is published) and is rerun. `release` frees the blocks."""
    return df.localCheckpoint(eager=True)


def release(*frames: DataFrame) -> None:
    """Free the blocks of materialized frames now rather than when the JVM collects them."""
    for df in frames:
        df._jdf.queryExecution().logical().rdd().unpersist(False)


# ---- gather: what the date reads, whether it may be built, and its fingerprint ----------------------
@dataclass
class DateInputs:
    dt: str
    log_files: dict  # date -> DateInput (today and the history window)
    catalog_files: dict  # date -> DateInput (every catalog date up to today)
    scans: dict  # path -> FileScan
    catalog: DataFrame  # parsed catalog of every date up to today (materialized)
    images: object  # ImagePlan of today's items
    fingerprint: str
    published: dict  # dt -> manifest entry of the dates published so far
    own_files: dict  # input kind -> digest of this date's own files of that kind (kept in its manifest entry)
    ignored_catalog_folders: list  # catalog/dt=<name> folders whose name is no date: not read, reported
    lookback_days: int = 0  # samples.history_lookback_days: the earlier dates whose logs this date reads


def _dated_lines(spark, base: str, files: dict) -> DataFrame:
    paths = [glob_escape(f.path) for d in sorted(files) for f in files[d].read]
    if not paths:
        return spark.createDataFrame([], "value string, dt string, file string")
    name = F.element_at(F.split(F.input_file_name(), "/"), -1)  # names are unique within a date folder
    return (spark.read.option("basePath", base).text(paths)
            .select("value", F.col("dt").cast("string").alias("dt"), name.alias("file")))


# A catalog date without a search log (a first catalog dump, a day the log was lost) is built as an
# empty log date, which publishes its items and their images for the dates after it.
_CATALOG_ONLY = ("give such a date an empty search log (an empty file in its search_log/dt=<date>/ folder) "
                 "and build it with --allow-empty, which publishes its items and their images")


def _files_digest(files, scans: dict) -> str:
    """sha256 of one date folder's data files (name, size, content sha256); files: a DateInput or None."""
    read = files.read if files else []
    return fingerprint(sorted((f.name, scans[f.path].size, scans[f.path].sha256) for f in read))


# The digest a date records for an input kind it has no folder of (e.g. a date without a catalog).
_NO_FILES = _files_digest(None, {})


def _changed_since_published(date: str, window: list[str], catalog_dates: list[str], log_files: dict,
                             catalog_files: dict, scans: dict, published: dict) -> list[str]:
    """The earlier dates this build reads whose own files are no longer those their build published
    from (a late file, a replaced or removed one): "<date> (<kind>)". This build would read rows their
    published tables and counts never saw (and judge clicks by verdicts that were never given). A date
    published before its files were recorded cannot say, and is not listed."""
    def recorded(x: str, kind: str) -> str | None:
        return published.get(x, {}).get("files", {}).get(kind)

    read = {SEARCH_LOG: (window, log_files), "catalog": (catalog_dates, catalog_files)}
    # A folder that is gone (archived past the lookback) is not read, not changed: only existing ones.
    return sorted(f"{x} ({kind})" for kind, (dates, files) in read.items() for x in dates
                  if x < date and x in files and recorded(x, kind) not in (None, _files_digest(files[x], scans)))


def _earlier_builds(published: dict, date: str, lookback_days: int) -> str:
    """A digest of what a build of `date` read from the earlier dates' published builds: the builds
    (fingerprint and run) of the dates in its history window (their clicks, verdicts and item images), and
    the catalog files of the earlier dates with a catalog (where each item was first listed). A log-only
    date outside the window is not read: its rebuild leaves `date` as it is."""
    start = (dt.date.fromisoformat(date) - dt.timedelta(days=lookback_days)).isoformat()
    read = {}
    for x, e in published.items():
        catalog = e.get("files", {}).get("catalog")
        if start <= x < date:
            read[x] = [e.get("fingerprint"), e.get("run_id")]
        elif x < date and catalog not in (None, _NO_FILES):
            read[x] = catalog
    return fingerprint(read)


def _built_before_an_earlier_rebuild(published: dict, dates, lookback_days: int) -> list[str]:
    """Those of the published `dates` that read an earlier date published again since (a rebuilt or
    back-filled date alone, not as a range through them): their tables hold what that date published then
    (an item its new catalog lists first kept an item_images row on both dates). A date published before
    this was recorded cannot say, and is not listed."""
    return sorted(x for x in dates if x in published and published[x].get("earlier") not in
                  (None, _earlier_builds(published, x, lookback_days)))


def _is_date(name: str) -> bool:
    try:
        return dt.date.fromisoformat(name).isoformat() == name
    except ValueError:
        return False


def gather_inputs(spark, cfg: Config, plog: PublishLog, date: str, allow_empty: bool) -> DateInputs:
    sc = cfg.samples
    log_base = under_root(cfg.raw_root, SEARCH_LOG)
    catalog_base = under_root(cfg.raw_root, "catalog")
    today = discover(spark, log_base, date, sc.input_ignore)
    if today is None:
        raise InputError(f"no raw search log for {date}: expected files under {log_base}/dt={date}/"
                         + (f" (the catalog has this date: {_CATALOG_ONLY})" if discover(
                             spark, catalog_base, date, sc.input_ignore) is not None else ""))
    d = dt.date.fromisoformat(date)
    window = [(d - dt.timedelta(days=i)).isoformat() for i in range(sc.history_lookback_days, 0, -1)]
    log_files = {x: f for x in window if (f := discover(spark, log_base, x, sc.input_ignore)) is not None}
    log_files[date] = today
    folders = sorted(p[3:] for p in list_dir(spark, catalog_base) if p.startswith("dt="))
    # A folder whose name is no date (`dt=2026-11-19.bad`, a delivery set aside) is not a catalog date:
    # compared as a string it would sort among them, and no build could ever publish it.
    not_dates = [x for x in folders if not _is_date(x)]
    if not_dates:
        log.warning("%s: ignoring folder(s) %s: not dt=YYYY-MM-DD", catalog_base, [f"dt={x}" for x in not_dates])
    catalog_dates = [x for x in folders if x not in not_dates and x <= date]
    published = plog.published_dates()
    # Every date reads every earlier catalog (where each item was first listed): a catalog folder that a
    # published date was built from and that is gone now (archived) would make its items unknown to this
    # build (their events quarantined as unknown_item) or new again (a second item_images row each).
    gone = sorted(x for x, p in published.items() if x < date and x not in catalog_dates
                  and p.get("files", {}).get("catalog") not in (None, _NO_FILES))
    if gone:
        raise InputError(f"{date}: the catalog folder(s) of published date(s) {gone} are gone from {catalog_base}; "
                         "every build reads every earlier catalog (an item's first listing), so restore them "
                         "(catalog folders are never archived; search-log folders past the history window may be)")
    if not catalog_dates:
        raise InputError(f"no item catalog on or before {date} under {catalog_base}")
    catalog_files = {x: discover(spark, catalog_base, x, sc.input_ignore) for x in catalog_dates}

    # Order between dates: a date reads the click history and the catalog (and so the item images) of
    # earlier dates; building it before they are published would mask those items' images.
    earlier = sorted({x for x in log_files if x < date} | {x for x in catalog_dates if x < date})
    missing = [x for x in earlier if x not in published]
    if missing:
        catalog_only = [x for x in missing if x not in log_files
                        and discover(spark, log_base, x, sc.input_ignore) is None]
        raise PublishError(f"{date}: earlier date(s) {missing} have raw input inside this date's history/catalog "
                           f"window but are not published yet; build them first (a --date .. --end-date range "
                           f"builds in order)" + (f". {catalog_only} have a catalog but no search log: "
                                                  f"{_CATALOG_ONLY}" if catalog_only else ""))

    stale = _built_before_an_earlier_rebuild(published, [x for x in published if x < date], sc.history_lookback_days)
    if stale:
        raise PublishError(f"{date}: published date(s) {stale} were built before an earlier date was published "
                           f"again, and read its item images, first listings and click verdicts as they were; "
                           f"rebuild them first (a --date {stale[0]} --end-date {date} range rebuilds in order)")
    scans = scan_files(spark, [f for di in (*log_files.values(), *catalog_files.values()) for f in di.read],
                       storage=fs.options_for(cfg))
    changed = _changed_since_published(date, window, catalog_dates, log_files, catalog_files, scans, published)
    if changed:
        raise PublishError(f"{date}: the input of published date(s) {changed} changed since they were published "
                           f"(a file added, replaced or removed); rebuild them first (a --date {changed[0][:10]} "
                           f"--end-date {date} range rebuilds in order)")
    empty = sum(scans[f.path].lines for f in today.read) == 0

    catalog = materialize(S.parse_catalog(_dated_lines(spark, catalog_base, catalog_files)))
    todays = [(r["item_id"], r["image_uri"]) for r in catalog.where(
        (F.col("dt") == date) & F.col("reason").isNull()).select("item_id", "image_uri").collect()]
    images = plan_images(spark, todays, cfg.images_root, sc.max_image_bytes)
    parts = {
        "rules": RULES_VERSION,
        "samples": dataclasses.asdict(sc),
        "images_root": cfg.images_root,
        "files": sorted((kind, x, f.name, scans[f.path].size, scans[f.path].sha256)
                        for kind, files in ((SEARCH_LOG, log_files), ("catalog", catalog_files))
                        for x, di in files.items() for f in di.read),
        "images": sorted(images.listing) + sorted(images.rejected),
        # courier_train joins the item images of earlier dates: their published builds are inputs too (the
        # run as well: a --force rebuild publishes other tables under the same fingerprint).
        "earlier": {x: [published[x].get("fingerprint"), published[x].get("run_id")]
                    for x in sorted(published) if x < date},
    }
    fp = fingerprint(parts)
    own = {SEARCH_LOG: _files_digest(today, scans), "catalog": _files_digest(catalog_files.get(date), scans)}
    # An empty date already published empty from these same log files (with --allow-empty) is not refused:
    # a backfill over it goes on (rebuilding it when anything else changed).
    before = published.get(date, {})
    same_log = (before["files"].get(SEARCH_LOG) == own[SEARCH_LOG] if "files" in before
                else before.get("fingerprint") == fp)
    if empty and not allow_empty and not same_log:
        release(catalog)
        raise InputError(f"{log_base}/dt={date}/ holds no lines ({len(today.read)} data file(s), ignored "
                         f"{[f.name for f in today.ignored]}); refusing to replace {date}'s tables with empty "
                         f"ones (pass --allow-empty to publish an empty date)")
    return DateInputs(date, log_files, catalog_files, scans, catalog, images, fp, published, own,
                      [f"dt={x}" for x in not_dates], lookback_days=sc.history_lookback_days)


# ---- compute: every table's rows staged (uncommitted), every count taken --------------------------
def published_click_rejections(store: TableStore, inputs: DateInputs) -> DataFrame | None:
    """(dt, event_id, reason) of the clicks the builds of the earlier dates read for click history
    quarantined with a click reason; None when no earlier date is read (keep_published_click_verdicts)."""
    earlier = sorted(x for x in inputs.log_files if x < inputs.dt)
    if not earlier or not store.exists(T.QUARANTINE):
        return None
    return (store.read(T.QUARANTINE, partitions={"dt": earlier, "job": [JOB]})
            .where((F.col("source") == SEARCH_LOG) & F.col("reason").isin(*S.CLICK_REASONS))
            .select(F.col("dt").cast("string").alias("dt"), "event_id", "reason"))


def compute(spark, cfg: Config, store: TableStore, inputs: DateInputs, run_id: str,
            progress: Callable[[str], None] | None) -> tuple[dict, DateReport]:
    sc = cfg.samples
    date = inputs.dt
    report = DateReport(dt=date)
    c = report.counts
    catalog = inputs.catalog
    known_items = catalog.where(F.col("reason").isNull()).select("item_id", "dt")
    todays_items = catalog.where((F.col("dt") == date) & F.col("reason").isNull())

    # ---- events: parse, dedupe, check item references and clicks -------------------------------
    raw = _dated_lines(spark, under_root(cfg.raw_root, SEARCH_LOG), inputs.log_files)
    # Materialized after the dedupe: the item check joins its input with itself (see materialize),
    # which would otherwise run the Python parser twice.
    # Kept partitioned by pv_id (its last window's): the item and click checks then need no shuffle.
    with static_partitioning(spark):
        deduped = materialize(S.mark_duplicates(S.parse_events(raw, sc.ts_skew_minutes)))
    unknown = materialize(S.unknown_item_events(deduped, known_items))
    few = unknown.count() <= MAX_BROADCAST_IDS
    # A valid event's raw text is never read again (only rejected rows are quarantined with theirs):
    # not keeping it makes the events' blocks ~40 % smaller.
    checked = S.mark_bad_clicks(S.mark_unknown_items(deduped, unknown, broadcast=few))
    published = published_click_rejections(store, inputs)
    if published is not None:
        checked = S.keep_published_click_verdicts(checked, date, published,
                                                  broadcast=published.count() <= MAX_BROADCAST_IDS)
    events = materialize(checked.withColumn("value", F.when(F.col("reason").isNotNull(), F.col("value"))))
    release(deduped, unknown)
    # Only what the samples read travels through the shuffle by user (not the raw text).
    valid = events.where(F.col("reason").isNull()).select(*S.VALID_EVENT_COLUMNS)

    # ---- samples: sessions, click history and labels over one shuffle by user -------------------
    timeline = S.click_history(S.sessionize(valid, sc.session_gap_minutes), sc.l_click)
    labelled = materialize(S.label_pvs(timeline, sc.neg_rate, sc.sampling_seed).where(F.col("dt") == date)
                           .select(*S.LABELLED_COLUMNS))
    # From here on only today's rejected events (the quarantine) and the events' counts are needed:
    # keep those and free the events (~1 GB at 2x the bench preset), so later steps do not spill.
    rejected_events = materialize(events.where((F.col("dt") == date) & F.col("reason").isNotNull()))
    event_counts = K.event_counts(events, date)
    release(events)
    samples = materialize(S.pv_samples(labelled, sc.l_pv, sc.sampling_seed))
    kept_samples = samples.where(F.col("drop_reason").isNull())

    # ---- images: listed by the driver, read by the executors, decoded per row -------------------
    plan = inputs.images
    rejected = spark.createDataFrame(
        [(i, None, None, None, None, r, dtl) for i, r, dtl in plan.rejected], S.IMAGE_RESULT_SCHEMA)
    with file_open_cost(spark, plan.mean_bytes):  # about one decoding task per core, not one per 32 images
        decoded = materialize(S.decode_images(image_files(spark, plan), sc.image_px, sc.jpeg_quality,
                                              sc.max_image_pixels).unionByName(rejected))

    # ---- quarantine: every rejected row of this date, with its reason ---------------------------
    quarantine = (
        rejected_events
        .select(F.lit(SEARCH_LOG).alias("source"), "reason", "detail", F.col("value").alias("raw"), "raw_b64",
                "event_id")
        .unionByName(catalog.where((F.col("dt") == date) & F.col("reason").isNotNull())
                     .select(F.lit("catalog").alias("source"), "reason", "detail", F.col("value").alias("raw"),
                             "raw_b64", F.col("item_id").alias("event_id")))
        .unionByName(decoded.where(F.col("reason").isNotNull()).join(todays_items, on="item_id", how="inner")
                     .select(F.lit("image").alias("source"), decoded["reason"], decoded["detail"],
                             F.col("value").alias("raw"), F.lit(None).cast("string").alias("raw_b64"),
                             F.col("item_id").alias("event_id")))
        .withColumn("job_run_id", F.lit(run_id))
        .select(*T.QUARANTINE.columns)
    )

    staged: dict = {}

    def stage(name: str, df: DataFrame, partition: dict | None = None) -> None:
        t0 = time.perf_counter()
        staged[name] = store.stage_partition(df, name, partition or {"dt": date})
        if progress:
            progress(f"  {date} {name}: staged {staged[name].rows} rows, {time.perf_counter() - t0:.1f}s")

    try:
        stage(T.QUARANTINE, quarantine, {"dt": date, "job": JOB})
        stage(T.ITEMS, todays_items.select(*T.ITEMS.columns))
        stage(T.ITEM_IMAGES,
              decoded.where(F.col("reason").isNull()).select(*T.ITEM_IMAGES.columns))
        stage(T.PV_SAMPLES, kept_samples.drop("drop_reason", "n_impressions", "n_neg_dropped", "n_trimmed",
                                              "repeated_on_page"))
        stage(T.CTR_LOG, S.ctr_log(labelled))

        # ---- counts: small grouped aggregates over the materialized frames, collected to the driver ----
        c.update(K.input_counts(inputs, date))
        c.update(event_counts)
        items, image_bytes = K.item_counts(catalog, decoded, date)
        c["quarantine"].update(items.pop("quarantine"))
        c.update(items)
        c.update(K.sample_counts(samples))
        # Only `samples` is still needed: free the other frames before the image-heavy courier_train step.
        release(rejected_events, labelled, decoded)

        # courier_train joins the images of this date (staged, not committed yet) and of the earlier
        # dates (published); never a later date's, so a date's rows do not depend on build order.
        images = store.read_staged(staged[T.ITEM_IMAGES])
        if store.exists(T.ITEM_IMAGES):
            earlier = store.read(T.ITEM_IMAGES).where(F.col("dt") < date)
            images = earlier.unionByName(images)
            image_bytes += earlier.select(F.sum(F.length("image"))).first()[0] or 0  # one pass over a column
        image_mb = image_bytes / 2**20
        broadcast = 0 < cfg.spark.broadcast_images_mb and image_mb <= cfg.spark.broadcast_images_mb
        if progress:
            progress(f"  {date} courier_train: item images ~{image_mb:,.0f} MB, "
                     + ("looked up in a broadcast copy" if broadcast else "shuffle join (over spark.broadcast_images_mb)"))
        # Never cached (the rows carry ~10 JPEGs each; the in-memory columnar cache builds whole batches
        # on the heap: OutOfMemoryError at 0.25x the bench preset): the drop reasons are observed in
        # the same pass that writes the kept rows.
        reasons = Observation("courier_train drop reasons")
        train = S.courier_train(kept_samples, images, sc.l_pv, sc.l_click, broadcast).observe(
            reasons, F.count_if(F.col("drop_reason").isNull()).alias("ok"),
            *[F.count_if(F.col("drop_reason") == r).alias(r) for r in S.TRAIN_DROP_REASONS])
        stage(T.COURIER_TRAIN, train.where(F.col("drop_reason").isNull()).drop("drop_reason"))
        observed = reasons.get
        c["courier_train"] = observed["ok"]
        c["train_dropped"] = {r: observed[r] for r in S.TRAIN_DROP_REASONS if observed[r]}
        release(samples)
        c.update(K.staged_counts(store, staged))
    except BaseException:
        discard(store, staged)
        raise
    return staged, report


def discard(store: TableStore, staged: dict) -> None:
    for s in staged.values():
        store.discard_staged(s)


# ---- verify: every identity before anything is committed ----------------------------------------
def verify(store: TableStore, staged: dict, report: DateReport, inputs: DateInputs) -> None:
    bad = report.mismatches()
    if not bad:
        return
    lines = [f"{report.dt}: counts do not add up; nothing was committed:"] + [f"  {b}" for b in bad]
    try:
        _diagnose(store, staged, report, inputs, lines)
    finally:  # the staged files go whatever the diagnosis does (a Spark job: it may fail, or be stopped)
        discard(store, staged)
    raise VerifyError("\n".join(lines))


def _diagnose(store: TableStore, staged: dict, report: DateReport, inputs: DateInputs, lines: list[str]) -> None:
    """What a failed verify adds to its message: the first repeated ids, the files that lost lines."""
    for name, key in ((t, t.key) for t in T.STAGE1 if t.key):
        dup = (store.read_staged(staged[name]).groupBy(*key).count().where(F.col("count") > 1)
               .orderBy(*key).limit(5).collect())
        if dup:
            lines.append(f"  first ids repeated in {name}: " + ", ".join(
                "/".join(str(r[k]) for k in key) + f" (x{r['count']})" for r in dup))
    if report.counts["raw_lines"] != report.counts["raw_rows"]:
        parsed = report.counts["rows_by_file"]
        for f in inputs.log_files[report.dt].read:
            if parsed.get(f.name, 0) != inputs.scans[f.path].lines:
                lines.append(f"  {f.name}: {inputs.scans[f.path].lines} lines in the file, "
                             f"{parsed.get(f.name, 0)} parsed")
    lines.append("counts: " + json.dumps(report.counts, sort_keys=True))


# ---- commit: the date's tables published as a unit ----------------------------------------------
def commit(store: TableStore, plog: PublishLog, staged: dict, report: DateReport, inputs: DateInputs,
           run_id: str, progress: Callable[[str], None] | None) -> None:
    try:
        _publish(store, plog, staged, report, inputs, run_id, progress)
    except BaseException:  # a SIGTERM (SystemExit) while waiting for the lock too
        if not report.versions:  # failed before its first commit (the lock, recovery): nothing refers to them
            discard(store, staged)
        raise


def _publish(store: TableStore, plog: PublishLog, staged: dict, report: DateReport, inputs: DateInputs,
             run_id: str, progress: Callable[[str], None] | None) -> None:
    with plog.lock(run_id):
        if plog.latest() is None:
            # First publish in this store: what exists now (tables written before the publish log)
            # is the published state, so recovery below has a reference.
            legacy = {n: store.latest_version(n) for n in T.STAGE1 if store.latest_version(n) is not None}
            plog.append({"dt": None, "run_id": run_id, "status": "init", "tables": legacy, "dates": {}})
        undone = recover(store, plog)
        if undone:
            report.note = "recovered an unfinished publish: " + "; ".join(undone)
        # This date was computed from the earlier dates' published tables (click verdicts, item images);
        # another build may have published one of them again since (the lock covers only this step).
        # (the run too: a --force rebuild publishes other tables under the same fingerprint)
        # This date too: another build of it (a backfill, a retry) that published meanwhile may have read
        # newer files; publishing this one's over it would put older input back, or the same again.
        now = plog.latest()["dates"]
        read, current = ({x: (e.get("fingerprint"), e.get("run_id")) for x, e in dates.items() if x <= report.dt}
                         for dates in (inputs.published, now))
        if read != current:
            moved = sorted(x for x in {*read, *current} if read.get(x) != current.get(x))
            which = "this date was" if moved == [report.dt] else f"date(s) {moved} were"
            raise PublishError(f"{report.dt}: {which} published by another build while this one was computed (from "
                               "the tables published before); nothing was committed: rerun the date")
        # After recovery each table's newest version holds its published content: this run's commit must be
        # the very next one. Another run's commit in between (the object-store lock cannot rule one out)
        # would be pinned with this run's in the record below.
        start = {t: store.latest_version(t) for t in T.STAGE1}
        try:
            for n, name in enumerate(T.STAGE1, 1):
                report.versions[name] = store.commit_staged(staged[name], JOB, run_id)
                expected = 0 if start[name] is None else start[name] + 1
                if report.versions[name] != expected:
                    raise PublishError(f"{report.dt}: {name} is at v{report.versions[name]} after this run's commit, "
                                       f"not v{expected}: another run committed to it meanwhile; rerun the date")
                if progress:
                    progress(f"  {report.dt} {name}: committed v{report.versions[name]}")
                pause_hook(n)
            # Each table's newest version is still this run's: no other run committed in between
            # (the object-store lock cannot rule that out), so the record below pins a consistent set.
            newest = {t: store.latest_version(t) for t in T.STAGE1}  # one log read per table
            moved = {t: v for t, v in newest.items() if v != report.versions[t]}
            if moved:
                raise PublishError(f"{report.dt}: another run committed to {sorted(moved)} while this one published "
                                   f"(newest versions {moved}, this run's {report.versions}); rerun the date")
        except BaseException:  # (a SIGTERM between two commits too: the date is never left half-committed)
            # A commit failed part-way: undo this run's commits now (a killed run is undone by the next).
            recover(store, plog)
            discard(store, staged)
            raise
        latest = plog.latest()
        dates = {**latest["dates"], report.dt: {"fingerprint": inputs.fingerprint, "run_id": run_id,
                                                "files": inputs.own_files,
                                                "earlier": _earlier_builds(inputs.published, report.dt,
                                                                           inputs.lookback_days)}}
        later = _built_before_an_earlier_rebuild(dates, [x for x in dates if x > report.dt], inputs.lookback_days)
        if later:
            report.note = "; ".join(filter(None, [report.note, (
                f"published later date(s) {later} read this date and are stale until rebuilt (a --date {later[0]} "
                f"--end-date {later[-1]} range, or the range this run goes on with); a later date is refused until "
                "then")]))
        plog.append({"dt": report.dt, "run_id": run_id, "status": "published",
                     "tables": {**latest["tables"], **report.versions}, "dates": dates,
                     "rows": report.counts["table_rows"]})


def build_date(spark, cfg: Config, store: TableStore, date: str, run_id: str,
               progress: Callable[[str], None] | None = None, allow_empty: bool = False,
               force: bool = False) -> DateReport:
    """Build, verify and publish every stage-1 table partition of one date; return its report.

    A date whose fingerprint equals its published one is `unchanged` (nothing committed) unless
    `force` (e.g. after a code change that did not bump RULES_VERSION).

    `progress` receives a line per table staged/committed. Raises InputError (input missing, empty or
    unreadable), PublishError (earlier dates unpublished, lock held) or VerifyError (counts do not add
    up); in each case nothing of the date was committed."""
    say = progress or (lambda line: log.info(line))
    t0 = time.perf_counter()
    plog = PublishLog(cfg.tables_root, store.spark)
    inputs = gather_inputs(spark, cfg, plog, date, allow_empty)
    say(f"  {date} inputs gathered and fingerprinted: {time.perf_counter() - t0:.1f}s")
    try:
        previous = inputs.published.get(date)
        if previous and previous.get("fingerprint") == inputs.fingerprint and not force:
            return DateReport(dt=date, status="unchanged", note=(
                f"inputs and config identical to the published run {previous.get('run_id')}; nothing committed"))
        staged, report = compute(spark, cfg, store, inputs, run_id, progress)
        say(f"  {date} computed and staged: {time.perf_counter() - t0:.1f}s")
        verify(store, staged, report, inputs)
        commit(store, plog, staged, report, inputs, run_id, progress)
        say(f"  {date} verified and published: {time.perf_counter() - t0:.1f}s")
        return report
    finally:
        release(inputs.catalog)


def log_date(report: DateReport, step: int) -> None:
    """One date's report printed, and logged to the active MLflow run: status and table versions as
    tags, the integer counts as metrics at `step`."""
    import mlflow

    print(report.render(), flush=True)
    mlflow.set_tag(f"status.{report.dt}", report.status)
    mlflow.log_metrics({k: v for k, v in report.counts.items() if isinstance(v, int)}, step=step)
    mlflow.set_tags({f"table_version.{t}.{report.dt}": str(v) for t, v in report.versions.items()})


@contextlib.contextmanager
def log_reports(reports: list[DateReport]):
    """The run's build_samples_report.json artifact, written also when a date fails part-way."""
    import mlflow

    try:
        yield reports
    finally:
        mlflow.log_text(report_json(reports), "build_samples_report.json")


def report_json(reports: list[DateReport]) -> str:
    return json.dumps([{"dt": r.dt, "status": r.status, "counts": r.counts, "versions": r.versions,
                        "note": r.note} for r in reports], indent=2)

