"""Config loading and validation: one place, clear errors."""
from __future__ import annotations

import pytest
from conftest import ROOT, write_config

from etl.config import ConfigError, load_config, parse_overrides, under_root


def test_shipped_configs_load():
    local = load_config(ROOT / "conf" / "local.yaml")
    assert local.samples.neg_rate == 0.2 and local.samples.l_pv == 5 and local.samples.l_click == 5
    assert local.tables_root == str(ROOT / "data" / "tables")
    assert local.mlflow_tracking_uri == "sqlite:///" + str(ROOT / "data" / "mlflow" / "mlflow.db")
    cluster = load_config(ROOT / "conf" / "cluster.example.yaml")
    assert cluster.tables.engine == "spark-delta" and cluster.tables_root.startswith("s3a://")
    # MLflow has no s3a:// artifact store: the default artifact root under an s3a data_root is s3://
    assert cluster.mlflow_artifact_root == "s3://my-bucket/courier/mlflow/artifacts"


@pytest.mark.parametrize("overrides, message", [
    ({"samples": {"neg_rat": 0.3}}, "unknown key(s) ['neg_rat']"),
    ({"sampels": {}}, "unknown key(s) ['sampels']"),
    ({"samples": {"neg_rate": 1.5}}, "samples.neg_rate must be in (0, 1]"),
    ({"samples": {"l_pv": "five"}}, "samples.l_pv: expected int"),
    ({"tables": {"engine": "parquet"}}, "tables.engine must be one of"),
    ({"train": {"batch_grouping": "category"}}, "train.batch_grouping must be none or query"),
    ({"ctr": {"level_combine": "mean"}}, "ctr.level_combine must be concat or sum"),
    ({"simulator": {"start_date": "20/11/2026"}}, "expected YYYY-MM-DD"),
    ({"spark": {"conf": {"executor.memory": "1g"}}}, "keys must start with 'spark.'"),
    ({"spark": {"broadcast_images_mb": -1}}, "spark.broadcast_images_mb must be >= 0"),
    # accepted before, then a ZeroDivisionError mid-training / "no limit" / one step
    ({"train": {"log_every": 0}}, "train.log_every must be >= 1"),
    ({"train": {"collective_timeout_min": 0}}, "train.collective_timeout_min must be >= 1"),
    ({"train": {"max_steps": 0}}, "train.max_steps must be >= 1"),
    ({"train": {"max_steps": -1}}, "train.max_steps must be >= 1"),
    ({"train": {"dim": 0}}, "train.dim must be >= 1"),
    ({"train": {"keep_checkpoints": -1}}, "train.keep_checkpoints must be >= 0"),
    ({"train": {"method": "supervised", "proj_head": True}}, "train.proj_head is not used by train.method=supervised"),
    # a traceback before (AttributeError on .startswith)
    ({"paths": {"data_root": 5}}, "paths.data_root must be a path or URI string, got int 5"),
    ({"mlflow": {"tracking_uri": 5}}, "mlflow.tracking_uri must be a URI string, got int 5"),
    # the default tracking store is a sqlite file under data_root: not in a bucket
    ({"paths": {"data_root": "s3a://bucket/courier"}}, "mlflow.tracking_uri must be set when paths.data_root is a URI"),
    # accepted before: a NaN tolerance disabled a gate or failed every review, inf trained on nothing
    ({"review": {"category_regression_limit": float("nan")}}, "category_regression_limit must be finite numbers >= 0"),
    ({"review": {"gauc_tol": float("nan")}}, "gauc_tol and category_regression_limit must be finite numbers"),
    ({"train": {"lr": float("inf")}}, "train.tau and train.lr must be finite numbers > 0"),
    ({"train": {"tau": float("nan")}}, "train.tau and train.lr must be finite numbers > 0"),
    ({"ctr": {"lr": float("inf")}}, "ctr.lr must be a finite number > 0"),
    # accepted before, then failing in the training processes or after the whole k-means / training
    ({"train": {"backbone": "resnet99"}}, "train.backbone must be tiny_cnn, resnet18/34/50/101/152"),
    ({"features": {"clusters_ref": "courier-clusters@latest"}}, "'latest' and 'v<number>' are MLflow's names"),
    ({"features": {"encoder_ref": "courier-encoder@V2"}}, "features.encoder_ref: 'V2' cannot be a registry alias"),
    # an empty root was the working directory; file:/x (Hadoop's form) a folder named 'file:' under the config's
    ({"mlflow": {"artifact_root": ""}}, "mlflow.artifact_root is empty"),
    ({"paths": {"images_root": "file:/srv/images"}}, "paths.images_root: 'file:/srv/images' reads as a URI without"),
    # the simulator's ranges: a ValueError not naming the key before
    ({"simulator": {"days": 0}}, "simulator.days >= 1"),
    ({"simulator": {"malformed_rate": 0.7}}, "simulator.malformed_rate must be in [0, 0.5)"),
    ({"simulator": {"style_drift_from": "soon"}}, "simulator.style_drift_from: expected YYYY-MM-DD"),
])
def test_bad_config_is_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, overrides))
    assert message in str(err.value)


