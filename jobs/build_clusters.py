"""spark-submit jobs/build_clusters.py --conf conf/local.yaml [--skip-if-current]

Stage 3b: FAISS k-means (inner product on L2-normalised vectors; an HNSW assignment index at or above
features.large_c_threshold) over item_embeddings of features.encoder_ref; logs the centroid index,
centroids and cluster statistics to MLflow as a new `courier-clusters` version tagged with the encoder
version, writes item_clusters (every catalog item; the reserved id -1 where there is no usable image)
in one commit, then points the features.clusters_ref alias (@current) at it. A full re-cluster is
this job again: a new, versioned clustering and feature version.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import job_parser, load_job_config  # noqa: E402

JOB = "build_clusters"


def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--skip-if-current", action="store_true",
                   help="exit 0 when features.clusters_ref already is a clustering of the same encoder with the "
                        "same settings and item_clusters holds it (idempotent pipelines)")
    args = p.parse_args(argv)
    cfg = load_job_config(args)

    import mlflow

    from etl.config import flat_params
    from etl.spark import get_spark
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow, start_run
    from features.pipeline import build_clusters, current_clusters_match, log_report

    spark = get_spark(cfg, app_name=JOB)
    store = TableStore(spark, cfg)
    if args.skip_if_current:
        setup_mlflow(cfg)
        spec = current_clusters_match(cfg, store)
        if spec is not None:
            print(f"[{JOB}] {cfg.features.clusters_ref} is already {spec.name} v{spec.version} of "
                  f"{spec.encoder_version} with these settings: nothing to do", flush=True)
            spark.stop()
            return 0
    with start_run(cfg, run_name=f"{JOB} C={cfg.features.n_clusters}", tags={"courier.job": JOB}) as run:
        mlflow.log_params(flat_params(cfg, ("features",)))
        report = build_clusters(spark, cfg, store, run.info.run_id, JOB)
        print(report.render(), flush=True)
        log_report(report)
        stats = report.info["cluster_stats"]
        mlflow.log_metrics({f"cluster_{k}": float(v) for k, v in stats.items()})
        mlflow.log_metric("kmeans_seconds", report.info["kmeans_seconds"])
    print(f"[{JOB}] done; MLflow run {run.info.run_id}", flush=True)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
