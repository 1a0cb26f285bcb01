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
from jobs.common import date_range, job_parser, load_job_config  # noqa: E402

JOB = "embed_items"


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--date", default=None, help="first first-seen date of items to embed (default: all)")
    p.add_argument("--end-date", default=None, help="last date, inclusive (default: --date)")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    import mlflow

    from etl.config import flat_params
    from etl.spark import get_spark
    from etl.tables import TableStore
    from etl.tracking import start_run
    from features.pipeline import embed_items, log_report

    dates = date_range(args.date, args.end_date) if args.date else None
    spark = get_spark(cfg, app_name=JOB)
    store = TableStore(spark, cfg)
    with start_run(cfg, run_name=f"{JOB} {cfg.features.encoder_ref}", tags={"courier.job": JOB}) as run:
        mlflow.log_params({**flat_params(cfg, ("features",)), "dates": ",".join(dates or ["all"])})
        report = embed_items(spark, cfg, store, dates, run.info.run_id, JOB)
        print(report.render(), flush=True)
        log_report(report)
    print(f"[{JOB}] done; MLflow run {run.info.run_id}", flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
