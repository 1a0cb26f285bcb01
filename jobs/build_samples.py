"""spark-submit jobs/build_samples.py --conf conf/local.yaml --date 2026-11-20 [--end-date 2026-11-24]

Stage 1: raw search log -> quarantine, items, item_images, pv_samples, ctr_log, courier_train (Delta,
partitioned by dt). Rerunning a date replaces exactly that date's partitions. Dates of a range are
built in order (a date's courier_train reads the item images of earlier dates).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import job_parser, load_job_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--date", required=True, help="first date to build (YYYY-MM-DD)")
    p.add_argument("--end-date", default=None, help="last date to build, inclusive (default: --date)")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    import mlflow

    from etl.build import JOB, build_date, date_range, report_json
    from etl.config import flat_params
    from etl.spark import get_spark
    from etl.tables import TableStore
    from etl.tracking import start_run

    dates = date_range(args.date, args.end_date)
    spark = get_spark(cfg, app_name=JOB)
    store = TableStore(spark, cfg)
    reports = []
    with start_run(cfg, run_name=f"{JOB} {dates[0]}..{dates[-1]}", tags={"courier.job": JOB}) as run:
        mlflow.log_params({**flat_params(cfg, ("samples",)), "dates": ",".join(dates),
                           "tables.engine": cfg.tables.engine, "config": cfg.source})
        for i, date in enumerate(dates, 1):
            print(f"[{JOB}] {i}/{len(dates)} building {date} ...", flush=True)
            report = build_date(spark, cfg, store, date, run.info.run_id,
                                progress=lambda line: print(line, flush=True))
            reports.append(report)
            print(report.render(), flush=True)
            flat = {k: v for k, v in report.counts.items() if isinstance(v, int)}
            mlflow.log_metrics({f"{k}": v for k, v in flat.items()}, step=i - 1)
            mlflow.set_tags({f"table_version.{t}.{date}": str(ver) for t, ver in report.versions.items()})
        mlflow.log_text(report_json(reports), "build_samples_report.json")
    print(f"[{JOB}] done: {len(dates)} date(s); MLflow run {run.info.run_id}", flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
