"""Stage 1 transforms: raw search log -> validated events -> PV samples, CTR log and training rows.

Every function here is a pure DataFrame -> DataFrame transform (the job wires them together and writes).
The rules are the paper's (section 4.2 "Pre-training dataset"), made precise in DESIGN.md:
- a PV is one result page (pv_id) shown to a user; an impression is positive when the same user
  clicked that item on that PV;
- click history: the user's last `l_click` distinct clicked items strictly before the PV's timestamp,
  most recent first (index 0 is the latest click);
- negative down-sampling keeps a non-clicked impression when a stable hash of (pv_id, item_id, seed)
  falls under `neg_rate`, so every rerun on any cluster size keeps the same rows;
- each PV is trimmed to `l_pv` items, positives first then by position; PVs without a positive or
  without history are dropped with a counted reason.
Rows that cannot be used get a `reason` instead of disappearing; the job writes them to `quarantine`.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

# The raw log's contract: each line is ONE JSON object; these fields have these JSON types (null is
# allowed and handled by the semantic checks). A value of another type is quarantined as
# `wrong_type:<field>`, never coerced. Other fields are ignored (producers add fields over time).
EVENT_FIELDS = {"event_id": "string", "event_type": "string", "ts": "string", "user_id": "string",
                "pv_id": "string", "query": "string", "item_id": "string", "session_id": "string",
                "items": "string_list"}
CATALOG_FIELDS = {"item_id": "string", "category": "string", "title": "string", "image_uri": "string",
                  "first_seen_dt": "string", "price": "number"}
EVENT_TYPES = ("pv", "click")
# What sessionize, click_history and label_pvs read of a valid event (and pass on to the samples).
VALID_EVENT_COLUMNS = ("event_id", "event_type", "ts", "user_id", "pv_id", "query", "items", "item_id",
                       "session_id", "clicked_items", "dt")
# What pv_samples and ctr_log read of a labelled PV (the page's `items` live on in `impressions`).
LABELLED_COLUMNS = ("user_id", "session_id", "pv_id", "query", "ts", "click_history", "click_history_ts",
                    "impressions", "repeated_on_page", "dt")
# courier_train's drop reasons, in the order they are tested (the first that holds is the row's)
TRAIN_DROP_REASONS = ("no_positive_image", "no_history_image")
_HASH_BUCKETS = 1 << 30
_SPARK_TYPES = {"string": T.StringType(), "string_list": T.ArrayType(T.StringType()), "number": T.DoubleType()}


def _first_reason(*cases: tuple[Column, str]) -> Column:
    """The first matching reason of an ordered list of (condition, reason); null when none matches."""
    expr = None
    for cond, reason in cases:
        expr = F.when(cond, F.lit(reason)) if expr is None else expr.when(cond, F.lit(reason))
    return expr.otherwise(F.lit(None).cast("string"))


class _Reject(Exception):
    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise _Reject("bad_json", "duplicate key " + next(k for k in keys if keys.count(k) > 1))
    return dict(pairs)


def _no_constant(name):
    raise _Reject("bad_json", f"{name} is not JSON")


# One decoder for every line (stateless between calls): duplicate keys and NaN/Infinity are rejected.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)


def _type_ok(value, kind: str) -> bool:
    if value is None:
        return True
    if kind == "string":
        return isinstance(value, str)
    if kind == "string_list":
        return isinstance(value, list) and all(isinstance(v, str) or v is None for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # A number column holds a double: 1e400 would read as infinity and an integer past 1.8e308 would
    # not convert at all, so a number outside the finite doubles is not of the type either.
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _utf8_ok(value) -> bool:
    strings = value if isinstance(value, list) else [value]
    try:
        for v in strings:
            if isinstance(v, str) and not v.isascii():
                v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_line(data: bytes, fields: dict) -> tuple[dict | None, str, str | None, str | None]:
    """(values, text, reason, detail) for one raw line; a pure function (the fuzz test calls it too).

    Strict: UTF-8 (else bad_encoding), not blank (blank_line), exactly one JSON object (bad_json;
    anything after it: trailing_content), each contract field of its JSON type (wrong_type:<field>)
    and free of unpaired surrogate escapes such as "\\ud800" (bad_json: not storable as UTF-8).
    `text` is the line decoded with undecodable bytes replaced by U+FFFD, readable by every reader.
    """
    try:
        strict = text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, data.decode("utf-8", errors="replace"), "bad_encoding", f"invalid UTF-8 at byte {e.start}"
    try:
        if not strict.strip():
            raise _Reject("blank_line")
        body = strict.lstrip(" \t\r\n\ufeff")
        try:
            obj, end = _DECODER.raw_decode(body)
        except json.JSONDecodeError as e:
            raise _Reject("bad_json", e.msg) from None
        except ValueError as e:  # an integer over Python's 4,300 digits
            raise _Reject("bad_json", str(e).split(":")[0]) from None
        except RecursionError:
            raise _Reject("bad_json", "nested too deeply") from None
        if body[end:].strip(" \t\r\n"):
            raise _Reject("trailing_content", f"{len(body) - end} characters after the object")
        if not isinstance(obj, dict):
            raise _Reject("bad_json", f"a JSON {type(obj).__name__}, not an object")
        for name, kind in fields.items():
            if not _type_ok(obj.get(name), kind):
                found = type(obj.get(name)).__name__
                raise _Reject(f"wrong_type:{name}", f"{found} outside the finite doubles" if found in ("int", "float")
                              else f"{found}, expected {kind}")
            if not _utf8_ok(obj.get(name)):  # JSON allows "\ud800"; a string column cannot hold it
                raise _Reject("bad_json", f"unpaired surrogate escape in {name}")
    except _Reject as r:
        return None, text, r.reason, r.detail
    return {name: obj.get(name) for name in fields}, text, None, None


# What makes a line "plain": read by Spark's JSON parser (Jackson) exactly as the strict parser reads it.
_WS = r"[ \t\n\r]*+"
_STRING = r'"[^"]*+"'  # a whole string: a plain line has no backslash, so no quote is escaped
_SCALAR = r'[^"{}\[\],: \t\n\r]++'  # a number, true, false or null (Jackson checks the spelling)


def _plain_shape(fields: dict) -> str:
    """A regex for the whole line: one object of members separated by commas, each contract field's
    value opening as its type allows (a string field: a string or null; a string list: null or a flat
    list of strings and nulls; a number: one scalar token) and any other key's value a string, a
    scalar or a flat list. One pass per line (ten regexes over the line before: 2.7 -> 1.5 s at 1x
    the bench preset); the quantifiers are possessive, so a line of 200,000 members does not recurse."""
    def keys(*kinds):
        return "|".join(re.escape(n) for n, k in fields.items() if k in kinds)

    element = rf"(?:{_STRING}|null)"
    opens_as = {"string": element,
                "string_list": rf"(?:null|\[{_WS}(?:{element}{_WS}(?:,{_WS}{element}{_WS})*+)?+\])",
                "number": _SCALAR}
    members = [rf'"(?:{keys(kind)})"{_WS}:{_WS}{value}' for kind, value in opens_as.items() if keys(kind)]
    # Any other key: not a contract field's name (which the lookahead leaves to its own branch above).
    members.append(rf'"(?!(?:{keys(*opens_as)})")[^"]*+"{_WS}:{_WS}'
                   rf'(?:{_STRING}|{_SCALAR}|\[(?:[^"\[\]{{}}]|{_STRING})*+\])')
    member = "(?:" + "|".join(members) + ")"
    return rf"\A\{{{_WS}(?:{member}(?:{_WS},{_WS}{member})*+)?+{_WS}\}}\z"


_MALFORMED = "_courier_malformed"
_JACKSON_STRICT = {"allowSingleQuotes": "false", "allowNonNumericNumbers": "false", "mode": "PERMISSIVE",
                   "columnNameOfCorruptRecord": _MALFORMED}


def _contract_fields(fields: dict) -> list:
    """The contract's fields as Spark struct fields, in contract order."""
    return [T.StructField(n, _SPARK_TYPES[k]) for n, k in fields.items()]


