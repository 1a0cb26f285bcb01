"""spark-submit jobs/embed_items.py --conf conf/local.yaml [--date 2026-11-20 [--end-date ...]]

Stage 3a: run the registered encoder (features.encoder_ref, e.g. courier-encoder@champion) over
item_images inside Spark (batched pandas UDF, one model load per executor process) and write
item_embeddings (item_id, embedding, encoder_version; partitions encoder_version x first-seen dt) in one
commit. Default: every date of item_images. A rerun replaces the same partitions with the same rows.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import check_date_range, date_range_arguments, dates_param, run_job  # noqa: E402

JOB = "embed_items"


def add_arguments(p) -> None:
    date_range_arguments(p, "the items (first seen) to embed", required=False)


def body(ctx) -> None:
    from etl.config import flat_params
    from features.pipeline import embed_items, log_report

    dates = ctx.args.dates
    params = {**flat_params(ctx.cfg, ("features",)), "dates": dates_param(dates)}
    with ctx.mlflow_run(f"{JOB} {ctx.cfg.features.encoder_ref}", params=params) as run:
        log_report(embed_items(ctx.spark, ctx.cfg, ctx.store, dates, run.info.run_id, JOB))
    ctx.say(f"done; MLflow run {run.info.run_id}")


def main(argv: list[str] | None = None) -> int:
    from features.pipeline import FeatureError
    from etl.registry import RegistryError

    return run_job(JOB, __doc__, add_arguments, body, check_args=check_date_range,
                   expected_errors=(FeatureError, RegistryError), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
