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
from jobs.common import job_parser, load_job_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--run-name", default=None, help="MLflow run name (default: ctr-<feature_mode>-v<table version>)")
    p.add_argument("--skip-if-done", action="store_true",
                   help="exit 0 without training when a ctr-model version was trained from the same config "
                        "and snapshot (idempotent pipelines)")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    from etl.spark import get_spark
    from etl.tables import TableStore
    from training.ctr.data import CtrDataError
    from training.ctr.pipeline import JOB, train_and_register

    spark = get_spark(cfg, app_name=JOB)
    try:
        train_and_register(cfg, TableStore(spark, cfg), run_name=args.run_name, skip_if_done=args.skip_if_done,
                           progress=lambda m: print(m, flush=True))
    except CtrDataError as exc:
        print(f"[{JOB}] error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
