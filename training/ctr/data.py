"""ctr_train -> in-memory tensors for the CTR model.

The CTR data is small (the demo: ~1e5-1e6 impressions), so a date range of one pinned ctr_train version
is read once into pandas and turned into a few dense tensors; training then slices them by index (no
per-row Python, no data loader). Everything here works without Spark except `read_ctr_frame`.

ID features are **hashed** into fixed bucket counts (no vocabulary to ship with the model): bucket 0 is
the shared out-of-vocabulary (OOV) bucket, ids hash into 1..buckets-1. The model remembers which buckets
were seen in training (a buffer in its state_dict) and sends every other id to bucket 0, so items never
seen in training (cold start) all take the same, trained OOV path (see `model.HashedEmbedding`).

Cluster ids are embedded by value: embedding row = cluster_id + 2, row 1 = "no usable image"
(`NO_IMAGE_CLUSTER_ID`, -1), row 0 = history padding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from etl import catalog as T
from etl.contracts import NO_IMAGE_CLUSTER_ID

TABLE = T.CTR_TRAIN
QUERY_BUCKETS = 1024  # queries are categories here; hashed like the other ids
POSITION_BUCKETS = 64  # positions >= 63 share the last bucket
NO_IMAGE_ROW = 1  # embedding row of NO_IMAGE_CLUSTER_ID: a cluster id's row is id - NO_IMAGE_CLUSTER_ID + NO_IMAGE_ROW

LEVEL_COLUMNS = ["item_cluster_levels", "history_cluster_levels"]  # with features.levels only
BASE_COLUMNS = ["user_id", "item_id", "pv_id", "session_id", "query", "position", "label", "history",
                "item_cluster_id", "history_cluster_ids", "sim_scores", "feature_version", "dt"]

ROW_ORDER = ["dt", "pv_id", "position", "item_id"]  # an impression's key: unique per row of ctr_train


class CtrDataError(ValueError):
    """ctr_train rows that break the stage-4 contract (message says which rule and how many rows)."""


# ---- dates and reading -----------------------------------------------------------------------------
def split_dates(available: list[str], train_dates: list | None, eval_dates: list | None,
                eval_last_n: int) -> tuple[list[str], list[str]]:
    """(train dates, eval dates): explicit lists must exist in the table; by default the last
    `eval_last_n` dates are evaluated and every earlier date is trained on. Training on a date at or after
    an evaluation date is refused (the evaluation must be on later data)."""
    available = sorted(str(d) for d in available)
    if not available:
        raise CtrDataError(f"{TABLE} has no dates")
    if eval_dates:
        ev = sorted(str(d) for d in eval_dates)
    else:
        if len(available) <= eval_last_n:
            raise CtrDataError(f"{TABLE} has {len(available)} date(s) {available}: need more than "
                               f"ctr.eval_last_n_dates={eval_last_n} to keep any for training")
        ev = available[-eval_last_n:]
    tr = sorted(str(d) for d in train_dates) if train_dates else [d for d in available if d < ev[0]]
    missing = sorted(set(tr + ev) - set(available))
    if missing:
        raise CtrDataError(f"{TABLE} has no partition for date(s) {missing}; available: {available}")
    if not tr:
        raise CtrDataError(f"no {TABLE} dates before the eval dates {ev} to train on")
    if max(tr) >= min(ev):
        raise CtrDataError(f"train dates {tr} must all precede the eval dates {ev}")
    return tr, ev


def dates_after_eval_start(trained_dates: list[str], eval_dates: list[str]) -> list[str]:
    """The training dates (of an image encoder, or of a CTR model) on or after the first eval date. A
    PV's click history holds the user's earlier clicks: whatever trained on an eval date, or on any
    later one, has seen the eval dates' clicks; an encoder's cluster ids would carry the labels they
    are evaluated on, and a model would be scored on what it learnt from."""
    return sorted(d for d in trained_dates if d and d >= min(eval_dates))


def validation_split(train_dates: list[str], last_n: int) -> tuple[list[str], list[str]]:
    """(fit dates, validation dates): the last `last_n` training dates validate, when at least one date
    is left to fit on; otherwise ([all], []) and the last epoch is kept. Eval dates are never involved."""
    train_dates = sorted(train_dates)
    if last_n <= 0 or len(train_dates) <= last_n:
        return train_dates, []
    return train_dates[:-last_n], train_dates[-last_n:]


def read_ctr_frame(store, version: int, dates: list[str], with_vector: bool) -> pd.DataFrame:
    """The rows of `dates` of ctr_train version `version` as pandas (via TableStore, Arrow collect)."""
    from pyspark.sql import functions as F

    sdf = store.read(TABLE, version)
    cols = list(BASE_COLUMNS) + [c for c in LEVEL_COLUMNS if c in sdf.columns]
    if with_vector:
        if "item_vector" not in sdf.columns:
            raise CtrDataError(f"feature_mode=vector needs {TABLE}.item_vector, which v{version} does not have "
                               "(attach with features.include_vector: true)")
        cols.append("item_vector")
    missing = [c for c in cols if c not in sdf.columns]
    if missing:
        raise CtrDataError(f"{TABLE} v{version} lacks contract column(s) {missing}")
    frame = sdf.where(F.col("dt").isin(list(dates))).select(*cols).toPandas()
    # One row order whatever the engine, file layout or core count: the mini-batches (and so the model
    # that --skip-if-done takes for "already trained") depend only on the snapshot and the config.
    return frame.sort_values(ROW_ORDER, kind="mergesort", ignore_index=True)


def table_dates(store, version: int) -> list[str]:
    return sorted({f.partition_values.get("dt") for f in store.files(TABLE, version)} - {None})


def feature_version_of(frame: pd.DataFrame) -> str:
    """The one feature_version of the rows; a mix would mean cluster ids from different clusterings."""
    values = frame["feature_version"].dropna().unique().tolist()
    nulls = int(frame["feature_version"].isna().sum())
    if nulls:
        raise CtrDataError(f"{nulls} {TABLE} rows have a null feature_version")
    if len(values) != 1:
        raise CtrDataError(f"{TABLE} rows carry feature_version(s) {sorted(values)}: train and evaluate on dates "
                           "attached with one clustering (re-run the attach job for the stale dates)")
    return str(values[0])


# ---- hashing ---------------------------------------------------------------------------------------
def hash_ids(values, buckets: int) -> np.ndarray:
    """Stable id -> bucket in 1..buckets-1 (pandas' fixed-key SipHash: the same in every process)."""
    arr = np.asarray(values, dtype=object)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    codes, uniques = pd.factorize(arr)
    if (codes < 0).any():
        raise CtrDataError(f"{int((codes < 0).sum())} null ids")
    h = pd.util.hash_array(np.asarray(uniques, dtype=object)) % np.uint64(buckets - 1) + np.uint64(1)
    return h.astype(np.int64)[codes]


def _flatten_lists(column: pd.Series, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of a list column; a null list is an empty one."""
    values = column.to_numpy()
    lens = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
    parts = [np.asarray(v) for v in values if v is not None and len(v)]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    if len(flat) != lens.sum():
        raise CtrDataError(f"{name}: nested lists are not allowed")
    if flat.dtype == object and pd.isna(flat).any():  # a null inside a list (a null list is an empty one)
        raise CtrDataError(f"{name}: {int(pd.isna(flat).sum())} null element(s) inside the lists")
    return flat, lens


# ---- tensors ---------------------------------------------------------------------------------------
@dataclass
class CtrTensors:
    """Dense per-impression tensors (N rows, L = max_history) plus the image-vector table."""
    label: torch.Tensor  # (N,) float
    item: torch.Tensor  # (N,) hashed item bucket
    user: torch.Tensor
    query: torch.Tensor
    position: torch.Tensor
    hist_item: torch.Tensor  # (N, L) hashed; 0 where padded
    hist_mask: torch.Tensor  # (N, L) bool
    item_cluster: torch.Tensor  # (N,) cluster id + 2 (1 = no image)
    hist_cluster: torch.Tensor  # (N, L)
    sim: torch.Tensor  # (N, L) float, 0 where padded
    item_vec: torch.Tensor  # (N,) row of vec_table (0 = none)
    hist_vec: torch.Tensor  # (N, L)
    vec_table: torch.Tensor  # (V, d) float; row 0 is zeros
    stats: dict = field(default_factory=dict)
    item_levels: torch.Tensor | None = None  # (N, K) coarser cluster ids + 2 (K = 0 without levels)
    hist_levels: torch.Tensor | None = None  # (N, L, K)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def rows(self, idx: torch.Tensor) -> "CtrTensors":
        """The rows `idx` as CtrTensors of their own (the image-vector table is shared)."""
        per_row = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                   if f.name not in ("vec_table", "stats") and getattr(self, f.name) is not None}
        return CtrTensors(**per_row, vec_table=self.vec_table, stats=dict(self.stats))

    def take(self, idx: torch.Tensor) -> dict:
        """A mini-batch as the model's input dict (image vectors gathered from the table here, so the
        (N, L, d) history-vector tensor never exists)."""
        return {"item": self.item[idx], "user": self.user[idx], "query": self.query[idx],
                "position": self.position[idx], "hist_item": self.hist_item[idx], "hist_mask": self.hist_mask[idx],
                "item_cluster": self.item_cluster[idx], "hist_cluster": self.hist_cluster[idx],
                "sim": self.sim[idx], "item_vec": self.vec_table[self.item_vec[idx]],
                "hist_vec": self.vec_table[self.hist_vec[idx]], "item_levels": self.item_levels[idx],
                "hist_levels": self.hist_levels[idx]}


def vector_table(frames: list[pd.DataFrame]) -> tuple[pd.Index, np.ndarray]:
    """item_id -> image vector from the rows' item_vector (one vector per item; history items borrow the
    vector of the same item seen as an impression). Row 0 of the table is the zero 'no vector' row."""
    parts = [f[["item_id", "item_vector"]] for f in frames if "item_vector" in f.columns]
    if not parts:
        return pd.Index([]), np.zeros((1, 1), dtype=np.float32)
    both = pd.concat(parts, ignore_index=True)
    both = both[both["item_vector"].notna()].drop_duplicates("item_id")
    if both.empty:
        return pd.Index([]), np.zeros((1, 1), dtype=np.float32)
    lens = both["item_vector"].map(len)
    if lens.nunique() != 1:
        raise CtrDataError(f"item_vector lengths differ: {sorted(lens.unique().tolist())[:5]}")
    table = np.zeros((len(both) + 1, int(lens.iloc[0])), dtype=np.float32)
    table[1:] = np.stack(both["item_vector"].to_numpy()).astype(np.float32)
    return pd.Index(both["item_id"].to_numpy()), table


def encode(frame: pd.DataFrame, max_history: int, item_buckets: int, user_buckets: int,
           vectors: tuple[pd.Index, np.ndarray] | None = None) -> CtrTensors:
    """Check the contract and build the tensors. Violations raise CtrDataError with counts; truncated
    histories (longer than max_history) are counted in stats, never silently."""
    n = len(frame)
    labels = frame["label"].to_numpy()
    if frame["label"].isna().any() or not np.isin(labels, (0, 1)).all():
        raise CtrDataError(f"label must be 0/1: {int((~np.isin(labels, (0, 1))).sum())} rows are not")
    cid = frame["item_cluster_id"]
    if cid.isna().any():
        raise CtrDataError(f"{int(cid.isna().sum())} rows have a null item_cluster_id "
                           f"(items without an image must carry {NO_IMAGE_CLUSTER_ID})")
    hist, hlen = _flatten_lists(frame["history"], "history")
    hcid, clen = _flatten_lists(frame["history_cluster_ids"], "history_cluster_ids")
    sims, slen = _flatten_lists(frame["sim_scores"], "sim_scores")
    for name, other in (("history_cluster_ids", clen), ("sim_scores", slen)):
        bad = int((other != hlen).sum())
        if bad:
            raise CtrDataError(f"{bad} rows have {name} not aligned with history (different lengths)")
    cids = cid.to_numpy().astype(np.int64)
    low = min(cids.min(initial=0), hcid.astype(np.int64).min(initial=0))
    if low < NO_IMAGE_CLUSTER_ID:
        raise CtrDataError(f"cluster ids must be >= {NO_IMAGE_CLUSTER_ID}, found {low}")
    if len(sims) and not np.isfinite(sims.astype(np.float64)).all():
        raise CtrDataError("sim_scores has NaN or infinite values")

    L = max_history
    rows = np.repeat(np.arange(n), hlen)
    pos = np.arange(len(hist)) - np.repeat(np.cumsum(hlen) - hlen, hlen)  # index within the row's history
    keep = pos < L  # most recent first: truncation drops the oldest clicks
    rows, pos = rows[keep], pos[keep]
    hist_item = np.zeros((n, L), dtype=np.int64)
    hist_item[rows, pos] = hash_ids(hist[keep], item_buckets)
    hist_mask = np.zeros((n, L), dtype=bool)
    hist_mask[rows, pos] = True
    hist_cluster = np.zeros((n, L), dtype=np.int64)
    hist_cluster[rows, pos] = hcid[keep].astype(np.int64) - NO_IMAGE_CLUSTER_ID + NO_IMAGE_ROW
    sim = np.zeros((n, L), dtype=np.float32)
    sim[rows, pos] = sims[keep].astype(np.float32)

    index, table = vectors if vectors is not None else (pd.Index([]), np.zeros((1, 1), dtype=np.float32))
    item_vec = index.get_indexer(frame["item_id"].to_numpy()) + 1  # -1 (unknown) -> row 0
    hist_vec = np.zeros((n, L), dtype=np.int64)
    hist_vec[rows, pos] = index.get_indexer(hist[keep]) + 1 if len(index) else 0

    item_levels, hist_levels = _levels(frame, n, L, rows, pos, keep, hlen)
    stats = {"rows": n, "positives": int(labels.sum()), "history_items": int(hlen.sum()),
             "histories_truncated": int((hlen > L).sum()), "rows_without_history": int((hlen == 0).sum()),
             "rows_without_image": int((cids == NO_IMAGE_CLUSTER_ID).sum()),
             "rows_without_vector": int((item_vec == 0).sum())}
    t = torch.from_numpy
    return CtrTensors(
        label=t(labels.astype(np.float32)), item=t(hash_ids(frame["item_id"].to_numpy(), item_buckets)),
        user=t(hash_ids(frame["user_id"].to_numpy(), user_buckets)),
        query=t(hash_ids(frame["query"].fillna("<null>").to_numpy(), QUERY_BUCKETS)),
        position=t(np.clip(frame["position"].fillna(POSITION_BUCKETS - 1).to_numpy().astype(np.int64), 0,
                           POSITION_BUCKETS - 1)),
        hist_item=t(hist_item), hist_mask=t(hist_mask),
        item_cluster=t(cids - NO_IMAGE_CLUSTER_ID + NO_IMAGE_ROW), hist_cluster=t(hist_cluster), sim=t(sim),
        item_vec=t(item_vec.astype(np.int64)), hist_vec=t(hist_vec), vec_table=t(table), stats=stats,
        item_levels=t(item_levels), hist_levels=t(hist_levels))


def _levels(frame: pd.DataFrame, n: int, L: int, rows, pos, keep, hlen) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) and (N, L, K) coarser cluster ids + 2 (1 = no image, 0 = padding); K = 0 without levels."""
    if not all(c in frame.columns for c in LEVEL_COLUMNS):
        return np.zeros((n, 0), np.int64), np.zeros((n, L, 0), np.int64)
    item = frame["item_cluster_levels"]
    if item.isna().any():
        raise CtrDataError(f"{int(item.isna().sum())} rows have a null item_cluster_levels")
    k = {len(x) for x in item}
    if len(k) != 1:
        raise CtrDataError(f"item_cluster_levels has rows with different numbers of levels {sorted(k)}")
    k = k.pop()
    raw_item = np.stack(item.to_numpy()).astype(np.int64).reshape(n, k)
    per_slot = [lv for row in frame["history_cluster_levels"] for lv in (row if row is not None else [])]
    lens = np.array([0 if row is None else len(row) for row in frame["history_cluster_levels"]])
    if (lens != hlen).any() or any(len(lv) != k for lv in per_slot):
        raise CtrDataError("history_cluster_levels is not aligned with history (or with the item's levels)")
    raw_hist = np.stack(per_slot).astype(np.int64).reshape(-1, k) if per_slot else np.zeros((0, k), np.int64)
    if min(raw_item.min(initial=0), raw_hist.min(initial=0)) < NO_IMAGE_CLUSTER_ID:
        raise CtrDataError(f"cluster level ids must be >= {NO_IMAGE_CLUSTER_ID}")
    hist_levels = np.zeros((n, L, k), np.int64)
    hist_levels[rows, pos] = raw_hist[keep] - NO_IMAGE_CLUSTER_ID + NO_IMAGE_ROW
    return raw_item - NO_IMAGE_CLUSTER_ID + NO_IMAGE_ROW, hist_levels


def seen_items(frame: pd.DataFrame) -> set[str]:
    """Every item id of the frame, as an impression or in a history (what 'seen in training' means)."""
    hist, _ = _flatten_lists(frame["history"], "history")
    return set(frame["item_id"].unique().tolist()) | set(hist.tolist())
