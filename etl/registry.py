"""The MLflow model registry: the one module that registers versions, reads and writes their lineage
tags and moves aliases. Every stage goes through it; nothing else calls the registry's write API.

Models (names in etl.contracts) and the lineage each version carries as tags:

    courier-encoder   run_id, data.table, data.version, data.dates (the courier_train dates it trained
                      on), method, backbone, image_px, dim, proj_head,
                      state_artifact (the weights-only state dict stage 3 loads)      -> EncoderSpec
    courier-clusters  encoder_ref, encoder_version, n_clusters, levels, dim, index_type, far_distance,
                      far_quantile, mean_distance, kmeans_iters/_sample/_seed, trained_on -> ClustersSpec
    ctr-model         run_id, ctr_train.version, feature_version, feature_mode, train.dates, eval.dates,
                      validation.dates (the last training dates: they chose selected_epochs),
                      eval.snapshot, eval.auc, eval.gauc, config_hash, gauc_by          -> Snapshot
                      (+ review.decision, review.run_id once reviewed)

Refs are ``<model>@<alias>``, ``<model>/<version>`` or ``<model>/latest``. Aliases move only through
`set_alias` (``promote`` = set @champion): by a review whose gates passed, by ``train_courier --alias``,
and by build_clusters once item_clusters holds the new version. Only the driver talks to MLflow;
executors receive bytes by broadcast.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from etl.catalog import COURIER_TRAIN
from etl.contracts import CHAMPION, CLUSTERS_MODEL, CTR_MODEL, ENCODER_MODEL

CLUSTERS_ARTIFACT = "clusters"  # run artifact folder of a clustering: index.faiss, centroids.npy, stats.json,
# and levels.npy (coarser ids per fine id) when it has several levels
ENCODER_STATE_ARTIFACT = "encoder_state/v{version}/encoder.pt"  # run artifact: an encoder's state dict
ENCODER_STATE_SHA256 = "state_sha256"  # version tag: training.train.state_digest of those weights

# Which job sets a model's versions and aliases: named in "no such version" errors.
_MADE_BY = {ENCODER_MODEL: "train_courier --alias champion", CLUSTERS_MODEL: "build_clusters",
            CTR_MODEL: "train_ctr, then review_model"}


class RegistryError(RuntimeError):
    pass


def _client():
    import mlflow

    return mlflow.MlflowClient()


# ---- names, refs and look-ups -------------------------------------------------------------------
def version_number(versioned_name: str) -> int:
    """'courier-encoder-v10' -> 10: versions compare as numbers ('v9' < 'v10'), never as strings."""
    m = re.search(r"-v(\d+)$", versioned_name)
    if not m:
        raise RegistryError(f"{versioned_name!r} is not a <model>-v<N> version name")
    return int(m.group(1))


def parse_ref(ref: str) -> tuple[str, str, str]:
    """'m@champion' -> (m, 'alias', 'champion'); 'm/3' -> (m, 'version', '3'); 'm/latest' -> (m, 'latest', '')."""
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:@([A-Za-z0-9_\-]+)|/(\d+|latest))", ref)
    if not m:
        raise RegistryError(f"bad model ref {ref!r}: use <model>@<alias>, <model>/<version> or <model>/latest")
    name, alias, version = m.groups()
    if alias:
        return name, "alias", alias
    return (name, "latest", "") if version == "latest" else (name, "version", version)


def _not_found(e) -> bool:
    """An MlflowException that says the model, version or alias does not exist; any other (the tracking
    server unreachable, a database error) must not be read as "nothing registered"."""
    return getattr(e, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def versions(name: str) -> list:
    """Every version of a registered model, oldest first; [] when the model is not registered."""
    import mlflow

    try:
        found = _client().search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException as e:
        if not _not_found(e):
            raise
        return []
    return sorted(found, key=lambda v: int(v.version))


def resolve(ref: str):
    """The MLflow ModelVersion a ref names, with a clear error when there is none."""
    import mlflow

    name, kind, value = parse_ref(ref)
    try:
        if kind == "alias":
            return _client().get_model_version_by_alias(name, value)
        if kind == "version":
            return _client().get_model_version(name, value)
    except mlflow.exceptions.MlflowException as e:
        if not _not_found(e):
            raise
        hint = f" ({_MADE_BY[name]} sets it)" if name in _MADE_BY else ""
        raise RegistryError(f"model ref {ref!r} names no registered version{hint}: {e.message}") from None
    found = versions(name)
    if not found:
        raise RegistryError(f"model ref {ref!r}: no version of {name!r} is registered")
    return found[-1]


def alias_version(name: str, alias: str = CHAMPION):
    """The version holding `alias`, or None (also when the model is not registered yet)."""
    try:
        return resolve(f"{name}@{alias}")
    except RegistryError:
        return None


def find_by_tags(name: str, tags: dict[str, str]):
    """The latest version of `name` holding every one of `tags` ({key: value}), or None."""
    hits = [v for v in versions(name) if all((v.tags or {}).get(k) == value for k, value in tags.items())]
    return hits[-1] if hits else None


# ---- writes: new versions, tags, aliases --------------------------------------------------------
def register_version(name: str, source: str, run_id: str, tags: dict, description: str = ""):
    """A new version of registered model `name` from an artifact `source` of `run_id` (the registered
    model is created on first use, with `description`); tag values are stored as strings."""
    import mlflow

    client = _client()
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if not _not_found(e):  # an unreachable server is not an empty registry
            raise
        try:
            client.create_registered_model(name, description=description)
        except mlflow.exceptions.MlflowException as race:  # another job created it meanwhile: fine
            if getattr(race, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
    return client.create_model_version(name, source=source, run_id=run_id,
                                       tags={k: str(v) for k, v in tags.items()})


def register_logged_model(name: str, model_uri: str, tags: dict | None = None):
    """A new version of `name` from a model logged with mlflow.<flavor>.log_model (its model_uri), with
    `tags` set in the same call."""
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags)


def tag_version(name: str, version: str, tags: dict) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def delete_version(name: str, version: str) -> None:
    """Remove a version no alias points at yet (a build that refused to publish it); its run keeps the artifacts."""
    _client().delete_model_version(name, str(version))


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `name@alias` at `version`: the only function that moves an alias."""
    _client().set_registered_model_alias(name, alias, str(version))


