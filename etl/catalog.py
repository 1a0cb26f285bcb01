"""The table catalogue: every Delta table's name, partition columns, unique key and schema contract.

Writers, readers and tests name tables by these constants, never by string literals. A `Table` is a
`str` (its name), so it goes wherever a table name goes (``store.read(CTR_TRAIN)``, dict keys,
messages), and carries its contract: `TableStore` checks every frame written to a catalogued table
against `columns` (plus `optional`), so a transform that renames, adds or drops a column fails at the
write, not in a reader days later. Column order is the writer's `select` (the contract as code).
"""
from __future__ import annotations


class Table(str):
    """A table name with its contract: stage, partition columns, data columns, key, optional columns,
    and the Parquet codec of its files."""

    stage: int
    partition_by: tuple[str, ...]
    columns: tuple[str, ...]  # data columns, in order, partition columns excluded
    # unique within a partition, by construction (the transforms dedupe on it): stage 1's verify names
    # repeated keys when its counts do not add up, the tests check it, a publish pays no pass for it
    key: tuple[str, ...]
    optional: tuple[str, ...]  # data columns present only under some settings
    compression: str | None  # Parquet codec of the files TableStore writes; None = Spark's session default (snappy)

    def __new__(cls, name: str, stage: int, partition_by: tuple[str, ...], columns: tuple[str, ...],
                key: tuple[str, ...] = (), optional: tuple[str, ...] = (), compression: str | None = None):
        t = super().__new__(cls, name)
        t.stage, t.partition_by, t.columns, t.key, t.optional = stage, partition_by, columns, key, optional
        t.compression = compression
        return t

    def __reduce__(self):  # copy, deepcopy (dataclasses.asdict) and pickle rebuild the same entry
        return Table, (str(self), self.stage, self.partition_by, self.columns, self.key, self.optional,
                       self.compression)

    def problems(self, frame_columns) -> list[str]:
        """What is wrong with a frame's columns for this table ([] when it fits). Partition columns may
        be in the frame or given separately by the writer."""
        have = [c for c in frame_columns if c not in self.partition_by]
        missing = [c for c in self.columns if c not in have]
        unknown = [c for c in have if c not in self.columns and c not in self.optional]
        return ([f"missing column(s) {missing}"] if missing else []) + \
               ([f"column(s) {unknown} not in the contract"] if unknown else [])


# ---- stage 1: raw search log -> samples (published together per date, in this order) ---------------
QUARANTINE = Table("quarantine", 1, ("dt", "job"),
                   ("source", "reason", "detail", "raw", "raw_b64", "event_id", "job_run_id"))
ITEMS = Table("items", 1, ("dt",), ("item_id", "category", "title", "price", "first_seen_dt", "image_uri"),
              key=("item_id",))
ITEM_IMAGES = Table("item_images", 1, ("dt",), ("item_id", "image", "width", "height", "sha256"), key=("item_id",))
PV_SAMPLES = Table("pv_samples", 1, ("dt",),
                   ("sample_id", "user_id", "session_id", "pv_id", "query", "ts", "pv_items", "pv_labels",
                    "pv_positions", "click_history", "click_history_ts", "n_pos"), key=("pv_id",))
CTR_LOG = Table("ctr_log", 1, ("dt",),
                ("user_id", "item_id", "pv_id", "session_id", "query", "position", "label", "ts", "history"),
                key=("pv_id", "item_id"))
# zstd: the rows carry ~10 JPEGs each and a user's consecutive samples repeat the same history images
# within zstd's window (not snappy's): -28 % bytes at the same write time and reader speed
# (bench/RESULTS.md, "courier_train codec"). Every reader here (Spark, pyarrow, delta-rs) reads zstd.
COURIER_TRAIN = Table("courier_train", 1, ("dt",),
                      ("sample_id", "user_id", "session_id", "pv_id", "query", "ts", "pv_items", "pv_labels",
                       "pv_mask", "pv_images", "click_history", "click_mask", "click_images"), key=("pv_id",),
                      compression="zstd")
STAGE1 = (QUARANTINE, ITEMS, ITEM_IMAGES, PV_SAMPLES, CTR_LOG, COURIER_TRAIN)

# ---- stages 3-4: image features -----------------------------------------------------------------
ITEM_EMBEDDINGS = Table("item_embeddings", 3, ("encoder_version", "dt"), ("item_id", "embedding"),
                        key=("item_id",))
ITEM_CLUSTERS = Table("item_clusters", 3, ("feature_version", "dt"), ("item_id", "cluster_id", "distance"),
                      key=("item_id",))
# ctr_log_digest: the digest of the ctr_log files a ctr_train partition was attached from
# (features.pipeline.ctr_log_digests), so the refresh knows exactly which dates a rebuild made stale.
# Optional: a ctr_train written before it existed keeps its schema (etl.tables refuses to mix two).
CTR_LOG_DIGEST = "ctr_log_digest"
CTR_TRAIN = Table("ctr_train", 4, ("dt",),
                  CTR_LOG.columns + ("item_cluster_id", "history_cluster_ids", "sim_scores", "feature_version"),
                  key=CTR_LOG.key,
                  optional=("item_cluster_levels", "history_cluster_levels", "item_vector", CTR_LOG_DIGEST))

TABLES = {t: t for t in (*STAGE1, ITEM_EMBEDDINGS, ITEM_CLUSTERS, CTR_TRAIN)}


def table(name: str) -> Table | None:
    """The catalogue entry of a table name, or None for a table outside the catalogue (tests' scratch
    tables, ad-hoc tables): those are written without a contract check."""
    return TABLES.get(name)
