"""spark-submit jobs/refresh_features.py --conf conf/local.yaml --date 2026-11-24

The scheduled daily feature refresh (after build_samples of the date): embed only the items not yet
clustered (first seen up to --date), assign them to the current clusters (features.clusters_ref), merge
them into item_embeddings / item_clusters and re-attach the ctr_train partitions that need it (missing,
of an older feature version, or mentioning a new item; a later date already attached with an older
feature version too). Everything is computed before the first
commit; each table changes in one commit. Rerunning the same day commits nothing. Logs a drift
measure (share of new items farther from every centroid than the build's 95th-percentile distance,
mean distance) and says when a full re-cluster (jobs/build_clusters.py) is due. Schedule: docs/schedule.md.
"""
from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import date_arg, run_job, status_file_argument  # noqa: E402

JOB = "refresh_features"


def _fault_hook():
    """Test-only crash injection: with COURIER_FAULT_KILL_AT=<stage> (a refresh hook stage such as
    committed:item_embeddings) and COURIER_FAULT_MARKER=<path>, the first run to reach that stage creates
    the marker and kills itself (SIGKILL: no cleanup, like a lost machine; COURIER_FAULT_SIGNAL=TERM: a
    scheduler's stop); later runs go through."""
    stage, marker = os.environ.get("COURIER_FAULT_KILL_AT"), os.environ.get("COURIER_FAULT_MARKER")
    sig = getattr(signal, "SIG" + os.environ.get("COURIER_FAULT_SIGNAL", "KILL"))

    def hook(at: str) -> None:
        if stage and marker and at == stage and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), sig)
    return hook


def add_arguments(p) -> None:
    p.add_argument("--date", required=True, help="the day to refresh (YYYY-MM-DD)")
    p.add_argument("--build-key", default="",
                   help="a scheduler's run id (the key it gives build_clusters): when a clustering was built for "
                        "it already, the status says so (recluster_built), so that a cleared run goes down its "
                        "re-cluster path again instead of measuring drift against the clusters it built")
    status_file_argument(p, "the day's status (what was refreshed, drift, whether a re-cluster is due)")


def check_args(args) -> None:
    args.date = date_arg("--date", args.date)


def body(ctx) -> None:
    from etl.config import flat_params
    from features.pipeline import clusters_built_for, log_report, refresh, refresh_status, render_status

    date = ctx.args.date
    params = {**flat_params(ctx.cfg, ("features",)), "date": date}
    with ctx.mlflow_run(f"{JOB} {date}", tags={"courier.date": date}, params=params) as run:
        report = refresh(ctx.spark, ctx.cfg, ctx.store, date, run.info.run_id, JOB, hook=_fault_hook())
        log_report(report)
        if report.info.get("recluster_due"):
            ctx.say(report.info["message"])
        key = ctx.args.build_key
        # (built with other settings too: the run goes down the re-cluster path, where build_clusters rebuilds)
        built = bool(key) and clusters_built_for(ctx.cfg, ctx.store, key, as_configured=False) is not None
        status = refresh_status(report, recluster_built=built)
        ctx.say(f"status {render_status(status)}")
        ctx.write_status(status)
    ctx.say(f"done; MLflow run {run.info.run_id}")


def main(argv: list[str] | None = None) -> int:
    from etl.registry import RegistryError
    from features.pipeline import FeatureError

    return run_job(JOB, __doc__, add_arguments, body, check_args=check_args,
                   expected_errors=(FeatureError, RegistryError), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
