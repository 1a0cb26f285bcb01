"""Seeded search-log simulator: the data COURIER runs on when nobody's data is at hand.

Pure Python + numpy + pillow (no Spark). ``simulate()`` writes a raw search log and an item catalog
partitioned by date, one procedural image per item, and a hidden-truth side table; it returns (and
writes as ``manifest.json``) the exact count of every row kind it produced, so that the pipeline's
``input = kept + dropped + quarantined`` bookkeeping can be checked against ground truth.

Generative model
================
Everything below is drawn from ``numpy.random.default_rng([seed, stream, ...])`` streams, so one
(preset, seed, start_date, rates, image_px) gives the same bytes on every run.

Items
-----
* ``category``: one of 8 (dress, shoe, bag, shirt, skirt, hat, scarf, coat), balanced (a shuffled
  round-robin), so every category has at least a page of items.
* Latent visual style, drawn independently and uniformly: ``hue`` family (red, orange, yellow,
  green, blue, purple), ``pattern`` (plain, stripes, dots, checks), silhouette ``shape`` (circle,
  square, triangle) and texture ``scale`` (fine, coarse; ``none`` for plain items, which have no
  texture).
* ``popularity`` ~ LogNormal(0, 1); ``price`` = round(LogNormal(3.2, 0.6), 2); ``title`` = two
  neutral words + the category name + a model code (e.g. "Urban Essential dress K-482"). Price, title
  and popularity are independent of the style: **only the pixels carry the style**.
* Image (``image_px`` square PNG): a neutral grey background (level U(0.80, 0.95)) with a faint
  linear gradient whose direction is set by the category (the only category cue in the pixels; it
  does not move clicks), one silhouette of the item's shape, filled with its hue family (hue jitter
  +-10 degrees, saturation U(0.55, 0.9), value U(0.7, 0.95)) and patterned in a darker or lighter tone of
  the same hue: stripes (period 1/f), dots (radius 0.3/f on a 1/f grid) or checks (cells 1/f), with
  f ~ 2.8 (fine) or 1.2 (coarse) cycles per silhouette radius, +-10%. Jitter: centre +-0.15,
  radius U(0.52, 0.72) of the half-width, rotation +-25 degrees, pattern angle +-20 degrees and
  phase, and grey-level Gaussian pixel noise (sd 0.03) everywhere, so no two images are identical.
* Cold start: the first date holds the initial catalog (``items`` of the preset); each later date
  adds ``round(new_item_share * items)`` new items (10%), which appear in that date's pages and later.

Users
-----
Each user has a taste: 1 liked hue (70%) or 2 (30%), one liked pattern, shape and scale; 1-3
favourite categories with Dirichlet(1) weights; an activity level ~ LogNormal(0, 0.6) (divided by
its mean) and a click bias ~ N(0, 0.3).

Requests
--------
Per date, a user has ``min(Poisson(1.5 * activity), 6)`` sessions (zero: inactive that day). The
day is cut into as many equal slots as the user has sessions; session k starts uniformly in slot k
early enough that it ends (last PV + 60 s) at least 31 minutes before the slot ends, so sessions are
separated by more than 30 minutes of inactivity and never cross midnight. A session has
``min(1 + Poisson(m - 1), 20)`` PVs (m = preset ``pvs_per_user_day / 1.5``), 20 s - 5 min apart.
The session picks a category from the user's favourites (by weight); each PV queries it (80%) or
another draw from the favourites (20%). A PV shows ``page_size`` = 10 distinct items of that category
available on that date, drawn without replacement with probability proportional to
``popularity ** 0.8`` (Plackett-Luce), in draw order (position 0 = first draw). The "ranker" does
not know the user's taste.

Clicks
------
For user u and the item i shown at position p (0-based)::

    affinity(u, i) = 1.0 [hue(i) in liked_hues(u)] + 0.7 [pattern(i) = liked_pattern(u)]
                   + 0.5 [shape(i) = liked_shape(u)] + 0.4 [scale(i) = liked_scale(u), i not plain]
    logit = -3.7 - 0.6 ln(1 + p) + 0.25 ln(popularity(i)) + click_bias(u) + 1.6 affinity(u, i) + e,
    e ~ N(0, 0.5);  click ~ Bernoulli(sigmoid(logit))

At most one click per (PV, item); its timestamp is the PV's + U(2, 60) s. An impression is
*taste-matching* when affinity >= 1.5 (the hue plus at least one of pattern/shape); with these
constants the overall CTR is about 7% and taste-matching impressions are clicked several times as
often as the others (see docs/simulator.md for measured numbers). ``taste_affinity()`` computes the
affinity from the truth tables, for evaluation only.

Malformed rows
--------------
Per date, ``round(rate * valid / (1 - rate))`` extra lines (rate = ``malformed_rate``) are added, split
evenly over five kinds (the tiny preset forces at least 2 of each). Each has exactly one fault and is
an extra line: valid events, and the clicks of valid PVs, are never altered.

* ``bad_json``: a copy of a valid event (fresh event_id) truncated mid-line, sometimes followed by
  junk characters; never parses as JSON.
* ``null_id``: a copy of a PV or click (fresh event_id; a PV copy also gets a fresh pv_id) whose
  user_id or pv_id is null.
* ``bad_timestamp``: a copy (fresh ids as above) whose ts is unparseable ("yesterday",
  "2026-13-45T99:00:00Z", ...).
* ``unknown_item``: a PV copy (fresh ids) with one item replaced by an id in no catalog, or a new
  click (fresh event_id) on a real PV, by that PV's user, on an unknown item.
* ``duplicate``: an exact copy of a valid line of the same date (same event_id), placed after it.

Bad images
----------
Per date, ``round(bad_image_rate * new_items)`` of that date's new items (tiny: at least 1 of each
kind) get a bad image, split evenly: ``image_missing`` (no file is written) and ``image_corrupt`` (a
file that fails to open/verify: the real PNG truncated inside its header, or a PNG signature followed
by garbage). These items are still in the catalog and in pages.

Layout
======
::

    out_root/search_log/dt=YYYY-MM-DD/part-NNNNN.jsonl   PV and click events (<= 500k lines a part)
    out_root/catalog/dt=YYYY-MM-DD/items.jsonl           items first seen that date
    out_root/manifest.json                               exact counts (the return value)
    images_root/<item_id>.png                             image_uri in the catalog is relative to it
    truth_root/item_styles.parquet, user_tastes.parquet   hidden truth: evaluation only

Within a date the valid events are sorted by (ts, pv before click); each malformed line is inserted
after the event it was copied from, within about 2,000 lines. Re-running replaces the date folders it generates,
the images of the items it generates (and removes the file of a missing-image item), the truth
tables and the manifest.

Run ``python -m sim --help`` for the command line.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Vocabulary and model constants (documented in the module docstring; copied into the truth tables)
# --------------------------------------------------------------------------------------------------
CATEGORIES = ("dress", "shoe", "bag", "shirt", "skirt", "hat", "scarf", "coat")
HUES = ("red", "orange", "yellow", "green", "blue", "purple")
HUE_DEGREES = (0.0, 30.0, 55.0, 120.0, 215.0, 285.0)
# Style drift (``style_drift_from``): items first seen on or after that date get a hue family no user
# likes and no earlier item has, on a dark background: a visual style the clusters have never seen.
DRIFT_HUE = "magenta"
DRIFT_HUE_DEGREES = 320.0
DRIFT_BACKGROUND_SHIFT = 0.65  # the grey background level drops from U(0.80, 0.95) to U(0.15, 0.30)
PATTERNS = ("plain", "stripes", "dots", "checks")
SHAPES = ("circle", "square", "triangle")
SCALES = ("fine", "coarse")  # plain items have scale "none"
SCALE_FREQ = (2.8, 1.2)  # pattern cycles per silhouette radius

TITLE_WORDS_A = ("Urban", "Classic", "Daily", "Modern", "Essential", "Premium", "Basic", "Smart",
                 "Weekend", "Studio", "Everyday", "Signature", "Casual", "Select", "Prime", "Core")
TITLE_WORDS_B = ("Essential", "Edition", "Line", "Series", "Collection", "Fit", "Craft", "Works",
                 "Label", "Choice", "Standard", "Original", "Comfort", "Form", "Journey", "Lab")

CLICK_MODEL = {
    "b0": -3.7,
    "position_slope": 0.6,  # logit -= slope * ln(1 + position)
    "popularity_weight": 0.25,  # logit += w * ln(popularity)
    "taste_weight": 1.6,  # logit += w * affinity
    "hue_weight": 1.0,
    "pattern_weight": 0.7,
    "shape_weight": 0.5,
    "scale_weight": 0.4,
    "user_bias_sd": 0.3,
    "noise_sd": 0.5,
    "ranker_popularity_power": 0.8,
}
TASTE_MATCH_THRESHOLD = 1.5  # affinity >= this: "taste-matching" impression

SESSIONS_PER_DAY = 1.5
MAX_SESSIONS_PER_DAY = 6
MAX_PVS_PER_SESSION = 20
SESSION_CATEGORY_STICKINESS = 0.8
DAY_US = 86_400 * 1_000_000

MALFORMED_KINDS = ("bad_json", "null_id", "bad_timestamp", "unknown_item", "duplicate")
BAD_IMAGE_KINDS = ("image_missing", "image_corrupt")
BAD_TIMESTAMPS = ("yesterday", "2026-13-45T99:00:00Z", "2026-11-20T25:61:00Z", "not-a-time",
                  "20261120T??:15:00Z", "N/A")

PRESETS: dict[str, dict] = {
    # tests: seconds
    "tiny": dict(users=40, items=150, days=3, pvs_per_user_day=4.0, page_size=10, new_item_share=0.10,
                 image_px=32, malformed_rate=0.01, bad_image_rate=0.01, min_malformed_per_kind=2,
                 min_bad_images_per_kind=1, part_lines=500_000),
    # default: a few days of a small shop, < 1 minute
    "demo": dict(users=1500, items=2000, days=5, pvs_per_user_day=6.7, page_size=10, new_item_share=0.10,
                 image_px=96, malformed_rate=0.01, bad_image_rate=0.01, min_malformed_per_kind=0,
                 min_bad_images_per_kind=0, part_lines=500_000),
    # one big day: >= 5M impressions, for the Spark job's benchmark
    "bench": dict(users=50_000, items=20_000, days=1, pvs_per_user_day=10.6, page_size=10,
                  new_item_share=0.10, image_px=48, malformed_rate=0.01, bad_image_rate=0.01,
                  min_malformed_per_kind=0, min_bad_images_per_kind=0, part_lines=500_000),
}

_STREAM_ITEMS, _STREAM_USERS, _STREAM_RENDER, _STREAM_BADIMG = 1, 2, 3, 4
_STREAM_DAY, _STREAM_MALFORMED = 11, 13
_RENDER_BATCH = 256


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


# --------------------------------------------------------------------------------------------------
# Items and users
# --------------------------------------------------------------------------------------------------
def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % k)


def _make_items(cfg: dict, seed: int, n_days: int) -> dict:
    rng = _rng(seed, _STREAM_ITEMS)
    n0 = int(cfg["items"])
    n_new = int(round(cfg["new_item_share"] * n0))
    counts = [n0] + [n_new] * (n_days - 1)
    n = int(sum(counts))
    first_day = np.repeat(np.arange(n_days), counts)
    category = np.concatenate([_balanced(rng, c, len(CATEGORIES)) for c in counts]).astype(np.int64)
    hue = rng.integers(0, len(HUES), n)
    pattern = rng.integers(0, len(PATTERNS), n)
    shape = rng.integers(0, len(SHAPES), n)
    scale = rng.integers(0, len(SCALES), n)
    scale = np.where(pattern == 0, -1, scale)
    popularity = rng.lognormal(0.0, 1.0, n)
    price = np.round(rng.lognormal(3.2, 0.6, n), 2)
    wa = rng.integers(0, len(TITLE_WORDS_A), n)
    wb = rng.integers(0, len(TITLE_WORDS_B), n)
    code_l = rng.integers(0, 26, n)
    code_n = rng.integers(100, 1000, n)
    width = max(6, len(str(n - 1)))
    ids = [f"i{k:0{width}d}" for k in range(n)]
    titles = [f"{TITLE_WORDS_A[a]} {TITLE_WORDS_B[b]} {CATEGORIES[c]} {chr(65 + l)}-{m}"
              for a, b, c, l, m in zip(wa.tolist(), wb.tolist(), category.tolist(), code_l.tolist(),
                                       code_n.tolist())]
    return dict(n=n, id_width=width, item_id=ids, first_day=first_day, category=category, hue=hue,
                pattern=pattern, shape=shape, scale=scale, popularity=popularity, price=price,
                title=titles, image_status=np.zeros(n, dtype=np.int8))


def _make_users(cfg: dict, seed: int) -> dict:
    rng = _rng(seed, _STREAM_USERS)
    n = int(cfg["users"])
    n_hues = np.where(rng.random(n) < 0.3, 2, 1)
    hues = np.stack([rng.permutation(len(HUES))[:2] for _ in range(n)]) if n else np.zeros((0, 2), int)
    hues[:, 1] = np.where(n_hues == 2, hues[:, 1], -1)
    pattern = rng.integers(0, len(PATTERNS), n)
    shape = rng.integers(0, len(SHAPES), n)
    scale = rng.integers(0, len(SCALES), n)
    n_fav = rng.integers(1, 4, n)
    favs = np.stack([rng.permutation(len(CATEGORIES))[:3] for _ in range(n)]) if n else np.zeros((0, 3), int)
    w = rng.dirichlet(np.ones(3), n) if n else np.zeros((0, 3))
    w = np.where(np.arange(3)[None, :] < n_fav[:, None], w, 0.0)
    w = w / w.sum(axis=1, keepdims=True)
    favs = np.where(np.arange(3)[None, :] < n_fav[:, None], favs, -1)
    activity = rng.lognormal(0.0, 0.6, n)
    activity = activity / activity.mean()
    bias = rng.normal(0.0, CLICK_MODEL["user_bias_sd"], n)
    width = max(6, len(str(n - 1)))
    ids = [f"u{k:0{width}d}" for k in range(n)]
    return dict(n=n, user_id=ids, liked_hues=hues, liked_pattern=pattern, liked_shape=shape,
                liked_scale=scale, fav_categories=favs, fav_weights=w, activity=activity, click_bias=bias)


def _affinity_idx(u_hues: np.ndarray, u_pattern, u_shape, u_scale, i_hue, i_pattern, i_shape, i_scale):
    """Vectorised affinity on integer codes; u_hues has a trailing axis of liked hues (-1 = none)."""
    m = CLICK_MODEL
    hue_hit = (i_hue[..., None] == u_hues).any(axis=-1)
    return (m["hue_weight"] * hue_hit
            + m["pattern_weight"] * (i_pattern == u_pattern)
            + m["shape_weight"] * (i_shape == u_shape)
            + m["scale_weight"] * ((i_scale == u_scale) & (i_pattern != 0)))


def taste_affinity(item_styles, user_tastes, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
    """Affinity of each (user_ids[k], item_ids[k]) pair, from the truth tables (pandas DataFrames as
    read from ``item_styles.parquet`` / ``user_tastes.parquet``). Evaluation only: never a model input.
    ``>= TASTE_MATCH_THRESHOLD`` means taste-matching. Raises KeyError on an unknown id."""
    import pandas as pd

    ipos = pd.Index(item_styles["item_id"]).get_indexer(pd.Index(list(item_ids)))
    upos = pd.Index(user_tastes["user_id"]).get_indexer(pd.Index(list(user_ids)))
    if (ipos < 0).any() or (upos < 0).any():
        raise KeyError("taste_affinity: an id is not in the truth tables")

    def codes(vocab: Sequence[str], values) -> np.ndarray:  # -1 for a value outside vocab ("none")
        return np.asarray(pd.Categorical(values, categories=list(vocab)).codes, dtype=np.int64)

    hues = np.full((len(user_tastes), 2), -1, dtype=np.int64)
    for k, hs in enumerate(user_tastes["liked_hues"].tolist()):
        for j, h in enumerate(list(hs)[:2]):
            hues[k, j] = HUES.index(h)
    it, ut = item_styles, user_tastes
    return _affinity_idx(hues[upos], codes(PATTERNS, ut["liked_pattern"])[upos],
                         codes(SHAPES, ut["liked_shape"])[upos], codes(SCALES, ut["liked_scale"])[upos],
                         codes(HUES + (DRIFT_HUE,), it["hue"])[ipos], codes(PATTERNS, it["pattern"])[ipos],
                         codes(SHAPES, it["shape"])[ipos], codes(SCALES, it["scale"])[ipos])


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """h in [0, 1), s, v in [0, 1] (same shapes) -> (..., 3) float32."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _render_params(items: dict, seed: int) -> dict:
    rng = _rng(seed, _STREAM_RENDER)
    n = items["n"]
    hue_deg = np.asarray(HUE_DEGREES + (DRIFT_HUE_DEGREES,))[items["hue"]] + rng.uniform(-10, 10, n)
    fill = _hsv_to_rgb(hue_deg / 360.0, rng.uniform(0.55, 0.9, n), rng.uniform(0.7, 0.95, n))
    dark = rng.random(n) < 0.6
    pat = np.where(dark[:, None], fill * 0.45, fill * 0.35 + 0.65).astype(np.float32)
    freq = np.where(items["scale"] == 1, SCALE_FREQ[1], SCALE_FREQ[0]) * rng.uniform(0.9, 1.1, n)
    return dict(
        fill=fill, pat=pat, freq=freq,
        cx=rng.uniform(-0.15, 0.15, n), cy=rng.uniform(-0.15, 0.15, n),
        radius=rng.uniform(0.52, 0.72, n), rot=np.deg2rad(rng.uniform(-25, 25, n)),
        prot=np.deg2rad(rng.uniform(-20, 20, n)), phase=rng.random((n, 2)),
        bg=rng.uniform(0.80, 0.95, n) - DRIFT_BACKGROUND_SHIFT * (items["hue"] == len(HUES)),
        grad_angle=2 * np.pi * items["category"] / len(CATEGORIES) + rng.uniform(-0.2, 0.2, n),
    )


