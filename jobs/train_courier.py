"""spark-submit jobs/train_courier.py --conf conf/local.yaml [--resume] [--run-name NAME]

Stage 2: pre-train the image encoder (COURIER, or a baseline with train.method) on a pinned Delta
version of courier_train, on `train.num_workers` processes (TorchDistributor: torch DDP, gloo on CPU,
nccl on GPU; or Horovod with train.backend=horovod). Logs parameters, per-step losses, throughput and
the data version to MLflow and registers the final encoder as `courier-encoder`.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import run_job  # noqa: E402

JOB = "train_courier"


def add_arguments(p) -> None:
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--skip-if-done", action="store_true",
                   help="exit 0 without training when this run name already finished (idempotent pipelines)")
    p.add_argument("--alias", default=None, help="point this registry alias of courier-encoder (e.g. champion, "
                   "which stage 3's features.encoder_ref reads) at the encoder this run registers")
    p.add_argument("--run-name", default=None, help="names the run and its checkpoint folder "
                   "(default: <method>-<backbone>-v<table version>)")


def check_args(args) -> None:
    from etl.config import check_alias

    if args.alias is not None:  # refused before the training, not by the registry after it
        check_alias(args.alias, "--alias")


def body(ctx) -> None:
    from etl import fs, registry
    from etl.contracts import ENCODER_MODEL
    from etl.tracking import setup_mlflow
    from training import launch as L

    a, t = ctx.args, ctx.cfg.train
    fs.configure(fs.options_for(ctx.cfg))  # checkpoints_root may be an object store
    plan = L.plan_training(ctx.cfg, ctx.store, a.run_name, a.resume, a.skip_if_done)
    done = L.finished_version(plan) if a.skip_if_done else None
    if done is not None:
        ctx.say(f"{plan.run_name} already finished (MLflow run {plan.marker['mlflow_run_id']}): nothing to do")
        if a.alias:  # an idempotent pipeline still ends with the alias on this run's encoder
            setup_mlflow(ctx.cfg)
            L.check_registered_by(plan, done)
            registry.set_alias(ENCODER_MODEL, a.alias, done)
            ctx.say(f"alias @{a.alias} -> {ENCODER_MODEL} v{done}")
        return
    fs.makedirs(plan.checkpoint_dir)
    tags = {"courier.data_version": str(plan.data_version), "courier.method": t.method}
    if plan.resume and not a.resume:
        ctx.say(f"{plan.run_name} started (MLflow run {plan.marker['mlflow_run_id']}) and did not finish: resuming it")
    with ctx.mlflow_run(plan.run_name, tags=None if plan.resume else tags,
                        run_id=plan.marker and plan.marker["mlflow_run_id"],
                        params=None if plan.resume else L.train_params(ctx.cfg, plan)) as run:
        result = L.launch(ctx.cfg, ctx.spark, plan, run.info.run_id)
        holdout = L.log_holdout(ctx.cfg, plan, result["encoder_path"])
        if holdout:
            ctx.say(holdout)
        L.log_result(result)
        mv = L.register_encoder(ctx.cfg, result["encoder_path"], run.info.run_id, plan.data_version, plan.dates,
                                 alias=a.alias)
    L.mark_done(plan, run.info.run_id, mv.version)
    trained = (f"final loss {result['losses'][-1]:.4f}, {result['images_per_s']:.1f} img/s" if result["losses"]
               else "no step trained in this attempt")
    ctx.say(f"done: {result['steps']} steps ({result['skipped']} skipped), {trained}; registered "
            f"{ENCODER_MODEL} v{mv.version}; checkpoints in {plan.checkpoint_dir}")


def main(argv: list[str] | None = None) -> int:
    from etl.registry import RegistryError
    from training.launch import TrainError

    return run_job(JOB, __doc__, add_arguments, body, check_args=check_args,
                   expected_errors=(TrainError, RegistryError), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
