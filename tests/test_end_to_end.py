"""All four stages on the tiny preset, in one process, every component real (Spark, Delta via delta-rs,
TorchDistributor, FAISS, MLflow registry): simulate -> samples -> COURIER (a few steps) -> embeddings ->
clusters -> attach -> CTR models -> registry review. scripts/pipeline.sh runs the same chain as jobs."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
from conftest import write_config

TRAIN = {"batch_size": 16, "num_workers": 1, "epochs": 1, "max_steps": 6, "checkpoint_every": 100,
         "log_every": 3, "decode_threads": 1}
# levels: the demo's multi-granularity ids (conf/local.yaml), scaled to the tiny preset
FEATURES = {"n_clusters": 8, "levels": [2, 4], "kmeans_iters": 10, "attach_batch_size": 256, "embed_batch_size": 64}
CTR = {"epochs": 2, "batch_size": 128, "layers": [32, 16], "item_buckets": 4096, "user_buckets": 1024}
REVIEW = {"min_eval_rows": 50, "min_category_rows": 50}


def test_simulate_to_review_on_tiny(spark, tmp_path):
    import mlflow

    from etl.build import build_date
    from etl.config import load_config
    from sim import simulate
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow, start_run
    from features import NO_IMAGE_CLUSTER_ID
    from features import pipeline as P
    from training.ctr.review import review_and_report
    from training.ctr.pipeline import train_and_register
    from etl.contracts import CHAMPION, CTR_MODEL as MODEL_NAME
    from training.launch import TrainPlan, launch, register_encoder, split_holdout

    cfg = load_config(write_config(tmp_path, {"train": TRAIN, "features": FEATURES, "ctr": CTR, "review": REVIEW}))
    simulate(cfg.raw_root, cfg.images_root, cfg.truth_root, preset="tiny", seed=7, image_px=32)
    dates = sorted(json.load(open(os.path.join(cfg.raw_root, "manifest.json")))["dates"])
    assert len(dates) == 3

    # Stage 1: every date, counts checked by build_date itself.
    store = TableStore(spark, cfg)
    reports = [build_date(spark, cfg, store, d, "e2e") for d in dates]
    counts = {t: store.read(t).count() for t in ("items", "item_images", "pv_samples", "ctr_log", "courier_train")}
    assert all(n > 0 for n in counts.values()), counts
    dropped = sum(sum(r.counts["train_dropped"].values()) for r in reports)  # PVs without usable images
    assert counts["courier_train"] + dropped == counts["pv_samples"]

    # Stage 2: a few steps of COURIER on every date but the last (the CTR eval date), registered with
    # the alias stage 3 reads.
    setup_mlflow(cfg)
    ckpt = os.path.join(cfg.checkpoints_root, "e2e")
    os.makedirs(ckpt)
    with start_run(cfg, "e2e-train") as run:
        files, held_out = split_holdout(store.files("courier_train"), True)
        plan = TrainPlan("e2e", store.version("courier_train"), files, held_out, ckpt, None)
        assert plan.dates == dates[:-1]
        result = launch(cfg, spark, plan, run.info.run_id)
        encoder = register_encoder(cfg, result["encoder_path"], run.info.run_id,
                                   data_version=store.version("courier_train"), dates=plan.dates, alias="champion")
    assert result["steps"] == TRAIN["max_steps"]

    # Stages 3-4: embeddings of every decodable image, k-means, features on every ctr_log impression.
    with start_run(cfg, "e2e-features") as run:
        P.embed_items(spark, cfg, store, None, run.info.run_id)
        P.build_clusters(spark, cfg, store, run.info.run_id)
        P.attach_dates(spark, cfg, store, dates, run.info.run_id)
    emb = store.read("item_embeddings")
    assert emb.select("item_id").distinct().count() == counts["item_images"]
    assert {r["encoder_version"] for r in emb.select("encoder_version").distinct().collect()} \
        == {f"courier-encoder-v{encoder.version}"}
    clusters = store.read("item_clusters").select("item_id", "cluster_id").toPandas()
    assert clusters["cluster_id"].between(NO_IMAGE_CLUSTER_ID, FEATURES["n_clusters"] - 1).all()
    assert (clusters["cluster_id"] >= 0).mean() > 0.9
    ctr_train = store.read("ctr_train").toPandas()
    assert len(ctr_train) == counts["ctr_log"]  # one row per impression, none lost or duplicated
    assert ctr_train["feature_version"].nunique() == 1
    # every impression carries its item's cluster, and items without a usable image the reserved id
    expected = ctr_train[["item_id"]].merge(clusters, on="item_id", how="left")["cluster_id"]
    assert (ctr_train["item_cluster_id"].to_numpy() == expected.fillna(NO_IMAGE_CLUSTER_ID).to_numpy()).all()
    assert (ctr_train["item_cluster_id"] == NO_IMAGE_CLUSTER_ID).any()  # the simulator's missing images

    # every impression's coarser ids, one per level, reserved (-1) on every level exactly where the fine is
    levels = ctr_train["item_cluster_levels"].map(list)
    assert (levels.map(len) == 2).all()
    assert ((levels.map(lambda lv: lv == [NO_IMAGE_CLUSTER_ID] * 2))
            == (ctr_train["item_cluster_id"] == NO_IMAGE_CLUSTER_ID)).all()
    assert levels.map(lambda lv: 0 <= lv[0] < 2 and 0 <= lv[1] < 4 or lv == [-1, -1]).all()

    # Stage 4: a baseline without image feature and the pipeline's challenger (multi_cluster: the
    # cluster id and its coarser levels) on the same snapshot.
    def train_ctr(mode):
        mode_cfg = dataclasses.replace(cfg, ctr=dataclasses.replace(cfg.ctr, feature_mode=mode))
        out = train_and_register(mode_cfg, store, run_name=f"e2e-{mode}", progress=lambda m: None)
        assert out["report"]["overall"]["rows"] > 0
        return out
    baseline, challenger = train_ctr("none"), train_ctr("multi_cluster")
    assert baseline["snapshot"] == challenger["snapshot"]

    # Review: the first model needs the explicit flag; then the cluster-ID model is gated against it.
    client = mlflow.MlflowClient()
    first = review_and_report(cfg, store, baseline["model_version"], allow_first=False, with_tsne=False)
    assert first.decision == "refused"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    first = review_and_report(cfg, store, baseline["model_version"], allow_first=True, with_tsne=False)
    assert first.decision == "promoted"
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == baseline["model_version"]
    second = review_and_report(cfg, store, challenger["model_version"], with_tsne=True)
    assert second.decision in ("promoted", "rejected"), second.reasons
    # The review states what each level brings: the challenger's AUC minus its AUC with that level hidden.
    gains = second.level_gains[challenger["model_version"]]
    assert [g["level"] for g in gains] == ["level 1 (coarse)", "level 2 (coarse)", "cluster id (fine)"]
    assert [g["ids"] <= k for g, k in zip(gains, (2, 4, 8))] == [True] * 3
    full = second.reports[challenger["model_version"]]["overall"]["auc"]
    assert all(abs(full - g["auc"] - g["auc_gain"]) < 1e-12 for g in gains)
    assert baseline["model_version"] not in second.level_gains  # no levels in a none model
    holder = str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version)
    assert holder == (challenger["model_version"] if second.decision == "promoted" else baseline["model_version"])
    review_runs = mlflow.search_runs(filter_string="tags.`courier.job` = 'review_model'", output_format="list")
    assert len(review_runs) == 3
    artifacts = {a.path for a in client.list_artifacts(review_runs[0].info.run_id, "review")}
    assert {"review/review.md", "review/review.html"} <= artifacts

    # A re-cluster (another k: a new feature version) and the daily DAG's CTR gate: the challenger is
    # trained on the re-attached ctr_train; @champion (the multi_cluster model, of the old feature
    # version) is re-scored on the same eval impressions with the features of its own clustering,
    # rebuilt here: they reproduce its training run's eval AUC.
    from etl import registry

    registry.promote(MODEL_NAME, challenger["model_version"])
    old_auc = float(client.get_model_version(MODEL_NAME, challenger["model_version"]).tags["eval.auc"])
    reclustered = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, n_clusters=6))
    with start_run(cfg, "e2e-recluster") as run:
        P.build_clusters(spark, reclustered, store, run.info.run_id)
        P.attach_dates(spark, reclustered, store, dates, run.info.run_id)
    new = train_ctr("multi_cluster")
    assert new["snapshot"] != challenger["snapshot"]
    third = review_and_report(cfg, store, new["model_version"], with_tsne=False)
    assert third.decision in ("promoted", "rejected"), third.reasons
    assert third.champion == challenger["model_version"] and "with the features of its own" in third.notes[0]
    rescored = third.reports[challenger["model_version"]]["overall"]
    assert rescored["rows"] == third.reports[new["model_version"]]["overall"]["rows"] \
        == new["report"]["overall"]["rows"]
    assert abs(rescored["auc"] - old_auc) < 1e-6, (rescored["auc"], old_auc)
