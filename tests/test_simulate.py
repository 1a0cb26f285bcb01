"""The search-log simulator (the sim package), tiny preset: determinism, exact manifest counts, the
event contract the Spark job reads, cold start, taste visible in clicks, and the images."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

import sim as S

TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def _run(base: Path, **kw) -> dict:
    return S.simulate(base / "raw", base / "images", base / "truth", preset="tiny", progress=None, **kw)


def _tree_hash(base: Path) -> dict[str, str]:
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()}


def _ts(s) -> dt.datetime | None:
    if not isinstance(s, str) or not TS_RE.match(s):
        return None
    try:
        return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None


def _catalog(base: Path) -> pd.DataFrame:
    rows = []
    for f in sorted((base / "raw" / "catalog").glob("dt=*/items.jsonl")):
        rows += [json.loads(x) | {"_dt": f.parent.name[3:]} for x in f.read_text().splitlines()]
    return pd.DataFrame(rows)


def _classify(base: Path, date: str, known: set[str]) -> dict:
    """Re-derive every count of a date from the files alone."""
    faults = Counter()
    seen: dict[str, str] = {}
    valid = []
    n_lines = 0
    for f in sorted((base / "raw" / "search_log" / f"dt={date}").glob("part-*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            n_lines += 1
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                faults["bad_json"] += 1
                continue
            found = []
            if e.get("event_id") is None or e.get("user_id") is None or e.get("pv_id") is None:
                found.append("null_id")
            if _ts(e.get("ts")) is None:
                found.append("bad_timestamp")
            refs = e["items"] if e["event_type"] == "pv" else [e["item_id"]]
            if any(r not in known for r in refs):
                found.append("unknown_item")
            if e.get("event_id") in seen:
                assert seen[e["event_id"]] == line, "a reused event_id must be an exact copy"
                found.append("duplicate")
            assert len(found) <= 1, f"more than one fault {found}: {line}"
            if found:
                faults[found[0]] += 1
                continue
            seen[e["event_id"]] = line
            valid.append(e)
    return {"faults": faults, "valid": valid, "n_lines": n_lines}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    a = tmp_path_factory.mktemp("sim_a")
    b = tmp_path_factory.mktemp("sim_b")
    return a, _run(a), b, _run(b)


@pytest.fixture(scope="module")
def parsed(runs):
    base, manifest, _, _ = runs
    cat = _catalog(base)
    known = set(cat["item_id"])
    return cat, {d: _classify(base, d, known) for d in manifest["dates"]}


def test_deterministic_bytes(runs):
    a, ma, b, mb = runs
    assert ma == mb
    ha, hb = _tree_hash(a), _tree_hash(b)
    assert len(ha) > 100 and ha == hb


def test_seed_changes_output(runs, tmp_path):
    a, _, _, _ = runs
    _run(tmp_path, seed=8)
    assert _tree_hash(tmp_path / "raw") != _tree_hash(a / "raw")


def test_manifest_counts_match_files(runs, parsed):
    base, manifest, _, _ = runs
    cat, by_date = parsed
    assert manifest == json.loads((base / "raw" / "manifest.json").read_text())
    assert list(manifest["dates"]) == ["2026-11-20", "2026-11-21", "2026-11-22"]
    assert manifest["items"] == len(cat) and manifest["users"] == 40
    for date, m in manifest["dates"].items():
        r = by_date[date]
        assert m["raw_rows"] == r["n_lines"]
        assert m["malformed"] == {k: r["faults"].get(k, 0) for k in S.MALFORMED_KINDS}
        assert all(n >= 2 for n in m["malformed"].values())  # tiny: every kind at least twice a date
        pvs = [e for e in r["valid"] if e["event_type"] == "pv"]
        clicks = [e for e in r["valid"] if e["event_type"] == "click"]
        assert m["pv_rows"] == len(pvs) and m["click_rows"] == len(clicks)
        assert m["impressions"] == sum(len(e["items"]) for e in pvs)
        assert m["raw_rows"] == m["pv_rows"] + m["click_rows"] + sum(m["malformed"].values())
        assert m["new_items"] == int((cat["first_seen_dt"] == date).sum()) == int((cat["_dt"] == date).sum())
        missing = corrupt = 0
        for iid, uri in cat.loc[cat["first_seen_dt"] == date, ["item_id", "image_uri"]].itertuples(index=False):
            assert uri == f"{iid}.png"
            path = base / "images" / uri
            if not path.exists():
                missing += 1
                continue
            try:
                with Image.open(path) as im:
                    im.verify()
                with Image.open(path) as im:
                    im.load()
            except Exception:
                corrupt += 1
        assert m["bad_images"] == {"image_missing": missing, "image_corrupt": corrupt}
        assert missing >= 1 and corrupt >= 1  # tiny: both kinds every date
        assert 1000 <= m["impressions"] <= 2500


def test_valid_events_follow_the_contract(runs, parsed):
    base, manifest, _, _ = runs
    cat, by_date = parsed
    first_seen = dict(zip(cat["item_id"], cat["first_seen_dt"]))
    all_event_ids = []
    for date, r in by_date.items():
        pvs = {e["pv_id"]: e for e in r["valid"] if e["event_type"] == "pv"}
        assert len(pvs) == manifest["dates"][date]["pv_rows"]  # pv_ids unique
        for e in pvs.values():
            assert e["query"] in S.CATEGORIES
            assert len(e["items"]) == 10 and len(set(e["items"])) == 10
            assert all(first_seen[i] <= date for i in e["items"])
            assert set(cat.set_index("item_id").loc[e["items"], "category"]) == {e["query"]}
            assert _ts(e["ts"]).date().isoformat() == date
        pairs = set()
        for c in (e for e in r["valid"] if e["event_type"] == "click"):
            pv = pvs[c["pv_id"]]
            assert c["user_id"] == pv["user_id"] and c["item_id"] in pv["items"]
            lag = (_ts(c["ts"]) - _ts(pv["ts"])).total_seconds()
            assert 2 <= lag <= 60
            assert _ts(c["ts"]).date().isoformat() == date
            assert (c["pv_id"], c["item_id"]) not in pairs
            pairs.add((c["pv_id"], c["item_id"]))
        all_event_ids += [e["event_id"] for e in r["valid"]]
        # sessions: inside a session events are < 30 min apart; sessions are > 30 min apart
        by_user = defaultdict(list)
        for e in r["valid"]:
            by_user[e["user_id"]].append(_ts(e["ts"]))
        for ts in by_user.values():
            gaps = np.diff(sorted(t.timestamp() for t in ts))
            assert not ((gaps > 6 * 60) & (gaps <= 31 * 60)).any()
    assert len(all_event_ids) == len(set(all_event_ids))  # unique across dates


def test_malformed_rows_leave_valid_events_intact(tmp_path, runs, parsed):
    """With malformed_rate=0 the same seed gives exactly the valid events of the default run."""
    _, manifest, _, _ = runs
    _, by_date = parsed
    m0 = _run(tmp_path, malformed_rate=0.0, bad_image_rate=0.0)
    known = set(_catalog(tmp_path)["item_id"])
    for date, m in m0["dates"].items():
        assert sum(m["malformed"].values()) == 0 and m["bad_images"] == {"image_missing": 0, "image_corrupt": 0}
        clean = _classify(tmp_path, date, known)
        assert not clean["faults"] and clean["n_lines"] == m["raw_rows"] == m["pv_rows"] + m["click_rows"]
        assert sorted(json.dumps(e, sort_keys=True) for e in clean["valid"]) == \
            sorted(json.dumps(e, sort_keys=True) for e in by_date[date]["valid"])


def test_cold_start_items_appear_in_pages(runs, parsed):
    _, manifest, _, _ = runs
    cat, by_date = parsed
    dates = list(manifest["dates"])
    assert manifest["dates"][dates[0]]["new_items"] == 150
    for date in dates[1:]:
        new = set(cat.loc[cat["first_seen_dt"] == date, "item_id"])
        assert len(new) == 15
        shown = {i for e in by_date[date]["valid"] if e["event_type"] == "pv" for i in e["items"]}
        assert len(new & shown) >= len(new) // 2
        earlier = {i for d in dates if d < date for e in by_date[d]["valid"] if e["event_type"] == "pv"
                   for i in e["items"]}
        assert not (new & earlier)


def test_taste_is_visible_in_clicks(runs, parsed):
    base, _, _, _ = runs
    _, by_date = parsed
    styles = pd.read_parquet(base / "truth" / "item_styles.parquet")
    tastes = pd.read_parquet(base / "truth" / "user_tastes.parquet")
    assert set(styles.columns) >= {"item_id", "category", "hue", "pattern", "shape", "scale", "popularity"}
    users, items, labels = [], [], []
    for r in by_date.values():
        clicked = {(e["pv_id"], e["item_id"]) for e in r["valid"] if e["event_type"] == "click"}
        for e in r["valid"]:
            if e["event_type"] == "pv":
                for i in e["items"]:
                    users.append(e["user_id"])
                    items.append(i)
                    labels.append((e["pv_id"], i) in clicked)
    aff = S.taste_affinity(styles, tastes, users, items)
    labels = np.asarray(labels)
    match = aff >= S.TASTE_MATCH_THRESHOLD
    ctr, ctr_match, ctr_other = labels.mean(), labels[match].mean(), labels[~match].mean()
    assert 0.04 <= ctr <= 0.12
    assert ctr_match > 2 * ctr_other, (ctr_match, ctr_other)


def test_images_are_distinct_and_decode(runs):
    base, manifest, _, _ = runs
    styles = pd.read_parquet(base / "truth" / "item_styles.parquet")
    ok = styles.loc[styles["image_status"] == "ok", "item_id"]
    digests = set()
    for iid in ok:
        data = (base / "images" / f"{iid}.png").read_bytes()
        digests.add(hashlib.sha256(data).hexdigest())
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert len(digests) == len(ok)  # no two images identical
    # corrupt files stay undecodable even for a lenient reader
    corrupt = styles.loc[styles["image_status"] == "corrupt", "item_id"]
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        for iid in corrupt:
            with pytest.raises(Exception):
                with Image.open(base / "images" / f"{iid}.png") as im:
                    im.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    assert not any((base / "images" / f"{i}.png").exists()
                   for i in styles.loc[styles["image_status"] == "missing", "item_id"])


def test_rerun_replaces_dates_and_leaves_no_stale_files(runs, tmp_path):
    a, _, _, _ = runs
    base = tmp_path / "copy"
    shutil.copytree(a, base)
    stray = base / "raw" / "search_log" / "dt=2026-11-21" / "part-00099.jsonl"
    stray.write_text("stale\n")
    m = _run(base, seed=8)
    assert not stray.exists()
    fresh = tmp_path / "fresh"
    assert m == _run(fresh, seed=8)
    assert _tree_hash(base) == _tree_hash(fresh)  # same files, same bytes as a run into empty folders


def test_presets_and_arguments():
    assert set(S.PRESETS) == {"tiny", "demo", "bench"}
    b = S.PRESETS["bench"]
    assert b["days"] == 1 and b["users"] * b["pvs_per_user_day"] * b["page_size"] >= 5_000_000
    with pytest.raises(ValueError):
        S.simulate("x", "y", "z", preset="huge", progress=None)


def test_style_drift_changes_only_the_new_items_of_the_drift_dates(runs, tmp_path):
    base, manifest, _, _ = runs
    drift = tmp_path / "drift"
    out = _run(drift, style_drift_from=manifest["start_date"][:8] + "22")
    assert out["style_drift_from"] == "2026-11-22"
    styles = pd.read_parquet(drift / "truth" / "item_styles.parquet")
    plain = pd.read_parquet(base / "truth" / "item_styles.parquet")
    drifted = styles["first_seen_dt"] >= "2026-11-22"
    assert drifted.sum() == 15 and (styles.loc[drifted, "hue"] == S.DRIFT_HUE).all()
    assert (styles.loc[~drifted, "hue"] == plain.loc[~drifted, "hue"]).all()  # every other draw unchanged
    assert S.DRIFT_HUE not in set(plain["hue"])
    # Before the drift date the files are byte for byte the undrifted run's; the drifted images are darker.
    a, b = _tree_hash(base / "raw"), _tree_hash(drift / "raw")
    earlier = [k for k in a if "2026-11-22" not in k and k != "manifest.json"]
    assert earlier and {k: a[k] for k in earlier} == {k: b[k] for k in earlier}
    ids = styles.loc[drifted & (styles["image_status"] == "ok"), "item_id"]
    same = [i for i in styles.loc[~drifted, "item_id"] if (base / "images" / f"{i}.png").exists()]
    assert all((base / "images" / f"{i}.png").read_bytes() == (drift / "images" / f"{i}.png").read_bytes() for i in same)
    lum = [np.asarray(Image.open(drift / "images" / f"{i}.png").convert("L")).mean()
           for i in ids]
    assert lum and max(lum) < 110  # dark background (undrifted: grey level 0.80-0.95 of 255)
    with pytest.raises(ValueError, match="style_drift_from"):
        _run(tmp_path / "bad", style_drift_from="2026-11-20")  # the first date has no new items to drift


def test_the_job_warns_about_dates_an_earlier_simulation_left(tmp_path, capsys):
    """Run again with another start date, the job names the older dates it did not write: build_samples
    would read them as part of the log."""
    from conftest import write_config

    from jobs.simulate_search_log import main

    conf = str(write_config(tmp_path, {"simulator": {"preset": "tiny", "days": 1, "start_date": "2026-11-20"}}))
    assert main(["--conf", conf]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert main(["--conf", conf, "--set", "simulator.start_date=2026-11-22"]) == 0
    assert "also holds date(s) ['2026-11-20'] that this run did not write" in capsys.readouterr().err
    # a bad setting is one line naming the key and exit 2, as for every job (a traceback and 1 before)
    assert main(["--conf", conf, "--set", "simulator.days=0"]) == 2
    err = capsys.readouterr().err
    assert "simulate_search_log: error: simulator.seed must be >= 0, simulator.days >= 1" in err, err
    assert "Traceback" not in err
