"""Driver side of stage 2: launch the per-process loop (TorchDistributor or Horovod) and register the
trained encoder in MLflow. Imports Spark and MLflow lazily; the workers only run training/train.py."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile

from etl import catalog as T, fs, registry
from etl.config import Config, flat_params, under_root
from etl.contracts import ENCODER_MODEL as MODEL_NAME

log = logging.getLogger(__name__)
TABLE = T.COURIER_TRAIN


class TrainError(RuntimeError):
    """Training cannot start: no data, or a checkpoint folder that belongs to another run."""


@dataclasses.dataclass
class TrainPlan:
    """What one train_courier run trains on and where it keeps its checkpoints."""
    run_name: str
    data_version: int
    files: list
    holdout: list
    checkpoint_dir: str
    marker: dict | None  # the run the checkpoint folder already belongs to
    resume: bool = False  # continue that run (from its last checkpoint, if it wrote one)

    @property
    def dates(self) -> list[str]:
        """The courier_train dates trained on (the held-out date not among them)."""
        return sorted({f.partition_values.get("dt") for f in self.files})

    @property
    def done_path(self) -> str:
        return fs.join(self.checkpoint_dir, "done.json")


# The settings a checkpoint's position and weights mean something under: the reader's order depends on
# (seed, epoch, rank, world size, batch size, grouping) and the files, the weights on the model's shape,
# and the run trains one objective with one optimizer (a resumed optimizer state restores its own lr and
# weight decay, so a changed one would be ignored while the run's parameters said otherwise). Likewise the
# precision, the weights it started from and the decoder (GPU decoding gives slightly other pixels): the run's
# parameters, logged when it started, name them.
RESUME_SETTINGS = ("batch_size", "num_workers", "seed", "batch_grouping", "holdout_last_date", "method",
                   "backbone", "dim", "proj_head", "lr", "weight_decay", "tau", "use_ucs", "use_contrast",
                   "reconstruction", "use_negatives", "precision", "pretrained_path", "gpu_decode")


def run_identity(cfg: Config, data_version: int) -> dict:
    """What a run was started on, kept in its run.json: a resume must match it."""
    return {"data_version": data_version, "samples.image_px": cfg.samples.image_px,
            **{f"train.{k}": getattr(cfg.train, k) for k in RESUME_SETTINGS}}


def plan_training(cfg: Config, store, run_name: str | None, resume: bool, skip_if_done: bool) -> TrainPlan:
    """The pinned courier_train version and its files (latest date held out when asked), and the
    checkpoint folder; refuses to start over an existing run unless resuming it. A resumed run trains on
    its own data version (not a newer one) and refuses settings that would change its order or model.
    With skip_if_done (an idempotent pipeline), a run that started and did not finish is resumed."""
    t = cfg.train
    latest = t.table_version if t.table_version is not None else store.version(TABLE)
    if latest is None:
        raise TrainError(f"{TABLE} does not exist yet: run jobs/build_samples.py first")
    name = run_name or f"{t.method}-{t.backbone}-v{latest}"
    checkpoint_dir = under_root(cfg.checkpoints_root, name)
    marker = run_marker(checkpoint_dir)
    resume = resume or (skip_if_done and marker is not None)
    if resume and marker is None:
        raise TrainError(f"--resume: no run to resume in {checkpoint_dir}")
    if not resume and marker is not None:
        raise TrainError(f"{checkpoint_dir} already holds run {marker['mlflow_run_id']}: pass --resume to "
                         "continue it, or --run-name for a new run (nothing is overwritten)")
    started_on = (marker or {}).get("identity", {}).get("data_version")
    version = started_on if resume and started_on is not None and t.table_version is None else latest
    files = store.files(TABLE, version)
    if not files:
        raise TrainError(f"{TABLE} v{version} has no rows to train on")
    train_files, holdout = split_holdout(files, t.holdout_last_date)
    plan = TrainPlan(name, version, train_files, holdout, checkpoint_dir, marker, resume)
    finished = resume and fs.exists(plan.done_path)
    if finished and not skip_if_done:  # (with it, the job says there is nothing to do)
        raise TrainError(f"--resume of {name}: the run finished and registered {MODEL_NAME} "
                         f"v{finished_version(plan)}; there is nothing to resume (a new run: --run-name)")
    if resume:  # a finished run too: one of other settings is not the run this config asks for
        _refuse_changed_settings(plan, run_identity(cfg, version), finished)
    if finished:
        return plan
    _refuse_other_widths(cfg, version, files)
    return plan


def _refuse_other_widths(cfg: Config, version: int, files) -> None:
    """Every file's rows are padded to the samples.l_pv / l_click of this config: a rank that runs out
    of rows sends empty batches of those widths, which a table built with others would meet in the
    all-gather with other shapes (gloo fails, NCCL can hang). One row of each file is read."""
    from training.reader import row_widths

    want = (cfg.samples.l_pv, cfg.samples.l_click)
    for f in files:
        got = row_widths(f.uri)
        if got is not None and got != want:
            raise TrainError(f"{TABLE} v{version} (dt={f.partition_values.get('dt')}) holds rows of l_pv={got[0]}, "
                             f"l_click={got[1]}, this config says l_pv={want[0]}, l_click={want[1]}: train with the "
                             f"settings it was built with (--set samples.l_pv={got[0]} "
                             f"--set samples.l_click={got[1]}), or rebuild those dates")


def _refuse_changed_settings(plan: TrainPlan, now: dict, finished: bool = False) -> None:
    then = plan.marker.get("identity")
    if then is None:  # a run.json written before identities were kept: nothing to compare
        return
    # A setting the run.json does not name was added since the run started: it cannot say.
    changed = "; ".join(f"{k}: {then[k]!r} -> {now[k]!r}" for k in now if k in then and then[k] != now[k])
    if changed and finished:
        raise TrainError(f"{plan.run_name} finished with other settings ({changed}): it is not the run this "
                         "config asks for, so there is nothing to skip to. Start a new run with --run-name")
    if changed:
        raise TrainError(f"--resume of {plan.run_name}: the run started with other settings ({changed}); "
                         "its checkpoint's position would skip or repeat rows. Resume with the run's settings, "
                         "or start a new run with --run-name")


def check_registered_by(plan: TrainPlan, version: str) -> None:
    """The courier-encoder version a finished run's done.json names was registered by that run: over a
    registry that numbers versions from 1 again (a new tracking store, old checkpoints) it would be
    another run's encoder."""
    mv = registry.resolve(f"{MODEL_NAME}/{version}")
    if (mv.tags or {}).get("run_id") != plan.marker["mlflow_run_id"]:
        raise TrainError(f"{plan.run_name} finished as {MODEL_NAME} v{version}, but this registry's v{version} was "
                         f"registered by run {(mv.tags or {}).get('run_id')}, not by {plan.marker['mlflow_run_id']}: "
                         "the checkpoints belong to another tracking store (start a new run with --run-name)")


