"""Configuration: the one place that loads, validates and resolves the project's YAML config.

A config file is a small tree of sections (``paths``, ``spark``, ``tables``, ``mlflow``, ``simulator``,
``samples``). Each section is a frozen dataclass below; its fields are the only keys allowed, so a typo
is an error that names the valid keys, not a silently ignored setting. Relative local paths resolve
against the directory of the config file; URIs (``s3://...``, ``hdfs://...``) are kept as they are.
"""
from __future__ import annotations

import dataclasses
import functools
import datetime as dt
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the key path that is wrong."""


SESSION_TIME_ZONE = "spark.sql.session.timeZone"
# Off in every session: stage 1 reads a value Spark cannot cast (a timestamp at 25:61) as null, then a
# quarantine reason; under ANSI the cast fails the whole job instead.
ANSI_MODE = "spark.sql.ansi.enabled"


def is_uri(path: str) -> bool:
    return "://" in str(path)


# MLflow refuses these alias names (they read as a version: "latest", "v3"), at the first alias move
_RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)


def check_alias(alias: str, key: str) -> None:
    """A registry alias a job may move: letters, digits, '_' and '-', and none that MLflow reserves."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", alias) or _RESERVED_ALIAS.fullmatch(alias):
        raise ConfigError(f"{key}: {alias!r} cannot be a registry alias (letters, digits, '_' and '-'; "
                          "'latest' and 'v<number>' are MLflow's names of versions)")


@dataclass(frozen=True)
class PathsConf:
    # Every other local root defaults to a folder under data_root.
    data_root: str = "../data"
    raw_root: str | None = None  # search_log/dt=.../*.jsonl and catalog/dt=.../items.jsonl
    images_root: str | None = None  # item images; catalog image_uri values resolve under it
    tables_root: str | None = None  # one folder per Delta table
    truth_root: str | None = None  # simulator's hidden truth (evaluation only, never a model input)
    checkpoints_root: str | None = None


@dataclass(frozen=True)
class SparkConf:
    master: str = "local[*]"  # ignored when spark-submit already set a master
    app_name: str = "courier"  # a session opened without a job's name (a job's application is named after it)
    shuffle_partitions: int = 8
    driver_memory: str = "4g"  # only applies when this process starts the JVM (not under spark-submit)
    conf: dict = field(default_factory=dict)  # extra spark.* settings, passed through
    # courier_train looks item images up in a broadcast copy while their JPEG bytes (this date's and
    # the earlier dates' item_images) sum to at most this many MB: no shuffle of images. Larger: a
    # shuffle join. Same rows either way; each executor holds the copy. 0 = always the shuffle join.
    broadcast_images_mb: int = 256


@dataclass(frozen=True)
class TablesConf:
    # delta-rs: Spark writes Parquet, deltalake commits (embedded default, no jars needed).
    # spark-delta: native format("delta") with the Delta extension (clusters with the Delta jars).
    # auto: spark-delta when the Delta jars are on Spark's class path, else delta-rs.
    engine: str = "delta-rs"


@dataclass(frozen=True)
class MlflowConf:
    tracking_uri: str | None = None  # default: sqlite db under data_root/mlflow
    artifact_root: str | None = None  # default: data_root/mlflow/artifacts
    experiment: str = "courier"


@dataclass(frozen=True)
class SimulatorConf:
    preset: str = "demo"
    seed: int = 7
    start_date: str = "2026-11-20"
    days: int | None = None  # default: the preset's
    malformed_rate: float | None = None  # share of raw lines with one fault; default: the preset's
    bad_image_rate: float | None = None  # share of new items with a missing/corrupt image
    image_px: int | None = None  # rendered image size; default: the preset's
    style_drift_from: str | None = None  # new items from this date on get an unseen visual style (drift tests)