def test_overrides_and_relative_paths(tmp_path):
    cfg = load_config(write_config(tmp_path), parse_overrides(["samples.neg_rate=0.5", "samples.l_pv=3"]))
    assert (cfg.samples.neg_rate, cfg.samples.l_pv) == (0.5, 3)
    # a Spark setting is one key under spark.conf, dots and all (it was split into nested keys and refused)
    # and its value is the string given, as Spark reads it (not YAML's octal 83 for "0123")
    cfg = load_config(write_config(tmp_path), parse_overrides(["spark.conf.spark.ui.enabled=false",
                                                               "spark.conf.spark.hadoop.fs.s3a.secret.key=0123"]))
    assert cfg.spark.conf["spark.ui.enabled"] == "false" and cfg.spark.conf["spark.hadoop.fs.s3a.secret.key"] == "0123"
    (tmp_path / "sub").mkdir()
    rel = tmp_path / "sub" / "c.yaml"
    rel.write_text("paths:\n  data_root: ../elsewhere\n")
    assert load_config(rel).data_root == str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError):
        parse_overrides(["samples.neg_rate"])
    # train.pretrained_path is a local file too: against the config's folder, not the working directory
    rel.write_text("train:\n  pretrained_path: ../weights/r18.pt\n")
    assert load_config(rel).train.pretrained_path == str(tmp_path / "weights" / "r18.pt")
    for backbone in ("tiny_cnn", "resnet50", "swin_t", "swin_v2_b"):
        assert load_config(rel, {"train": {"backbone": backbone}}).train.backbone == backbone


def test_model_refs_name_the_models_the_jobs_write(tmp_path):
    """features.clusters_ref / encoder_ref of another model name: no job registers it, and build_clusters
    would move courier-clusters' alias, not that model's, so a re-cluster would never reach the refresh."""
    conf = write_config(tmp_path, {})
    for key, ref in (("clusters_ref", "courier-clusters-prod@current"), ("encoder_ref", "my-encoder@champion"),
                     ("clusters_ref", "courier-encoder@current"), ("clusters_ref", "courier-clusters")):
        with pytest.raises(ConfigError, match=f"features.{key}: expected courier-"):
            load_config(conf, {"features": {key: ref}})
    for ref in ("courier-clusters@current", "courier-clusters/3", "courier-clusters/latest"):
        assert load_config(conf, {"features": {"clusters_ref": ref}}).features.clusters_ref == ref


def test_paths_from_data_stay_under_their_root(tmp_path):
    assert under_root(str(tmp_path), "a/b.png") == str(tmp_path / "a" / "b.png")
    for bad in ("../x.png", "/etc/passwd", "a/../../x"):
        with pytest.raises(ConfigError):
            under_root(str(tmp_path), bad)