def promote(name: str, version: str) -> None:
    """Deployment: @champion moves to `version` (call only after the validation gates passed)."""
    set_alias(name, CHAMPION, version)


# ---- courier-encoder ----------------------------------------------------------------------------
def encoder_tags(run_id: str, data_version: int, dates: list[str], method: str, backbone: str, image_px: int,
                 dim: int, proj_head: bool, state_artifact: str, state_sha256: str) -> dict:
    """A courier-encoder version's lineage. Tagged in this order, so a version that holds the last
    tag (the weights' hash) holds them all."""
    return {"run_id": run_id, "data.table": COURIER_TRAIN, "data.version": str(data_version),
            "data.dates": ",".join(sorted(dates)), "method": method, "backbone": backbone, "image_px": str(image_px),
            "dim": str(dim), "proj_head": str(proj_head).lower(), "state_artifact": state_artifact,
            ENCODER_STATE_SHA256: state_sha256}


def encoder_registered_by(run_id: str, state_sha256: str):
    """The courier-encoder version that run `run_id` registered from the weights of this digest, with
    its whole lineage tagged; None when it registered none. A retry of a run whose registration succeeded
    (and whose job failed after it) finds its version here instead of registering the same weights twice."""
    return find_by_tags(ENCODER_MODEL, {"run_id": run_id, ENCODER_STATE_SHA256: state_sha256})