def finished_version(plan: TrainPlan) -> str | None:
    """The courier-encoder version a finished run registered, or None when the run is not done."""
    if plan.marker is None or not fs.exists(plan.done_path):
        return None
    return str(json.loads(fs.read_text(plan.done_path))["model_version"])


def train_params(cfg: Config, plan: TrainPlan) -> dict:
    return {**flat_params(cfg, ("train",)), "data.table": TABLE, "data.version": plan.data_version,
            "data.files": len(plan.files), "data.rows": sum(f.num_records or 0 for f in plan.files),
            "samples.image_px": cfg.samples.image_px}


def log_holdout(cfg: Config, plan: TrainPlan, encoder_path: str) -> str | None:
    """Held-out PV ranking AUC of the trained encoder vs its random init, logged; a line for the log."""
    import mlflow

    if not plan.holdout:
        return None
    init, trained = (evaluate_holdout(cfg, plan.holdout, p) for p in (None, encoder_path))
    mlflow.log_metrics({"holdout_pv_auc": trained["pv_auc"], "holdout_pv_auc_init": init["pv_auc"],
                        "holdout_pages": trained["pages"]})
    return (f"held-out PV ranking AUC ({trained['pages']} pages of {plan.holdout[0].partition_values.get('dt')}): "
            f"trained {trained['pv_auc']:.4f} vs untrained {init['pv_auc']:.4f}")


