"""bench/quality/run_quality.py: its pandas ctr_train frame equals features.attach.attach on Spark, and its
tables have every row with finite numbers (the full experiment itself is too long for the suite)."""
from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pandas as pd
from conftest import ROOT

spec = importlib.util.spec_from_file_location("run_quality", ROOT / "bench" / "quality" / "run_quality.py")
rq = importlib.util.module_from_spec(spec)
sys.modules["run_quality"] = rq  # its dataclasses look their module up
spec.loader.exec_module(rq)


def _feats(n_items: int, d: int, rng) -> tuple:
    from features.clustering import normalize

    emb = rng.normal(size=(n_items, d)).astype(np.float32)
    emb[3] = 0.0  # an unusable embedding: reserved id, score 0
    unit, ok = normalize(emb)
    ids = rng.integers(0, 4, n_items).astype(np.int64)
    ids[3] = -1
    cluster_of = np.append(ids, -1)
    unit_all = np.vstack([unit, np.zeros((1, d), np.float32)])
    return rq.Feats(cluster_of, unit_all, np.append(ok, False), {}, "v-test")


def test_pandas_attach_matches_spark_attach(spark):
    from pyspark.sql import types as T

    from features.attach import attach

    rng = np.random.default_rng(0)
    items = np.array([f"i{k}" for k in range(12)], dtype=object)
    feats = _feats(len(items), 8, rng)
    rows = []
    for r in range(60):
        hist = [str(x) for x in rng.choice(list(items) + ["unknown"], rng.integers(0, 6), replace=False)]
        rows.append({"user_id": f"u{r % 7}", "item_id": str(rng.choice(list(items) + ["unknown"])),
                     "pv_id": f"p{r // 3}", "session_id": "s", "query": "dress", "position": r % 10,
                     "label": int(r % 4 == 0), "ts": pd.Timestamp("2026-11-20 10:00:00"), "history": hist,
                     "dt": "2026-11-20"})
    log = pd.DataFrame(rows)
    # Two coarser levels (nested: fine c -> c // 2 -> c // 4), reserved on every level for no image.
    parents = np.array([[c // 4 for c in range(4)], [c // 2 for c in range(4)]])
    feats.levels_of = np.array([parents[:, c] if c >= 0 else [-1, -1] for c in feats.cluster_of])
    ours = rq.attach_pandas(log, feats, pd.Index(items), with_vector=False)

    schema = T.StructType([T.StructField("item_id", T.StringType()), T.StructField("cluster_id", T.IntegerType()),
                           T.StructField("vec", T.ArrayType(T.FloatType()))])
    fdf = spark.createDataFrame(pd.DataFrame({
        "item_id": items, "cluster_id": feats.cluster_of[:-1].astype(np.int32),
        "vec": [v if o else None for v, o in zip(feats.unit[:-1].tolist(), feats.ok[:-1])]}), schema)
    sdf = spark.createDataFrame(log.assign(history=log["history"].map(list)))
    level_map = spark.createDataFrame([(c, [int(x) for x in parents[:, c]]) for c in range(4)] + [(-1, [-1, -1])],
                                      "cluster_id int, cluster_levels array<int>")
    theirs = attach(sdf, fdf, "v-test", False, 8, level_map).toPandas()
    key = ["pv_id", "item_id", "user_id", "position"]
    a, b = ours.sort_values(key).reset_index(drop=True), theirs.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == len(log)
    assert (a["item_cluster_id"].to_numpy() == b["item_cluster_id"].to_numpy()).all()
    for x, y, h in zip(a["history_cluster_ids"], b["history_cluster_ids"], a["history"]):
        assert list(x) == list(y) and len(x) == len(h)
    for x, y in zip(a["sim_scores"], b["sim_scores"]):
        np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=1e-5)
    assert [list(x) for x in a["item_cluster_levels"]] == [list(y) for y in b["item_cluster_levels"]]
    assert ([[list(v) for v in x] for x in a["history_cluster_levels"]]
            == [[list(v) for v in y] for y in b["history_cluster_levels"]])
    assert any(list(x) == [-1, -1] for x in a["item_cluster_levels"])  # the unknown item / no image
    none = rq.attach_pandas(log, None, pd.Index(items), with_vector=False)
    assert (none["item_cluster_id"] == -1).all() and all((np.asarray(s) == 0).all() for s in none["sim_scores"])


def test_tables_have_every_row():
    rng = np.random.default_rng(1)
    out = {"args": {"clusters": 8}, "seeds": {}}
    for s in ("0", "1", "2"):
        m = lambda: {"auc": float(rng.uniform(0.5, 0.7)), "gauc": float(rng.uniform(0.5, 0.7))}  # noqa: E731
        out["seeds"][s] = {
            "ctr": {row: {"overall": m(), "cold_start": m()} for row, _, _ in rq.CTR_ROWS},
            "encoders": {e: {**{k: 0.5 for k in ("nmi_style", "nmi_hue", "nmi_pattern", "nmi_shape", "nmi_scale",
                                                 "nmi_category", "purity_style")},
                             "loss_first": None if e == "untrained" else 1.0, "loss_last_10": 0.5}
                         for e in rq.ENCODERS}}
    text = rq.tables(out)
    for row, _, _ in rq.CTR_ROWS:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "3" and "n/a" not in line
        assert all(math.isfinite(float(c.split(" ± ")[0])) for c in cells[2:9] if c != "-")


def test_oracle_references_are_the_hidden_attributes_with_nested_levels():
    """The reference rows: oracle_hue's id is the hue family, and the oracles' levels are the ideal
    hierarchy (style -> hue + pattern -> hue): every fine id has one parent per level."""
    rng = np.random.default_rng(4)
    n = 300
    ids = np.array([f"i{k}" for k in range(n)], dtype=object)
    styles = pd.DataFrame({"item_id": ids, "hue": rng.choice(["red", "blue", "green"], n),
                           "pattern": rng.choice(["solid", "dots"], n), "shape": rng.choice(["a", "b"], n),
                           "scale": rng.choice(["s", "l"], n)})
    data = rq.Data(item_ids=ids, images=np.zeros((n, 3, 4, 4), np.uint8), categories=rng.choice(["bag", "dress"], n),
                   styles=styles, train_files=[], ctr_train=None, ctr_eval=None, cat_list=["bag", "dress"],
                   eval_date="2026-11-24")
    hue = rq.oracle_features(data, "hue-s0", "hue")
    style = rq.oracle_features(data, "style-s0", "style")
    assert rq.ENCODERS["oracle_hue"] == "truth:hue" and "oracle_hue" in rq.ORACLES
    assert hue.cluster_of[-1] == -1 and (hue.levels_of[-1] == -1).all()  # the reserved no-image entry
    assert len(set(hue.cluster_of[:-1])) == 3 and abs(hue.quality["nmi_hue"] - 1) < 1e-9
    same_hue = styles["hue"].to_numpy()[:, None] == styles["hue"].to_numpy()[None, :]
    assert ((hue.cluster_of[:-1, None] == hue.cluster_of[None, :-1]) == same_hue).all()
    assert abs(style.quality["nmi_style"] - 1) < 1e-9 and style.quality["nmi_hue"] < 1
    for fine, coarse in ((style.cluster_of[:-1], style.levels_of[:-1, 1]),
                         (style.levels_of[:-1, 1], style.levels_of[:-1, 0])):
        assert all(len(set(coarse[fine == f])) == 1 for f in set(fine))  # nested: one parent per id
    assert len(set(style.levels_of[:-1, 0])) == 3 and len(set(style.levels_of[:-1, 1])) == 6