@dataclass(frozen=True)
class SamplesConf:
    session_gap_minutes: int = 30  # a new session after a gap longer than this (unless the log has session ids)
    l_pv: int = 5  # PV items kept per sample, positives first (paper: 5)
    l_click: int = 5  # click history length, most recent first (paper: 5)
    neg_rate: float = 0.2  # share of non-clicked impressions kept (paper: 20%)
    sampling_seed: int = 17  # part of the down-sampling hash: change it to draw another sample
    history_lookback_days: int = 7  # raw log days read before the date for click history
    image_px: int = 224  # item images are resized to image_px x image_px
    jpeg_quality: int = 90
    ts_skew_minutes: int = 10  # events may be this far outside their date folder's day (clock skew)
    max_image_pixels: int = 25_000_000  # width x height from the header; larger -> image_too_large
    max_image_bytes: int = 50_000_000  # image file size; larger -> image_too_large (never read)
    # File names in a raw date folder that are skipped and counted (fnmatch); any other file that is
    # not *.jsonl / *.json (optionally .gz / .bz2) fails the date.
    input_ignore: list = field(default_factory=lambda: ["_*", ".*"])


@dataclass(frozen=True)
class TrainConf:
    """Stage 2: pre-training the image encoder (COURIER or a baseline) on a courier_train snapshot."""
    method: str = "courier"  # courier | simclr | simsiam | supervised
    backbone: str = "tiny_cnn"  # swin_t (the paper's; GPU default) | resnet18 | resnet50 | tiny_cnn (CPU)
    dim: int = 256  # embedding size d
    pretrained_path: str | None = None  # a local state dict; nothing is downloaded
    grad_checkpointing: bool = False
    batch_size: int = 32  # PV samples per worker (paper: 64 per GPU)
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (all epochs together)
    lr: float = 1e-4  # Adam (paper: 1e-4)
    weight_decay: float = 1e-6  # (paper: 1e-6)
    tau: float = 0.05  # contrastive temperature (paper: 0.05)
    # The paper's ablations (section 4.3): each switch off/changed gives one row of Table 6.
    use_ucs: bool = True  # False: w/o UCS
    use_contrast: bool = True  # False: w/o contrast
    reconstruction: str = "attention"  # self_attention: w/o reconstruction; multihead: an extension
    use_negatives: bool = True  # False: w/o negative PV items
    proj_head: bool = False  # True: with projection head
    backend: str = "ddp"  # ddp (TorchDistributor) | horovod
    num_workers: int = 2  # training processes
    local_mode: bool = True  # TorchDistributor: processes on the driver (True) or on executors
    use_gpu: bool | None = None  # default: local mode, when this machine has CUDA; else when tasks get GPUs
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    checkpoint_every: int = 50  # steps
    # how long a DDP rank waits for its peers in a collective: rank 0 writes checkpoints (model + optimizer,
    # ~1 GB for a large backbone, to an object store) and the final encoder while the others wait in the
    # next one, and torch's default for nccl is 10 minutes
    collective_timeout_min: int = 60
    keep_checkpoints: int = 3  # step-*.pt files kept besides last.pt (each holds model + optimizer); 0 = all
    max_bad_steps: int = 5  # consecutive non-finite steps before the job aborts
    log_every: int = 10  # steps between progress lines
    # JPEG decoding of the training reader (training/reader.py), per training process:
    # decode_workers: worker processes; auto = this process's share of the cores (cores // local training
    # processes) minus what the step keeps busy (1 on CUDA, torch's intra-op threads on CPU), 0 when
    # nothing is left; 0 = decode in the training process with decode_threads threads.
    decode_workers: int | str = "auto"
    decode_threads: int = 2  # threads when decode_workers is 0
    # decode on the training GPU with torchvision.io.decode_jpeg (nvjpeg) instead: auto = when training on
    # CUDA and this torchvision can; true = required (error otherwise); false = CPU decoding
    gpu_decode: bool | str = "auto"
    # The paper pre-trains on one category, so in-batch negatives share it. "query": every batch's PVs
    # share one query (the simulated log's query is the PV's category); "none": batches mix them.
    batch_grouping: str = "none"
    seed: int = 0
    table_version: int | None = None  # pin a courier_train version (default: the latest)
    holdout_last_date: bool = True  # evaluate on the latest date's PVs, train on the others


