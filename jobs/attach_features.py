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
from jobs.common import check_date_range, date_range_arguments, dates_param, run_job  # noqa: E402

JOB = "attach_features"


def add_arguments(p) -> None:
    date_range_arguments(p, "ctr_log to attach features to")


def body(ctx) -> None:
    from etl.config import flat_params
    from features.pipeline import attach_dates, log_report

    dates = ctx.args.dates
    params = {**flat_params(ctx.cfg, ("features",)), "dates": dates_param(dates)}
    with ctx.mlflow_run(f"{JOB} {dates[0]}..{dates[-1]}", params=params) as run:
        log_report(attach_dates(ctx.spark, ctx.cfg, ctx.store, dates, run.info.run_id, JOB))
    ctx.say(f"done; MLflow run {run.info.run_id}")


def main(argv: list[str] | None = None) -> int:
    from etl.registry import RegistryError
    from features.pipeline import FeatureError

    return run_job(JOB, __doc__, add_arguments, body, check_args=check_date_range,
                   expected_errors=(FeatureError, RegistryError), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
