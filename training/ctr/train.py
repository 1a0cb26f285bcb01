"""Fit, score, save and load the CTR model (in-process torch; no Spark, no MLflow here).

`fit_and_evaluate` is the whole library step of jobs/train_ctr.py: encode the train and eval frames,
fit for `ctr.epochs` (evaluating after each epoch for the training curve -- the final weights are kept,
the eval dates never choose anything), score the eval dates and compute the metric report.
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
from training.ctr.data import CtrTensors, encode, seen_items, vector_table
from training.ctr.model import CTRModel, ModelSpec

WEIGHTS = "weights.pt"
SPEC = "model_spec.json"


def spec_from_conf(ctr, feature_mode: str | None = None) -> ModelSpec:
    return ModelSpec(feature_mode=feature_mode or ctr.feature_mode, id_dim=ctr.id_dim, cluster_dim=ctr.cluster_dim,
                     vector_dim=ctr.vector_dim, context_dim=ctr.context_dim, layers=list(ctr.layers),
                     attention_hidden=ctr.attention_hidden, max_history=ctr.max_history,
                     item_buckets=ctr.item_buckets, user_buckets=ctr.user_buckets, id_dropout=ctr.id_dropout)


@torch.no_grad()
def predict(model: CTRModel, data: CtrTensors, batch_size: int = 65536) -> np.ndarray:
    """Click probabilities for every row of `data`, in row order."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        out.append(torch.sigmoid(model(data.take(idx))))
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def fit(model: CTRModel, train: CtrTensors, ctr, eval_data: CtrTensors | None = None,
        progress: Callable[[str], None] | None = None) -> list[dict]:
    """Adam on binary cross entropy; returns the training curve (one dict per epoch)."""
    torch.manual_seed(ctr.seed)
    gen = torch.Generator().manual_seed(ctr.seed)
    sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    # Two Adams with one learning rate: SparseAdam updates only the id rows a batch used.
    opts = [torch.optim.Adam(dense, lr=ctr.lr), torch.optim.SparseAdam(sparse, lr=ctr.lr)]
    curve = []
    n = len(train)
    for epoch in range(1, ctr.epochs + 1):
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
        if eval_data is not None and len(eval_data):
            p = predict(model, eval_data)
            y = eval_data.label.numpy()
            point.update(eval_logloss=metrics.log_loss(y, p), eval_auc=metrics.auc(y, p))
        curve.append(point)
        if progress:
            progress("epoch {epoch}: train loss {train_loss:.4f}".format(**point)
                     + (", eval logloss {eval_logloss:.4f}, eval AUC {eval_auc:.4f}".format(**point)
                        if "eval_auc" in point else "") + f" ({point['epoch_seconds']:.1f} s)")
    return curve


@dataclass
class TrainResult:
    model: CTRModel
    spec: ModelSpec
    curve: list[dict]
    report: dict  # metrics.evaluate_predictions on the eval dates
    eval_probs: np.ndarray
    cold_items: set
    data_stats: dict
    seconds: dict


def fit_and_evaluate(train_frame: pd.DataFrame, eval_frame: pd.DataFrame, ctr, feature_mode: str | None = None,
                     progress: Callable[[str], None] | None = None) -> TrainResult:
    """Encode, fit on the train frame, evaluate on the eval frame (overall, per category, cold start)."""
    if len(train_frame) == 0 or len(eval_frame) == 0:
        raise ValueError(f"nothing to train or evaluate on: {len(train_frame)} train rows, {len(eval_frame)} eval rows")
    torch.set_num_threads(ctr.threads)
    spec = spec_from_conf(ctr, feature_mode)
    t0 = time.perf_counter()
    vectors = vector_table([train_frame, eval_frame]) if spec.feature_mode == "vector" else None
    if spec.feature_mode == "vector" and vectors is not None and len(vectors[0]) == 0:
        raise ValueError("feature_mode=vector but no row carries an item_vector")
    enc = dict(max_history=spec.max_history, item_buckets=spec.item_buckets, user_buckets=spec.user_buckets,
               vectors=vectors)
    train, ev = encode(train_frame, **enc), encode(eval_frame, **enc)
    rows = int(max(train.item_cluster.max(), ev.item_cluster.max(), train.hist_cluster.max(),
                   ev.hist_cluster.max())) + 1
    spec = replace(spec, num_cluster_rows=rows, vector_in=int(train.vec_table.shape[1]))
    encode_s = time.perf_counter() - t0
    torch.manual_seed(ctr.seed)  # the same seed gives the same initial weights and the same model
    model = CTRModel(spec)
    model.mark_seen(train.take(torch.arange(len(train))))
    t1 = time.perf_counter()
    curve = fit(model, train, ctr, ev, progress)
    fit_s = time.perf_counter() - t1
    probs = predict(model, ev)
    cold = seen_items_complement(eval_frame, seen_items(train_frame))
    report = metrics.evaluate_predictions(eval_frame, probs, cold_items=cold, group_col=ctr.gauc_by)
    return TrainResult(model, spec, curve, report, probs, cold,
                       {"train": train.stats, "eval": ev.stats},
                       {"encode": encode_s, "fit": fit_s, "total": time.perf_counter() - t0})


def seen_items_complement(eval_frame: pd.DataFrame, seen: set) -> set:
    """Eval impression items never seen in the training dates (the cold-start slice)."""
    return set(eval_frame["item_id"].unique().tolist()) - seen


def score_frame(model: CTRModel, frame: pd.DataFrame, extra_vector_frames: list | None = None) -> np.ndarray:
    """Probabilities of a saved/loaded model for the rows of a ctr_train frame (used by the review)."""
    s = model.spec
    vectors = vector_table([frame, *(extra_vector_frames or [])]) if s.feature_mode == "vector" else None
    data = encode(frame, s.max_history, s.item_buckets, s.user_buckets, vectors)
    return predict(model, data)


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