@dataclass(frozen=True)
class FeaturesConf:
    """Stages 3-4: item embeddings, FAISS clusters, CTR features and the daily refresh."""
    # The encoder embed_items/build_clusters use: "<model>@<alias>", "<model>/<version>" or "<model>/latest".
    # train_courier --alias champion points the alias at the encoder it registers.
    encoder_ref: str = "courier-encoder@champion"
    # The clustering attach/refresh use; its encoder is the one tagged on it (lineage, not a second setting).
    clusters_ref: str = "courier-clusters@current"
    n_clusters: int = 1024  # C (paper: 1e5 for 6e7 items): the finest cluster ids
    # Coarser cluster-id levels, coarsest first (e.g. [8, 64] under n_clusters 512): each is a k-means of
    # the next finer level's centroids, so a fine id maps to exactly one id per level and serving costs
    # no extra search. ctr_train then carries item_cluster_levels / history_cluster_levels, which the CTR
    # model's multi_cluster mode uses. [] = one level (the paper's setting).
    levels: list = field(default_factory=list)
    kmeans_iters: int = 20
    kmeans_sample: int = 1_000_000  # k-means trains on at most this many items (a seeded sample)
    kmeans_seed: int = 1234
    large_c_threshold: int = 8192  # C >= this: HNSW assignment index (training and serving) instead of flat
    hnsw_m: int = 32  # HNSW graph degree of the large-C index
    hnsw_ef_search: int = 128  # HNSW search breadth: recall vs speed of the large-C assignment
    embed_batch_size: int = 128  # images per encoder forward pass inside the embedding UDF
    attach_batch_size: int = 8192  # vectors per Arrow batch of the assignment UDF
    include_vector: bool = False  # ctr_train.item_vector (the L2-normalised image embedding)
    drift_far_quantile: float = 0.95  # "far from every centroid" = beyond this quantile of the build's distances
    drift_threshold: float = 0.15  # share of a day's new items that are far; above it a full re-cluster is due
    executor_threads: int = 1  # torch/FAISS threads per Spark Python worker (Spark runs one per core)


@dataclass(frozen=True)
class CtrConf:
    """Stage 4: the downstream CTR model trained on ctr_train dates and evaluated on later ones."""
    # How the image enters the model (the paper's Table B1): none | vector | simscore | cluster_id;
    # multi_cluster = cluster_id plus an embedding per coarser level (features.levels).
    feature_mode: str = "cluster_id"
    # multi_cluster: the fine and coarser levels' embeddings concatenated (each level its own slice, so the
    # target attention sees a match per level) or summed into one slice (bench/RESULTS.md run F: concat
    # doubles the gain of the levels)
    level_combine: str = "concat"
    table_version: int | None = None  # pin a ctr_train version (default: the latest)
    train_dates: list | None = None  # explicit YYYY-MM-DD lists; default: every date before the eval dates
    eval_dates: list | None = None  # default: the last `eval_last_n_dates` dates of the table version
    eval_last_n_dates: int = 1
    id_dim: int = 16  # item-/user-ID embedding size
    cluster_dim: int = 16  # cluster-ID embedding size (cluster_id mode)
    vector_dim: int = 16  # the image vector is projected to this size (vector mode)
    context_dim: int = 8  # query (= searched category) and position embedding sizes
    # Hidden MLP widths; with the output layer, 4 hidden layers make the paper's 5-layer MLP.
    layers: list = field(default_factory=lambda: [256, 128, 64, 32])
    attention_hidden: int = 32  # width of the target-attention unit over the click history
    max_history: int = 5  # history items used, most recent first (stage 1 keeps l_click = 5)
    item_buckets: int = 262144  # hashed item-ID buckets; >> items so seen items rarely collide
    user_buckets: int = 65536
    id_dropout: float = 0.1  # share of training IDs replaced by the OOV bucket, so cold items' path is trained
    epochs: int = 3  # the most epochs; early stopping on the validation dates may choose fewer
    # Honest model selection: the last N training dates are the validation split. The number of epochs
    # is chosen on them (early stopping), then the model is refit on every training date for that many
    # epochs. The eval dates never choose anything. 0 = no validation (the last epoch is kept).
    validation_last_n_dates: int = 1
    early_stopping_patience: int = 1  # epochs without a better validation AUC before stopping
    lr: float = 0.002  # Adam
    batch_size: int = 1024  # impressions per step (id tables update sparsely, so a step stays cheap)
    seed: int = 0
    threads: int = 2  # torch intra-op threads
    gauc_by: str = "pv_id"  # GAUC groups: pv_id (a result page, the paper's in-page ranking) | session_id, per user