def _strict_object(fields: dict) -> Column:
    """from_json of the contract fields under the JSON standard's rules (Spark's defaults allow
    single quotes and NaN); `_courier_malformed` holds the line where Jackson could not read it (its
    limits, such as numbers over 1,000 digits, included)."""
    schema = T.StructType(_contract_fields(fields) + [T.StructField(_MALFORMED, T.StringType())])
    return F.from_json("value", schema, _JACKSON_STRICT)


def plain_line(fields: dict, parsed: Column | None = None) -> Column:
    """True where the strict parser (`parse_line`) would accept the line `value` and read the values
    `from_json` reads; false for every other line, which the strict parser then judges.

    Plain: valid UTF-8 (Spark hands Jackson U+FFFD for bad bytes); no backslash, so every quote
    opens or closes a string and no key is escaped; the line is one object of the shape
    `_plain_shape` allows (braces only as its first and last character, so the object read is the
    whole line: from_json ignores what follows an object; each contract field's value opening as its
    type allows: from_json would read a number into a string field as its text); read by Jackson
    under the standard's rules; distinct keys. A number must be a finite double (Jackson and Python
    both round a JSON number to the nearest double). The test compares both paths line by line.
    parsed: `_strict_object(fields)` when the caller has it already."""
    value = F.col("value")
    parsed = _strict_object(fields) if parsed is None else parsed
    not_finite = F.lit(False)
    for name in (n for n, k in fields.items() if k == "number"):  # 1e400 reads as infinity
        not_finite = not_finite | F.isnan(parsed[name]) | (F.abs(parsed[name]) == float("inf"))
    keys = F.json_object_keys("value")
    return F.coalesce(
        (F.decode(value.cast("binary"), "UTF-8") == value)
        & ~value.contains("\\")
        & value.rlike(_plain_shape(fields))
        & parsed[_MALFORMED].isNull()
        & (F.size(F.array_distinct(keys)) == F.size(keys))
        & ~not_finite, F.lit(False))


