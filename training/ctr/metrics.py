"""CTR evaluation metrics: AUC, GAUC and log loss, and their breakdowns (category, cold start).

Definitions (the paper's section 4.2.2, made precise):

- **AUC**: the probability that a random positive scores above a random negative, ties counting 1/2.
  Computed from average ranks (Mann-Whitney U), O(n log n). Undefined -- returned as NaN -- when the
  input lacks a positive or a negative (this includes empty input); never an exception, because a
  breakdown slice (a category on one day) can legitimately be one-class.
- **GAUC**: the AUC within each group that has both a positive and a negative, averaged with weights =
  the group's number of impressions. The default grouping is the page view (``pv_id``): the paper's
  GAUC measures in-page ranking ("the ranking performance among the recalled items"), and a PV is
  exactly one result page. ``session_id`` is the alternative (config ``ctr.gauc_by``). Groups with one
  class are skipped and counted (``groups_skipped``); NaN when no group qualifies.
- **log loss**: mean binary cross entropy of the predicted probabilities, clipped to [1e-7, 1 - 1e-7]
  so that a confident mistake is large but finite. NaN for empty input.

Bad input (different lengths, labels other than 0/1, non-finite scores) raises ``ValueError``: those
are bugs upstream, not slices to skip.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

EPS = 1e-7


def _check(labels, scores, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and {name} must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and {name} differ in length: {len(y)} vs {len(s)}")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 or 1, found {bad.tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} must be finite; {int((~np.isfinite(s)).sum())} are NaN or infinite")
    return y.astype(np.int8), s


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (like scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values, and each run's average rank.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels, scores) -> float:
    """ROC AUC with ties as 1/2; NaN when there is no positive or no negative (incl. empty input)."""
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = average_ranks(s)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels, scores, groups) -> dict:
    """Impression-weighted mean AUC over the groups that have both classes.

    Returns {"gauc", "groups_used", "groups_skipped", "rows_used"}; gauc is NaN when no group qualifies.
    Vectorised: one global sort by (group, score) gives within-group average ranks, so 1e6 rows take
    well under a second.
    """
    y, s = _check(labels, scores)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups and labels differ in length: {len(g)} vs {len(y)}")
    if len(y) == 0:
        return {"gauc": float("nan"), "groups_used": 0, "groups_skipped": 0, "rows_used": 0}
    codes, _ = pd.factorize(g, use_na_sentinel=False)
    # Ranks of the scores within each group: sort by (group, score), find runs of equal (group, score).
    order = np.lexsort((s, codes))
    cs, ss = codes[order], s[order]
    new_group = np.r_[True, cs[1:] != cs[:-1]]
    new_run = new_group | np.r_[True, ss[1:] != ss[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(ss)]
    # Rank within the group = position in the sorted order minus the group's first position.
    group_first = np.maximum.accumulate(np.where(new_group, np.arange(len(ss)), 0))
    avg = (starts - group_first[starts]) + (ends - starts + 1) / 2.0
    ranks = np.empty(len(ss))
    ranks[order] = np.repeat(avg, ends - starts)
    n_groups = codes.max() + 1
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(codes, weights=y, minlength=n_groups)
    n_neg = n - n_pos
    rank_pos = np.bincount(codes, weights=ranks * y, minlength=n_groups)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return {"gauc": float("nan"), "groups_used": 0, "groups_skipped": int(n_groups), "rows_used": 0}
    group_auc = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    weights = n[ok]
    return {"gauc": float((group_auc * weights).sum() / weights.sum()), "groups_used": int(ok.sum()),
            "groups_skipped": int((~ok).sum()), "rows_used": int(weights.sum())}


def log_loss(labels, probs) -> float:
    """Mean binary cross entropy; probabilities clipped to [EPS, 1-EPS]; NaN for empty input."""
    y, p = _check(labels, probs, "probabilities")
    if len(y) == 0:
        return float("nan")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    p = np.clip(p, EPS, 1 - EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def summarize(labels, probs, groups) -> dict:
    """The metric set reported for one slice: auc, gauc (+ group counts), logloss, rows, positives, ctr."""
    y, p = _check(labels, probs, "probabilities")
    g = gauc(y, p, groups)
    n = int(len(y))
    return {"auc": auc(y, p), "gauc": g["gauc"], "logloss": log_loss(y, p), "rows": n,
            "positives": int(y.sum()), "ctr": float(y.mean()) if n else float("nan"),
            "gauc_groups": g["groups_used"], "gauc_groups_skipped": g["groups_skipped"]}


def evaluate_predictions(frame: pd.DataFrame, probs: np.ndarray, cold_items: Iterable[str] | None = None,
                         group_col: str = "pv_id", category_col: str = "query") -> dict:
    """Overall, per-category and cold-start/warm metrics of predictions for the rows of `frame`.

    frame needs label, item_id, `group_col` and `category_col`. cold_items: the items never seen in the
    training dates (cold start); when None the cold/warm slices are left out.
    """
    missing = [c for c in ("label", "item_id", group_col, category_col) if c not in frame.columns]
    if missing:
        raise ValueError(f"evaluation frame lacks column(s) {missing}")
    p = np.asarray(probs, dtype=np.float64)
    if len(p) != len(frame):
        raise ValueError(f"{len(p)} predictions for {len(frame)} rows")
    y = frame["label"].to_numpy()
    if group_col == "session_id" and "user_id" in frame.columns:
        # A session is one user's: ids the log supplies itself (e.g. "s1") may repeat across users.
        groups = frame.groupby(["user_id", group_col], sort=False, dropna=False).ngroup().to_numpy()
    else:
        groups = frame[group_col].to_numpy()
    out = {"overall": summarize(y, p, groups), "by_category": {}, "group_by": group_col}
    cats = frame[category_col].fillna("<null>").to_numpy()
    for cat in sorted(set(cats.tolist())):
        m = cats == cat
        out["by_category"][str(cat)] = summarize(y[m], p[m], groups[m])
    if cold_items is not None:
        cold = frame["item_id"].isin(set(cold_items)).to_numpy()
        out["cold_start"] = summarize(y[cold], p[cold], groups[cold])
        out["warm"] = summarize(y[~cold], p[~cold], groups[~cold])
    return out


def flat_metrics(report: Mapping, prefix: str = "eval") -> dict[str, float]:
    """{"eval.auc": .., "eval.category.dress.auc": .., "eval.cold_start.auc": ..} for MLflow (NaN kept:
    MLflow stores it, and a missing key would hide that the slice was empty)."""
    keys = ("auc", "gauc", "logloss", "rows", "positives")
    out = {f"{prefix}.{k}": float(report["overall"][k]) for k in keys}
    cats = report.get("by_category", {})
    safe = {cat: "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in cat) for cat in cats}
    taken = Counter(safe.values())
    for cat, m in cats.items():
        key = safe[cat]
        if key != cat and taken[key] > 1:  # "t shirt" and "t_shirt": one key each
            key += "_" + hashlib.sha256(cat.encode()).hexdigest()[:6]
        out.update({f"{prefix}.category.{key}.{k}": float(m[k]) for k in ("auc", "gauc", "rows")})
    for part in ("cold_start", "warm"):
        if part in report:
            out.update({f"{prefix}.{part}.{k}": float(report[part][k]) for k in keys})
    return out


def nan_to_none(value):
    """JSON-safe floats (NaN -> None) for reports."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return value
