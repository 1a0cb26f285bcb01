"""spark-submit jobs/build_samples.py --conf conf/local.yaml --date 2026-11-20 [--end-date 2026-11-24]

Stage 1: raw search log -> quarantine, items, item_images, pv_samples, ctr_log, courier_train (Delta,
partitioned by dt). Each date is verified before it is published, and its six tables are published as
a unit; a date whose inputs and config did not change since its last publish commits nothing
(`unchanged`). Dates of a range are built in order (a date reads the item images of earlier dates).
Exit codes: 0 built/unchanged, 1 the input or the counts refused publishing, 2 bad arguments/config,
3 the job failed (a crash, its traceback printed: never read as a refusal), 143 stopped by SIGTERM.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import check_date_range, date_range_arguments, dates_param, run_job  # noqa: E402

JOB = "build_samples"


def add_arguments(p) -> None:
    date_range_arguments(p, "the raw log to build")
    p.add_argument("--allow-empty", action="store_true",
                   help="publish a date whose raw log folder holds no lines (replaces its tables with empty ones)")
    p.add_argument("--force", action="store_true",
                   help="rebuild a date even when its inputs and config are unchanged since its last publish")


def body(ctx) -> int:
    from etl.build import build_date, log_date, log_reports
    from etl.config import flat_params

    dates = ctx.args.dates
    params = {**flat_params(ctx.cfg, ("samples",)), "dates": dates_param(dates), "tables.engine": ctx.cfg.tables.engine,
              "config": ctx.cfg.source}
    reports = []
    with ctx.mlflow_run(params=params) as run, log_reports(reports):
        for i, date in enumerate(dates, 1):
            ctx.say(f"{i}/{len(dates)} building {date} ...")
            reports.append(build_date(ctx.spark, ctx.cfg, ctx.store, date, run.info.run_id,
                                      allow_empty=ctx.args.allow_empty, force=ctx.args.force,
                                      progress=lambda line: print(line, flush=True)))
            log_date(reports[-1], step=i - 1)
    built = sum(r.status == "built" for r in reports)
    ctx.say(f"done: {len(dates)} date(s), {built} built, {len(dates) - built} unchanged; MLflow run {run.info.run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from etl.build import InputError, PublishError, VerifyError

    return run_job(JOB, __doc__, add_arguments, body, check_args=check_date_range,
                   expected_errors=(InputError, PublishError, VerifyError), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