def parse_json_lines(raw: DataFrame, fields: dict) -> DataFrame:
    """Raw lines (value, dt, file) -> (value, raw_b64, dt, file, <fields>, reason, detail), one row
    per line (file: the input file's name, for per-file counts).

    Two paths with one result. Spark's JSON functions alone would coerce any value into a string field
    and ignore what follows the first object on a line (measured with from_json), silently keeping
    half of a line holding two events. So a line goes to `from_json` in the JVM only when
    `plain_line` shows that the strict parser (`parse_line`) would accept it with the same values;
    every other line - the bad ones, and valid ones that are merely unusual (escapes, braces in a
    string) - goes to `parse_line` on the executors (a pandas UDF handed only those lines' bytes),
    in the same pass.
    value: the line as readable text (U+FFFD where bytes were not UTF-8); raw_b64: the original bytes,
    base64, for lines that were not valid UTF-8 (null otherwise).
    """
    value = F.col("value")
    routed = raw.withColumn("_obj", _strict_object(fields)).withColumn("_plain", plain_line(fields, F.col("_obj")))
    # One pass: the strict parser is handed the bytes of the lines that are not plain (null for the rest).
    judged = routed.withColumn("_strict", _strict_parser(fields)(F.when(~F.col("_plain"), value.cast("binary"))))
    plain, strict = F.col("_plain"), F.col("_strict")
    return judged.select(
        F.when(plain, value).otherwise(strict["text"]).alias("value"), strict["raw_b64"].alias("raw_b64"),
        "dt", "file", *[F.when(plain, F.col("_obj")[n]).otherwise(strict[n]).alias(n) for n in fields],
        strict["reason"].alias("reason"), strict["detail"].alias("detail"))


def _strict_parser(fields: dict):
    """A pandas UDF: raw line bytes -> struct(text, raw_b64, <fields>, reason, detail) by `parse_line`,
    on the executors; a null line gives a null struct (nothing to judge)."""
    schema = T.StructType([T.StructField("text", T.StringType()), T.StructField("raw_b64", T.StringType())]
                          + _contract_fields(fields)
                          + [T.StructField("reason", T.StringType()), T.StructField("detail", T.StringType())])

    @F.pandas_udf(schema)
    def strict(lines: pd.Series) -> pd.DataFrame:
        import base64

        out = {name: np.full(len(lines), None, dtype=object) for name in schema.names}
        # Most lines are plain (null here): visit only the others (0.84 -> 0.31 s of CPU per 870k lines).
        for i in np.flatnonzero(lines.notna().to_numpy()):
            data = lines.iat[i]
            values, out["text"][i], reason, out["detail"][i] = parse_line(data, fields)
            out["reason"][i] = reason
            if reason == "bad_encoding":
                out["raw_b64"][i] = base64.b64encode(data).decode("ascii")
            for name, kind in fields.items():
                out[name][i] = None if values is None else _as_spark(values[name], kind)
        return pd.DataFrame(out)

    return strict


# A date and a time of day to the minute at least, as ISO 8601 writes them (or a space for the T).
TS_SHAPE = r"^\s*\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}"


def _missing(column: str) -> Column:
    """No value, or a blank one: an empty user_id (logged-out traffic) would merge every such user's clicks
    into one history, an empty session_id every such page into one session."""
    return F.col(column).isNull() | (F.trim(column) == "")


def parse_events(raw: DataFrame, ts_skew_minutes: int) -> DataFrame:
    """Raw JSON lines (value, dt) -> one row per line with typed fields and a `reason` (null = valid).

    Reasons, first match wins: the parser's (bad_encoding, blank_line, bad_json, trailing_content,
    wrong_type:<field>), then bad_event_type (missing or not pv/click), null_id (an id missing or blank; a
    blank session_id reads as none: the session is derived), bad_timestamp,
    ts_outside_date (outside the date folder's UTC day widened by ts_skew_minutes), empty_pv.
    """
    # ts parsed once, as its own column: inline, to_timestamp would run once per use below (the checks
    # are branches of one CASE WHEN, which Spark's common-subexpression elimination leaves alone); 1.7 s
    # of 8.8 s at 1x the bench preset.
    # Spark's cast reads far more than a timestamp: a date alone as its midnight, a year as 1 January, a
    # time alone as that time today (the day of the run, so a rerun could judge the line otherwise).
    # Only a date with a time of day is one; the rest (seconds, fraction, zone) is left to the cast.
    parsed = parse_json_lines(raw, EVENT_FIELDS).withColumnRenamed("ts", "ts_raw") \
        .withColumn("_ts", F.when(F.col("ts_raw").rlike(TS_SHAPE), F.to_timestamp("ts_raw")))
    is_pv = F.col("event_type") == "pv"
    ts = F.col("_ts")
    day_start = F.unix_micros(F.to_timestamp("dt"))
    skew = ts_skew_minutes * 60 * 1_000_000
    outside = ((F.unix_micros(ts) < day_start - skew)
               | (F.unix_micros(ts) >= day_start + 86_400 * 1_000_000 + skew))
    checked = F.coalesce("reason", _first_reason(
        (F.col("event_type").isNull() | ~F.col("event_type").isin(*EVENT_TYPES), "bad_event_type"),
        (_missing("event_id") | _missing("user_id") | _missing("pv_id") | (~is_pv & _missing("item_id")), "null_id"),
        (ts.isNull(), "bad_timestamp"),
        (outside, "ts_outside_date"),
        (is_pv & (F.col("items").isNull() | (F.size("items") == 0)
                  | F.exists("items", lambda x: x.isNull())), "empty_pv"),
    ))
    # the checks' reason as a column too: the detail reads it again
    reason = F.col("_reason")
    return parsed.withColumn("_reason", checked).select(
        "value", "raw_b64", "dt", "file", "event_id", "event_type", ts.alias("ts"), "user_id", "pv_id", "query",
        "items", "item_id", F.when(~_missing("session_id"), F.col("session_id")).alias("session_id"),
        reason.alias("reason"),
        F.when(F.col("reason").isNotNull(), F.col("detail"))
        .when(reason == "ts_outside_date", F.concat(F.lit("ts "), F.col("ts_raw"))).alias("detail"),
    )


