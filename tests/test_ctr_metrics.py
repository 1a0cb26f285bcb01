"""AUC / GAUC / log loss against brute-force pairwise counting and scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from training.ctr import metrics


def brute_auc(y, s):
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    if not pos or not neg:
        return float("nan")
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def brute_gauc(y, s, g):
    num = den = 0.0
    for grp in dict.fromkeys(g):
        idx = [i for i, x in enumerate(g) if x == grp]
        a = brute_auc([y[i] for i in idx], [s[i] for i in idx])
        if not math.isnan(a):
            num += a * len(idx)
            den += len(idx)
    return num / den if den else float("nan")


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_brute_force_and_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n), 1)  # only 11 distinct values: many ties, within and across classes
    assert metrics.auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert metrics.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_known_values_and_undefined_cases():
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts 1/2
    assert metrics.auc([1, 0], [0.9, 0.1]) == 1.0
    assert math.isnan(metrics.auc([], []))  # empty: undefined
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.3]))  # one class: undefined
    assert math.isnan(metrics.auc([0, 0, 0], [0.2, 0.3, 0.1]))


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="length"):
        metrics.auc([0, 1], [0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.auc([0, 2], [0.3, 0.4])
    with pytest.raises(ValueError, match="finite"):
        metrics.auc([0, 1], [0.3, float("nan")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.log_loss([0, 1], [0.3, 1.5])
    with pytest.raises(ValueError, match="groups"):
        metrics.gauc([0, 1], [0.3, 0.4], ["a"])


@pytest.mark.parametrize("seed", range(6))
def test_gauc_matches_brute_force_with_ties_and_one_class_groups(seed):
    rng = np.random.default_rng(seed)
    n = 400
    g = rng.integers(0, 60, n).astype(str)  # ~7 rows per group: many groups have one class only
    y = rng.integers(0, 2, n)
    y[g == "0"] = 1  # a group with positives only
    s = np.round(rng.random(n), 1)
    got = metrics.gauc(y, s, g)
    assert got["gauc"] == pytest.approx(brute_gauc(list(y), list(s), list(g)), abs=1e-12)
    one_class = sum(1 for grp in set(g) if len(set(y[g == grp])) == 1)
    assert got["groups_skipped"] == one_class
    assert got["groups_used"] + got["groups_skipped"] == len(set(g))
    assert got["rows_used"] == sum(int((g == grp).sum()) for grp in set(g) if len(set(y[g == grp])) == 2)


def test_gauc_equals_sklearn_per_group_weighted_mean():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    frame = pd.DataFrame({"g": rng.integers(0, 30, 2000), "y": rng.integers(0, 2, 2000),
                          "s": rng.random(2000)})
    num = den = 0.0
    for _, part in frame.groupby("g"):
        if part["y"].nunique() == 2:
            num += roc_auc_score(part["y"], part["s"]) * len(part)
            den += len(part)
    assert metrics.gauc(frame["y"], frame["s"], frame["g"])["gauc"] == pytest.approx(num / den, abs=1e-12)


def test_gauc_by_session_keeps_two_users_with_the_same_session_id_apart():
    frame = pd.DataFrame({"label": [1, 0, 1, 0], "item_id": list("abcd"), "query": "q",
                          "user_id": ["u1", "u1", "u2", "u2"], "session_id": "s1", "pv_id": ["p1", "p1", "p2", "p2"]})
    probs = np.array([0.9, 0.1, 0.2, 0.8])  # u1's session ranks perfectly (1.0), u2's backwards (0.0)
    overall = metrics.evaluate_predictions(frame, probs, group_col="session_id")["overall"]
    assert overall["gauc"] == 0.5 and overall["gauc_groups"] == 2  # one group would read 0.75


def test_gauc_undefined_cases():
    empty = metrics.gauc([], [], [])
    assert math.isnan(empty["gauc"]) and empty["groups_used"] == 0
    one_class = metrics.gauc([1, 1, 0], [0.1, 0.2, 0.3], ["a", "a", "b"])
    assert math.isnan(one_class["gauc"]) and one_class["groups_skipped"] == 2


def test_log_loss_matches_sklearn_and_is_finite_for_confident_mistakes():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = rng.random(500)
    assert metrics.log_loss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)
    assert math.isfinite(metrics.log_loss([1, 0], [0.0, 1.0]))  # clipped
    assert math.isnan(metrics.log_loss([], []))


def test_breakdowns_by_category_and_cold_start():
    frame = pd.DataFrame({"label": [1, 0, 1, 0, 1, 0], "item_id": ["a", "b", "c", "d", "e", "f"],
                          "pv_id": ["p1", "p1", "p2", "p2", "p3", "p3"],
                          "query": ["dress", "dress", "shoe", "shoe", "shoe", "shoe"]})
    probs = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3])
    rep = metrics.evaluate_predictions(frame, probs, cold_items={"c", "d"})
    assert rep["by_category"]["dress"]["auc"] == 1.0
    assert rep["by_category"]["shoe"]["auc"] == pytest.approx(brute_auc([1, 0, 1, 0], [0.2, 0.8, 0.7, 0.3]))
    assert rep["cold_start"]["rows"] == 2 and rep["cold_start"]["auc"] == 0.0
    assert rep["warm"]["rows"] == 4 and rep["warm"]["auc"] == 1.0
    assert rep["overall"]["gauc"] == pytest.approx((1.0 * 2 + 0.0 * 2 + 1.0 * 2) / 6)
    flat = metrics.flat_metrics(rep)
    assert flat["eval.category.shoe.rows"] == 4 and "eval.cold_start.auc" in flat
    # two names that clean to the same key both keep their metrics (the second overwrote the first)
    twins = {"overall": rep["overall"], "by_category": {"t shirt": rep["by_category"]["dress"],
                                                        "t_shirt": rep["by_category"]["shoe"]}}
    rows = sorted(v for k, v in metrics.flat_metrics(twins).items() if k.startswith("eval.category.t_shirt")
                  and k.endswith(".rows"))
    assert rows == [2, 4]
    with pytest.raises(ValueError, match="predictions"):
        metrics.evaluate_predictions(frame, probs[:3])


def test_gauc_is_fast_on_a_million_rows():
    import time

    rng = np.random.default_rng(0)
    n = 1_000_000
    t0 = time.perf_counter()
    metrics.gauc(rng.integers(0, 2, n), rng.random(n), rng.integers(0, 200_000, n))
    assert time.perf_counter() - t0 < 10