def log_result(result: dict) -> None:
    """The run's totals. An attempt that trained no step (resumed at max_steps after e.g. a failed
    registration) has no loss or throughput of its own: the first attempt's stand, not NaN and 0."""
    import mlflow

    metrics = {"steps": result["steps"], "skipped_steps": result["skipped"]}
    if result["losses"]:
        metrics.update(final_loss=result["losses"][-1], throughput_images_per_s=result["images_per_s"])
    mlflow.log_metrics(metrics)


def mark_done(plan: TrainPlan, run_id: str, model_version: str) -> None:
    fs.write_text(plan.done_path, json.dumps({"mlflow_run_id": run_id, "model_version": model_version}))


def run_marker(checkpoint_dir: str) -> dict | None:
    """The run a checkpoint folder belongs to ({"mlflow_run_id": ...}), or None for a fresh folder."""
    path = fs.join(checkpoint_dir, "run.json")
    if not fs.exists(path):
        return None
    return json.loads(fs.read_text(path))


def _write_marker(checkpoint_dir: str, run_id: str, identity: dict, categories: list[str] | None = None) -> None:
    marker = {"mlflow_run_id": run_id, "identity": identity}
    if categories is not None:
        marker["categories"] = categories
    fs.write_text(fs.join(checkpoint_dir, "run.json"), json.dumps(marker))


def run_categories(spark, cfg: Config, marker: dict | None) -> list[str]:
    """The supervised baseline's class list, in a fixed order: the run's own (run.json) when it has one,
    else the categories of the items stage 1 published. Fixed with the run as the classifier's size and
    the meaning of its indices are: a resume after a new category was published would not fit its
    checkpoint (or would read the indices shifted)."""
    if marker is not None and marker.get("categories") is not None:
        return list(marker["categories"])
    from etl.tables import TableStore

    items = TableStore(spark, cfg).read(T.ITEMS).select("category").distinct()
    return sorted(r["category"] for r in items.collect() if r["category"])


def make_spec(cfg: Config, files, checkpoint_dir: str, run_id: str | None, resume: bool):
    from training.train import TrainSpec

    return TrainSpec(
        urls=["file://" + f.uri if "://" not in f.uri else f.uri for f in files],
        train=dataclasses.asdict(cfg.train),
        l_pv=cfg.samples.l_pv, l_click=cfg.samples.l_click, image_px=cfg.samples.image_px,
        checkpoint_dir=checkpoint_dir, result_path=fs.join(checkpoint_dir, "result.json"),
        resume=resume, mlflow_run_id=run_id, mlflow_tracking_uri=cfg.mlflow_tracking_uri,
        total_rows=sum(f.num_records or 0 for f in files),
        # Executors on other machines reach the object store with the driver's settings, not their env.
        storage=fs.options_for(cfg).as_dict() if any(fs.is_object_store(u) for u in
                                                      [checkpoint_dir, *(f.uri for f in files)]) else None)


TASK_GPUS = "spark.task.resource.gpu.amount"


def spark_schedules_gpus(spark, local_mode: bool) -> bool:
    """Whether Spark hands GPUs to the training processes: on a cluster, when each task is given one
    (TASK_GPUS); in local mode, when the driver was started with GPU resources
    (spark.driver.resource.gpu.*). TorchDistributor's use_gpu needs exactly that, else it refuses."""
    if not local_mode:
        return float(spark.conf.get(TASK_GPUS, "0") or 0) >= 1
    return "gpu" in spark.sparkContext.resources


