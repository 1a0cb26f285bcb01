"""spark-submit jobs/build_clusters.py --conf conf/local.yaml [--skip-if-current] [--build-key KEY]

Stage 3b: FAISS k-means (inner product on L2-normalised vectors; an HNSW assignment index at or above
features.large_c_threshold) over item_embeddings of features.encoder_ref; logs the centroid index,
centroids and cluster statistics to MLflow as a new `courier-clusters` version tagged with the encoder
version, writes item_clusters (every catalog item; the reserved id -1 where there is no usable image)
in one commit, then points the features.clusters_ref alias (@current) at it. A full re-cluster is
this job again: a new, versioned clustering and feature version. A scheduler passes --build-key (its
run's id): a retry of a build that already committed its clustering (it failed afterwards, e.g.
logging its metrics, or was stopped before moving the alias, which the retry then moves) has nothing
to build instead of building a second clustering.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import run_job  # noqa: E402

JOB = "build_clusters"


def add_arguments(p) -> None:
    p.add_argument("--skip-if-current", action="store_true",
                   help="exit 0 when features.clusters_ref already is a clustering of the same encoder with the "
                        "same settings and item_clusters holds it (idempotent pipelines)")
    p.add_argument("--build-key", default="",
                   help="the scheduler's run id: kept on the clustering; exit 0 without building when a build with "
                        "this key already committed its clustering (a retry; the alias is moved to it if that "
                        "build stopped before moving it)")


def body(ctx) -> None:
    import mlflow

    from etl.config import flat_params
    from etl.tracking import setup_mlflow
    from features.pipeline import (build_clusters, clusters_built_for, current_clusters_match, log_report,
                                   publish_built)

    key = ctx.args.build_key
    if ctx.args.skip_if_current or key:
        setup_mlflow(ctx.cfg)
    spec = current_clusters_match(ctx.cfg, ctx.store) if ctx.args.skip_if_current else None
    if spec is not None:
        return ctx.say(f"{ctx.cfg.features.clusters_ref} is already {spec.name} v{spec.version} of "
                       f"{spec.encoder_version} with these settings: nothing to do")
    spec = clusters_built_for(ctx.cfg, ctx.store, key) if key else None
    if spec is not None:  # a retry: that build committed its item_clusters; at most the alias is left to move
        return ctx.say(f"{spec.name} v{spec.version} was built for {key!r}: {publish_built(ctx.cfg, spec)}; "
                       "nothing to build")
    with ctx.mlflow_run(f"{JOB} C={ctx.cfg.features.n_clusters}", params=flat_params(ctx.cfg, ("features",))) as run:
        report = build_clusters(ctx.spark, ctx.cfg, ctx.store, run.info.run_id, JOB, build_key=key)
        log_report(report)
        mlflow.log_metrics({f"cluster_{k}": float(v) for k, v in report.info["cluster_stats"].items()})
        mlflow.log_metric("kmeans_seconds", report.info["kmeans_seconds"])
    ctx.say(f"done; MLflow run {run.info.run_id}")


def main(argv: list[str] | None = None) -> int:
    from etl.registry import RegistryError
    from features.pipeline import FeatureError

    return run_job(JOB, __doc__, add_arguments, body, expected_errors=(FeatureError, RegistryError), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