def encoder_training_dates(feature_version: str) -> list[str] | None:
    """The courier_train dates the encoder of a feature version trained on (its data.dates tag); None
    when that is unknown: a feature version of no courier-encoder, or an encoder registered before its
    dates were recorded. Raises RegistryError when the feature version names an encoder version this
    registry does not hold (deleted, or another registry's): its dates cannot be checked."""
    encoder = encoder_version_of(feature_version)
    if encoder is None:
        return None
    dates = resolve(f"{ENCODER_MODEL}/{version_number(encoder)}").tags.get("data.dates")
    return None if dates is None else [d for d in dates.split(",") if d]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild a registered encoder without unpickling anything."""
    name: str
    version: str
    run_id: str
    backbone: str
    dim: int
    image_px: int
    proj_head: bool
    state_artifact: str

    @property
    def encoder_version(self) -> str:  # a partition value: [A-Za-z0-9_.:-] only
        return f"{self.name}-v{self.version}"

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


def encoder_spec(ref: str) -> EncoderSpec:
    mv = resolve(ref)
    tags = mv.tags or {}
    missing = [k for k in ("backbone", "dim", "image_px") if k not in tags]
    if missing:
        raise RegistryError(f"{mv.name} v{mv.version} lacks the tags {missing} needed to rebuild the encoder")
    if "state_artifact" not in tags:
        raise RegistryError(f"{mv.name} v{mv.version} has no weights-only state dict artifact (registered "
                            "before stage 3 existed): re-register it with training.launch.register_encoder")
    return EncoderSpec(name=mv.name, version=str(mv.version), run_id=mv.run_id, backbone=tags["backbone"],
                       dim=int(tags["dim"]), image_px=int(tags["image_px"]),
                       proj_head=tags.get("proj_head", "false") == "true", state_artifact=tags["state_artifact"])


def _artifact_bytes(run_id: str, path: str) -> bytes:
    import mlflow

    with open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path), "rb") as fh:
        return fh.read()


def encoder_state_bytes(spec: EncoderSpec) -> bytes:
    """The encoder's state dict file (torch.save format), downloaded from its run's artifacts."""
    return _artifact_bytes(spec.run_id, spec.state_artifact)


# ---- courier-clusters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ClustersSpec:
    name: str
    version: str
    run_id: str
    encoder_ref: str  # courier-encoder/<N>: the encoder whose embeddings were clustered
    encoder_version: str  # courier-encoder-v<N>
    n_clusters: int
    dim: int
    index_type: str
    far_distance: float  # drift_far_quantile of the training rows' leave-one-out distances (unseen-item scale)
    mean_distance: float  # their mean
    far_quantile: float = 0.95
    levels: tuple = ()  # coarser cluster counts, coarsest first (features.levels); () = one level

    @property
    def clusters_version(self) -> str:
        return f"{self.name}-v{self.version}"

    @property
    def feature_version(self) -> str:
        return f"{self.encoder_version}.{self.clusters_version}"


def encoder_version_of(feature_version: str) -> str | None:
    """'courier-encoder-v3.courier-clusters-v2' -> 'courier-encoder-v3' (ClustersSpec.feature_version's
    encoder part); None for anything else."""
    encoder, dot, _ = feature_version.partition(".")
    return encoder if dot and encoder.startswith(f"{ENCODER_MODEL}-v") else None


def clusters_ref_of(feature_version: str) -> str | None:
    """'courier-encoder-v3.courier-clusters-v2' -> 'courier-clusters/2', the clustering that made a
    feature version; None for anything else."""
    encoder = encoder_version_of(feature_version)
    clusters = feature_version[len(encoder) + 1:] if encoder else ""
    m = re.fullmatch(rf"{re.escape(CLUSTERS_MODEL)}-v(\d+)", clusters)
    return f"{CLUSTERS_MODEL}/{m.group(1)}" if m else None


def clusters_tags(encoder: EncoderSpec, features, dim: int, index_type: str, far_distance: float,
                  mean_distance: float, trained_on: int, build_key: str = "") -> dict:
    """A clustering's lineage: its encoder, the k-means settings (features config) and the build's
    distance statistics that the daily refresh's drift measure compares against; `build_key`: the
    scheduler's run that asked for the build (build_clusters --build-key), when one did."""
    f = features
    tags = {"encoder_ref": encoder.ref, "encoder_version": encoder.encoder_version, "n_clusters": f.n_clusters,
            "dim": dim, "index_type": index_type, "far_distance": far_distance, "far_quantile": f.drift_far_quantile,
            "mean_distance": mean_distance, "kmeans_iters": f.kmeans_iters, "kmeans_sample": f.kmeans_sample,
            "kmeans_seed": f.kmeans_seed, "trained_on": trained_on}
    if index_type == "hnsw":  # the graph's settings decide the assignments (recall) too
        tags.update(hnsw_m=f.hnsw_m, hnsw_ef_search=f.hnsw_ef_search)
    if f.levels:
        tags["levels"] = ",".join(str(k) for k in f.levels)
    if build_key:
        tags["build_key"] = build_key
    return tags


def clusters_spec(ref: str) -> ClustersSpec:
    return clusters_spec_of(resolve(ref))