def resolve_use_gpu(use_gpu: bool | None, local_mode: bool, spark, num_workers: int) -> bool:
    """train.use_gpu for this launch. auto (None): on a cluster, when Spark gives each task a GPU (the
    driver may have none: its own CUDA says nothing about the executors'); in local mode, when this
    machine has CUDA. In local mode without Spark GPU resources the training processes see the
    machine's GPUs and take one each by local rank, so there must be one per process."""
    if use_gpu is None:
        use_gpu = spark_schedules_gpus(spark, False) if not local_mode else _cuda_devices() > 0
    if use_gpu and local_mode and not spark_schedules_gpus(spark, True) and num_workers > _cuda_devices():
        raise TrainError(f"train.num_workers={num_workers} GPU processes in local mode, but this machine has "
                         f"{_cuda_devices()} CUDA device(s): one process per GPU (lower train.num_workers, or "
                         f"set train.use_gpu: false)")
    return bool(use_gpu)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch(cfg: Config, spark, plan: TrainPlan, run_id: str) -> dict:
    """Run training on cfg.train.num_workers processes; return rank 0's result dict."""
    from training.train import last_checkpoint, train_fn

    t = cfg.train
    files, checkpoint_dir, resume = plan.files, plan.checkpoint_dir, plan.resume
    # before the run's marker: a config the machine cannot run must not claim the run's name
    use_gpu = resolve_use_gpu(t.use_gpu, t.local_mode, spark, t.num_workers)
    categories = run_categories(spark, cfg, plan.marker) if t.method == "supervised" else None
    if not resume:
        _write_marker(checkpoint_dir, run_id, run_identity(cfg, plan.data_version), categories)
    elif last_checkpoint(checkpoint_dir) is None:  # it failed before its first checkpoint
        print(f"[train] {plan.run_name} has no checkpoint yet: starting from step 0 in the same run", flush=True)
        resume = False
    spec = dataclasses.asdict(make_spec(cfg, files, checkpoint_dir, run_id, resume))
    result_path = spec["result_path"]
    fs.remove(result_path)
    spec["train"]["use_gpu"] = use_gpu
    if categories is not None:  # the class list, in a fixed order, for the category classifier
        spec["extra"]["categories"] = categories
    print(f"[train] {t.method} / {t.backbone} on {t.num_workers} {t.backend} worker(s), "
          f"{'GPU' if use_gpu else 'CPU'}, {spec['total_rows']} rows", flush=True)
    if t.backend == "ddp":
        from pyspark.ml.torch.distributor import TorchDistributor

        TorchDistributor(num_processes=t.num_workers, local_mode=t.local_mode,
                         use_gpu=use_gpu and spark_schedules_gpus(spark, t.local_mode)).run(train_fn, spec)
    else:
        import horovod.spark

        horovod.spark.run(train_fn, args=(spec,), num_proc=t.num_workers, use_gloo=True,
                          env={**os.environ})
    # TorchDistributor returns the last process's value, not rank 0's: rank 0 writes its own.
    if not fs.exists(result_path):
        raise RuntimeError(f"training finished without a result from rank 0 ({result_path})")
    return json.loads(fs.read_text(result_path))


def register_encoder(cfg: Config, encoder_path: str, run_id: str, data_version: int, dates: list[str],
                     alias: str | None = None):
    """Log the trained encoder to the run and register it as a new `courier-encoder` version with its
    lineage (run, data version and the dates trained on, method, backbone) as version tags; stage 4
    refuses to evaluate its cluster ids on those dates or earlier ones. A run registers given weights
    once: a retry after its registration (the job failed before marking the run done) reuses that version."""
    from training.train import load_state, state_digest

    state = load_state(encoder_path)
    state_sha256 = state_digest(state)
    version = registry.encoder_registered_by(run_id, state_sha256)
    if version is not None:  # a retry of this run after its registration: the same weights, one version
        print(f"[train] run {run_id} registered these weights as {MODEL_NAME} v{version.version} already", flush=True)
    else:
        _remove_half_registered(run_id)
        version = _register_new_encoder(cfg, encoder_path, state, run_id, data_version, dates, state_sha256)
    if alias:
        registry.set_alias(MODEL_NAME, alias, version.version)
    return version


