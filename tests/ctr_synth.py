"""A synthetic ctr_train for the CTR/review tests: real Delta (TableStore) written by real Spark.

The label depends on image cluster ids only: an impression is clicked with p=0.6 when the item's cluster
is among its history's clusters, else p=0.1. Every eval-date item is new (cold start), so item-ID
embeddings cannot carry the signal there and a model without the image feature sits near AUC 0.5.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

DATES = ["2026-11-20", "2026-11-21", "2026-11-22"]
N_CLUSTERS = 12


def synth_frame(seed: int, date: str, n: int, item_offset: int, n_items: int = 200,
                feature_version: str = "fv-test") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    items = np.array([f"i{item_offset + k:05d}" for k in range(n_items)])
    item_cluster = rng.integers(0, N_CLUSTERS, n_items)
    item_cluster[:5] = -1  # items without a usable image (features.NO_IMAGE_CLUSTER_ID)
    pool = np.array([f"h{k:04d}" for k in range(300)])
    pool_cluster = np.arange(300) % N_CLUSTERS
    it = rng.integers(0, n_items, n)
    hist_len = rng.integers(0, 6, n)
    base = dt.datetime.fromisoformat(date + "T00:00:00")
    rows = []
    for r in range(n):
        h = rng.integers(0, 300, hist_len[r])
        c = int(item_cluster[it[r]])
        match = c >= 0 and c in set(pool_cluster[h].tolist())
        vec = np.zeros(N_CLUSTERS + 1, dtype=np.float32)
        vec[c + 1] = 1.0
        rows.append({
            "user_id": f"u{rng.integers(0, 60):03d}", "item_id": items[it[r]], "pv_id": f"p{date}-{r // 3}",
            "session_id": f"s{date}-{r // 9}", "query": f"cat{it[r] % 4}", "position": int(r % 3),
            "label": int(rng.random() < (0.6 if match else 0.1)), "ts": base + dt.timedelta(seconds=r),
            "history": [str(x) for x in pool[h]], "item_cluster_id": c,
            "history_cluster_ids": [int(x) for x in pool_cluster[h]],
            "sim_scores": [0.0 if c < 0 else (0.9 if pool_cluster[k] == c else 0.1) for k in h],
            "item_vector": vec.tolist(), "feature_version": feature_version, "dt": date})
    return pd.DataFrame(rows)


def schema():
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("user_id", T.StringType()), T.StructField("item_id", T.StringType()),
        T.StructField("pv_id", T.StringType()), T.StructField("session_id", T.StringType()),
        T.StructField("query", T.StringType()), T.StructField("position", T.IntegerType()),
        T.StructField("label", T.IntegerType()), T.StructField("ts", T.TimestampType()),
        T.StructField("history", T.ArrayType(T.StringType())),
        T.StructField("item_cluster_id", T.IntegerType()),
        T.StructField("history_cluster_ids", T.ArrayType(T.IntegerType())),
        T.StructField("sim_scores", T.ArrayType(T.FloatType())),
        T.StructField("item_vector", T.ArrayType(T.FloatType())),
        T.StructField("feature_version", T.StringType()), T.StructField("dt", T.StringType())])


def write_ctr_train(spark, store, rows_per_date: int = 2500, feature_version: str = "fv-test",
                    dates=DATES, with_vector: bool = True) -> int:
    """Write one partition per date (each date's items are new); returns the table version. Without
    `with_vector` the rows are an attach's with features.include_vector: false (no item_vector)."""
    version = None
    for k, date in enumerate(dates):
        pdf = synth_frame(100 + k, date, rows_per_date, item_offset=1000 * k, feature_version=feature_version)
        df = spark.createDataFrame(pdf, schema=schema())
        if not with_vector:
            df = df.drop("item_vector")
        version = store.replace_partition(df, "ctr_train", {"dt": date}, job="test")
    return version
