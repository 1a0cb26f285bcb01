"""Registry look-ups for stages 3-4: which encoder / clustering a ref names, and fetching their files.

Refs are ``<model>@<alias>``, ``<model>/<version>`` or ``<model>/latest``. Only the driver talks to
MLflow; executors receive bytes by broadcast, so they need no access to the tracking store.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from etl.tracking import register_version

from etl.contracts import CLUSTERS_MODEL, ENCODER_MODEL  # noqa: F401 - re-exported for stages 3-4
CLUSTERS_ARTIFACT = "clusters"  # run artifact folder: index.faiss, centroids.npy, stats.json


class RegistryError(RuntimeError):
    pass


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


def resolve(ref: str):
    """The MLflow ModelVersion a ref names, with a clear error when there is none."""
    import mlflow

    name, kind, value = parse_ref(ref)
    client = mlflow.MlflowClient()
    try:
        if kind == "alias":
            return client.get_model_version_by_alias(name, value)
        if kind == "version":
            return client.get_model_version(name, value)
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException as e:
        hint = (" (train_courier --alias champion sets it)" if name == ENCODER_MODEL else
                " (build_clusters sets it)" if name == CLUSTERS_MODEL else "")
        raise RegistryError(f"model ref {ref!r} names no registered version{hint}: {e.message}") from None
    if not versions:
        raise RegistryError(f"model ref {ref!r}: no version of {name!r} is registered")
    return max(versions, key=lambda v: int(v.version))


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


def encoder_state_bytes(spec: EncoderSpec) -> bytes:
    """The encoder's state dict file (torch.save format), downloaded from its run's artifacts."""
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=spec.run_id, artifact_path=spec.state_artifact)
    with open(path, "rb") as fh:
        return fh.read()


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
    far_distance: float  # the build's drift_far_quantile of assignment distances
    mean_distance: float

    @property
    def clusters_version(self) -> str:
        return f"{self.name}-v{self.version}"

    @property
    def feature_version(self) -> str:
        return f"{self.encoder_version}.{self.clusters_version}"


def clusters_spec(ref: str) -> ClustersSpec:
    mv = resolve(ref)
    t = mv.tags or {}
    try:
        return ClustersSpec(name=mv.name, version=str(mv.version), run_id=mv.run_id, encoder_ref=t["encoder_ref"],
                            encoder_version=t["encoder_version"], n_clusters=int(t["n_clusters"]), dim=int(t["dim"]),
                            index_type=t["index_type"], far_distance=float(t["far_distance"]),
                            mean_distance=float(t["mean_distance"]))
    except KeyError as e:
        raise RegistryError(f"{mv.name} v{mv.version} lacks the tag {e}: not written by jobs/build_clusters.py") from None


def clusters_index_bytes(spec: ClustersSpec) -> bytes:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=spec.run_id, artifact_path=f"{CLUSTERS_ARTIFACT}/index.faiss")
    with open(path, "rb") as fh:
        return fh.read()


def register_clusters(folder: str, run_id: str, tags: dict, alias: str | None):
    """Log folder as the run's `clusters` artifact and register it as a new courier-clusters version."""
    import mlflow

    mlflow.log_artifacts(folder, CLUSTERS_ARTIFACT)
    source = f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{CLUSTERS_ARTIFACT}"
    mv = register_version(CLUSTERS_MODEL, source, run_id, tags,
                          description="FAISS centroid index of COURIER item embeddings (stage 3); "
                                      "tags name the encoder version it belongs to")
    client = mlflow.MlflowClient()
    if alias:
        client.set_registered_model_alias(CLUSTERS_MODEL, alias, mv.version)
    return mv