def test_symlinks_and_nul_characters_cannot_leave_a_root_given_as_a_file_uri(tmp_path):
    from etl.inputs import plan_images

    root = tmp_path / "images"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "lnk").symlink_to(tmp_path / "secret")  # a folder inside the root that points out of it
    uri = "file://" + str(root)
    assert under_root(uri, "ok/b.png") == uri + "/ok/b.png"  # the URI kept as written
    for r in (uri, str(root)):
        with pytest.raises(ConfigError, match="escapes its root"):
            under_root(r, "lnk/passwd")
        with pytest.raises(ConfigError, match="NUL character"):
            under_root(r, "ok/b\x00.png")
    # in a catalog, a NUL in an image_uri quarantines that item instead of failing the date
    plan = plan_images(None, [("i1", "ok/b\x00.png")], str(root), 1000)
    assert plan.rejected == [("i1", "image_path_escapes_root", "ok/b\x00.png")]


def test_the_session_time_zone_stays_utc_and_ansi_mode_off(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("spark:\n  conf:\n    spark.sql.session.timeZone: Europe/Paris\n")
    with pytest.raises(ConfigError, match="spark.sql.session.timeZone must be UTC"):
        load_config(conf)
    conf.write_text("spark:\n  conf:\n    spark.sql.ansi.enabled: true\n")
    with pytest.raises(ConfigError, match="spark.sql.ansi.enabled must be false"):
        load_config(conf)
    conf.write_text("spark:\n  conf:\n    spark.sql.session.timeZone: UTC\n")
    assert load_config(conf).spark.conf["spark.sql.session.timeZone"] == "UTC"


def test_environment_references_are_interpolated(tmp_path, monkeypatch):
    conf = tmp_path / "c.yaml"
    conf.write_text("paths:\n  data_root: s3a://${T_BUCKET}/courier\n"
                    "spark:\n  master: ${T_MASTER:-local[2]}\n  conf:\n    spark.hadoop.fs.s3a.endpoint: http://${T_HOST}:9\n"
                    "mlflow:\n  tracking_uri: ${T_MLFLOW}\n")
    monkeypatch.setenv("T_BUCKET", "b-1")
    monkeypatch.setenv("T_HOST", "127.0.0.1")
    monkeypatch.setenv("T_MLFLOW", "http://127.0.0.1:5999")
    monkeypatch.delenv("T_MASTER", raising=False)
    cfg = load_config(conf)
    assert cfg.tables_root == "s3a://b-1/courier/tables"
    assert cfg.spark.master == "local[2]"  # the default after :-
    assert cfg.spark.conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:9"
    assert cfg.mlflow_tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.setenv("T_MASTER", "spark://127.0.0.1:7077")
    assert load_config(conf).spark.master == "spark://127.0.0.1:7077"
    # --set values are interpolated too
    assert load_config(conf, parse_overrides(["paths.raw_root=s3a://${T_BUCKET}/raw"])).raw_root == "s3a://b-1/raw"
    monkeypatch.delenv("T_BUCKET")
    with pytest.raises(ConfigError, match=r"paths.data_root: environment variable T_BUCKET is not set"):
        load_config(conf)


def test_cluster_local_config_needs_the_cluster_env(monkeypatch):
    names = ("COURIER_BUCKET", "SPARK_MASTER_URL", "COURIER_SPARK_CLASSPATH", "COURIER_S3_ENDPOINT",
             "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")
    for n in names:
        monkeypatch.delenv(n, raising=False)
    with pytest.raises(ConfigError, match="is not set"):
        load_config(ROOT / "conf" / "cluster.local.yaml")
    for n, v in zip(names, ("b", "spark://127.0.0.1:7", "/jars/*", "http://127.0.0.1:8", "us-east-1",
                            "http://127.0.0.1:9")):
        monkeypatch.setenv(n, v)
    cfg = load_config(ROOT / "conf" / "cluster.local.yaml")
    assert cfg.tables.engine == "spark-delta" and cfg.spark.master == "spark://127.0.0.1:7"
    roots = [cfg.raw_root, cfg.images_root, cfg.tables_root, cfg.checkpoints_root, cfg.truth_root]
    assert all(r.startswith("s3a://b/") for r in roots), roots
    assert cfg.mlflow_artifact_root == "s3://b/mlflow/artifacts"
    assert cfg.spark.conf["spark.executor.extraClassPath"] == "/jars/*"