def _render_batch(items: dict, prm: dict, idx: np.ndarray, px: int, seed: int) -> np.ndarray:
    """Render items idx (all of one shape and one pattern) -> (B, px, px, 3) uint8, pure numpy."""
    f32 = np.float32
    shape, pattern = int(items["shape"][idx[0]]), int(items["pattern"][idx[0]])
    assert (items["shape"][idx] == shape).all() and (items["pattern"][idx] == pattern).all()
    g = (np.arange(px, dtype=f32) + 0.5) / px * 2 - 1  # pixel centres in [-1, 1]
    X = g[None, None, :]
    Y = g[None, :, None]
    col = lambda a: np.asarray(a[idx], dtype=f32)[:, None, None]
    cx, cy, r, rot, prot, freq = (col(prm[k]) for k in ("cx", "cy", "radius", "rot", "prot", "freq"))
    dx, dy = X - cx, Y - cy
    c, s = np.cos(rot) / r, np.sin(rot) / r
    u = c * dx + s * dy  # silhouette frame, in radii
    v = c * dy - s * dx
    # signed distance (in radii, > 0 inside) of the silhouette
    if shape == 0:
        sd = 1.0 - np.sqrt(u * u + v * v)
    elif shape == 1:
        sd = 0.84 - np.maximum(np.abs(u), np.abs(v))
    else:
        apex, base, half = -1.33, 0.67, 1.15
        norm = math.hypot(base - apex, half)
        sd = np.minimum(base - v, ((v - apex) * half - (base - apex) * np.abs(u)) / norm)
    alpha = np.clip(sd * (r * (px / 2)) + 0.5, 0, 1)  # anti-aliased edge, one pixel wide
    # pattern mask in the silhouette's frame, turned by a small extra angle
    if pattern == 0:
        m = None
    else:
        ph = np.asarray(prm["phase"][idx], dtype=f32)
        ph0, ph1 = ph[:, 0][:, None, None], ph[:, 1][:, None, None]
        pc, ps = np.cos(prot) * freq, np.sin(prot) * freq
        pu = pc * u + ps * v + ph0  # in pattern periods
        if pattern == 1:  # stripes
            m = np.clip(0.5 + 2.5 * np.sin(2 * np.pi * pu), 0, 1)
        else:
            pv = pc * v - ps * u + ph1
            if pattern == 2:  # dots
                du, dv = pu % 1.0 - 0.5, pv % 1.0 - 0.5
                m = (du * du + dv * dv < 0.09).astype(f32)
            else:  # checks
                m = ((np.floor(pu) + np.floor(pv)) % 2).astype(f32)
    fill = np.asarray(prm["fill"][idx], dtype=f32)[:, None, None, :]
    pat = np.asarray(prm["pat"][idx], dtype=f32)[:, None, None, :]
    ga = col(prm["grad_angle"])
    bg = col(prm["bg"]) + 0.07 * (X * np.cos(ga) + Y * np.sin(ga))
    noise = _rng(seed, _STREAM_RENDER, 1 + int(idx[0])).standard_normal(alpha.shape, dtype=f32)
    grey = bg * (1 - alpha) + 0.03 * noise  # background + grey-level pixel noise everywhere
    img = alpha[..., None] * fill
    if m is not None:
        img += (alpha * m)[..., None] * (pat - fill)
    img += grey[..., None]
    np.clip(img, 0, 1, out=img)
    img *= 255
    img += 0.5
    return img.astype(np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _corrupt_bytes(good: bytes, rng: np.random.Generator) -> bytes:
    """Bytes that fail Image.open/verify/load: a PNG cut inside its header, or a signature + garbage."""
    if rng.random() < 0.5:
        return good[: int(rng.integers(0, 30))]
    junk = rng.integers(0, 256, int(rng.integers(64, 512)), dtype=np.uint8).tobytes()
    return good[:8] + b"\x00\x00\x00\x0dJUNK" + junk


def _write_images(items: dict, images_root: Path, px: int, seed: int,
                  progress: Callable[[str], None] | None) -> None:
    t0 = time.perf_counter()
    images_root.mkdir(parents=True, exist_ok=True)
    prm = _render_params(items, seed)
    rng_bad = _rng(seed, _STREAM_BADIMG, 1)
    n = items["n"]
    status = items["image_status"]
    # batches of one (shape, pattern) so each pixel computes only its own silhouette and pattern
    order = np.lexsort((np.arange(n), items["pattern"], items["shape"]))
    groups = np.split(order, np.flatnonzero(np.diff(items["shape"][order] * 8 + items["pattern"][order])) + 1)
    for group in groups:
        for start in range(0, len(group), _RENDER_BATCH):
            idx = group[start:start + _RENDER_BATCH]
            batch = _render_batch(items, prm, idx, px, seed)
            for k, i in enumerate(idx.tolist()):
                path = images_root / f"{items['item_id'][i]}.png"
                if status[i] == 1:  # image_missing
                    if path.exists() or path.is_symlink():
                        path.unlink()
                    continue
                data = _png_bytes(batch[k])
                if status[i] == 2:  # image_corrupt
                    data = _corrupt_bytes(data, rng_bad)
                with open(path, "wb") as fh:
                    fh.write(data)
    _say(progress, f"simulate: rendered {n} images ({px}px) in {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------------------------------
# One day of traffic
# --------------------------------------------------------------------------------------------------
def _draw_pages(rng: np.random.Generator, pool: np.ndarray, weights: np.ndarray, n_rows: int,
                page: int) -> np.ndarray:
    """n_rows pages of `page` distinct items from pool, Plackett-Luce by weights (draw order)."""
    M = len(pool)
    if M < page:
        raise ValueError(f"a category has {M} items, fewer than a page ({page})")
    if n_rows == 0:
        return np.zeros((0, page), dtype=np.int64)
    out = np.empty((n_rows, page), dtype=np.int64)
    logw = np.log(weights)
    if M <= 256:  # exact Gumbel-top-k
        for s in range(0, n_rows, 4096):
            e = min(n_rows, s + 4096)
            keys = logw[None, :] + rng.gumbel(size=(e - s, M))
            out[s:e] = np.argsort(-keys, axis=1, kind="stable")[:, :page]
        return pool[out]
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    K = 3 * page
    cand = np.minimum(np.searchsorted(cdf, rng.random((n_rows, K)), side="right"), M - 1)
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, axis=1)
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    key = np.where(dup, K, 0) + np.arange(K)[None, :]
    first = np.argsort(key, axis=1, kind="stable")[:, :page]
    out[:] = np.take_along_axis(cand, first, axis=1)
    short = np.flatnonzero((~dup).sum(axis=1) < page)  # rare: redraw those rows exactly
    if len(short):
        keys = logw[None, :] + rng.gumbel(size=(len(short), M))
        out[short] = np.argsort(-keys, axis=1, kind="stable")[:, :page]
    return pool[out]


def _simulate_traffic(d: int, cfg: dict, items: dict, users: dict, seed: int) -> dict:
    rng = _rng(seed, _STREAM_DAY, d)
    U = users["n"]
    page = int(cfg["page_size"])
    n_sess = np.minimum(rng.poisson(SESSIONS_PER_DAY * users["activity"]), MAX_SESSIONS_PER_DAY)
    S = int(n_sess.sum())
    s_user = np.repeat(np.arange(U), n_sess)
    s_of = np.repeat(n_sess, n_sess)
    s_slot = np.arange(S) - np.repeat(np.cumsum(n_sess) - n_sess, n_sess)
    m = max(1.0, cfg["pvs_per_user_day"] / SESSIONS_PER_DAY)
    n_pv = np.minimum(1 + rng.poisson(m - 1, S), MAX_PVS_PER_SESSION)
    P = int(n_pv.sum())
    p_sess = np.repeat(np.arange(S), n_pv)
    first_of_sess = np.cumsum(n_pv) - n_pv
    p_j = np.arange(P) - first_of_sess[p_sess]
    gaps = rng.integers(20_000_000, 300_000_001, P)
    gaps[p_j == 0] = 0
    csum = np.cumsum(gaps)
    offs = csum - csum[first_of_sess][p_sess]
    dur = offs[first_of_sess + n_pv - 1] + 60_000_000
    slot_len = DAY_US // s_of
    room = slot_len - dur - 31 * 60 * 1_000_000
    assert (room > 0).all(), "session does not fit its slot"
    start = s_slot * slot_len + (rng.random(S) * room).astype(np.int64)
    pv_ts = start[p_sess] + offs
    pv_user = s_user[p_sess]

    # category per session, then per PV (sticky)
    cw = np.cumsum(users["fav_weights"], axis=1)

    def pick_fav(uidx: np.ndarray) -> np.ndarray:
        r = rng.random(len(uidx))
        k = (r[:, None] >= cw[uidx]).sum(axis=1)
        k = np.minimum(k, (users["fav_categories"][uidx] >= 0).sum(axis=1) - 1)
        return users["fav_categories"][uidx, k]

    s_cat = pick_fav(s_user)
    redraw = rng.random(P) >= SESSION_CATEGORY_STICKINESS
    pv_cat = s_cat[p_sess].copy()
    pv_cat[redraw] = pick_fav(pv_user[redraw])

    # pages: popularity-ranked draws among the category's items available that day
    avail = items["first_day"] <= d
    w_all = items["popularity"] ** CLICK_MODEL["ranker_popularity_power"]
    pv_items = np.empty((P, page), dtype=np.int64)
    for c in range(len(CATEGORIES)):
        rows = np.flatnonzero(pv_cat == c)
        pool = np.flatnonzero(avail & (items["category"] == c))
        pv_items[rows] = _draw_pages(rng, pool, w_all[pool], len(rows), page)

    # clicks
    cm = CLICK_MODEL
    aff = _affinity_idx(users["liked_hues"][pv_user][:, None, :], users["liked_pattern"][pv_user][:, None],
                        users["liked_shape"][pv_user][:, None], users["liked_scale"][pv_user][:, None],
                        items["hue"][pv_items], items["pattern"][pv_items], items["shape"][pv_items],
                        items["scale"][pv_items])
    logit = (cm["b0"] - cm["position_slope"] * np.log1p(np.arange(page))[None, :]
             + cm["popularity_weight"] * np.log(items["popularity"][pv_items])
             + users["click_bias"][pv_user][:, None] + cm["taste_weight"] * aff
             + cm["noise_sd"] * rng.standard_normal((P, page)))
    clicked = rng.random((P, page)) < 1.0 / (1.0 + np.exp(-logit))
    c_pv, c_pos = np.nonzero(clicked)
    c_ts = pv_ts[c_pv] + rng.integers(2_000_000, 60_000_001, len(c_pv))
    return dict(P=P, S=S, pv_ts=pv_ts, pv_user=pv_user, pv_cat=pv_cat, pv_items=pv_items,
                c_pv=c_pv, c_item=pv_items[c_pv, c_pos], c_ts=c_ts,
                affinity=aff, clicked=clicked)


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


def _split_counts(total: int, kinds: int, minimum: int) -> list[int]:
    base = [total // kinds + (1 if k < total % kinds else 0) for k in range(kinds)]
    return [max(minimum, b) for b in base]


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


def _pick_bad_images(items: dict, cfg: dict, seed: int, rate: float, n_days: int) -> list[dict]:
    rng = _rng(seed, _STREAM_BADIMG)
    minimum = int(cfg.get("min_bad_images_per_kind", 0)) if rate > 0 else 0
    per_day = []
    for d in range(n_days):
        new = np.flatnonzero(items["first_day"] == d)
        total = int(round(rate * len(new))) if rate > 0 else 0
        n_missing, n_corrupt = _split_counts(total, 2, minimum)
        n_missing = min(n_missing, len(new))
        n_corrupt = min(n_corrupt, len(new) - n_missing)
        chosen = rng.permutation(new)[: n_missing + n_corrupt]
        items["image_status"][chosen[:n_missing]] = 1
        items["image_status"][chosen[n_missing:]] = 2
        per_day.append({"image_missing": int(n_missing), "image_corrupt": int(n_corrupt)})
    return per_day


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
    ap = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n\n")[0])
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