def clusters_spec_of(mv) -> ClustersSpec:
    """The ClustersSpec of a resolved courier-clusters model version (its tags)."""
    t = mv.tags or {}
    try:
        return ClustersSpec(name=mv.name, version=str(mv.version), run_id=mv.run_id, encoder_ref=t["encoder_ref"],
                            encoder_version=t["encoder_version"], n_clusters=int(t["n_clusters"]), dim=int(t["dim"]),
                            index_type=t["index_type"], far_distance=float(t["far_distance"]),
                            mean_distance=float(t["mean_distance"]), far_quantile=float(t.get("far_quantile", 0.95)),
                            levels=tuple(int(k) for k in t.get("levels", "").split(",") if k))
    except KeyError as e:
        raise RegistryError(f"{mv.name} v{mv.version} lacks the tag {e}: not written by jobs/build_clusters.py") from None


def clusters_index_bytes(spec: ClustersSpec) -> bytes:
    return _artifact_bytes(spec.run_id, f"{CLUSTERS_ARTIFACT}/index.faiss")


def clusters_level_parents(spec: ClustersSpec):
    """The (len(levels), n_clusters) int32 array of coarser ids per fine id, or None for one level."""
    import io

    import numpy as np

    if not spec.levels:
        return None
    return np.load(io.BytesIO(_artifact_bytes(spec.run_id, f"{CLUSTERS_ARTIFACT}/levels.npy")), allow_pickle=False)


def register_clusters(folder: str, run_id: str, tags: dict):
    """Log folder as the run's `clusters` artifact and register it as a new courier-clusters version
    (no alias: build_clusters moves it once item_clusters holds the version)."""
    import mlflow

    mlflow.log_artifacts(folder, CLUSTERS_ARTIFACT)
    source = f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{CLUSTERS_ARTIFACT}"
    return register_version(CLUSTERS_MODEL, source, run_id, tags,
                            description="FAISS centroid index of COURIER item embeddings (stage 3); "
                                        "tags name the encoder version it belongs to")


# ---- ctr-model ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """The pinned evaluation data of a CTR model: same table version, feature version and eval dates.
    Two models are compared only when their snapshot keys are equal."""
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
        eval_dates = tuple(d for d in tags["eval.dates"].split(",") if d)
        if not eval_dates:
            raise ValueError("model version's eval.dates tag names no date: not registered by jobs/train_ctr.py")
        return cls(int(tags["ctr_train.version"]), tags["feature_version"], eval_dates)

    def differences(self, other: "Snapshot") -> list[str]:
        out = []
        if self.table_version != other.table_version:
            out.append(f"ctr_train version {self.table_version} vs {other.table_version}")
        if self.feature_version != other.feature_version:
            out.append(f"feature_version {self.feature_version!r} vs {other.feature_version!r}")
        if self.eval_dates != other.eval_dates:
            out.append(f"eval dates {list(self.eval_dates)} vs {list(other.eval_dates)}")
        return out


def ctr_tags(run_id: str, snapshot: Snapshot, feature_mode: str, train_dates: list[str], auc: float, gauc: float,
             config_digest: str, gauc_by: str, selection: dict | None = None) -> dict:
    selection = selection or {}
    return {"run_id": run_id, "ctr_train.version": str(snapshot.table_version),
            # the model-selection split (inside the training dates) and what it chose
            "validation.dates": ",".join(selection.get("validation_dates", [])) or "none",
            "selected_epochs": str(selection.get("epochs", "n/a")),
            "feature_version": snapshot.feature_version, "feature_mode": feature_mode,
            "train.dates": ",".join(train_dates), "eval.dates": ",".join(snapshot.eval_dates),
            "eval.snapshot": snapshot.key, "eval.auc": f"{auc:.6f}", "eval.gauc": f"{gauc:.6f}",
            "config_hash": config_digest, "gauc_by": gauc_by}


# ctr settings that only choose the data (their resolved values are the snapshot and the train dates)
# or how fast it runs: a table_version of null or the number it resolves to is the same training.
_NOT_HASHED = ("table_version", "train_dates", "eval_dates", "eval_last_n_dates", "threads")


def ctr_config_hash(ctr_conf_dict: dict, snapshot: Snapshot, train_dates: list[str]) -> str:
    """Identifies a CTR training run's inputs (model config + data), for --skip-if-done reruns."""
    model = {k: v for k, v in ctr_conf_dict.items() if k not in _NOT_HASHED}
    blob = json.dumps({"ctr": model, "snapshot": snapshot.key, "train": train_dates}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def review_tags(decision: str, review_run_id: str) -> dict:
    return {"review.decision": decision, "review.run_id": review_run_id}
