"""The JVM fast path of the line parser gives, line for line, what the strict Python parser gives.

`parse_json_lines` sends a line to `from_json` only when `plain_line` proves the strict parser would
accept it with the same values; every other line goes to `parse_line`. Here thousands of lines - the
log's own shapes, hand-picked traps (escaped keys, case variants, line separators, surrogates, huge
numbers) and random byte edits of both - go through the real Spark path, and the multiset of output rows
must equal what `parse_line` gives for the same bytes: for the search log's contract (strings and a
string list) and the catalog's (with a number: every way of writing one, and numbers no double holds)."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from etl.samples import CATALOG_FIELDS, EVENT_FIELDS, parse_json_lines, parse_line, plain_line

DT = "2026-11-20"
GOOD = {"event_id": "e1", "event_type": "pv", "ts": "2026-11-20T08:00:00Z", "user_id": "u1", "pv_id": "p1",
        "query": "dress", "items": ["i1", "i2"], "session_id": None}
CLICK = {"event_id": "e2", "event_type": "click", "ts": "2026-11-20T08:00:05Z", "user_id": "u1", "pv_id": "p1",
         "item_id": "i2"}

TRAPS = [
    '{"event_id":"e1","User_Id":"u9","user_id":"u1"}',            # keys are case-sensitive
    '{"user\\u005fid":"u1","event_id":"e1"}',                       # an escaped key naming a contract field
    '{"user\\u005fid":7,"event_id":"e1"}',
    '{"user_id":"u1","user\\u005fid":"u2"}',                        # duplicate once unescaped
    '{"user_id":"u1","user_id":"u1"}',                              # duplicate, same value
    '{"a":1,"a":2,"event_id":"e1"}',                                # duplicate outside the contract
    '{"event_id":"e1"}\u2028', '{"event_id":"e1"}\u0085', '{"event_id":"e1"}\r', '{"event_id":"e1"} ',
    '\ufeff{"event_id":"e1"}', ' {"event_id":"e1"}', '\t{"event_id":"e1"}',
    '{"event_id":"e\\ud800"}', '{"event_id":"e\\udfff"}', '{"event_id":"e\\ud83d\\ude00"}', '{"query":"\\uDBFF"}',
    '{"q":"\\ud800","event_id":"e1"}',                              # a surrogate outside the contract
    '{"event_id":"e\\u0000x"}', '{"event_id":"a\\"b\\\\c\\/d\\b\\f\\n\\r\\t"}', '{"event_id":"\\x41"}',
    '{"event_id":"tab\there"}', '{"event_id":"\u00e9t\u00e9 \U0001f457 \ufffd"}',
    '{"n":' + "9" * 150 + ',"event_id":"e1"}', '{"n":1e999,"event_id":"e1"}', '{"n":-0.0e-5,"event_id":"e1"}',
    '{"n":01,"event_id":"e1"}', '{"n":1.,"event_id":"e1"}', '{"n":.5}', '{"n":+1}', '{"n":NaN}', '{"n":-Infinity}',
    '{"event_id":null,"items":null}', '{"items":[]}', '{"items":[null,"i1"]}', '{"items":[1]}', '{"items":[["i1"]]}',
    '{"items":"i1"}', '{"items":{"a":"b"}}', '{"event_id":["e1"]}', '{"event_id":{"x":"e1"}}', '{"event_id":true}',
    '{"event_id":nul}', '{"event_id":"e1",}', '{,"event_id":"e1"}', '{"event_id" "e1"}', '{"event_id":"e1"',
    '{"event_id":"e1"}{"event_id":"e2"}', '{"event_id":"e1"} x', '{"extra":{"user_id":5},"user_id":"u1"}',
    '{"extra":"\\"user_id\\": 5","user_id":"u1"}', '{"extra":[1,{"a":[]}],"user_id":"u1"}',
    '{ "event_id" : "e1" , "items" : [ "i1" , null ] }', '{\t"event_id":\t"e1"\t}',
    '{}', '[]', '[1, 2]', '"text"', 'null', '', '   ', '{"a":true,"b":false,"c":null}',
    "{'event_id':'e1'}", '{"event_id":"e1","n":NaN}', '{"event_id":"e1","n":Infinity}',  # Spark's defaults allow these
    '{"q":"a{b}","event_id":"e1"}', '{"q":"}","event_id":"e1"}', '{"event_id":"e1"}}', '{{"event_id":"e1"}',
    '{"a":"b"} x}', '{"items":["i]1", 5]}', '{"items":["i]1","i2"]}', '{"items":["i1",true]}', '{"items":["null"]}',
    '{"items":["i1"],"q":"items"}', '{"q":"user_id","user_id":5}', '{"x":["user_id"],"user_id":"u"}',
    '{"user_id" : 5}', '{"user_id":\t5}', '{"user_id"\t:"u"}', '{"event_id":"a\x01b"}', '{"event_id":"e1",\x0b"a":1}',
    '{"n":' + "1" * 5000 + '}', '{"n":' + "1" * 1500 + ',"event_id":"e1"}', '{"n":' + "[" * 1500 + "]" * 1500 + "}",
    '{"n":' + "[" * 300 + "]" * 300 + ',"event_id":"e1"}', '{"query":"\u00e9t\u00e9"}'.encode().decode("unicode_escape"),
    '{"event_id":"e1","":"x"}', '{"event_id":"e1","items":["i1" "i2"]}', '{"items":[,"i1"]}', '{"items":["i1",]}',
    '{"event_id":"e1"   }', '{"_courier_malformed":"x","event_id":"e1"}', '{"event_id":"e1","items":[]}',
]


ITEM = {"item_id": "i1", "category": "dress", "title": "Robe", "image_uri": "i1.png", "first_seen_dt": DT,
        "price": 19.9}
NUMBERS = ["0", "-0", "0.0", "-0.0", "-0.0e-5", "1", "-17", "19.9", "0.1", "1e23", "1E5", "1e+5", "2.5E-3",
           "9007199254740993", "123456789012345678901234567890", "1" + "0" * 308, "1" + "0" * 309,
           "1.7976931348623157e308", "1.7976931348623159e308", "1e400", "-1e400", "1e-400", "5e-324", "2e-324",
           "4.9406564584124654e-324", "0." + "0" * 400 + "1", "1" * 999, "1" * 1001, "1" * 5000,
           "01", "1.", ".5", "+1", "NaN", "-Infinity", "0x10", "1_0", '"9.5"', '""', '"NaN"', "true", "null",
           "[1]", '{"a":1}']
CATALOG_TRAPS = ['{"item_id":"i1","price":%s}' % n for n in NUMBERS] + [
    '{"price":%s,"item_id":"i1","image_uri":"i1.png"}' % n for n in ("3", "-3.5", " 7 ", "7 ,")] + [
    '{"price":1,"price":1}', '{"price":1,"Price":"x"}', '{"item_id":"i1","price": -1}', '{"price":-}',
    '{"price":- 1}', '{"price":1e}', '{"price":1e5.5}', '{"title":"price","price":2}', '{"price":[1]}']


def _lines(fields: dict) -> list[bytes]:
    """The log's own shapes, the traps, and random byte edits of both (seeded: the same every run)."""
    rng = random.Random(15)
    if fields is EVENT_FIELDS:
        base = [json.dumps(GOOD), json.dumps(CLICK), json.dumps(GOOD, separators=(",", ":")),
                json.dumps({**GOOD, "query": "robe d'\u00e9t\u00e9 \U0001f457"}, ensure_ascii=False),
                json.dumps({**GOOD, "query": "robe d'\u00e9t\u00e9 \U0001f457"}),
                json.dumps({**CLICK, "extra": {"nested": [1, 2.5, None]}, "price": 1e-7, "ok": True})]
        traps = TRAPS
    else:
        base = [json.dumps(ITEM), json.dumps({**ITEM, "price": 5}), json.dumps({**ITEM, "price": None}),
                json.dumps({**ITEM, "price": -0.25}, separators=(",", ":")), json.dumps({**ITEM, "title": "\u00e9t\u00e9"})]
        traps = CATALOG_TRAPS + TRAPS[:40]
    lines = [s.encode() for s in base + traps]
    alphabet = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b" ", b"\t", b"\x00", b"\x1f", b"n", b"u",
                b"0", b"9", b"e", b"-", b".", b"\xff", b"\xc3", b"\xe2\x80\xa8", b"\xef\xbf\xbd", b"d8", b"'", b"N",
                b"a", b"null", b"[1]"]
    for _ in range(3000):
        data = bytearray(rng.choice(lines[: len(base) + len(traps)]))
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(data))
            edit = rng.random()
            if edit < 0.4:
                data[at:at] = rng.choice(alphabet)
            elif edit < 0.7:
                del data[at:at + rng.randint(1, 3)]
            else:
                data[at:at + 1] = rng.choice(alphabet)
        lines.append(bytes(data))
    return [line for line in lines if b"\n" not in line and b"\r" not in line]  # one line each


