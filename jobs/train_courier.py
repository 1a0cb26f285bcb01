"""spark-submit jobs/train_courier.py --conf conf/local.yaml [--resume] [--run-name NAME]

Stage 2: pre-train the image encoder (COURIER, or a baseline with train.method) on a pinned Delta
version of courier_train, on `train.num_workers` processes (TorchDistributor: torch DDP, gloo on CPU,
nccl on GPU; or Horovod with train.backend=horovod). Logs parameters, per-step losses, throughput and
the data version to MLflow and registers the final encoder as `courier-encoder`.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import job_parser, load_job_config  # noqa: E402

JOB = "train_courier"
TABLE = "courier_train"


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--skip-if-done", action="store_true",
                   help="exit 0 without training when this run name already finished (idempotent pipelines)")
    p.add_argument("--alias", default=None, help="point this registry alias of courier-encoder (e.g. champion, "
                   "which stage 3's features.encoder_ref reads) at the encoder this run registers")
    p.add_argument("--run-name", default=None, help="names the run and its checkpoint folder "
                   "(default: <method>-<backbone>-v<table version>)")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    from dataclasses import asdict

    from etl import fs
    from etl.config import flat_params, under_root
    from etl.spark import get_spark
    from etl.tables import TableStore
    from etl.tracking import start_run
    from training.launch import evaluate_holdout, launch, register_encoder, run_marker, split_holdout

    t = cfg.train
    fs.configure(fs.options_for(cfg))  # checkpoints_root may be an object store
    spark = get_spark(cfg, app_name=JOB)
    store = TableStore(spark, cfg)
    version = t.table_version if t.table_version is not None else store.version(TABLE)
    if version is None:
        raise SystemExit(f"{TABLE} does not exist yet: run jobs/build_samples.py first")
    files = store.files(TABLE, version)
    if not files:
        raise SystemExit(f"{TABLE} v{version} has no rows to train on")
    files, holdout = split_holdout(files, t.holdout_last_date)
    run_name = args.run_name or f"{t.method}-{t.backbone}-v{version}"
    checkpoint_dir = under_root(cfg.checkpoints_root, run_name)
    marker = run_marker(checkpoint_dir)
    if args.skip_if_done and marker is not None and fs.exists(fs.join(checkpoint_dir, "done.json")):
        print(f"[{JOB}] {run_name} already finished (MLflow run {marker['mlflow_run_id']}): nothing to do")
        if args.alias:  # an idempotent pipeline still ends with the alias on this run's encoder
            import mlflow

            from etl.tracking import setup_mlflow
            from training.launch import MODEL_NAME

            done_version = json.loads(fs.read_text(fs.join(checkpoint_dir, "done.json")))["model_version"]
            setup_mlflow(cfg)
            mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, args.alias, str(done_version))
            print(f"[{JOB}] alias @{args.alias} -> courier-encoder v{done_version}", flush=True)
        return 0
    if args.resume and marker is None:
        raise SystemExit(f"--resume: no run to resume in {checkpoint_dir}")
    if not args.resume and marker is not None:
        raise SystemExit(f"{checkpoint_dir} already holds run {marker['mlflow_run_id']}: pass --resume to "
                         "continue it, or --run-name for a new run (nothing is overwritten)")
    fs.makedirs(checkpoint_dir)
    with start_run(cfg, run_name, tags={"courier.job": JOB}, run_id=marker and marker["mlflow_run_id"]) as run:
        import mlflow

        if not args.resume:
            mlflow.log_params({**flat_params(cfg, ("train",)), "data.table": TABLE, "data.version": version,
                               "data.files": len(files), "data.rows": sum(f.num_records or 0 for f in files),
                               "samples.image_px": cfg.samples.image_px})
            mlflow.set_tags({"courier.data_version": str(version), "courier.method": t.method})
        result = launch(cfg, spark, files, checkpoint_dir, run.info.run_id, resume=args.resume)
        if holdout:
            init, trained = (evaluate_holdout(cfg, holdout, p) for p in (None, result["encoder_path"]))
            mlflow.log_metrics({"holdout_pv_auc": trained["pv_auc"], "holdout_pv_auc_init": init["pv_auc"],
                                "holdout_pages": trained["pages"]})
            print(f"[{JOB}] held-out PV ranking AUC ({trained['pages']} pages of "
                  f"{holdout[0].partition_values.get('dt')}): trained {trained['pv_auc']:.4f} vs untrained "
                  f"{init['pv_auc']:.4f}", flush=True)
        mlflow.log_metrics({"final_loss": result["losses"][-1] if result["losses"] else float("nan"),
                            "steps": result["steps"], "skipped_steps": result["skipped"],
                            "throughput_images_per_s": result["images_per_s"]})
        version_info = register_encoder(cfg, result["encoder_path"], run.info.run_id, data_version=version,
                                        alias=args.alias)
    fs.write_text(fs.join(checkpoint_dir, "done.json"),
                  json.dumps({"mlflow_run_id": run.info.run_id, "model_version": version_info.version}))
    print(f"[{JOB}] done: {result['steps']} steps ({result['skipped']} skipped), final loss "
          f"{result['losses'][-1] if result['losses'] else float('nan'):.4f}, "
          f"{result['images_per_s']:.1f} img/s; registered courier-encoder v{version_info.version}; "
          f"checkpoints in {checkpoint_dir}", flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
