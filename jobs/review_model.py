"""python jobs/review_model.py --conf conf/local.yaml [--version N] [--allow-first] [--no-tsne]

Registry review of `ctr-model`: re-score the challenger (default: the latest version) and the current
@champion on their pinned evaluation snapshot, apply the gates of the config's `review:` section and
move @champion to the challenger only when every gate passes (logic: training/ctr/review.py). A first
model (no champion yet) is promoted only with --allow-first. Writes review.md with PNG plots as
artifacts of an MLflow run and prints a one-screen summary.

Exit status: 0 promoted, 1 rejected by a gate (alias unchanged), 2 refused (no comparable evidence:
mismatched snapshots, no champion without --allow-first, too few eval rows, unknown version).
With --status-file (schedulers): the decision is written there as one JSON line and the exit status is
0 whenever the review reached a decision, so that a crash (non-zero) is never mistaken for a rejection.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import job_parser, load_job_config  # noqa: E402

JOB = "review_model"


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--version", default=None, help="challenger version (default: the latest ctr-model version)")
    p.add_argument("--allow-first", action="store_true", help="promote the challenger when no @champion exists yet")
    p.add_argument("--no-tsne", action="store_true", help="leave the item-embedding t-SNE out of the report")
    p.add_argument("--status-file", default=None,
                   help="write the decision as one JSON line here and exit 0 on any decision (for schedulers)")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    from etl.spark import get_spark
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow

    spark = get_spark(cfg, app_name=JOB)
    try:
        setup_mlflow(cfg)
        outcome = review_and_report(cfg, TableStore(spark, cfg), args.version, args.allow_first,
                                    with_tsne=not args.no_tsne)
    finally:
        spark.stop()
    if args.status_file:
        with open(args.status_file, "w") as fh:
            fh.write(json.dumps({"decision": outcome.decision, "challenger": outcome.challenger,
                                 "champion_before": outcome.champion, "reasons": outcome.reasons}) + "\n")
        return 0
    return outcome.exit_code


def review_and_report(cfg, store, version=None, allow_first=False, with_tsne=True):
    """Review, then log the report in an MLflow run (also for refusals: the record says why)."""
    import mlflow

    from etl.tracking import start_run
    from training.ctr.registry import MODEL_NAME
    from training.ctr.report import summary_text, write_report
    from training.ctr.review import embedding_sample, run_review

    outcome = run_review(cfg, store, version, allow_first)
    tsne = embedding_sample(store, cfg) if with_tsne and outcome.reports else None
    with start_run(cfg, f"review-{MODEL_NAME}-v{outcome.challenger or 'none'}", tags={"courier.job": JOB}) as run:
        with tempfile.TemporaryDirectory() as tmp:
            write_report(outcome, tmp, tsne)
            mlflow.log_artifacts(tmp, "review")
        mlflow.set_tags({"review.decision": outcome.decision, "review.challenger": str(outcome.challenger),
                         "review.champion_before": str(outcome.champion), "review.snapshot": str(outcome.snapshot)})
        for v, rep in outcome.reports.items():
            role = "challenger" if v == outcome.challenger else "champion"
            mlflow.log_metrics({f"{role}.auc": rep["overall"]["auc"], f"{role}.gauc": rep["overall"]["gauc"]})
        run_id = run.info.run_id
    if outcome.challenger and outcome.reports:
        client = mlflow.MlflowClient()
        for key, value in {"review.decision": outcome.decision, "review.run_id": run_id}.items():
            client.set_model_version_tag(MODEL_NAME, outcome.challenger, key, value)
    print(summary_text(outcome), flush=True)
    print(f"report: MLflow run {run_id}, artifacts review/review.html (plots inline; also review.md + PNGs); "
          f"UI: mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri} --host 127.0.0.1", flush=True)
    return outcome


if __name__ == "__main__":
    sys.exit(main())