def mark_duplicates(events: DataFrame) -> DataFrame:
    """Among valid rows: the same event_id, or the same pv_id on PV events, with different content ->
    every copy `conflicting_duplicate` (which one is right cannot be known); identical copies ->
    all but the earliest `duplicate`. The earliest is by (dt, ts, event_id, raw text): deterministic
    whatever the partitioning. Invalid rows (already quarantined) take no part.

    Two shuffles, one sort each: per key, the rank and the content check share one window (the
    copies differ when the smallest and the largest content differ).
    """
    valid = F.col("reason").isNull()
    is_pv = F.col("event_type") == "pv"
    content = F.struct("event_type", "ts", "user_id", "pv_id", "query", "items", "item_id", "session_id")
    # Sort keys as columns: windows ordered by the same columns share one sort (an expression in
    # orderBy becomes a new column per window, and a new sort).
    events = events.withColumn("_invalid", ~valid).withColumn("_not_pv_row", ~(valid & is_pv))
    order = ["_invalid", "dt", "ts", "event_id", "value"]  # valid rows rank first

    def differs(among: Column, w: Window) -> Column:
        # null fields compare equal (<=>), as they are equal content
        whole = w.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
        return ~F.min(F.when(among, content)).over(whole).eqNullSafe(F.max(F.when(among, content)).over(whole))

    by_event = Window.partitionBy("event_id").orderBy(*order)
    by_event_rows = events.withColumn("_differs_e", differs(valid, by_event)) \
        .withColumn("_rank_e", F.row_number().over(by_event))
    # The valid PV rows of a pv_id rank among themselves: they sort ahead of the page's other rows.
    by_pv = Window.partitionBy("pv_id").orderBy("_not_pv_row", *order)
    by_pv_rows = by_event_rows.withColumn("_differs_p", differs(valid & is_pv, by_pv)) \
        .withColumn("_rank_p", F.row_number().over(by_pv))
    return by_pv_rows.withColumn("reason", F.coalesce("reason", F.when(valid, _first_reason(
        (F.col("_differs_e") | (is_pv & F.col("_differs_p")), "conflicting_duplicate"),
        ((F.col("_rank_e") > 1) | (is_pv & (F.col("_rank_p") > 1)), "duplicate"),
    )))).drop("_invalid", "_not_pv_row", "_differs_e", "_rank_e", "_differs_p", "_rank_p")


def _as_spark(value, kind: str):
    if value is None:
        return None
    if kind == "number":
        return float(value)
    return value


def unknown_item_events(events: DataFrame, items: DataFrame) -> DataFrame:
    """(event_id) of each valid event that references an item not in the catalog `items` (item_id, dt)
    of its own date or an earlier one - a valid PV listing one, a valid click on one - once each:
    usually few. Each reference is matched against the broadcast catalog.

    An event is judged by the catalog as it stood on the event's date, so an earlier date re-read for
    click history gets the verdict its own build gave: an item first listed on a later date does not
    make that date's quarantined events valid."""
    # One valid definition per item (parse_catalog); its date is the first date the item is known on.
    known = items.groupBy(F.col("item_id").alias("_known")).agg(F.min("dt").alias("_known_dt"))
    refs = (events.where(F.col("reason").isNull())
            .select("event_id", "dt", F.explode(F.when(F.col("event_type") == "pv", F.col("items"))
                                                .otherwise(F.array("item_id"))).alias("_ref")))
    return (refs.join(F.broadcast(known), (refs["_ref"] == known["_known"]) & (known["_known_dt"] <= refs["dt"]),
                      how="left_anti")
            .select("event_id").distinct())


def mark_unknown_items(events: DataFrame, unknown: DataFrame, broadcast: bool = True) -> DataFrame:
    """Valid events whose event_id is in `unknown` (`unknown_item_events`) get reason `unknown_item`.

    A left join by event_id: ids are unique among valid rows after mark_duplicates, and rows already
    rejected keep their reason. With `broadcast` (the ids are few) the events are not shuffled and
    keep their partitioning - by pv_id after mark_duplicates, the one mark_bad_clicks needs next."""
    ids = unknown.select(F.col("event_id").alias("_unknown"))
    ids = F.broadcast(ids) if broadcast else ids
    return (events.join(ids, events["event_id"] == ids["_unknown"], how="left")
            .withColumn("reason", F.coalesce("reason", F.when(F.col("_unknown").isNotNull(), F.lit("unknown_item"))))
            .select(*events.columns))


# mark_bad_clicks' reasons: a click's verdict that depends on the page it refers to
ORPHAN_CLICK = "orphan_click"
CLICK_REASONS = (ORPHAN_CLICK, "click_user_mismatch", "click_not_on_pv", "click_before_pv", "duplicate_click")


