"""Fit, score, save and load the CTR model (in-process torch; no Spark, no MLflow here).

`fit_and_evaluate` is the whole library step of jobs/train_ctr.py: encode the train and eval frames,
choose the number of epochs on the validation dates (the last training dates; early stopping), refit on
every training date for that many epochs, score the eval dates and compute the metric report. The eval
dates are scored after each epoch for the training curve only: they never choose anything.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from training.ctr import metrics
from training.ctr.data import NO_IMAGE_ROW, CtrDataError, CtrTensors, encode, seen_items, vector_table
from training.ctr.model import CTRModel, ModelSpec

WEIGHTS = "weights.pt"
SPEC = "model_spec.json"


def spec_from_conf(ctr, feature_mode: str | None = None) -> ModelSpec:
    return ModelSpec(feature_mode=feature_mode or ctr.feature_mode, id_dim=ctr.id_dim, cluster_dim=ctr.cluster_dim,
                     vector_dim=ctr.vector_dim, context_dim=ctr.context_dim, layers=list(ctr.layers),
                     attention_hidden=ctr.attention_hidden, max_history=ctr.max_history,
                     item_buckets=ctr.item_buckets, user_buckets=ctr.user_buckets, id_dropout=ctr.id_dropout,
                     level_combine=ctr.level_combine)


@torch.no_grad()
def predict(model: CTRModel, data: CtrTensors, batch_size: int = 65536) -> np.ndarray:
    """Click probabilities for every row of `data`, in row order. The sigmoid in float64: in float32 every
    logit above ~16.6 is exactly 1.0, and AUC would read those rows as ties."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        out.append(torch.sigmoid(model(data.take(idx)).double()))
    return torch.cat(out).numpy() if out else np.zeros(0)


