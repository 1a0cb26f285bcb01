"""Driver side of stage 2: launch the per-process loop (TorchDistributor or Horovod) and register the
trained encoder in MLflow. Imports Spark and MLflow lazily; the workers only run training/train.py."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile

from etl import fs
from etl.config import Config
from etl.contracts import ENCODER_MODEL as MODEL_NAME

log = logging.getLogger(__name__)

STATE_ARTIFACT = "encoder_state/v{version}/encoder.pt"  # run artifact: the encoder's state dict (weights only)


def run_marker(checkpoint_dir: str) -> dict | None:
    """The run a checkpoint folder belongs to ({"mlflow_run_id": ...}), or None for a fresh folder."""
    path = fs.join(checkpoint_dir, "run.json")
    if not fs.exists(path):
        return None
    return json.loads(fs.read_text(path))


def _write_marker(checkpoint_dir: str, run_id: str) -> None:
    fs.write_text(fs.join(checkpoint_dir, "run.json"), json.dumps({"mlflow_run_id": run_id}))


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


def launch(cfg: Config, spark, files, checkpoint_dir: str, run_id: str, resume: bool = False) -> dict:
    """Run training on cfg.train.num_workers processes; return rank 0's result dict."""
    from training.train import train_fn

    t = cfg.train
    _write_marker(checkpoint_dir, run_id)
    spec = dataclasses.asdict(make_spec(cfg, files, checkpoint_dir, run_id, resume))
    result_path = spec["result_path"]
    fs.remove(result_path)
    use_gpu = t.use_gpu
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    spec["train"]["use_gpu"] = use_gpu
    if t.method == "supervised":  # the class list, in a fixed order, for the category classifier
        from etl.tables import TableStore

        items = TableStore(spark, cfg).read("items").select("category").distinct()
        spec["extra"]["categories"] = sorted(r["category"] for r in items.collect() if r["category"])
    print(f"[train] {t.method} / {t.backbone} on {t.num_workers} {t.backend} worker(s), "
          f"{'GPU' if use_gpu else 'CPU'}, {spec['total_rows']} rows", flush=True)
    if t.backend == "ddp":
        from pyspark.ml.torch.distributor import TorchDistributor

        TorchDistributor(num_processes=t.num_workers, local_mode=t.local_mode, use_gpu=use_gpu).run(train_fn, spec)
    else:
        import horovod.spark

        horovod.spark.run(train_fn, args=(spec,), num_proc=t.num_workers, use_gloo=True,
                          env={**os.environ})
    # TorchDistributor returns the last process's value, not rank 0's: rank 0 writes its own.
    if not fs.exists(result_path):
        raise RuntimeError(f"training finished without a result from rank 0 ({result_path})")
    return json.loads(fs.read_text(result_path))


def register_encoder(cfg: Config, encoder_path: str, run_id: str, data_version: int, alias: str | None = None):
    """Log the trained encoder to the run and register it as a new `courier-encoder` version with its
    lineage (run, data version, method, backbone) as version tags."""
    import mlflow
    import torch
    import torchvision

    from training.courier import ImageEncoder
    from training.train import load_state

    t = cfg.train
    encoder = ImageEncoder(t.backbone, dim=t.dim, proj_head=t.proj_head)
    encoder.load_state_dict(load_state(encoder_path))
    encoder.eval()
    info = mlflow.pytorch.log_model(
        encoder, name="encoder", registered_model_name=MODEL_NAME,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}"],
        code_paths=[os.path.dirname(os.path.abspath(__file__))], serialization_format="pickle")
    client = mlflow.MlflowClient()
    version = client.get_model_version(MODEL_NAME, info.registered_model_version)
    # The bare state dict too: stage 3 rebuilds ImageEncoder from the version's tags and loads this with
    # torch.load(weights_only=True), so no pickled model is ever unpickled downstream. One folder per
    # version: a run that registers two encoders must not overwrite the first one's weights.
    state_artifact = STATE_ARTIFACT.format(version=version.version)
    with tempfile.TemporaryDirectory() as tmp:
        fs.copy_to_local(encoder_path, os.path.join(tmp, os.path.basename(state_artifact)))
        mlflow.log_artifact(os.path.join(tmp, os.path.basename(state_artifact)), os.path.dirname(state_artifact))
    for key, value in {"run_id": run_id, "data.table": "courier_train", "data.version": str(data_version),
                       "method": t.method, "backbone": t.backbone, "image_px": str(cfg.samples.image_px),
                       "dim": str(t.dim), "proj_head": str(t.proj_head).lower(),
                       "state_artifact": state_artifact}.items():
        client.set_model_version_tag(MODEL_NAME, version.version, key, value)
    if alias:
        client.set_registered_model_alias(MODEL_NAME, alias, version.version)
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