def mark_bad_clicks(events: DataFrame) -> DataFrame:
    """Valid clicks that cannot label an impression get a reason, and each valid PV its
    `clicked_items` (the items of its valid clicks in the same date's log: its positives; null on other
    rows). `pv_on_other_date` (true / false on valid clicks, null on other rows): the click's PV is in
    another date's log, e.g. a session across midnight. Such a click stays valid (it is a real click:
    later click histories hold it) but labels nothing: a date's labels come from its own log only, so
    they do not depend on a later date's files or on the order dates are built in.

    orphan_click: no valid PV with that pv_id was read; click_user_mismatch: the PV was shown to another
    user; click_not_on_pv: the item was not on the page; click_before_pv: the click is timed before its
    PV; duplicate_click: a second click on the same (pv, item) (labels are 0/1; of the clicks that
    passed the other checks the one kept is the earliest in the page's own date's log, else the earliest).

    Windows by pv_id (a pv_id has at most one valid PV after mark_duplicates), no join: one shuffle,
    none when the input is already partitioned by pv_id. The clicked items come from these windows
    too: label_pvs, after the shuffle by user, then needs no sort by page.
    """
    valid = F.col("reason").isNull()
    is_click = valid & (F.col("event_type") == "click")
    valid_pv = valid & (F.col("event_type") == "pv")  # this step leaves PVs' reasons as they are
    by_pv = Window.partitionBy("pv_id")
    pv = F.first(F.when(valid_pv, F.struct(
        F.col("user_id").alias("user_id"), F.col("items").alias("items"), F.col("ts").alias("ts"),
        F.col("dt").alias("dt"))), ignorenulls=True).over(by_pv)
    first = _first_reason(
        (F.col("_pv.user_id").isNull(), ORPHAN_CLICK),
        (F.col("_pv.user_id") != F.col("user_id"), "click_user_mismatch"),
        (~F.array_contains("_pv.items", F.col("item_id")), "click_not_on_pv"),
        (F.col("ts") < F.col("_pv.ts"), "click_before_pv"),
    )
    # The valid clicks of a (pv, item) rank among themselves (_is_click in the key keeps the rest out); one
    # logged on the page's own date first: only such a click labels, and the one kept must be the one
    # that can (an earlier date's copy, e.g. a page logged just after midnight, labels nothing).
    other_date = F.coalesce(F.col("dt") != F.col("_pv.dt"), F.lit(True))
    w = (Window.partitionBy("pv_id", "item_id", "_is_click")
         .orderBy(F.col("_first").isNotNull(), other_date, "ts", "event_id"))
    checked = (events.withColumn("_pv", pv).withColumn("_is_click", is_click)
               .withColumn("_first", F.when(F.col("_is_click"), first))
               .withColumn("reason", F.when(F.col("_is_click"), F.coalesce(
                   "_first", F.when(F.row_number().over(w) > 1, F.lit("duplicate_click")))).otherwise(F.col("reason"))))
    # A click still valid here passed every check above, so its PV is valid and its user's (the
    # duplicate clicks left out only repeat an item already in the set).
    same_date = F.col("_pv.dt") == F.col("dt")
    clicked = F.collect_set(F.when(F.col("_is_click") & valid & same_date, F.col("item_id"))).over(by_pv)
    return checked.select(*events.columns, F.when(valid_pv, clicked).alias("clicked_items"),
                          F.when(F.col("_is_click") & valid, ~same_date).alias("pv_on_other_date"))


def keep_published_click_verdicts(events: DataFrame, date: str, published: DataFrame,
                                  broadcast: bool = True) -> DataFrame:
    """A click of an earlier date in `events` (read for click history) whose page was not read here
    (mark_bad_clicks: `orphan_click`) takes the verdict its own date's build published: that build
    read the days before it, this one reads only the history window (a click just after midnight at
    the start of the window refers to a page a day further back; re-judged here it would leave the
    histories). Every other verdict stands: where the page was read, this build judges it with at least
    the context the earlier one had. `published`: (dt, event_id, reason) of the click reasons those
    builds quarantined; a click in none of them passed.

    With `broadcast` (the verdicts are few) a broadcast left join: the events keep their partitioning."""
    verdicts = (published.groupBy(F.col("dt").alias("_v_dt"), F.col("event_id").alias("_v_id"))
                .agg(F.min("reason").alias("_v_reason")))
    verdicts = F.broadcast(verdicts) if broadcast else verdicts
    page_not_read = ((F.col("dt") < F.lit(date)) & (F.col("event_type") == "click")
                     & (F.col("reason") == ORPHAN_CLICK))
    joined = events.join(verdicts, (events["dt"] == verdicts["_v_dt"]) & (events["event_id"] == verdicts["_v_id"]),
                         how="left")
    return joined.select(*[F.when(page_not_read, F.col("_v_reason")).otherwise(F.col("reason")).alias("reason")
                           if c == "reason" else F.col(c) for c in events.columns])


def _position(array: Column, value: Column) -> Column:
    """1-based int position of value's first occurrence in array, 0 when absent (array_position, whose
    Python wrapper in Spark 3.5 takes only a literal value)."""
    return F.call_function("array_position", array, value).cast("int")