def fit(model: CTRModel, train: CtrTensors, ctr, eval_data: CtrTensors | None = None,
        progress: Callable[[str], None] | None = None, valid_data: CtrTensors | None = None,
        epochs: int | None = None) -> list[dict]:
    """Adam on binary cross entropy for `epochs` (default ctr.epochs); returns the training curve (one
    dict per epoch). With `valid_data`, stops once the validation AUC has not improved for
    ctr.early_stopping_patience epochs (the curve then ends there)."""
    torch.manual_seed(ctr.seed)
    gen = torch.Generator().manual_seed(ctr.seed)
    sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    # Two Adams with one learning rate: SparseAdam updates only the id rows a batch used.
    opts = [torch.optim.Adam(dense, lr=ctr.lr), torch.optim.SparseAdam(sparse, lr=ctr.lr)]
    curve = []
    n = len(train)
    best, since_best = -np.inf, 0
    for epoch in range(1, (epochs or ctr.epochs) + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, steps = 0.0, 0
        for start in range(0, n, ctr.batch_size):
            idx = perm[start:start + ctr.batch_size]
            loss = F.binary_cross_entropy_with_logits(model(train.take(idx)), train.label[idx])
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
            total += float(loss.detach()) * len(idx)
            steps += 1
        point = {"epoch": epoch, "train_loss": total / max(n, 1), "steps": steps,
                 "epoch_seconds": time.perf_counter() - t0}
        for name, data in (("valid", valid_data), ("eval", eval_data)):
            if data is not None and len(data):
                p, y = predict(model, data), data.label.numpy()
                point.update({f"{name}_logloss": metrics.log_loss(y, p), f"{name}_auc": metrics.auc(y, p)})
        curve.append(point)
        if progress:
            progress(f"epoch {epoch}: train loss {point['train_loss']:.4f}" + "".join(
                f", {name} logloss {point[name + '_logloss']:.4f}, {name} AUC {point[name + '_auc']:.4f}"
                for name in ("valid", "eval") if f"{name}_auc" in point) + f" ({point['epoch_seconds']:.1f} s)")
        if "valid_auc" in point:
            score = _valid_score(point)
            best, since_best = (score, 0) if score > best else (best, since_best + 1)
            if since_best >= ctr.early_stopping_patience:
                break
    return curve


def _valid_score(point: dict) -> float:
    """An epoch's validation score: its AUC, or minus its log loss where the AUC is undefined."""
    return point["valid_auc"] if np.isfinite(point["valid_auc"]) else -point["valid_logloss"]


def best_epochs(curve: list[dict]) -> int:
    """The epoch count with the best validation score (`_valid_score`); ties go to the fewer epochs."""
    return max(curve, key=lambda p: (_valid_score(p), -p["epoch"]))["epoch"]


@dataclass
class TrainResult:
    model: CTRModel
    spec: ModelSpec
    curve: list[dict]  # the selection fit's epochs (train, valid and eval columns)
    report: dict  # metrics.evaluate_predictions on the eval dates
    eval_probs: np.ndarray
    cold_items: set
    data_stats: dict
    seconds: dict
    selection: dict | None = None  # {"validation_dates", "epochs", "refit"}: how the epoch count was chosen


def fit_and_evaluate(train_frame: pd.DataFrame, eval_frame: pd.DataFrame, ctr, feature_mode: str | None = None,
                     progress: Callable[[str], None] | None = None,
                     validation_dates: list[str] | None = None) -> TrainResult:
    """Encode, fit on the train frame, evaluate on the eval frame (overall, per category, cold start).

    With `validation_dates` (a subset of the train frame's dates): fit on the other dates with early
    stopping on those, then refit on the whole train frame for the best number of epochs."""
    if len(train_frame) == 0 or len(eval_frame) == 0:
        raise ValueError(f"nothing to train or evaluate on: {len(train_frame)} train rows, {len(eval_frame)} eval rows")
    torch.set_num_threads(ctr.threads)
    spec = spec_from_conf(ctr, feature_mode)
    t0 = time.perf_counter()
    # vector mode: a history item borrows the vector of the same item seen as an impression. The training
    # rows borrow from training rows only (an eval row would change what the model trains on); the eval
    # rows from both.
    vector = spec.feature_mode == "vector"
    train_vectors = vector_table([train_frame]) if vector else None
    if vector and len(train_vectors[0]) == 0:
        raise CtrDataError("feature_mode=vector but no training row carries an item_vector "
                           "(attach with features.include_vector: true)")
    enc = dict(max_history=spec.max_history, item_buckets=spec.item_buckets, user_buckets=spec.user_buckets)
    train = encode(train_frame, **enc, vectors=train_vectors)
    ev = encode(eval_frame, **enc, vectors=vector_table([train_frame, eval_frame]) if vector else None)
    # Cluster tables sized by the training rows alone: the eval rows choose nothing, not even the table
    # size (a larger table draws more initial weights, and every module after it would start elsewhere).
    # An eval id past the table reads the no-image row, as any cluster training never held does.
    rows = int(max(train.item_cluster.max(), train.hist_cluster.max())) + 1
    # Embedding rows per coarser level: its largest id (+2 offset) over items and histories, + 1.
    level_rows = [1 + max(int(ids.max()) for ids in (train.item_levels[:, k], train.hist_levels[..., k]))
                  for k in range(train.item_levels.shape[1])]
    if spec.feature_mode == "multi_cluster" and (not level_rows or ev.item_levels.shape[1] != len(level_rows)):
        raise CtrDataError("feature_mode multi_cluster needs ctr_train.item_cluster_levels / history_cluster_levels "
                           "(build_clusters with features.levels, then attach)")
    spec = replace(spec, num_cluster_rows=rows, vector_in=int(train.vec_table.shape[1]),
                   level_rows=level_rows if spec.feature_mode == "multi_cluster" else [])
    encode_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    is_valid = train_frame["dt"].isin(validation_dates or []).to_numpy()
    selection = {"validation_dates": sorted(validation_dates or []), "epochs": ctr.epochs, "refit": False}
    if is_valid.any() and not is_valid.all():
        fit_rows, valid_rows = (torch.from_numpy(np.flatnonzero(m)) for m in (~is_valid, is_valid))
        fit_part = train.rows(fit_rows)
        model = _new_model(spec, ctr, fit_part)
        curve = fit(model, fit_part, ctr, ev, progress, valid_data=train.rows(valid_rows))
        selection.update(epochs=best_epochs(curve), refit=True)
        if progress:
            progress(f"validation on {selection['validation_dates']}: {selection['epochs']} epoch(s) chosen; "
                     "refit on every training date")
        model = _new_model(spec, ctr, train)
        fit(model, train, ctr, epochs=selection["epochs"])
    else:
        model = _new_model(spec, ctr, train)
        curve = fit(model, train, ctr, ev, progress)
    fit_s = time.perf_counter() - t1
    probs = predict(model, ev)
    cold = seen_items_complement(eval_frame, seen_items(train_frame))
    report = metrics.evaluate_predictions(eval_frame, probs, cold_items=cold, group_col=ctr.gauc_by)
    return TrainResult(model, spec, curve, report, probs, cold,
                       {"train": train.stats, "eval": ev.stats},
                       {"encode": encode_s, "fit": fit_s, "total": time.perf_counter() - t0}, selection)


def _new_model(spec: ModelSpec, ctr, seen: CtrTensors) -> CTRModel:
    torch.manual_seed(ctr.seed)  # the same seed gives the same initial weights and the same model
    model = CTRModel(spec)
    # The id columns only: take() of every row would gather the (N, L, d) history vectors of vector mode.
    model.mark_seen({"item": seen.item, "hist_item": seen.hist_item, "hist_mask": seen.hist_mask, "user": seen.user,
                     "query": seen.query, "item_cluster": seen.item_cluster, "hist_cluster": seen.hist_cluster,
                     "item_levels": seen.item_levels, "hist_levels": seen.hist_levels})
    return model


def seen_items_complement(eval_frame: pd.DataFrame, seen: set) -> set:
    """Eval impression items never seen in the training dates (the cold-start slice)."""
    return set(eval_frame["item_id"].unique().tolist()) - seen


def score_frame(model: CTRModel, frame: pd.DataFrame, extra_vector_frames: list | None = None) -> np.ndarray:
    """Probabilities of a saved/loaded model for the rows of a ctr_train frame (used by the review)."""
    s = model.spec
    vectors = vector_table([frame, *(extra_vector_frames or [])]) if s.feature_mode == "vector" else None
    data = encode(frame, s.max_history, s.item_buckets, s.user_buckets, vectors)
    return predict(model, data)


def hide_level(data: CtrTensors, level: int | None) -> CtrTensors:
    """`data` with one cluster level replaced by "no usable image": level None = the fine cluster id,
    k = the k-th coarser level (coarsest first). Padding (row 0) stays padding."""
    def hidden(ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids > NO_IMAGE_ROW, torch.full_like(ids, NO_IMAGE_ROW), ids)

    if level is None:
        return replace(data, item_cluster=hidden(data.item_cluster), hist_cluster=hidden(data.hist_cluster))
    item, hist = data.item_levels.clone(), data.hist_levels.clone()
    item[:, level], hist[..., level] = hidden(item[:, level]), hidden(hist[..., level])
    return replace(data, item_levels=item, hist_levels=hist)


def level_scores(model: CTRModel, frame: pd.DataFrame) -> list[tuple[str, int, np.ndarray]]:
    """Per cluster level of a multi_cluster model: (level name, distinct ids of the level in `frame`,
    the model's probabilities with that level hidden). The full model's score minus these is the gain
    each level brings (the review states it); [] for the other feature modes."""
    s = model.spec
    if s.feature_mode != "multi_cluster":
        return []
    data = encode(frame, s.max_history, s.item_buckets, s.user_buckets, None)

    def n_ids(item: torch.Tensor) -> int:
        return int(torch.unique(item[item > NO_IMAGE_ROW]).numel())

    levels = [(f"level {k + 1} (coarse)", n_ids(data.item_levels[:, k]), k) for k in range(data.item_levels.shape[1])]
    levels.append(("cluster id (fine)", n_ids(data.item_cluster), None))
    return [(name, n, predict(model, hide_level(data, k))) for name, n, k in levels]


# ---- persistence: a JSON spec + a state_dict, never a pickle --------------------------------------------
def save_model(model: CTRModel, folder: str, extra: dict | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, SPEC), "w") as fh:
        fh.write(model.spec.to_json())
    if extra:
        with open(os.path.join(folder, "lineage.json"), "w") as fh:
            json.dump(extra, fh, indent=2, sort_keys=True)


def load_registered(version) -> tuple[CTRModel, dict]:
    """(model, lineage tags) of a registered ctr-model ModelVersion; weights read with weights_only=True."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=tmp)
        return load_model(local), dict(version.tags)


def load_model(folder: str) -> CTRModel:
    with open(os.path.join(folder, SPEC)) as fh:
        spec = ModelSpec.from_json(fh.read())
    model = CTRModel(spec)
    state = torch.load(os.path.join(folder, WEIGHTS), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
