"""The log writer: ``simulate()`` turns each simulated day into search-log lines (valid events in time
order, malformed lines after the events they were copied from), writes them with the catalog, the
images, the truth tables and the manifest, and ``main()`` is its command line (``python -m sim``).
The model and the layout are documented in the package docstring (``sim/__init__.py``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sim.images import _pick_bad_images, _write_images
from sim.world import (BAD_TIMESTAMPS, CATEGORIES, CLICK_MODEL, DRIFT_HUE, HUES, MALFORMED_KINDS, PATTERNS,
                       PRESETS, SCALES, SHAPES, TASTE_MATCH_THRESHOLD, _STREAM_MALFORMED, _make_items,
                       _make_users, _rng, _say, _simulate_traffic, _split_counts)


DESCRIPTION = "Seeded search-log simulator: the data COURIER runs on when nobody's data is at hand."


# --------------------------------------------------------------------------------------------------
# Lines
# --------------------------------------------------------------------------------------------------
def _ts_strings(day: np.datetime64, us: np.ndarray) -> np.ndarray:
    t = day + us.astype("timedelta64[us]")
    return np.char.add(np.datetime_as_string(t, unit="us"), "Z")


def _ts_string(day: np.datetime64, us: int) -> str:
    return str(np.datetime_as_string(day + np.timedelta64(int(us), "us"), unit="us")) + "Z"


def _pv_line(eid, ts, uid, pid, query, items_json) -> str:
    return (f'{{"event_id": "{eid}", "event_type": "pv", "ts": "{ts}", "user_id": "{uid}", '
            f'"pv_id": "{pid}", "query": "{query}", "items": [{items_json}]}}')


def _click_line(eid, ts, uid, pid, item) -> str:
    return (f'{{"event_id": "{eid}", "event_type": "click", "ts": "{ts}", "user_id": "{uid}", '
            f'"pv_id": "{pid}", "item_id": "{item}"}}')


def _build_day_lines(d: int, date: str, tr: dict, items: dict, users: dict, seed: int,
                     malformed_rate: float, cfg: dict) -> tuple[list[str], dict]:
    ymd = date.replace("-", "")
    day = np.datetime64(date, "us")
    P, C = tr["P"], len(tr["c_pv"])
    # valid events sorted by (ts, pv before click, index)
    ev_ts = np.concatenate([tr["pv_ts"], tr["c_ts"]])
    ev_kind = np.concatenate([np.zeros(P, np.int8), np.ones(C, np.int8)])
    ev_idx = np.concatenate([np.arange(P), np.arange(C)])
    order = np.lexsort((ev_idx, ev_kind, ev_ts))
    # pv ids in PV time order (PV ts ties broken by index, same as `order`)
    pv_rank = np.empty(P, np.int64)
    pv_rank[order[ev_kind[order] == 0]] = np.arange(P)
    item_ids = np.asarray(items["item_id"], dtype=object)
    user_ids = np.asarray(users["user_id"], dtype=object)
    pid = np.array([f"p{ymd}{r:08d}" for r in pv_rank.tolist()], dtype=object)
    n_valid = P + C
    eid_sorted = [f"e{ymd}{k:09d}" for k in range(n_valid)]
    ts_str = _ts_strings(day, ev_ts)
    quoted = np.array([f'"{x}"' for x in items["item_id"]], dtype=object)
    pv_items_json = [", ".join(row) for row in quoted[tr["pv_items"]].tolist()]
    cats = np.asarray(CATEGORIES, dtype=object)
    lines: list[str] = [""] * n_valid
    kinds = ev_kind[order].tolist()
    idxs = ev_idx[order].tolist()
    ts_o = ts_str[order].tolist()
    pv_user_s = user_ids[tr["pv_user"]].tolist()
    pv_q = cats[tr["pv_cat"]].tolist()
    pid_l = pid.tolist()
    c_pv = tr["c_pv"].tolist()
    c_item_s = item_ids[tr["c_item"]].tolist()
    for pos in range(n_valid):
        i = idxs[pos]
        if kinds[pos] == 0:
            lines[pos] = _pv_line(eid_sorted[pos], ts_o[pos], pv_user_s[i], pid_l[i], pv_q[i], pv_items_json[i])
        else:
            p = c_pv[i]
            lines[pos] = _click_line(eid_sorted[pos], ts_o[pos], pv_user_s[p], pid_l[p], c_item_s[i])

    # ---- malformed rows ------------------------------------------------------------------------
    rng = _rng(seed, _STREAM_MALFORMED, d)
    on = malformed_rate > 0 and P > 0
    total = int(round(malformed_rate * n_valid / (1.0 - malformed_rate))) if on else 0
    minimum = int(cfg.get("min_malformed_per_kind", 0)) if on else 0
    counts = dict(zip(MALFORMED_KINDS, _split_counts(total, len(MALFORMED_KINDS), minimum)))
    pos_of_pv = np.empty(P, np.int64)  # position in `lines` of each PV
    pos_of_pv[np.asarray(idxs)[np.asarray(kinds) == 0]] = np.flatnonzero(np.asarray(kinds) == 0)
    next_eid = [n_valid]
    next_pid = [P]

    def fresh_eid() -> str:
        e = f"e{ymd}{next_eid[0]:09d}"
        next_eid[0] += 1
        return e

    def fresh_pid() -> str:
        p_ = f"p{ymd}{next_pid[0]:08d}"
        next_pid[0] += 1
        return p_

    def event_dict(pos: int) -> dict:
        i = idxs[pos]
        if kinds[pos] == 0:
            return {"event_id": eid_sorted[pos], "event_type": "pv", "ts": ts_o[pos], "user_id": pv_user_s[i],
                    "pv_id": pid_l[i], "query": pv_q[i], "items": item_ids[tr["pv_items"][i]].tolist()}
        p = c_pv[i]
        return {"event_id": eid_sorted[pos], "event_type": "click", "ts": ts_o[pos], "user_id": pv_user_s[p],
                "pv_id": pid_l[p], "item_id": c_item_s[i]}

    def copy_of(pos: int) -> dict:
        e = event_dict(pos)
        e["event_id"] = fresh_eid()
        if e["event_type"] == "pv":
            e["pv_id"] = fresh_pid()
        return e

    unknown_base = 10 ** items["id_width"] + d * 100_000
    extra: list[tuple[float, str]] = []  # (sort key, line)
    n_unknown = 0
    span = max(1, min(n_valid, 2000))
    for kind in MALFORMED_KINDS:
        for _ in range(counts[kind]):
            pos = int(rng.integers(0, n_valid))
            key = pos + 0.5 + float(rng.random()) * span
            if kind == "bad_json":
                text = json.dumps(copy_of(pos))
                cut = int(rng.integers(max(2, len(text) // 5), len(text) - 1))
                text = text[:cut]
                if rng.random() < 0.5:
                    text += "".join("#@~^%&!?"[int(k)] for k in rng.integers(0, 8, int(rng.integers(1, 6))))
                extra.append((key, text))
            elif kind == "null_id":
                e = copy_of(pos)
                e["user_id" if rng.random() < 0.5 else "pv_id"] = None
                extra.append((key, json.dumps(e)))
            elif kind == "bad_timestamp":
                e = copy_of(pos)
                e["ts"] = BAD_TIMESTAMPS[int(rng.integers(0, len(BAD_TIMESTAMPS)))]
                extra.append((key, json.dumps(e)))
            elif kind == "unknown_item":
                unknown = f"i{unknown_base + n_unknown}"
                n_unknown += 1
                pv_i = int(rng.integers(0, P))
                ppos = int(pos_of_pv[pv_i])
                key = ppos + 0.5 + float(rng.random()) * span
                e = copy_of(ppos)
                if C == 0 or rng.random() < 0.5:  # a PV listing an unknown item
                    e["items"][int(rng.integers(0, len(e["items"])))] = unknown
                else:  # a click on a real PV, by its user, on an unknown item
                    src = event_dict(ppos)
                    t = day + np.timedelta64(int(tr["pv_ts"][pv_i] + rng.integers(2_000_000, 60_000_001)), "us")
                    e = {"event_id": e["event_id"], "event_type": "click",
                         "ts": str(np.datetime_as_string(t, unit="us")) + "Z", "user_id": src["user_id"],
                         "pv_id": src["pv_id"], "item_id": unknown}
                extra.append((key, json.dumps(e)))
    dup_src = rng.choice(n_valid, size=min(counts["duplicate"], n_valid), replace=False) if n_valid else []
    for pos in sorted(int(x) for x in dup_src):
        extra.append((pos + 0.5 + float(rng.random()) * span, lines[pos]))
    counts["duplicate"] = len(dup_src)

    keys = np.concatenate([np.arange(n_valid, dtype=np.float64), np.array([k for k, _ in extra], np.float64)])
    all_lines = lines + [t for _, t in extra]
    final = [all_lines[k] for k in np.argsort(keys, kind="stable").tolist()]
    stats = dict(raw_rows=len(final), pv_rows=P, click_rows=C, impressions=int(tr["pv_items"].size),
                 malformed={k: int(counts[k]) for k in MALFORMED_KINDS})
    return final, stats


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------
def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(lines))
        if lines:
            fh.write("\n")


def _catalog_lines(items: dict, d: int, date: str) -> list[str]:
    out = []
    for i in np.flatnonzero(items["first_day"] == d).tolist():
        iid = items["item_id"][i]
        out.append(json.dumps({"item_id": iid, "category": CATEGORIES[items["category"][i]],
                               "title": items["title"][i], "price": float(items["price"][i]),
                               "image_uri": f"{iid}.png", "first_seen_dt": date}))
    return out


def _write_truth(truth_root: Path, items: dict, users: dict, dates: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    truth_root.mkdir(parents=True, exist_ok=True)
    status_names = np.array(["ok", "missing", "corrupt"], dtype=object)
    scale_names = np.array(list(SCALES) + ["none"], dtype=object)  # index -1 -> "none"
    it = pa.table({
        "item_id": pa.array(items["item_id"], pa.string()),
        "category": pa.array(np.asarray(CATEGORIES, dtype=object)[items["category"]].tolist(), pa.string()),
        "hue": pa.array(np.asarray(HUES + (DRIFT_HUE,), dtype=object)[items["hue"]].tolist(), pa.string()),
        "pattern": pa.array(np.asarray(PATTERNS, dtype=object)[items["pattern"]].tolist(), pa.string()),
        "shape": pa.array(np.asarray(SHAPES, dtype=object)[items["shape"]].tolist(), pa.string()),
        "scale": pa.array(scale_names[items["scale"]].tolist(), pa.string()),
        "popularity": pa.array(items["popularity"], pa.float64()),
        "first_seen_dt": pa.array([dates[k] for k in items["first_day"].tolist()], pa.string()),
        "image_status": pa.array(status_names[items["image_status"]].tolist(), pa.string()),
    })
    hues = [[HUES[h] for h in row if h >= 0] for row in users["liked_hues"].tolist()]
    favs = [[CATEGORIES[c] for c in row if c >= 0] for row in users["fav_categories"].tolist()]
    fw = [[float(w) for w, c in zip(wr, cr) if c >= 0]
          for wr, cr in zip(users["fav_weights"].tolist(), users["fav_categories"].tolist())]
    ut = pa.table({
        "user_id": pa.array(users["user_id"], pa.string()),
        "liked_hues": pa.array(hues, pa.list_(pa.string())),
        "liked_pattern": pa.array([PATTERNS[k] for k in users["liked_pattern"].tolist()], pa.string()),
        "liked_shape": pa.array([SHAPES[k] for k in users["liked_shape"].tolist()], pa.string()),
        "liked_scale": pa.array([SCALES[k] for k in users["liked_scale"].tolist()], pa.string()),
        "fav_categories": pa.array(favs, pa.list_(pa.string())),
        "fav_weights": pa.array(fw, pa.list_(pa.float64())),
        "activity": pa.array(users["activity"], pa.float64()),
        "click_bias": pa.array(users["click_bias"], pa.float64()),
    })
    pq.write_table(it, truth_root / "item_styles.parquet", compression="snappy")
    pq.write_table(ut, truth_root / "user_tastes.parquet", compression="snappy")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def simulate(out_root: str | Path, images_root: str | Path, truth_root: str | Path, *, preset: str = "demo",
             seed: int = 7, start_date: str = "2026-11-20", days: int | None = None,
             malformed_rate: float | None = None, bad_image_rate: float | None = None,
             image_px: int | None = None, style_drift_from: str | None = None,
             progress: Callable[[str], None] | None = print) -> dict:
    """Generate a seeded search log, catalog, images and truth tables; return the manifest.

    See the module docstring for the generative model and the layout. Deterministic for a given
    (preset, seed, start_date, days, rates, image_px, style_drift_from). ``style_drift_from`` (a date
    after the first): the items first seen on or after it get the drift style (DRIFT_HUE on a dark
    background), so that the feature refresh can be seen to detect drift; every other draw is unchanged.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
    cfg = dict(PRESETS[preset])
    n_days = int(cfg["days"] if days is None else days)
    rate = float(cfg["malformed_rate"] if malformed_rate is None else malformed_rate)
    img_rate = float(cfg["bad_image_rate"] if bad_image_rate is None else bad_image_rate)
    px = int(cfg["image_px"] if image_px is None else image_px)
    if n_days < 1:
        raise ValueError("days must be >= 1")
    if not 0.0 <= rate < 0.5 or not 0.0 <= img_rate <= 1.0:
        raise ValueError("malformed_rate must be in [0, 0.5) and bad_image_rate in [0, 1]")
    if px < 8:
        raise ValueError("image_px must be >= 8")
    if int(seed) < 0:
        raise ValueError("seed must be >= 0")
    d0 = _dt.date.fromisoformat(start_date)
    dates = [(d0 + _dt.timedelta(days=k)).isoformat() for k in range(n_days)]
    out_root, images_root, truth_root = Path(out_root), Path(images_root), Path(truth_root)
    t_all = time.perf_counter()

    items = _make_items(cfg, seed, n_days)
    if style_drift_from is not None:
        if style_drift_from not in dates[1:]:
            raise ValueError(f"style_drift_from {style_drift_from!r} must be one of the simulated dates after the "
                             f"first ({', '.join(dates[1:]) or 'none: simulate at least 2 days'})")
        items["hue"] = np.where(items["first_day"] >= dates.index(style_drift_from), len(HUES), items["hue"])
    users = _make_users(cfg, seed)
    bad_images = _pick_bad_images(items, cfg, seed, img_rate, n_days)
    _say(progress, f"simulate: preset={preset} seed={seed} days={n_days} items={items['n']} users={users['n']}")
    _write_images(items, images_root, px, seed, progress)
    _write_truth(truth_root, items, users, dates)

    manifest: dict = {"preset": preset, "seed": int(seed), "start_date": dates[0], "dates": {},
                      "items": int(items["n"]), "users": int(users["n"]), "image_px": px,
                      "malformed_rate": rate, "bad_image_rate": img_rate,
                      "categories": list(CATEGORIES), "click_model": dict(CLICK_MODEL),
                      "taste_match_threshold": TASTE_MATCH_THRESHOLD, "style_drift_from": style_drift_from}
    part_lines = int(cfg["part_lines"])
    for d, date in enumerate(dates):
        t0 = time.perf_counter()
        tr = _simulate_traffic(d, cfg, items, users, seed)
        lines, stats = _build_day_lines(d, date, tr, items, users, seed, rate, cfg)
        log_dir = out_root / "search_log" / f"dt={date}"
        cat_dir = out_root / "catalog" / f"dt={date}"
        for p_ in (log_dir, cat_dir):
            if p_.exists():
                shutil.rmtree(p_)
            p_.mkdir(parents=True)
        for k, s in enumerate(range(0, max(1, len(lines)), part_lines)):
            _write_lines(log_dir / f"part-{k:05d}.jsonl", lines[s:s + part_lines])
        cat = _catalog_lines(items, d, date)
        _write_lines(cat_dir / "items.jsonl", cat)
        clicks = stats["click_rows"]
        stats.update(new_items=len(cat), bad_images=bad_images[d], sessions=int(tr["S"]),
                     ctr=round(clicks / stats["impressions"], 6) if stats["impressions"] else 0.0)
        manifest["dates"][date] = stats
        _say(progress, f"simulate: {date} sessions={tr['S']} pvs={stats['pv_rows']} "
                       f"impressions={stats['impressions']} clicks={clicks} ctr={stats['ctr']:.3f} "
                       f"malformed={sum(stats['malformed'].values())} new_items={len(cat)} "
                       f"({time.perf_counter() - t0:.1f}s)")
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / "manifest.json", "w", encoding="utf-8", newline="\n") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
    _say(progress, f"simulate: done in {time.perf_counter() - t_all:.1f}s -> {out_root}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim", description=DESCRIPTION)
    ap.add_argument("--out", required=True, help="raw root: search_log/ and catalog/ go here")
    ap.add_argument("--images", required=True, help="images root")
    ap.add_argument("--truth", required=True, help="hidden truth root (evaluation only)")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--start-date", default="2026-11-20")
    ap.add_argument("--days", type=int)
    ap.add_argument("--malformed-rate", type=float)
    ap.add_argument("--bad-image-rate", type=float)
    ap.add_argument("--image-px", type=int)
    ap.add_argument("--style-drift-from", help="date from which new items get an unseen visual style")
    a = ap.parse_args(argv)
    simulate(a.out, a.images, a.truth, preset=a.preset, seed=a.seed, start_date=a.start_date, days=a.days,
             malformed_rate=a.malformed_rate, bad_image_rate=a.bad_image_rate, image_px=a.image_px,
             style_drift_from=a.style_drift_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
