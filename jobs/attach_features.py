"""spark-submit jobs/attach_features.py --conf conf/local.yaml --date 2026-11-20 [--end-date 2026-11-24]

Stage 4: ctr_log partitions -> ctr_train (every ctr_log column + item_cluster_id, history_cluster_ids,
sim_scores, optional item_vector, feature_version), all dates in one commit. Features come from
item_clusters / item_embeddings of features.clusters_ref (and the encoder tagged on it); items not yet
clustered are embedded and assigned on the fly with the broadcast FAISS index; items without a usable
image get the reserved id -1 (features.NO_IMAGE_CLUSTER_ID) and sim score 0.0. Checks one ctr_train
row per ctr_log row per date.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import date_range, job_parser, load_job_config  # noqa: E402

JOB = "attach_features"


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--date", required=True, help="first ctr_log date (YYYY-MM-DD)")
    p.add_argument("--end-date", default=None, help="last date, inclusive (default: --date)")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    import mlflow

    from etl.config import flat_params
    from etl.spark import get_spark
    from etl.tables import TableStore
    from etl.tracking import start_run
    from features.pipeline import attach_dates, log_report

    dates = date_range(args.date, args.end_date)
    spark = get_spark(cfg, app_name=JOB)
    store = TableStore(spark, cfg)
    with start_run(cfg, run_name=f"{JOB} {dates[0]}..{dates[-1]}", tags={"courier.job": JOB}) as run:
        mlflow.log_params({**flat_params(cfg, ("features",)), "dates": ",".join(dates)})
        report = attach_dates(spark, cfg, store, dates, run.info.run_id, JOB)
        print(report.render(), flush=True)
        log_report(report)
    print(f"[{JOB}] done; MLflow run {run.info.run_id}", flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