def _remove_half_registered(run_id: str) -> None:
    """Versions an earlier attempt of this run created and never finished (killed between creating one
    and its last lineage tag, the weights' hash: its own clean-up never ran): courier-encoder/latest must
    not name one, and this attempt registers the weights again."""
    for v in registry.versions(MODEL_NAME):
        tags = v.tags or {}
        if tags.get("run_id") == run_id and registry.ENCODER_STATE_SHA256 not in tags and not v.aliases:
            print(f"[train] removing {MODEL_NAME} v{v.version}, left half-registered by an earlier attempt of "
                  f"run {run_id}", flush=True)
            registry.delete_version(MODEL_NAME, v.version)


def _register_new_encoder(cfg: Config, encoder_path: str, state: dict, run_id: str, data_version: int,
                          dates: list[str], state_sha256: str):
    import mlflow
    import torch
    import torchvision

    from training.courier import ImageEncoder

    t = cfg.train
    encoder = ImageEncoder(t.backbone, dim=t.dim, proj_head=t.proj_head)
    encoder.load_state_dict(state)
    encoder.eval()
    info = mlflow.pytorch.log_model(
        encoder, name="encoder",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}"],
        code_paths=[os.path.dirname(os.path.abspath(__file__))], serialization_format="pickle")
    # the run's id from the start: a retry finds (and removes) a version this attempt leaves half-registered
    version = registry.register_logged_model(MODEL_NAME, info.model_uri, tags={"run_id": run_id})
    # The bare state dict too: stage 3 rebuilds ImageEncoder from the version's tags and loads this with
    # torch.load(weights_only=True), so no pickled model is ever unpickled downstream. One folder per
    # version: a run that registers two encoders must not overwrite the first one's weights.
    state_artifact = registry.ENCODER_STATE_ARTIFACT.format(version=version.version)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fs.copy_to_local(encoder_path, os.path.join(tmp, os.path.basename(state_artifact)))
            mlflow.log_artifact(os.path.join(tmp, os.path.basename(state_artifact)), os.path.dirname(state_artifact))
        registry.tag_version(MODEL_NAME, version.version, registry.encoder_tags(
            run_id, data_version, dates, t.method, t.backbone, cfg.samples.image_px, t.dim, t.proj_head,
            state_artifact, state_sha256))
    except BaseException:  # a version without its weights or lineage must not be what courier-encoder/latest names
        registry.delete_version(MODEL_NAME, version.version)
        raise
    return version


def split_holdout(files, holdout_last_date: bool):
    """(train files, held-out files): the latest dt is held out when asked and more than one dt exists."""
    dates = sorted({f.partition_values.get("dt") for f in files})
    if not holdout_last_date or len(dates) < 2:
        return list(files), []
    return ([f for f in files if f.partition_values.get("dt") != dates[-1]],
            [f for f in files if f.partition_values.get("dt") == dates[-1]])


def evaluate_holdout(cfg: Config, files, encoder_path: str | None) -> dict:
    """pv_auc of the trained encoder (encoder_path) or of its random init (None) on held-out files."""
    import torch

    from training.courier import ImageEncoder
    from training.evaluate import pv_ranking_auc
    from training.reader import iterate_batches
    from training.train import load_state

    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights the training started from
    encoder = ImageEncoder(t.backbone, dim=t.dim, proj_head=t.proj_head, pretrained_path=t.pretrained_path)
    if encoder_path:
        encoder.load_state_dict(load_state(encoder_path))
    urls = [f.uri if "://" in f.uri else "file://" + f.uri for f in files]
    batches = iterate_batches(urls, batch_size=64, rank=0, world_size=1, seed=0, epoch=0,
                              decode_threads=t.decode_threads, decode_workers=t.decode_workers,
                              image_px=cfg.samples.image_px)
    return pv_ranking_auc(encoder, batches)