def _comparable(v):
    """A field value as the test compares it: lists as tuples, numbers as stored (float.hex: -0.0 is
    not 0.0 there, though Python's == says so)."""
    if isinstance(v, list):
        return tuple(v)
    return float(v).hex() if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _expected_row(data: bytes, fields: dict) -> tuple:
    values, text, reason, detail = parse_line(data, fields)
    return (text, DT, *[None if values is None else _comparable(values[n]) for n in fields], reason, detail)


@pytest.fixture(scope="module", params=["search_log", "catalog"])
def raw(request, spark, tmp_path_factory):
    from pyspark.sql import functions as F

    fields = EVENT_FIELDS if request.param == "search_log" else CATALOG_FIELDS
    path = tmp_path_factory.mktemp("fast_parse") / "part-0.jsonl"
    lines = _lines(fields)
    path.write_bytes(b"\n".join(lines) + b"\n")
    frame = spark.read.text(str(path)).select("value", F.lit(DT).alias("dt"), F.lit(path.name).alias("file"))
    return frame, lines, fields


def test_both_paths_give_what_the_strict_parser_gives(raw):
    from pyspark.sql import functions as F

    frame, lines, fields = raw
    read = [bytes(r[0]) for r in frame.select(F.col("value").cast("binary")).collect()]
    assert sorted(read) == sorted(lines)  # the file holds exactly these lines
    rows = parse_json_lines(frame, fields).collect()
    got = Counter((r["value"], r["dt"], *[_comparable(r[n]) for n in fields], r["reason"], r["detail"]) for r in rows)
    want = Counter(_expected_row(line, fields) for line in lines)
    assert got == want, (sorted(got - want, key=repr)[:5], sorted(want - got, key=repr)[:5])
    # bad encodings keep their bytes
    b64 = {r["raw_b64"] for r in rows if r["reason"] == "bad_encoding"}
    assert len(b64) == len({line for line in lines if parse_line(line, fields)[2] == "bad_encoding"}) > 0


