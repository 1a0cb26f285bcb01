"""Property-based fuzz of stage 1: random valid events mixed with random corruptions (bytes, types,
duplicates, timestamps, truncations, two objects on a line, blank lines). For every example the job
finishes, its identities hold (build_date verifies them before publishing), and every input line is in
exactly one place: a quarantine row holding its bytes, or a valid event counted into the outputs.
Few examples, one Spark session: each runs the real build of one date."""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

from conftest import write_catalog, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DATE = "2026-11-20"
ITEMS = [f"i{k}" for k in range(1, 7)]
CORRUPTIONS = ("bytes", "type", "duplicate", "conflict", "ts_far", "ts_garbage", "truncate", "two_objects",
               "blank", "unknown_item", "bad_type_value")


@st.composite
def day_log(draw) -> list[bytes]:
    lines: list[bytes] = []
    events: list[dict] = []
    for p in range(draw(st.integers(3, 12))):
        user = f"u{draw(st.integers(1, 3))}"
        t = draw(st.integers(0, 86_000))
        items = draw(st.lists(st.sampled_from(ITEMS), min_size=1, max_size=6))  # repeats allowed
        pv_id = f"p{p}"
        events.append({"event_id": f"e{p}", "event_type": "pv", "ts": _ts(t), "user_id": user, "pv_id": pv_id,
                       "query": "dress", "items": items})
        for k, item in enumerate(draw(st.lists(st.sampled_from(items), max_size=3))):
            events.append({"event_id": f"e{p}c{k}", "event_type": "click", "ts": _ts(t + draw(st.integers(-5, 60))),
                           "user_id": user, "pv_id": pv_id, "item_id": item})
    for e in events:
        line = json.dumps(e).encode()
        kind = draw(st.one_of(st.none(), st.none(), st.sampled_from(CORRUPTIONS)))
        if kind is None:
            lines.append(line)
        elif kind == "bytes":
            at = draw(st.integers(0, len(line)))
            lines.append(line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x80"])) + line[at:])
        elif kind == "type":
            lines.append(json.dumps({**e, draw(st.sampled_from(["user_id", "ts", "pv_id"])): 7}).encode())
        elif kind == "duplicate":
            lines += [line, line]
        elif kind == "conflict":
            lines += [line, json.dumps({**e, "ts": _ts(86_300)}).encode()]
        elif kind == "ts_far":
            lines.append(json.dumps({**e, "ts": draw(st.sampled_from(["1970-01-01T00:00:00Z", "2999-01-01T00:00:00Z",
                                                                      "2026-11-21T03:00:00Z"]))}).encode())
        elif kind == "ts_garbage":
            lines.append(json.dumps({**e, "ts": "2026-13-45T99:00:00Z"}).encode())
        elif kind == "truncate":
            lines.append(line[:draw(st.integers(0, len(line) - 1))])
        elif kind == "two_objects":
            lines.append(line + line)
        elif kind == "blank":
            lines += [b"", line]
        elif kind == "unknown_item":
            lines.append(json.dumps({**e, "item_id": "zz", "items": ["zz"]}).encode())
        else:
            lines.append(json.dumps({**e, "event_type": draw(st.sampled_from(["view", None, ""]))}).encode())
    return draw(st.permutations(lines))


def _ts(seconds: int) -> str:
    seconds = max(0, seconds)
    return f"{DATE}T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=day_log())
def test_fuzzed_day_every_line_in_exactly_one_place(spark, tmp_path_factory, lines):
    from etl.build import build_date
    from etl.config import load_config
    from etl.tables import TableStore

    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = load_config(write_config(tmp, {"samples": {"image_px": 16}}))
    write_catalog(cfg, DATE, ITEMS)
    folder = Path(cfg.raw_root) / "search_log" / f"dt={DATE}"
    folder.mkdir(parents=True)
    (folder / "part-00000.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    store = TableStore(spark, cfg)

    report = build_date(spark, cfg, store, DATE, "run-fuzz")  # raises when an identity fails
    c = report.counts
    assert report.status == "built" and not report.mismatches()
    assert c["raw_lines"] == len(lines) == c["raw_rows"]
    q = store.read("quarantine").where(f"dt = '{DATE}' and source = 'search_log'").collect()
    quarantined = Counter(base64.b64decode(r["raw_b64"]) if r["raw_b64"] else r["raw"].encode() for r in q)
    remaining = Counter(lines) - quarantined
    assert not quarantined - Counter(lines), "a quarantine row that is no input line"
    assert sum(remaining.values()) == c["valid_pv"] + c["valid_click"] == len(lines) - len(q)
    valid_pvs = {json.loads(line)["pv_id"] for line in remaining.elements() if json.loads(line)["event_type"] == "pv"}
    assert len(valid_pvs) == c["valid_pv"]
    kept = {r["pv_id"] for r in store.read("pv_samples").where(f"dt = '{DATE}'").collect()}
    assert kept <= valid_pvs and len(kept) == c["pv_samples"]
