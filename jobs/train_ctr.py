"""python jobs/train_ctr.py --conf conf/local.yaml [--set ctr.feature_mode=simscore] [--skip-if-done]

Stage 4: train the downstream CTR model (item-ID embedding + image feature + target attention over the
click history + MLP) on the earlier dates of a pinned ctr_train Delta version and evaluate it on the
later ones (AUC, GAUC, log loss; per category and on cold-start items). Logs parameters, the training
curve, the metrics, the Delta version and feature_version to MLflow and registers the model as a new
`ctr-model` version with its lineage tags. Promotion to @champion is jobs/review_model.py's decision.
Runs as plain python or under spark-submit.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import run_job, status_file_argument  # noqa: E402

JOB = "train_ctr"


def add_arguments(p) -> None:
    p.add_argument("--run-name", default=None, help="MLflow run name (default: ctr-<feature_mode>-v<table version>)")
    p.add_argument("--skip-if-done", action="store_true",
                   help="exit 0 without training when a ctr-model version was trained from the same config "
                        "and snapshot (idempotent pipelines)")
    status_file_argument(p, '{"model_version", "skipped"} (the version to review)')


def body(ctx) -> None:
    from training.ctr.pipeline import train_and_register

    out = train_and_register(ctx.cfg, ctx.store, run_name=ctx.args.run_name, skip_if_done=ctx.args.skip_if_done,
                             progress=lambda m: print(m, flush=True))
    ctx.write_status({"model_version": str(out["model_version"]), "skipped": bool(out.get("skipped"))})


def main(argv: list[str] | None = None) -> int:
    from training.ctr.data import CtrDataError

    return run_job(JOB, __doc__, add_arguments, body, expected_errors=(CtrDataError,), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
