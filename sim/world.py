"""The simulated shop: vocabulary and presets, items, users and their taste, one day of traffic.

Sessions, pages and clicks come out as arrays; ``sim.searchlog`` turns them into log lines. The model
is documented in the package docstring (``sim/__init__.py``) and docs/simulator.md.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# Vocabulary and model constants (documented in the package docstring; copied into the truth tables)
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

# the random streams of the whole package (``_rng(seed, stream, ...)``), kept in one place
_STREAM_ITEMS, _STREAM_USERS, _STREAM_RENDER, _STREAM_BADIMG = 1, 2, 3, 4
_STREAM_DAY, _STREAM_MALFORMED = 11, 13


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _split_counts(total: int, kinds: int, minimum: int) -> list[int]:
    base = [total // kinds + (1 if k < total % kinds else 0) for k in range(kinds)]
    return [max(minimum, b) for b in base]


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
