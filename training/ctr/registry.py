"""The `ctr-model` registry entries: evaluation snapshots, lineage tags, saving and loading versions.

A registered version's artifact folder holds `weights.pt` (a state_dict: torch.load(weights_only=True)),
`model_spec.json` (everything needed to rebuild the module), `lineage.json` and `eval_report.json`.
Nothing is pickled. Its version tags carry the lineage the review relies on:

    ctr_train.version   the pinned Delta version of ctr_train it was trained and evaluated on
    feature_version     the clustering/feature version of those rows (one value, checked)
    feature_mode        none | vector | simscore | cluster_id
    train.dates, eval.dates
    eval.snapshot       "ctr_train@v<version>|fv=<feature_version>|eval=<dates>": two models are compared
                        only when this string is equal
    eval.auc, eval.gauc, config_hash, run_id
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

from etl.contracts import CHAMPION, CTR_MODEL as MODEL_NAME
from etl.tracking import register_version

ARTIFACT_DIR = "ctr_model"


@dataclass(frozen=True)
class Snapshot:
    """The pinned evaluation data of a model: same table version, feature version and eval dates."""
    table_version: int
    feature_version: str
    eval_dates: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"ctr_train@v{self.table_version}|fv={self.feature_version}|eval={','.join(self.eval_dates)}"

    @classmethod
    def from_tags(cls, tags: dict) -> "Snapshot":
        missing = [k for k in ("ctr_train.version", "feature_version", "eval.dates") if k not in tags]
        if missing:
            raise ValueError(f"model version lacks lineage tag(s) {missing}: not registered by jobs/train_ctr.py")
        return cls(int(tags["ctr_train.version"]), tags["feature_version"],
                   tuple(d for d in tags["eval.dates"].split(",") if d))

    def differences(self, other: "Snapshot") -> list[str]:
        out = []
        if self.table_version != other.table_version:
            out.append(f"ctr_train version {self.table_version} vs {other.table_version}")
        if self.feature_version != other.feature_version:
            out.append(f"feature_version {self.feature_version!r} vs {other.feature_version!r}")
        if self.eval_dates != other.eval_dates:
            out.append(f"eval dates {list(self.eval_dates)} vs {list(other.eval_dates)}")
        return out


def config_hash(ctr_conf_dict: dict, snapshot: Snapshot, train_dates: list[str]) -> str:
    """Identifies a training run's inputs (model config + data), for --skip-if-done reruns."""
    blob = json.dumps({"ctr": ctr_conf_dict, "snapshot": snapshot.key, "train": train_dates}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def register(result, run_id: str, snapshot: Snapshot, train_dates: list[str], extra_tags: dict):
    """Log the model folder to the active run and register it as a new `ctr-model` version with tags."""
    import mlflow

    from training.ctr.metrics import nan_to_none
    from training.ctr.train import save_model

    tags = {"run_id": run_id, "ctr_train.version": str(snapshot.table_version),
            "feature_version": snapshot.feature_version, "feature_mode": result.spec.feature_mode,
            "train.dates": ",".join(train_dates), "eval.dates": ",".join(snapshot.eval_dates),
            "eval.snapshot": snapshot.key, "eval.auc": f"{result.report['overall']['auc']:.6f}",
            "eval.gauc": f"{result.report['overall']['gauc']:.6f}", **extra_tags}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, ARTIFACT_DIR)
        save_model(result.model, folder, extra=tags)
        with open(os.path.join(folder, "eval_report.json"), "w") as fh:
            json.dump(nan_to_none(result.report), fh, indent=1, sort_keys=True)
        mlflow.log_artifacts(folder, ARTIFACT_DIR)
    return register_version(MODEL_NAME, mlflow.get_artifact_uri(ARTIFACT_DIR), run_id, tags,
                            description="Downstream CTR model (COURIER stage 4); weights are a state_dict + "
                                        "model_spec.json (training/ctr/train.py load_model)")


def find_done(config_digest: str):
    """The latest ctr-model version trained from exactly these inputs, or None."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    except mlflow.exceptions.MlflowException:
        return None
    hits = [v for v in versions if v.tags.get("config_hash") == config_digest]
    return max(hits, key=lambda v: int(v.version)) if hits else None


def load_version(version):
    """(model, tags) of a registered ModelVersion; weights read with weights_only=True."""
    import mlflow

    from training.ctr.train import load_model

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=tmp)
        return load_model(local), dict(version.tags)


def champion(client):
    """The version holding @champion, or None (also when the model is not registered yet)."""
    import mlflow

    try:
        return client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
