"""Stage-4 orchestration shared by jobs/train_ctr.py, jobs/review_model.py and the tests: resolve the
pinned snapshot, read its frames, train + evaluate, log to MLflow and register."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from typing import Callable

from etl import registry
from etl.contracts import CTR_MODEL
from etl.registry import Snapshot
from training.ctr import data as ctr_data

JOB = "train_ctr"
ARTIFACT_DIR = "ctr_model"  # run artifact folder of a registered ctr-model version


def resolve_dates(store, ctr) -> tuple[int, list[str], list[str]]:
    """(ctr_train version, train dates, eval dates) for this config."""
    version = ctr.table_version if ctr.table_version is not None else store.version(ctr_data.TABLE)
    if version is None:
        raise ctr_data.CtrDataError(f"{ctr_data.TABLE} does not exist yet: run the attach job (stage 4) first")
    train, ev = ctr_data.split_dates(ctr_data.table_dates(store, version), ctr.train_dates, ctr.eval_dates,
                                     ctr.eval_last_n_dates)
    return version, train, ev


def load_frames(store, version: int, train_dates: list[str], eval_dates: list[str], with_vector: bool):
    """(train frame, eval frame, Snapshot); both frames must carry the same single feature_version."""
    tr = ctr_data.read_ctr_frame(store, version, train_dates, with_vector)
    ev = ctr_data.read_ctr_frame(store, version, eval_dates, with_vector)
    for name, frame, dates in (("train", tr, train_dates), ("eval", ev, eval_dates)):
        if frame.empty:
            raise ctr_data.CtrDataError(f"{ctr_data.TABLE} v{version} has no rows for the {name} dates {dates}")
    fv_train, fv_eval = ctr_data.feature_version_of(tr), ctr_data.feature_version_of(ev)
    if fv_train != fv_eval:
        raise ctr_data.CtrDataError(f"train dates carry feature_version {fv_train!r} but eval dates {fv_eval!r}: "
                                    "cluster ids of different clusterings cannot be mixed")
    return tr, ev, Snapshot(version, fv_eval, tuple(eval_dates))


def encoder_leak(feature_version: str, feature_mode: str, eval_dates: list[str]) -> str | None:
    """Why a model of `feature_mode` on `feature_version` cannot be evaluated on `eval_dates`: its image
    encoder trained on an eval date or a later one (ctr_data.dates_after_eval_start); None when it may
    (or the encoder's dates are unknown: see registry.encoder_training_dates)."""
    if feature_mode == "none":  # no image feature: the encoder takes no part in the model
        return None
    try:
        trained_on = registry.encoder_training_dates(feature_version)
    except registry.RegistryError as e:
        return (f"the image encoder of feature_version {feature_version!r} cannot be found ({e}), so whether it "
                "trained on the eval dates cannot be checked")
    seen = ctr_data.dates_after_eval_start(trained_on or [], eval_dates)
    if not seen:
        return None
    return (f"the image encoder of feature_version {feature_version!r} was trained on courier_train date(s) "
            f"{seen}, on or after the first eval date {min(eval_dates)}: those PVs and their click histories hold "
            "the eval dates' clicks, so its cluster ids would carry the labels they are scored on. Evaluate on "
            "dates after the encoder's (ctr.eval_dates), or use an encoder trained on earlier dates only "
            "(train.holdout_last_date holds out the latest)")


def train_and_register(cfg, store, run_name: str | None = None, skip_if_done: bool = False,
                       progress: Callable[[str], None] = print) -> dict:
    """The whole train_ctr job body (Spark session and store given). Returns a summary dict."""
    import mlflow

    from etl.config import flat_params
    from etl.tracking import setup_mlflow, start_run
    from training.ctr.metrics import flat_metrics, nan_to_none
    from training.ctr.train import fit_and_evaluate

    ctr = cfg.ctr
    version, train_dates, eval_dates = resolve_dates(store, ctr)
    tr, ev, snap = load_frames(store, version, train_dates, eval_dates, ctr.feature_mode == "vector")
    setup_mlflow(cfg)
    leak = encoder_leak(snap.feature_version, ctr.feature_mode, eval_dates)
    if leak:
        raise ctr_data.CtrDataError(leak)
    digest = registry.ctr_config_hash(dataclasses.asdict(ctr), snap, train_dates)
    if skip_if_done:
        done = registry.find_by_tags(CTR_MODEL, {"config_hash": digest})
        if done is not None:
            progress(f"[{JOB}] ctr-model v{done.version} was already trained from these inputs "
                     f"({snap.key}, config {digest}): nothing to do")
            return {"skipped": True, "model_version": str(done.version), "snapshot": snap.key}
    _, valid_dates = ctr_data.validation_split(train_dates, ctr.validation_last_n_dates)
    progress(f"[{JOB}] {snap.key}: train {train_dates} ({len(tr)} rows; validation {valid_dates or 'none'}), "
             f"eval {eval_dates} ({len(ev)} rows), feature_mode={ctr.feature_mode}")
    name = run_name or f"ctr-{ctr.feature_mode}-v{version}"
    with start_run(cfg, name, tags={"courier.job": JOB}) as run:
        mlflow.log_params({**flat_params(cfg, ("ctr",)), "data.table": ctr_data.TABLE, "data.version": version,
                           "data.feature_version": snap.feature_version, "data.train_dates": ",".join(train_dates),
                           "data.eval_dates": ",".join(eval_dates), "data.validation_dates": ",".join(valid_dates),
                           "data.train_rows": len(tr),
                           "data.eval_rows": len(ev)})
        mlflow.set_tags({"courier.data_version": str(version), "courier.feature_version": snap.feature_version,
                         "courier.feature_mode": ctr.feature_mode, "courier.eval_snapshot": snap.key})
        result = fit_and_evaluate(tr, ev, ctr, progress=lambda m: progress(f"[{JOB}] {m}"), validation_dates=valid_dates)
        mlflow.log_metric("selected_epochs", result.selection["epochs"])
        for point in result.curve:  # the training curve, one point per epoch
            mlflow.log_metrics({k: float(v) for k, v in point.items() if k != "epoch"}, step=point["epoch"])
        mlflow.log_metrics(flat_metrics(result.report))
        mlflow.log_metrics({"seconds.fit": result.seconds["fit"], "seconds.encode": result.seconds["encode"],
                            "eval.cold_items": len(result.cold_items)})
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/train_report.json"
            with open(path, "w") as fh:
                json.dump(nan_to_none({"snapshot": snap.key, "train_dates": train_dates,
                                       "selection": result.selection, "report": result.report,
                                       "curve": result.curve, "data_stats": result.data_stats,
                                       "seconds": result.seconds}), fh, indent=1, sort_keys=True)
            mlflow.log_artifact(path)
        mv = register(result, registry.ctr_tags(run.info.run_id, snap, ctr.feature_mode, train_dates,
                                                result.report["overall"]["auc"], result.report["overall"]["gauc"],
                                                digest, ctr.gauc_by, result.selection))
    o = result.report["overall"]
    cold = result.report.get("cold_start", {})
    progress(f"[{JOB}] eval {snap.key}: AUC {_f(o['auc'])}  GAUC {_f(o['gauc'])} ({o['gauc_groups']} {ctr.gauc_by} "
             f"groups)  logloss {_f(o['logloss'])}  rows {o['rows']}; cold-start items {len(result.cold_items)}: "
             f"AUC {_f(cold.get('auc'))} on {cold.get('rows', 0)} rows")
    progress(f"[{JOB}] registered ctr-model v{mv.version} (run {run.info.run_id}); fit {result.seconds['fit']:.1f} s")
    return {"skipped": False, "model_version": str(mv.version), "run_id": run.info.run_id, "snapshot": snap.key,
            "report": result.report, "curve": result.curve, "data_stats": result.data_stats,
            "seconds": result.seconds}


def register(result, tags: dict):
    """Log the model folder to the active run and register it as a new `ctr-model` version. The folder
    holds weights.pt (a state_dict), model_spec.json, lineage.json (the tags) and eval_report.json;
    nothing is pickled."""
    import mlflow

    from training.ctr.metrics import nan_to_none
    from training.ctr.train import save_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, ARTIFACT_DIR)
        save_model(result.model, folder, extra=tags)
        with open(os.path.join(folder, "eval_report.json"), "w") as fh:
            json.dump(nan_to_none(result.report), fh, indent=1, sort_keys=True)
        mlflow.log_artifacts(folder, ARTIFACT_DIR)
    return registry.register_version(CTR_MODEL, mlflow.get_artifact_uri(ARTIFACT_DIR), tags["run_id"], tags,
                                     description="Downstream CTR model (COURIER stage 4); weights are a "
                                                 "state_dict + model_spec.json (training/ctr/train.py load_model)")


def _f(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
