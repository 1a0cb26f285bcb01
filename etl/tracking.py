"""MLflow setup: the one place that points MLflow at the configured tracking store and experiment."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from etl.config import Config, is_uri

log = logging.getLogger(__name__)


def check_tracking_endpoints(cfg: Config) -> None:
    """A tracking server URI must answer, and so must the S3 endpoint of an s3:// artifact root, within
    seconds: MLflow's and boto3's own retries would take minutes to report a stopped server."""
    from etl.services import check_http_health, check_tcp

    uri = cfg.mlflow_tracking_uri
    if uri.startswith(("http://", "https://")):
        check_http_health("MLflow tracking server (mlflow.tracking_uri)", uri)
    s3_endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if cfg.mlflow_artifact_root.startswith("s3://") and s3_endpoint:
        check_tcp("S3 endpoint of the MLflow artifact root (MLFLOW_S3_ENDPOINT_URL)", s3_endpoint)


def setup_mlflow(cfg: Config) -> str:
    """Set the tracking URI, make sure the experiment exists with its artifact root; return its id."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import mlflow

    uri = cfg.mlflow_tracking_uri
    check_tracking_endpoints(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    root = cfg.mlflow_artifact_root
    local = not is_uri(root)
    artifacts = Path(root).resolve().as_uri() if local else root
    if exp is None:
        if local:
            Path(root).mkdir(parents=True, exist_ok=True)
        try:
            exp_id = mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException as e:  # another job created it meanwhile
            exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
            if exp is None:
                raise e
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        # An experiment keeps the artifact location it was created with: a changed mlflow.artifact_root
        # does not move it (MLflow has no such change), so runs keep writing to the old place.
        if exp.artifact_location.rstrip("/") != artifacts.rstrip("/"):
            log.warning("MLflow experiment %r stores its artifacts in %s, not in mlflow.artifact_root %s: an "
                        "experiment keeps the location it was created with (name another mlflow.experiment "
                        "to use the new root)", cfg.mlflow.experiment, exp.artifact_location, artifacts)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def start_run(cfg: Config, run_name: str, tags: dict | None = None, run_id: str | None = None):
    """An MLflow run in the project's experiment (or the existing `run_id`, to continue it);
    the run is marked FAILED if the body raises."""
    import mlflow

    setup_mlflow(cfg)
    if run_id:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    with mlflow.start_run(run_name=run_name, tags={"courier.env": cfg.env, **(tags or {})}) as run:
        yield run