def _with_micros(events: DataFrame) -> DataFrame:
    """events with `_t` = ts in epoch microseconds, the timeline's sort key (kept when already there)."""
    return events if "_t" in events.columns else events.withColumn("_t", F.unix_micros("ts"))


def sessionize(events: DataFrame, gap_minutes: int) -> DataFrame:
    """Add session_id to valid events: the log's own session id, else a new session per user where the
    gap since the user's previous event is longer than `gap_minutes` (exactly `gap_minutes` stays in
    the session; id = user_id + ':' + the session's first epoch second). Also adds `_t`
    (ts in microseconds), which click_history's windows sort by as these do."""
    # Ordered by the columns (_t, event_id) (as click_history): one sort serves every window by user.
    events = _with_micros(events)
    w = Window.partitionBy("user_id").orderBy("_t", "event_id")
    gap = F.col("_t") - F.lag("_t").over(w)
    starts = events.withColumn("_new", (gap.isNull() | (gap > gap_minutes * 60 * 1_000_000)).cast("int"))
    starts = starts.withColumn("_start", F.when(F.col("_new") == 1, F.unix_seconds("ts")))
    run = w.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    derived = F.concat_ws(":", "user_id", F.last("_start", ignorenulls=True).over(run).cast("string"))
    return (starts.withColumn("session_id", F.coalesce("session_id", derived))
            .drop("_new", "_start"))


def click_history(events: DataFrame, l_click: int) -> DataFrame:
    """Add click_history (the user's last `l_click` distinct clicked items strictly before the PV's
    timestamp, most recent first) and click_history_ts to every PV row of `events` (a user's valid
    PVs and clicks; null on click rows).

    A click at the PV's own timestamp or later is not history (kept: clicks timed strictly before).
    A window by user over PVs and clicks together, ordered as sessionize's: the same shuffle and the
    same sort, no join.
    """
    # Clicks strictly before the row's timestamp: a range frame over its microseconds ends 1 us before
    # it, so clicks at the same timestamp stay out. Ordered by the columns sessionize sorts by
    # (_t, event_id): one sort serves every window by user.
    before = (Window.partitionBy("user_id").orderBy("_t")
              .rangeBetween(Window.unboundedPreceding, -1))
    clicked = F.when(F.col("event_type") == "click", F.struct(F.col("_t").alias("t"), F.col("item_id").alias("item")))
    is_pv = F.col("event_type") == "pv"
    # Newest first (sort_array: array_sort reversed, in generated code rather than interpreted);
    # array_distinct keeps the first (most recent) occurrence of an item.
    newest_first = F.sort_array(F.collect_list(clicked).over(before), asc=False)
    with_hist = _with_micros(events).withColumn("_hist", F.when(is_pv, newest_first))
    items = F.slice(F.array_distinct(F.col("_hist")["item"]), 1, l_click)
    # _hist is newest first, so an item's first position is its latest click.
    latest_ts = F.transform("click_history", lambda it: F.timestamp_micros(
        F.element_at(F.col("_hist")["t"], _position(F.col("_hist")["item"], it))))
    return (with_hist.withColumn("click_history", items)
            .withColumn("click_history_ts", latest_ts)
            .drop("_hist"))


def keep_negative(pv_id: Column, item_id: Column, neg_rate: float, seed: int) -> Column:
    """Stable down-sampling decision: keep when hash(pv_id, item_id, seed) falls under neg_rate."""
    bucket = F.pmod(F.xxhash64(pv_id, item_id, F.lit(seed)), F.lit(_HASH_BUCKETS))
    return bucket < F.lit(int(neg_rate * _HASH_BUCKETS))


def label_pvs(events: DataFrame, neg_rate: float, seed: int) -> DataFrame:
    """The PV rows of `events` (valid PVs and clicks) with `impressions`: array of struct(item_id,
    position, label, kept) in position order, where kept = label or the down-sampling keeps it. No
    explode: arrays stay per PV.

    A PV's positives are its `clicked_items` (from mark_bad_clicks); click rows are not read."""
    pvs = events.where(F.col("event_type") == "pv")

    def impression(item: Column, position: Column) -> Column:
        label = F.array_contains("clicked_items", item)
        return F.struct(item.alias("item_id"), position.alias("position"), label.cast("int").alias("label"),
                        (label | keep_negative(F.col("pv_id"), item, neg_rate, seed)).alias("kept"))

    # An item listed twice on a page is one impression at its first position; the repeats are counted
    # (repeated_on_page), not kept. Pages without repeats (nearly all) take their positions from the
    # index: array_position per item scans the page, ~3x the time of the index at 1x the bench.
    firsts = F.array_distinct("items")  # first occurrences, in page order
    imps = (F.when(F.size(firsts) == F.size("items"), F.transform("items", impression))
            # 1-based position of the first occurrence (valid PVs list no null item)
            .otherwise(F.transform(firsts, lambda item: impression(item, _position(F.col("items"), item) - 1))))
    return (pvs.withColumn("impressions", imps)
            .withColumn("repeated_on_page", F.size("items") - F.size("impressions")))