def test_the_fast_path_takes_the_logs_own_lines_and_no_line_the_parser_rejects(raw):
    from pyspark.sql import functions as F

    frame, lines, fields = raw
    flags = frame.select(F.col("value").cast("binary").alias("b"), plain_line(fields).alias("plain")).collect()
    plain = {bytes(r["b"]) for r in flags if r["plain"]}
    rejected = {line for line in lines if parse_line(line, fields)[2] is not None}
    assert len(rejected) > 1000 and not plain & rejected
    assert len(plain) > 150  # the fast path is exercised, edited lines included
    if fields is CATALOG_FIELDS:
        assert {json.dumps(ITEM).encode(), json.dumps({**ITEM, "price": 5}).encode()} <= plain
        numbers = {n for n in NUMBERS if ('{"item_id":"i1","price":%s}' % n).encode() in plain}
        assert {"-0", "-0.0", "1e23", "9007199254740993", "1" + "0" * 308, "5e-324", "1e-400"} <= numbers
        assert not numbers & {"1" + "0" * 309, "1e400", "-1e400", "1" * 1001, "NaN", '"9.5"'}
        return
    assert {json.dumps(GOOD).encode(), json.dumps(CLICK).encode()} <= plain
    # unusual but valid lines are left to the strict parser: the route is conservative, not exact
    assert '{"event_id":"e1"} '.encode() not in plain and parse_line(b'{"event_id":"e1"} ', EVENT_FIELDS)[2] is None


def test_a_line_of_many_members_is_judged_without_recursion(spark):
    """The shape regex runs in the JVM on every line: a page of 200,000 items or a line of 200,000 keys
    must not overflow the task's stack (Java's regex engine recurses on a non-possessive repeated group)."""
    page = {k: v for k, v in GOOD.items() if k != "items"}
    many_items = json.dumps({**page, "items": [f"i{i}" for i in range(200_000)]})  # the list ends the line
    many_keys = "{" + ",".join(f'"k{i}":{i}' for i in range(200_000)) + ',"event_id":"e1"}'
    wrong_last = many_items[:-2] + ',7]}'  # the 200,001st element is not a string
    frame = spark.createDataFrame([(many_items,), (many_keys,), (wrong_last,)], "value string")
    assert [r[0] for r in frame.select(plain_line(EVENT_FIELDS)).collect()] == [True, True, False]
