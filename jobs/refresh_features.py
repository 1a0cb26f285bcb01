"""spark-submit jobs/refresh_features.py --conf conf/local.yaml --date 2026-11-24

The scheduled daily feature refresh (after build_samples of the date): embed only the items not yet
clustered (first seen up to --date), assign them to the current clusters (features.clusters_ref), merge
them into item_embeddings / item_clusters and re-attach the ctr_train partitions that need it (missing,
of an older feature version, or mentioning a new item). Everything is computed before the first
commit; each table changes in one commit. Rerunning the same day commits nothing. Logs a drift
measure (share of new items farther from every centroid than the build's 95th-percentile distance,
mean distance) and says when a full re-cluster (jobs/build_clusters.py) is due. Schedule: docs/schedule.md.
"""
from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import job_parser, load_job_config  # noqa: E402

JOB = "refresh_features"


def _fault_hook():
    """Test-only crash injection: with COURIER_FAULT_KILL_AT=<stage> (a refresh hook stage such as
    committed:item_embeddings) and COURIER_FAULT_MARKER=<path>, the first run to reach that stage creates
    the marker and kills itself (SIGKILL: no cleanup, like a lost machine); later runs go through."""
    stage, marker = os.environ.get("COURIER_FAULT_KILL_AT"), os.environ.get("COURIER_FAULT_MARKER")

    def hook(at: str) -> None:
        if stage and marker and at == stage and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--date", required=True, help="the day to refresh (YYYY-MM-DD)")
    p.add_argument("--status-file", default=None,
                   help="also write the day's one-line status (JSON) to this file, for schedulers")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    import mlflow

    from etl.config import flat_params, parse_date
    from etl.spark import get_spark
    from etl.tables import TableStore
    from etl.tracking import start_run
    from features.pipeline import log_report, refresh, refresh_status, render_status

    date = parse_date(args.date, "--date").isoformat()
    spark = get_spark(cfg, app_name=JOB)
    store = TableStore(spark, cfg)
    with start_run(cfg, run_name=f"{JOB} {date}", tags={"courier.job": JOB, "courier.date": date}) as run:
        mlflow.log_params({**flat_params(cfg, ("features",)), "date": date})
        report = refresh(spark, cfg, store, date, run.info.run_id, JOB, hook=_fault_hook())
        print(report.render(), flush=True)
        log_report(report)
        if report.info.get("recluster_due"):
            print(f"[{JOB}] {report.info['message']}", flush=True)
        status = refresh_status(report)
        print(f"[{JOB}] status {render_status(status)}", flush=True)
        if args.status_file:
            with open(args.status_file, "w") as fh:
                fh.write(json.dumps(status, sort_keys=True) + "\n")
    print(f"[{JOB}] done; MLflow run {run.info.run_id}", flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