def pv_samples(labelled: DataFrame, l_pv: int, sampling_seed: int) -> DataFrame:
    """PV-grain samples with a `drop_reason` (null = kept): no_positive, then no_history.

    pv_items/pv_labels/pv_positions: the kept impressions sorted positives first, then by position,
    trimmed to l_pv. n_trimmed counts kept impressions cut by the trim.
    """
    # Positives first, then the kept negatives, each in page order (impressions are in position order):
    # the sort by (1 - label, position), without sorting.
    kept = F.concat(F.filter("impressions", lambda s: s["label"] == 1),
                    F.filter("impressions", lambda s: (s["label"] == 0) & s["kept"]))
    trimmed = F.slice(kept, 1, l_pv)
    n_pos = F.size(F.array_remove(F.col("impressions")["label"], 0))  # labels are 0/1
    return labelled.select(
        F.sha2(F.concat_ws("|", "pv_id", F.lit(str(sampling_seed))), 256).substr(1, 16).alias("sample_id"),
        "user_id", "session_id", "pv_id", "query", "ts",
        trimmed["item_id"].alias("pv_items"),
        trimmed["label"].alias("pv_labels"),
        trimmed["position"].alias("pv_positions"),
        F.coalesce("click_history", F.array().cast("array<string>")).alias("click_history"),
        F.coalesce("click_history_ts", F.array().cast("array<timestamp>")).alias("click_history_ts"),
        n_pos.alias("n_pos"),
        F.size("impressions").alias("n_impressions"),
        "repeated_on_page",
        (F.size("impressions") - F.size(kept)).alias("n_neg_dropped"),
        (F.size(kept) - F.size(trimmed)).alias("n_trimmed"),
        _first_reason(
            (n_pos == 0, "no_positive"),
            (F.coalesce(F.size("click_history"), F.lit(0)) == 0, "no_history"),
        ).alias("drop_reason"),
        "dt",
    )


def ctr_log(labelled: DataFrame) -> DataFrame:
    """Impression-grain CTR samples (not grouped, not trimmed; same down-sampling and history)."""
    return (labelled.select("user_id", "session_id", "pv_id", "query", "ts", "click_history", "dt",
                            F.explode(F.filter("impressions", lambda s: s["kept"])).alias("imp"))
            .select("user_id", F.col("imp.item_id").alias("item_id"), "pv_id", "session_id", "query",
                    F.col("imp.position").alias("position"), F.col("imp.label").alias("label"), "ts",
                    F.coalesce("click_history", F.array().cast("array<string>")).alias("history"), "dt"))


def parse_catalog(raw: DataFrame) -> DataFrame:
    """Catalog JSON lines (value, dt) -> items with a `reason` (null = valid).

    Reasons: the parser's (bad_encoding, blank_line, bad_json, trailing_content, wrong_type:<field>),
    null_id (no item_id or image_uri, or a blank one), duplicate_item (an item_id an earlier catalog row already
    defines: an earlier date, or earlier on the same date by raw text; the first definition wins).
    """
    parsed = parse_json_lines(raw, CATALOG_FIELDS)
    reason = F.coalesce("reason", _first_reason(
        (_missing("item_id") | _missing("image_uri"), "null_id"),
    ))
    rows = parsed.withColumn("reason", reason)
    w = Window.partitionBy("item_id").orderBy(F.col("reason").isNotNull(), "dt", "value")
    return rows.select(
        "value", "raw_b64", "dt", "item_id", "category", "title", "price",
        F.coalesce("first_seen_dt", "dt").alias("first_seen_dt"), "image_uri",
        F.coalesce("reason", F.when(F.row_number().over(w) > 1, F.lit("duplicate_item"))).alias("reason"),
        "detail")


IMAGE_RESULT_SCHEMA = T.StructType([
    T.StructField("item_id", T.StringType()),
    T.StructField("image", T.BinaryType()),
    T.StructField("width", T.IntegerType()),
    T.StructField("height", T.IntegerType()),
    T.StructField("sha256", T.StringType()),
    T.StructField("reason", T.StringType()),
    T.StructField("detail", T.StringType()),
])


def decode_images(files: DataFrame, image_px: int, jpeg_quality: int, max_pixels: int) -> DataFrame:
    """(item_id, content) -> IMAGE_RESULT_SCHEMA: each file's bytes validated, centre-cropped to an
    image_px square and JPEG-encoded (etl.images.normalize_image), on the executors over Arrow
    record batches. A bad image gets a reason (image_too_large, image_corrupt) instead of failing the job.
    files may hold (item_id, path) of local files instead: each executor reads them itself, and a file
    gone since it was listed is image_missing."""
    source = "content" if "content" in files.columns else "path"

    def decode_batches(batches):
        import pyarrow as pa

        from etl.images import normalize_image, normalize_local_image

        normalize = normalize_image if source == "content" else normalize_local_image
        types = [pa.binary(), pa.int32(), pa.int32(), pa.string(), pa.string(), pa.string()]
        for batch in batches:  # Arrow record batches: no pandas in between
            rows = [normalize(c, image_px, jpeg_quality, max_pixels) for c in batch.column(source).to_pylist()]
            yield pa.RecordBatch.from_arrays(
                [batch.column("item_id")] + [pa.array([r[i] for r in rows], t) for i, t in enumerate(types)],
                names=IMAGE_RESULT_SCHEMA.names)

    return files.select("item_id", source).mapInArrow(decode_batches, IMAGE_RESULT_SCHEMA)