@dataclass(frozen=True)
class ReviewConf:
    """Registry review gates: a challenger replaces @champion only when all of them pass."""
    auc_tol: float = 0.001  # challenger AUC may be at most this much below the champion's
    gauc_tol: float = 0.001  # same for GAUC
    category_regression_limit: float = 0.005  # no category's AUC may drop by more than this
    min_category_rows: int = 500  # categories with fewer eval rows are reported but not gated (noise)
    min_eval_rows: int = 1000  # fewer eval rows than this: no decision is possible, the review refuses


@dataclass(frozen=True)
class Config:
    env: str = "local"
    paths: PathsConf = field(default_factory=PathsConf)
    spark: SparkConf = field(default_factory=SparkConf)
    tables: TablesConf = field(default_factory=TablesConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    simulator: SimulatorConf = field(default_factory=SimulatorConf)
    samples: SamplesConf = field(default_factory=SamplesConf)
    train: TrainConf = field(default_factory=TrainConf)
    features: FeaturesConf = field(default_factory=FeaturesConf)
    ctr: CtrConf = field(default_factory=CtrConf)
    review: ReviewConf = field(default_factory=ReviewConf)
    source: str | None = None  # the file this config was loaded from

    # ---- resolved paths: the only way the rest of the code reads a location -------------------
    @property
    def data_root(self) -> str:
        return self.paths.data_root

    def _root(self, value: str | None, default_sub: str) -> str:
        return value if value is not None else _join(self.paths.data_root, default_sub)

    @property
    def raw_root(self) -> str:
        return self._root(self.paths.raw_root, "raw")

    @property
    def images_root(self) -> str:
        return self._root(self.paths.images_root, "raw/images")

    @property
    def tables_root(self) -> str:
        return self._root(self.paths.tables_root, "tables")

    @property
    def truth_root(self) -> str:
        return self._root(self.paths.truth_root, "truth")

    @property
    def checkpoints_root(self) -> str:
        return self._root(self.paths.checkpoints_root, "checkpoints")

    @property
    def mlflow_tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return "sqlite:///" + _join(self.paths.data_root, "mlflow/mlflow.db")

    @property
    def mlflow_artifact_root(self) -> str:
        root = self._root(self.mlflow.artifact_root, "mlflow/artifacts")
        # s3a:// is Hadoop's name for S3; MLflow's artifact stores know the same objects as s3://.
        return "s3://" + root[len("s3a://"):] if root.startswith("s3a://") else root


# ---- allowed values: the one list of each; the modules that branch on a value import it from here ----
TABLE_ENGINES = ("delta-rs", "spark-delta", "auto")
SIMULATOR_PRESETS = ("tiny", "demo", "bench")
TRAIN_METHODS = ("courier", "simclr", "simsiam", "supervised")
TRAIN_BACKENDS = ("ddp", "horovod")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RECONSTRUCTION_MODES = ("attention", "self_attention", "multihead")
BATCH_GROUPINGS = ("none", "query")
FEATURE_MODES = ("none", "vector", "simscore", "cluster_id", "multi_cluster")
LEVEL_COMBINES = ("concat", "sum")
GAUC_GROUPS = ("pv_id", "session_id")


BACKBONE = re.compile(r"tiny_cnn|resnet(18|34|50|101|152)|swin_(v2_)?[tsb]")  # training.courier's


def _positive(*values: float) -> bool:
    """Every value a finite number > 0 (a NaN passes no comparison, so `x > 0` alone would refuse it
    only where it is tested first, and inf would pass)."""
    return all(math.isfinite(v) and v > 0 for v in values)


def _non_negative(*values: float) -> bool:
    return all(math.isfinite(v) and v >= 0 for v in values)


def _one_of(key: str, allowed: tuple) -> str:
    """'train.backend must be ddp or horovod' (the error text of a value outside `allowed`)."""
    return f"{key} must be {', '.join(allowed[:-1])} or {allowed[-1]}"


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _join(root: str, sub: str) -> str:
    return root.rstrip("/") + "/" + sub if is_uri(root) else str(Path(root) / sub)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Check a scalar against a field's resolved type hint (typing.get_type_hints, never eval)."""
    args = typing.get_args(annotation)
    allowed = args if args else (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key}: must not be null")
    for t in allowed:
        if t is type(None):
            continue
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, bool):
            continue
        if isinstance(value, base):
            return value
        if base is str and isinstance(value, (dt.date,)):  # YAML turns 2026-11-20 into a date
            return value.isoformat()
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Mapping[str, Any] | None, prefix: str) -> Any:
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # the string annotations resolved in this module's namespace
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        ftype = fields[name].type
        if isinstance(ftype, str) and ftype.endswith("Conf"):
            kwargs[name] = _build(globals()[ftype], value, key)
        else:
            kwargs[name] = _check_type(value, hints[name], key)
    return cls(**kwargs)


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def parse_overrides(pairs: list[str] | None) -> dict:
    """Turn ["samples.neg_rate=0.3", ...] (CLI --set) into a nested dict; values are parsed as YAML."""
    tree: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key.path=value")
        key, raw = pair.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        spark_key = parts[:2] == ["spark", "conf"] and len(parts) > 2
        if spark_key:  # a Spark key is one key: spark.conf.spark.ui.port
            parts = ["spark", "conf", ".".join(parts[2:])]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        # A Spark setting is a string, as Spark reads it (YAML would read a secret "0123" as 83, "on" as true).
        node[parts[-1]] = raw if spark_key else yaml.safe_load(raw)
    return tree


