"""Stage 4 transforms: the item feature look-up and ctr_log -> ctr_train (Spark built-ins only; the
only Python in the path is the Arrow assignment UDF and the encoder UDF for items not yet clustered)."""
from __future__ import annotations

from typing import Callable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from features import NO_IMAGE_CLUSTER_ID, NO_IMAGE_SIM_SCORE

CTR_LOG_COLUMNS = ["user_id", "item_id", "pv_id", "session_id", "query", "position", "label", "ts", "history"]
FEATURE_COLUMNS = ["item_cluster_id", "history_cluster_ids", "sim_scores"]

# item features: item_id, cluster_id (int, never null), vec (L2-normalised array<float>, null when unusable)


def unit_vector(col: str | Column) -> Column:
    """L2-normalised array, or null when it is null, holds NaN/inf or has zero norm (built-ins, no UDF)."""
    e = F.col(col) if isinstance(col, str) else col
    sq = F.aggregate(e, F.lit(0.0).cast("double"), lambda acc, x: acc + x.cast("double") * x.cast("double"))
    ok = sq.isNotNull() & ~F.isnan(sq) & (sq > 0) & (sq != float("inf"))
    # The norm once per row, zipped in: referenced inside a lambda, Spark evaluated the whole sum again for
    # every element (O(d^2) per row: 73 s instead of 0.9 s for 20,000 vectors of 256 on one core).
    norms = F.array_repeat(F.sqrt(sq), F.size(e))
    return F.when(ok, F.zip_with(e, norms, lambda x, norm: (x / norm).cast("float")))


def needed_items(ctr_log: DataFrame) -> DataFrame:
    """Every item an impression or a history refers to (item_id)."""
    return (ctr_log.select("item_id")
            .unionByName(ctr_log.select(F.explode("history").alias("item_id")))
            .where(F.col("item_id").isNotNull()).distinct())


def known_features(item_clusters: DataFrame, item_embeddings: DataFrame) -> DataFrame:
    """Items already in item_clusters (one feature version) with their normalised embeddings."""
    emb = item_embeddings.select("item_id", unit_vector("embedding").alias("vec"))
    return (item_clusters.select("item_id", "cluster_id").join(emb, on="item_id", how="left")
            .select("item_id", F.coalesce("cluster_id", F.lit(NO_IMAGE_CLUSTER_ID)).alias("cluster_id"), "vec"))


def on_the_fly_features(items: DataFrame, item_images: DataFrame,
                        embed: Callable[[DataFrame], DataFrame],
                        assign: Callable[[DataFrame], DataFrame]) -> DataFrame:
    """Items not yet clustered: embed their images and assign them with the broadcast index; an item
    with no usable image gets NO_IMAGE_CLUSTER_ID and a null vector.

    assign must be assign_frame(..., keep=("embedding",)): (item_id, cluster_id, distance, embedding)."""
    with_image = items.join(item_images.select("item_id", "image"), on="item_id", how="inner")
    assigned = assign(embed(with_image)).select("item_id", "cluster_id", unit_vector("embedding").alias("vec"))
    no_image = items.join(item_images.select("item_id"), on="item_id", how="left_anti").select(
        "item_id", F.lit(NO_IMAGE_CLUSTER_ID).alias("cluster_id"), F.lit(None).cast("array<float>").alias("vec"))
    return assigned.unionByName(no_image)


def attach(ctr_log: DataFrame, features: DataFrame, feature_version: str, include_vector: bool,
           dim: int, level_map: DataFrame | None = None) -> DataFrame:
    """ctr_log -> ctr_train: one output row per input row (left joins on unique keys only).

    features: (item_id unique, cluster_id, vec). History features are computed once per distinct
    (pv_id, history) and joined back, so the item-level table is never broadcast. With `level_map`
    (cluster_id unique -> cluster_levels array<int>, the reserved id included), every coarser level of
    the item and of each history item is written too: item_cluster_levels, history_cluster_levels.
    """
    feats = features.select("item_id", F.coalesce("cluster_id", F.lit(NO_IMAGE_CLUSTER_ID)).alias("cluster_id"),
                            "vec")
    if level_map is not None:  # a fine id -> its coarser ids: a look-up, not another search
        feats = feats.join(F.broadcast(level_map.select("cluster_id", "cluster_levels")), on="cluster_id", how="left")
    else:
        feats = feats.withColumn("cluster_levels", F.lit(None).cast("array<int>"))
    item = feats.select("item_id", F.col("cluster_id").alias("item_cluster_id"), F.col("vec").alias("_ivec"),
                        F.col("cluster_levels").alias("_ilev"))
    pvs = ctr_log.select("pv_id", "history").distinct()
    slots = (pvs.select("pv_id", "history", F.posexplode("history").alias("_pos", "_hid"))
             .join(feats.withColumnRenamed("item_id", "_hid"), on="_hid", how="left"))
    per_pv = slots.groupBy("pv_id", "history").agg(
        # sorted by position: aligned with `history`
        F.array_sort(F.collect_list(F.struct("_pos", "cluster_id", "vec", "cluster_levels"))).alias("_h"))
    joined = (ctr_log.join(item, on="item_id", how="left")
              .join(per_pv, on=["pv_id", "history"], how="left")
              .withColumn("_h", F.coalesce("_h", F.array().cast(per_pv.schema["_h"].dataType))))

    def sim(s: Column) -> Column:
        dot = F.aggregate(F.zip_with("_ivec", s["vec"], lambda a, b: a * b), F.lit(0.0).cast("double"),
                          lambda acc, x: acc + x)
        return F.when(F.col("_ivec").isNull() | s["vec"].isNull(), F.lit(NO_IMAGE_SIM_SCORE)).otherwise(dot).cast("float")

    cols = [*CTR_LOG_COLUMNS,
            F.coalesce("item_cluster_id", F.lit(NO_IMAGE_CLUSTER_ID)).cast("int").alias("item_cluster_id"),
            F.transform("_h", lambda s: F.coalesce(s["cluster_id"], F.lit(NO_IMAGE_CLUSTER_ID)).cast("int"))
            .alias("history_cluster_ids"),
            F.transform("_h", sim).alias("sim_scores")]
    if level_map is not None:
        # An item outside the features (or without an image) is reserved on every level.
        n_levels = level_map.select(F.max(F.size("cluster_levels"))).first()[0]
        reserved = F.array_repeat(F.lit(NO_IMAGE_CLUSTER_ID), n_levels)
        cols += [F.coalesce("_ilev", reserved).alias("item_cluster_levels"),
                 F.transform("_h", lambda s: F.coalesce(s["cluster_levels"], reserved)).alias("history_cluster_levels")]
    if include_vector:
        cols.append(F.coalesce("_ivec", F.array_repeat(F.lit(0.0).cast("float"), dim)).alias("item_vector"))
    return joined.select(*cols, F.lit(feature_version).alias("feature_version"), "dt")