def _images_by_shuffle(samples: DataFrame, images: DataFrame, l_pv: int, l_click: int) -> DataFrame:
    """samples + (_pv_images, _click_images): each slot's image or null, l_pv / l_click long.
    Any size of image table: slots join the images and regroup by sample (each image moves once per
    reference)."""
    slots = (samples.select("sample_id", F.lit("pv").alias("kind"),
                            F.posexplode("pv_items").alias("slot", "item_id"))
             .unionByName(samples.select("sample_id", F.lit("click").alias("kind"),
                                         F.posexplode("click_history").alias("slot", "item_id"))))
    joined = slots.join(images, on="item_id", how="left")
    grouped = joined.groupBy("sample_id").agg(
        F.array_sort(F.collect_list(F.struct("kind", "slot", "image"))).alias("_slots"))

    def padded(kind: str, n: int) -> Column:
        # Slots sorted by (kind, slot); a slot past the sample's items is null.
        vals = F.transform(F.filter("_slots", lambda s: s["kind"] == kind), lambda s: s["image"])
        return F.concat(vals, F.array_repeat(F.lit(None).cast("binary"), F.lit(n) - F.size(vals)))

    return samples.join(grouped.select("sample_id", padded("pv", l_pv).alias("_pv_images"),
                                       padded("click", l_click).alias("_click_images")), on="sample_id", how="left")


def _images_by_lookup(samples: DataFrame, images: DataFrame, l_pv: int, l_click: int) -> DataFrame:
    """samples + (_pv_images, _click_images), as _images_by_shuffle, for an image table small enough
    to broadcast: one left join per slot against the same broadcast table (Spark ships it once), all
    in the samples' own stage - no shuffle, no sort, each image copied straight into its row."""
    rows = samples
    slot_cols = {"pv": [], "click": []}
    for kind, items, n in (("pv", "pv_items", l_pv), ("click", "click_history", l_click)):
        for k in range(n):
            key, image = f"_{kind}_item_{k}", f"_{kind}_image_{k}"
            table = images.select(F.col("item_id").alias(key), F.col("image").alias(image))
            # get(): null past the array's end (a null key matches nothing)
            rows = rows.withColumn(key, F.get(items, k)).join(F.broadcast(table), on=key, how="left")
            slot_cols[kind].append(image)
    # As from the shuffle join: null arrays for a sample without any item (it has no slot to group).
    has_slots = (F.size("pv_items") > 0) | (F.size("click_history") > 0)
    return rows.select(*samples.columns, F.when(has_slots, F.array(*slot_cols["pv"])).alias("_pv_images"),
                       F.when(has_slots, F.array(*slot_cols["click"])).alias("_click_images"))


def courier_train(samples: DataFrame, item_images: DataFrame, l_pv: int, l_click: int,
                  broadcast_images: bool = False) -> DataFrame:
    """Training rows for stage 2: kept PV samples with their PV and click-history images inline,
    padded to l_pv / l_click with masks (1 = a real item with a usable image).

    drop_reason (null = kept): no_positive_image (no clicked PV item has an image), then
    no_history_image (no history item has an image). broadcast_images: look the images up in a
    broadcast copy (the caller checks that it fits) instead of a shuffle join; the same rows.
    """
    by = _images_by_lookup if broadcast_images else _images_by_shuffle
    with_images = by(samples, item_images.select("item_id", "image"), l_pv, l_click)

    def pad_to(col: str, n: int, pad: Column) -> Column:
        return F.concat(F.col(col), F.array_repeat(pad, F.lit(n) - F.size(col)))

    empty = F.lit(b"").cast("binary")  # a missing image: empty bytes, mask 0
    pv_images = F.transform("_pv_images", lambda b: F.coalesce(b, empty))
    click_images = F.transform("_click_images", lambda b: F.coalesce(b, empty))
    rows = with_images.select(
        "sample_id", "user_id", "session_id", "pv_id", "query", "ts",
        pad_to("pv_items", l_pv, F.lit("")).alias("pv_items"),
        pad_to("pv_labels", l_pv, F.lit(0)).alias("pv_labels"),
        pv_images.alias("pv_images"),
        pad_to("click_history", l_click, F.lit("")).alias("click_history"),
        click_images.alias("click_images"),
        "dt",
    )
    rows = (rows.withColumn("pv_mask", F.transform("pv_images", lambda b: (F.length(b) > 0).cast("int")))
            .withColumn("click_mask", F.transform("click_images", lambda b: (F.length(b) > 0).cast("int"))))
    has_pos_image = F.exists(F.arrays_zip("pv_labels", "pv_mask"),
                             lambda z: (z["pv_labels"] == 1) & (z["pv_mask"] == 1))
    no_positive_image, no_history_image = TRAIN_DROP_REASONS
    return rows.withColumn("drop_reason", _first_reason(
        (~has_pos_image, no_positive_image),
        (~F.array_contains("click_mask", 1), no_history_image),
    )).select("sample_id", "user_id", "session_id", "pv_id", "query", "ts",
              "pv_items", "pv_labels", "pv_mask", "pv_images",
              "click_history", "click_mask", "click_images", "drop_reason", "dt")