def _validate(cfg: Config) -> None:
    s = cfg.samples
    checks = [
        (0.0 < s.neg_rate <= 1.0, "samples.neg_rate must be in (0, 1]"),
        (s.l_pv >= 1, "samples.l_pv must be >= 1"),
        (s.l_click >= 2, "samples.l_click must be >= 2 (the UCS loss needs a target and a history)"),
        (s.session_gap_minutes > 0, "samples.session_gap_minutes must be > 0"),
        (s.history_lookback_days >= 0, "samples.history_lookback_days must be >= 0"),
        (16 <= s.image_px <= 1024, "samples.image_px must be in [16, 1024]"),
        (1 <= s.jpeg_quality <= 100, "samples.jpeg_quality must be in [1, 100]"),
        (s.ts_skew_minutes >= 0, "samples.ts_skew_minutes must be >= 0"),
        (s.max_image_pixels >= 1 and s.max_image_bytes >= 1, "samples.max_image_pixels and max_image_bytes must be >= 1"),
        (isinstance(s.input_ignore, list) and all(isinstance(x, str) and x for x in s.input_ignore),
         "samples.input_ignore must be a list of non-empty file name patterns"),
        (cfg.tables.engine in TABLE_ENGINES, f"tables.engine must be one of {', '.join(TABLE_ENGINES)}"),
        (cfg.spark.shuffle_partitions >= 1, "spark.shuffle_partitions must be >= 1"),
        (cfg.spark.broadcast_images_mb >= 0, "spark.broadcast_images_mb must be >= 0"),
        # the jobs read dates and timestamps in UTC (a date's window, the tables' timestamps)
        (str(cfg.spark.conf.get(SESSION_TIME_ZONE, "UTC")) == "UTC",
         f"spark.conf {SESSION_TIME_ZONE} must be UTC (or left out): the jobs read the log's dates in UTC"),
        (str(cfg.spark.conf.get(ANSI_MODE, "false")).lower() == "false",
         f"spark.conf {ANSI_MODE} must be false (or left out): stage 1 quarantines a value Spark cannot cast "
         "(read as null), which ANSI mode turns into a failed job"),
        (cfg.simulator.preset in SIMULATOR_PRESETS, _one_of("simulator.preset", SIMULATOR_PRESETS)),
        (cfg.simulator.seed >= 0 and (cfg.simulator.days is None or cfg.simulator.days >= 1)
         and (cfg.simulator.image_px is None or cfg.simulator.image_px >= 8),
         "simulator.seed must be >= 0, simulator.days >= 1 and simulator.image_px >= 8"),
        ((cfg.simulator.malformed_rate is None or 0.0 <= cfg.simulator.malformed_rate < 0.5)
         and (cfg.simulator.bad_image_rate is None or 0.0 <= cfg.simulator.bad_image_rate <= 1.0),
         "simulator.malformed_rate must be in [0, 0.5) and simulator.bad_image_rate in [0, 1]"),
        (cfg.train.method in TRAIN_METHODS, _one_of("train.method", TRAIN_METHODS)),
        # The supervised baseline's classifier reads the encoder's output, never a projection head, whose
        # unused parameters DDP (find_unused_parameters off) would wait for in every step.
        (not (cfg.train.method == "supervised" and cfg.train.proj_head),
         "train.proj_head is not used by train.method=supervised (its classifier reads the encoder's output): "
         "leave proj_head false"),
        (cfg.train.backend in TRAIN_BACKENDS, _one_of("train.backend", TRAIN_BACKENDS)),
        (cfg.train.precision in PRECISIONS, _one_of("train.precision", PRECISIONS)),
        (cfg.train.reconstruction in RECONSTRUCTION_MODES, _one_of("train.reconstruction", RECONSTRUCTION_MODES)),
        (cfg.train.batch_grouping in BATCH_GROUPINGS, _one_of("train.batch_grouping", BATCH_GROUPINGS)),
        (cfg.train.batch_size >= 1 and cfg.train.num_workers >= 1 and cfg.train.epochs >= 1,
         "train.batch_size, train.num_workers and train.epochs must be >= 1"),
        (_positive(cfg.train.tau, cfg.train.lr), "train.tau and train.lr must be finite numbers > 0"),
        (bool(BACKBONE.fullmatch(cfg.train.backbone)),
         f"train.backbone must be tiny_cnn, resnet18/34/50/101/152 or swin_t/s/b (also swin_v2_*), "
         f"got {cfg.train.backbone!r}"),
        (cfg.train.checkpoint_every >= 1 and cfg.train.max_bad_steps >= 1 and cfg.train.log_every >= 1,
         "train.checkpoint_every, train.max_bad_steps and train.log_every must be >= 1"),
        (cfg.train.collective_timeout_min >= 1, "train.collective_timeout_min must be >= 1 (minutes)"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1,
         f"train.max_steps must be >= 1 (or left out: no limit), got {cfg.train.max_steps!r}"),
        (cfg.train.dim >= 1 and _non_negative(cfg.train.weight_decay) and cfg.train.seed >= 0,
         "train.dim must be >= 1, train.weight_decay and train.seed >= 0"),
        (cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0 (0 keeps every one)"),
        (cfg.mlflow.tracking_uri or not is_uri(cfg.paths.data_root),
         f"mlflow.tracking_uri must be set when paths.data_root is a URI ({cfg.paths.data_root}): the default, a "
         "sqlite file under data_root, cannot live in an object store"),
        (cfg.train.decode_workers == "auto"
         or (isinstance(cfg.train.decode_workers, int) and cfg.train.decode_workers >= 0),
         f"train.decode_workers must be auto or an integer >= 0, got {cfg.train.decode_workers!r}"),
        (cfg.train.decode_threads >= 1, "train.decode_threads must be >= 1"),
        (cfg.train.gpu_decode in (True, False, "auto"),
         f"train.gpu_decode must be auto, true or false, got {cfg.train.gpu_decode!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_features(cfg.features)
    _validate_ctr(cfg.ctr, cfg.review)
    parse_date(cfg.simulator.start_date, "simulator.start_date")
    if cfg.simulator.style_drift_from is not None:
        parse_date(cfg.simulator.style_drift_from, "simulator.style_drift_from")
    bad_spark = [k for k in cfg.spark.conf if not str(k).startswith("spark.")]
    if bad_spark:
        raise ConfigError(f"spark.conf: keys must start with 'spark.', got {bad_spark}")


def _validate_features(f: FeaturesConf) -> None:
    import re

    from etl.contracts import CLUSTERS_MODEL, ENCODER_MODEL

    # The jobs register and read these models only (lineage, feature versions): another name would be
    # a model no job writes, and build_clusters would move an alias of courier-clusters, not of it.
    for key, model in (("encoder_ref", ENCODER_MODEL), ("clusters_ref", CLUSTERS_MODEL)):
        if not re.fullmatch(rf"{re.escape(model)}(@[A-Za-z0-9_\-]+|/(\d+|latest))", getattr(f, key)):
            raise ConfigError(f"features.{key}: expected {model}@<alias>, {model}/<version> or {model}/latest, "
                              f"got {getattr(f, key)!r}")
        if "@" in getattr(f, key):
            check_alias(getattr(f, key).split("@", 1)[1], f"features.{key}")
    checks = [
        (f.n_clusters >= 2, "features.n_clusters must be >= 2"),
        (f.kmeans_iters >= 1, "features.kmeans_iters must be >= 1"),
        (isinstance(f.levels, list) and all(isinstance(k, int) and not isinstance(k, bool) for k in f.levels)
         and all(2 <= a < b for a, b in zip(f.levels, [*f.levels[1:], f.n_clusters])),
         "features.levels must be increasing cluster counts >= 2, each below features.n_clusters"),
        (f.kmeans_sample >= f.n_clusters, "features.kmeans_sample must be >= features.n_clusters"),
        (f.large_c_threshold >= 2 and f.hnsw_m >= 4 and f.hnsw_ef_search >= 1,
         "features.large_c_threshold >= 2, hnsw_m >= 4 and hnsw_ef_search >= 1"),
        (f.embed_batch_size >= 1 and f.attach_batch_size >= 1 and f.executor_threads >= 1,
         "features.embed_batch_size, attach_batch_size and executor_threads must be >= 1"),
        (0.0 < f.drift_far_quantile < 1.0, "features.drift_far_quantile must be in (0, 1)"),
        (0.0 <= f.drift_threshold <= 1.0, "features.drift_threshold must be in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _validate_ctr(c: CtrConf, r: ReviewConf) -> None:
    checks = [
        (c.feature_mode in FEATURE_MODES, _one_of("ctr.feature_mode", FEATURE_MODES)),
        (c.level_combine in LEVEL_COMBINES, _one_of("ctr.level_combine", LEVEL_COMBINES)),
        (c.gauc_by in GAUC_GROUPS, _one_of("ctr.gauc_by", GAUC_GROUPS)),
        (c.eval_last_n_dates >= 1, "ctr.eval_last_n_dates must be >= 1"),
        (c.validation_last_n_dates >= 0, "ctr.validation_last_n_dates must be >= 0"),
        (c.early_stopping_patience >= 1, "ctr.early_stopping_patience must be >= 1"),
        (isinstance(c.layers, list) and len(c.layers) >= 1
         and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in c.layers),
         "ctr.layers must be a non-empty list of positive integers (hidden widths)"),
        (min(c.id_dim, c.cluster_dim, c.vector_dim, c.context_dim, c.attention_hidden) >= 1,
         "ctr.id_dim, cluster_dim, vector_dim, context_dim and attention_hidden must be >= 1"),
        (c.max_history >= 1, "ctr.max_history must be >= 1"),
        (c.item_buckets >= 2 and c.user_buckets >= 2, "ctr.item_buckets and ctr.user_buckets must be >= 2"),
        (0.0 <= c.id_dropout < 1.0, "ctr.id_dropout must be in [0, 1)"),
        (c.epochs >= 1 and c.batch_size >= 1 and c.threads >= 1, "ctr.epochs, batch_size and threads must be >= 1"),
        (_positive(c.lr), "ctr.lr must be a finite number > 0"),
        (_non_negative(r.auc_tol, r.gauc_tol, r.category_regression_limit),
         "review.auc_tol, gauc_tol and category_regression_limit must be finite numbers >= 0"),
        (r.min_eval_rows >= 1 and r.min_category_rows >= 1, "review.min_eval_rows and min_category_rows must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key in ("train_dates", "eval_dates"):
        dates = getattr(c, key)
        if dates is None:
            continue
        if not isinstance(dates, list) or not dates:
            raise ConfigError(f"ctr.{key}: expected a non-empty list of YYYY-MM-DD dates")
        for d in dates:
            parse_date(d, f"ctr.{key}")
    if c.train_dates and c.eval_dates:
        overlap = sorted({str(d) for d in c.train_dates} & {str(d) for d in c.eval_dates})
        if overlap:
            raise ConfigError(f"ctr.train_dates and ctr.eval_dates overlap on {overlap}")


def parse_date(value: str, what: str = "date") -> dt.date:
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{what}: expected YYYY-MM-DD, got {value!r}") from None


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    """Make local relative paths absolute against the config file's folder."""
    def resolve(v: str | None, key: str) -> str | None:
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{key} must be a path or URI string, got {type(v).__name__} {v!r}")
        if v is None or is_uri(v) or v.startswith("sqlite:"):
            return v
        if not v.strip():
            raise ConfigError(f"{key} is empty: give a path or URI, or leave the key out for its default")
        if re.match(r"[A-Za-z][A-Za-z0-9+.\-]+:", v):  # file:/srv/x (Hadoop's form), s3a:bucket/x
            raise ConfigError(f"{key}: {v!r} reads as a URI without '//': write it as "
                              f"{v.split(':', 1)[0]}:///... (or a plain local path)")
        return str((base_dir / os.path.expanduser(v)).resolve())

    raw = dict(raw)
    for section in ("paths", "mlflow"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"{section} must be a mapping of keys to values, got {type(raw[section]).__name__}")
    raw["paths"] = {k: resolve(v, f"paths.{k}") for k, v in (raw.get("paths") or {}).items()}
    if "data_root" not in raw["paths"]:
        raw["paths"]["data_root"] = resolve(PathsConf.data_root, "paths.data_root")
    ml = dict(raw.get("mlflow") or {})
    if ml.get("artifact_root") is not None:
        ml["artifact_root"] = resolve(ml["artifact_root"], "mlflow.artifact_root")
    train = raw.get("train")
    if isinstance(train, dict) and train.get("pretrained_path") is not None:  # read by the training processes
        raw["train"] = {**train, "pretrained_path": resolve(train["pretrained_path"], "train.pretrained_path")}
    uri = ml.get("tracking_uri")
    if uri is not None and not isinstance(uri, str):
        raise ConfigError(f"mlflow.tracking_uri must be a URI string, got {type(uri).__name__} {uri!r}")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        ml["tracking_uri"] = "sqlite:///" + resolve(uri[len("sqlite:///"):], "mlflow.tracking_uri")
    if ml:
        raw["mlflow"] = ml
    return raw


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, key: str, environ: Mapping[str, str]) -> Any:
    """Replace ``${NAME}`` (or ``${NAME:-default}``) in string values with environment variables, so a
    config can point at services whose endpoints are chosen at start (conf/cluster.local.yaml and the
    cluster.env of scripts/cluster_up.sh) without any secret in the file. A variable that is not set and
    has no default is an error naming the key and the variable."""
    if isinstance(node, Mapping):
        return {k: _interpolate(v, f"{key}.{k}" if key else str(k), environ) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{key}[{i}]", environ) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{key}: environment variable {name} is not set (the value is {node!r}); "
                          f"for conf/cluster.local.yaml, `source <run dir>/cluster.env` first")

    out = _ENV_REF.sub(value, node)
    if "${" in out:
        raise ConfigError(f"{key}: malformed ${{...}} reference in {node!r}")
    return out


def load_config(path: str | os.PathLike, overrides: Mapping | None = None) -> Config:
    """Load, merge overrides into, resolve and validate a config file. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    raw = _deep_merge(raw, overrides or {})
    raw.pop("source", None)
    raw = _interpolate(raw, "", os.environ)
    raw = _resolve_paths(raw, path.parent.resolve())
    cfg = _build(Config, raw, "")
    cfg = dataclasses.replace(cfg, source=str(path.resolve()))
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as a plain dict (for logging to MLflow and reports)."""
    return dataclasses.asdict(cfg)


def flat_params(cfg: Config, sections: tuple[str, ...]) -> dict[str, Any]:
    """Flatten the named sections to {"samples.neg_rate": 0.2, ...} for MLflow params."""
    d = to_dict(cfg)
    return {f"{s}.{k}": v for s in sections for k, v in d[s].items()}


@functools.lru_cache(maxsize=64)
def _resolved_root(root: str) -> Path:
    """A configured root, resolved once per process (under_root runs once per catalog image)."""
    return Path(root).resolve()


def under_root(root: str, relative: str) -> str:
    """Join a path from data (e.g. a catalog image_uri) to its root; refuse anything that escapes it."""
    if "\x00" in relative:  # no file system takes it; Path.resolve would raise ValueError
        raise ConfigError(f"path {relative!r} holds a NUL character")
    if is_uri(root):
        if ".." in Path(relative).parts or relative.startswith("/"):
            raise ConfigError(f"path {relative!r} escapes its root {root}")
        if root.startswith("file:"):  # local disk under a URI: a symlink could leave the root, as below
            from urllib.parse import unquote, urlparse

            under_root(unquote(urlparse(root).path), relative)
        return _join(root, relative)
    base = _resolved_root(root)
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise ConfigError(f"path {relative!r} escapes its root {root}")
    return str(target)
