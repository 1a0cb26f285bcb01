"""Registry review on real MLflow (sqlite) + Delta: first model needs the flag, a better challenger is
promoted, a worse one is not, mismatched snapshots are refused; the jobs run as subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.ctr_synth import DATES, write_ctr_train

ROOT = Path(__file__).resolve().parents[1]
CTR = {"epochs": 3, "layers": [64, 32], "batch_size": 256, "lr": 0.005, "id_dim": 8, "cluster_dim": 8,
       "item_buckets": 65536, "user_buckets": 4096}
REVIEW = {"min_eval_rows": 500, "min_category_rows": 200, "auc_tol": 0.002, "gauc_tol": 0.002,
          "category_regression_limit": 0.01}


@pytest.fixture(scope="module")
def env(spark, tmp_path_factory):
    from etl.config import load_config
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow
    from tests.conftest import write_config

    tmp = tmp_path_factory.mktemp("review")
    conf = write_config(tmp, {"ctr": CTR, "review": REVIEW})
    cfg = load_config(conf)
    store = TableStore(spark, cfg)
    write_ctr_train(spark, store, rows_per_date=2000)
    setup_mlflow(cfg)
    return conf, cfg, store


def _train(env, **ctr):
    import dataclasses

    from training.ctr.pipeline import train_and_register

    conf, cfg, store = env
    cfg = dataclasses.replace(cfg, ctr=dataclasses.replace(cfg.ctr, **ctr))
    return train_and_register(cfg, store, progress=lambda m: None)


def _champion():
    import mlflow

    from etl.contracts import CTR_MODEL as MODEL_NAME

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def _review(env, version, allow_first=False):
    from training.ctr.review import review_and_report

    _, cfg, store = env
    return review_and_report(cfg, store, version, allow_first, with_tsne=False)


def test_review_sequence(env, capsys):
    import mlflow

    from etl.contracts import CTR_MODEL as MODEL_NAME
    from training.ctr.train import load_model

    v_none = _train(env, feature_mode="none")["model_version"]
    mv = mlflow.MlflowClient().get_model_version(MODEL_NAME, v_none)
    assert mv.tags["feature_mode"] == "none" and mv.tags["feature_version"] == "fv-test"
    assert mv.tags["eval.dates"] == DATES[-1] and mv.tags["ctr_train.version"] == "2"
    local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source)
    assert set(os.listdir(local)) >= {"weights.pt", "model_spec.json", "eval_report.json"}
    load_model(local)  # a state_dict + JSON spec, loaded with weights_only=True

    # 1. The first model is promoted only with the explicit flag.
    out = _review(env, v_none)
    assert out.decision == "refused" and "--allow-first" in out.reasons[0] and _champion() is None
    from training.ctr.review import promote, validate

    _, cfg, store = env
    out = promote(validate(cfg, store, v_none, allow_first=True))  # and its report (log_review) never written
    assert out.decision == "promoted" and _champion() == v_none
    # the decision went with the alias, not with the report: the earlier refusal's tag does not stand
    assert mlflow.MlflowClient().get_model_version(MODEL_NAME, v_none).tags["review.decision"] == "promoted"

    # 2. A better challenger (cluster ids on a table whose label is a cluster match) is promoted.
    v_cluster = _train(env, feature_mode="cluster_id")["model_version"]
    out = _review(env, v_cluster)
    assert out.decision == "promoted", out.reasons
    assert out.reports[v_cluster]["overall"]["auc"] > out.reports[v_none]["overall"]["auc"] + 0.05
    assert _champion() == v_cluster
    summary = capsys.readouterr().out
    assert "decision: PROMOTED" in summary and "[PASS] auc" in summary

    # 3. A worse challenger is rejected and the alias stays.
    v_worse = _train(env, feature_mode="none", seed=1)["model_version"]
    out = _review(env, v_worse)
    assert out.decision == "rejected" and out.exit_code == 1
    assert any(r.startswith("auc:") for r in out.reasons) and _champion() == v_cluster
    assert mlflow.MlflowClient().get_model_version(MODEL_NAME, v_worse).tags["review.decision"] == "rejected"

    # A model whose scores are not numbers is rejected (not a crash), the alias untouched.
    import training.ctr.train as ctr_train

    load, score = ctr_train.load_registered, ctr_train.score_frame

    for broken, decision in ((v_worse, "rejected"), (v_cluster, "refused")):  # the challenger's fault, the champion's
        def load_marking(mv, broken=broken):
            model, tags = load(mv)
            model.nan_scores = str(mv.version) == broken
            return model, tags

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ctr_train, "load_registered", load_marking)
            mp.setattr(ctr_train, "score_frame", lambda model, frame, *a: np.full(len(frame), np.nan)
                       if model.nan_scores else score(model, frame, *a))
            out = _review(env, v_worse)
        assert out.decision == decision and f"v{broken}'s scores" in out.reasons[0], out.reasons
        assert "are not numbers" in out.reasons[0] and _champion() == v_cluster

    # 4. A challenger evaluated on another snapshot (other eval dates) is refused, alias untouched.
    v_other = _train(env, feature_mode="cluster_id", train_dates=[DATES[0]], eval_dates=[DATES[1]])["model_version"]
    out = _review(env, v_other)
    assert out.decision == "refused" and "evaluation snapshots differ" in out.reasons[0]
    assert "eval dates" in out.reasons[0] and _champion() == v_cluster
    assert mlflow.MlflowClient().get_model_version(MODEL_NAME, v_other).tags["review.decision"] == "refused"
    out = _review(env, v_cluster)  # the champion itself: nothing to review, its own review's tag stays
    assert out.decision == "refused" and "already holds" in out.reasons[0]
    assert mlflow.MlflowClient().get_model_version(MODEL_NAME, v_cluster).tags["review.decision"] == "promoted"

    # The review run holds the report and its plots.
    runs = mlflow.search_runs(filter_string="tags.`courier.job` = 'review_model'", output_format="list")
    promoted = [r for r in runs if r.data.tags.get("review.challenger") == v_cluster
                and r.data.tags.get("review.decision") == "promoted"][0]
    files = {os.path.basename(f.path) for f in mlflow.MlflowClient().list_artifacts(promoted.info.run_id, "review")}
    assert {"review.md", "review.html", "auc_gauc.png", "category_gain.png", "training_curves.png"} <= files


def test_a_champion_from_an_earlier_snapshot_is_rescored_on_the_challengers_eval_dates(env):
    """The daily case: @champion was trained and evaluated a day earlier. The challenger's eval date is
    new to it, so both are scored on the challenger's impressions; the other way round (a challenger
    evaluated on a date the champion trained on) is refused."""
    from etl import registry
    from etl.contracts import CTR_MODEL as MODEL_NAME
    from training.ctr import data as ctr_data
    from training.ctr.metrics import evaluate_predictions
    from training.ctr.train import load_registered, score_frame

    _, cfg, store = env
    v_day1 = _train(env, feature_mode="cluster_id", train_dates=[DATES[0]], eval_dates=[DATES[1]])["model_version"]
    v_day2 = _train(env, feature_mode="cluster_id", seed=3)["model_version"]  # train DATES[:2], eval DATES[2]
    registry.promote(MODEL_NAME, v_day1)
    out = _review(env, v_day2)
    assert out.decision in ("promoted", "rejected"), out.reasons
    assert out.notes and out.notes[0].startswith(f"champion v{v_day1} was evaluated on ")
    assert "eval dates" in out.notes[0]
    # The champion's numbers are its scores on the challenger's eval date, not on its own.
    ev = ctr_data.read_ctr_frame(store, 2, [DATES[2]], False)
    model, _ = load_registered(registry.resolve(f"{MODEL_NAME}/{v_day1}"))
    expected = evaluate_predictions(ev, score_frame(model, ev), cold_items=set(), group_col=cfg.ctr.gauc_by)
    assert out.reports[v_day1]["overall"]["auc"] == expected["overall"]["auc"]
    assert out.reports[v_day1]["overall"]["rows"] == len(ev)

    registry.promote(MODEL_NAME, v_day2)
    out = _review(env, v_day1)
    assert out.decision == "refused" and _champion() == v_day2
    assert f"it trained on ['{DATES[1]}'], on or after the challenger's first eval date" in out.reasons[0]


def test_what_keeps_a_champion_from_being_rescored():
    from etl.registry import Snapshot
    from training.ctr.review import not_rescorable

    snap = Snapshot(5, "courier-encoder-v2.courier-clusters-v4", ("2026-11-22",))
    ok = {"train.dates": "2026-11-20,2026-11-21", "feature_version": snap.feature_version, "feature_mode": "cluster_id"}
    assert not_rescorable(ok, snap) is None
    assert not_rescorable({**ok, "feature_version": "courier-encoder-v1.courier-clusters-v3"}, snap) is None
    assert "trained on ['2026-11-22', '2026-11-23']" in not_rescorable(
        {**ok, "train.dates": "2026-11-21,2026-11-22,2026-11-23"}, snap)
    assert "names no courier-clusters version" in not_rescorable({**ok, "feature_version": "fv-test"}, snap)
    assert "vector-mode" in not_rescorable({**ok, "feature_version": "courier-encoder-v1.courier-clusters-v3",
                                            "feature_mode": "vector"}, snap)
    assert not_rescorable({**ok, "feature_version": "fv-test", "feature_mode": "none"}, snap) is None
    assert "training dates are unknown" in not_rescorable({k: v for k, v in ok.items() if k != "train.dates"}, snap)


def test_snapshot_differences_name_each_part(env):
    from etl.registry import Snapshot

    a = Snapshot(3, "fv-a", ("2026-11-22",))
    b = Snapshot(3, "fv-b", ("2026-11-22",))
    assert a.differences(b) == ["feature_version 'fv-a' vs 'fv-b'"]
    assert Snapshot(4, "fv-a", ("2026-11-22",)).differences(a) == ["ctr_train version 4 vs 3"]
    tags = {"ctr_train.version": "3", "feature_version": "fv-a", "eval.dates": "2026-11-22"}
    assert Snapshot.from_tags(tags) == a
    with pytest.raises(ValueError, match="names no date"):  # (the review refuses it, naming the version)
        Snapshot.from_tags({**tags, "eval.dates": ""})


def test_category_gate_is_pure_and_can_fail():
    from etl.config import ReviewConf
    from training.ctr.review import gate_checks

    def rep(auc, cats, positives=100):
        return {"overall": {"auc": auc, "gauc": auc, "rows": 5000},
                "by_category": {c: {"auc": a, "rows": 1000, "positives": positives} for c, a in cats.items()}}

    review = ReviewConf(category_regression_limit=0.005, min_eval_rows=1000)
    gates = {g.name: g for g in gate_checks(rep(0.70, {"a": 0.75, "b": 0.60}), rep(0.70, {"a": 0.70, "b": 0.65}), review)}
    assert gates["auc"].passed and not gates["categories"].passed and "b -0.0500" in gates["categories"].detail
    gates = {g.name: g for g in gate_checks(rep(float("nan"), {}), rep(0.7, {}), review)}
    assert not gates["auc"].passed  # an undefined metric never passes
    # undefined for both models on the same rows: the rows hold no evidence, a refusal (not a rejection)
    gates = {g.name: g for g in gate_checks(rep(float("nan"), {}), rep(float("nan"), {}), review)}
    assert "auc" not in gates and not gates["metrics_defined"].passed
    assert "both models" in gates["metrics_defined"].detail
    # A category with no click (or only clicks) in the eval rows: no model has an AUC there, so it is not
    # gated; a category with both classes whose AUC is undefined (NaN scores) still fails.
    nan = float("nan")
    for positives in (0, 1000):
        gates = {g.name: g for g in gate_checks(rep(0.7, {"a": nan, "b": 0.7}, positives),
                                                rep(0.7, {"a": nan, "b": 0.7}, positives), review)}
        assert gates["categories"].passed and "one class" in gates["categories"].detail
        assert "a" in gates["categories"].detail.split("one class")[1]
    gates = {g.name: g for g in gate_checks(rep(0.7, {"a": nan, "b": 0.7}), rep(0.7, {"a": 0.7, "b": 0.7}), review)}
    assert not gates["categories"].passed and "a (AUC undefined)" in gates["categories"].detail


def test_jobs_run_as_scripts(env):
    conf, _, _ = env
    envvars = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}

    def run(*args):
        return subprocess.run([sys.executable, *args, "--conf", str(conf)], cwd=ROOT, env=envvars,
                              capture_output=True, text=True, timeout=600)

    first = run("jobs/train_ctr.py", "--set", "ctr.feature_mode=simscore", "--skip-if-done")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "registered ctr-model v" in first.stdout
    again = run("jobs/train_ctr.py", "--set", "ctr.feature_mode=simscore", "--skip-if-done")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    review = run("jobs/review_model.py", "--no-tsne")
    assert review.returncode in (0, 1), review.stderr[-3000:]
    assert "== ctr-model review" in review.stdout and "decision:" in review.stdout


def test_newest_encoder_is_chosen_by_number_not_by_string(spark, tmp_path):
    """The t-SNE sample keeps the rows of the newest encoder: v10 is newer than v9 (string max says v9)."""
    from pyspark.sql import types as T

    from etl.registry import RegistryError, version_number
    from training.ctr.review import embedding_sample

    assert version_number("courier-encoder-v10") > version_number("courier-encoder-v9")
    with pytest.raises(RegistryError):
        version_number("courier-encoder-latest")

    from etl.config import load_config
    from etl.tables import TableStore
    from tests.conftest import write_config

    cfg = load_config(write_config(tmp_path))
    store = TableStore(spark, cfg)
    schema = T.StructType([T.StructField("item_id", T.StringType()),
                           T.StructField("embedding", T.ArrayType(T.FloatType())),
                           T.StructField("encoder_version", T.StringType()), T.StructField("dt", T.StringType())])
    for v in (9, 10):
        rows = [(f"i{k}", [float(v), 0.0], f"courier-encoder-v{v}", "2026-11-20") for k in range(12)]
        store.replace_partition(spark.createDataFrame(rows, schema), "item_embeddings",
                                {"encoder_version": f"courier-encoder-v{v}", "dt": "2026-11-20"})
    emb, _ = embedding_sample(store, cfg)
    assert emb.shape == (12, 2) and set(emb[:, 0].tolist()) == {10.0}
    # the reviewed model's encoder when given (its feature_version names it), never another one's
    emb, _ = embedding_sample(store, cfg, max_items=5, encoder_version="courier-encoder-v9")
    assert emb.shape == (5, 2) and set(emb[:, 0].tolist()) == {9.0}
    assert embedding_sample(store, cfg, encoder_version="courier-encoder-v11") is None
    from etl.registry import encoder_version_of  # what log_review passes: the reviewed model's encoder

    assert encoder_version_of("courier-encoder-v10.courier-clusters-v2") == "courier-encoder-v10"
    assert encoder_version_of("fv-test") is None


def test_hue_panel_draws_each_hue_family_in_its_own_colour():
    from matplotlib.colors import to_rgba

    from training.ctr.report import _plt, panel_colours

    hues = ["?", "green", "magenta", "orange"]
    assert panel_colours(hues, _plt()) == [to_rgba("lightgrey"), to_rgba("green"), to_rgba("magenta"),
                                           to_rgba("orange")]
    categories = panel_colours(["dress", "shoes"], _plt())
    assert len(set(categories)) == 2 and to_rgba("green") not in categories


def test_promotion_is_refused_when_the_champion_moved_during_the_review(env):
    """Two reviews validated against the same champion: the one that finishes second must not promote
    a challenger that was never compared with the first one's."""
    from etl import registry
    from etl.contracts import CTR_MODEL as MODEL_NAME
    from training.ctr.review import APPROVED, ReviewOutcome, promote

    versions = sorted((str(v.version) for v in registry.versions(MODEL_NAME)), key=int)
    while len(versions) < 3:
        versions.append(_train(env, feature_mode="none", seed=len(versions))["model_version"])
    a, b, c = versions[-3:]
    registry.promote(MODEL_NAME, a)
    validated = ReviewOutcome(APPROVED, [], challenger=c, champion=a)
    registry.promote(MODEL_NAME, b)  # the other review promoted b meanwhile
    out = promote(validated)
    assert out.decision == "refused" and out.reasons[-1].startswith(f"@champion moved from v{a} to v{b}")
    assert _champion() == b
    out = promote(ReviewOutcome(APPROVED, [], challenger=c, champion=b))
    assert out.decision == "promoted" and _champion() == c


def test_a_promotion_whose_tags_fail_still_says_it_moved_the_alias_and_its_report_tags_it(env, monkeypatch):
    """The alias moved and the registry then failed the decision tag (a blip): the outcome is `promoted`
    (not an exception that hides the move), and the review's report writes the tags."""
    import mlflow

    from etl import registry
    from etl.contracts import CTR_MODEL as MODEL_NAME
    from training.ctr.review import APPROVED, ReviewOutcome, log_review, promote

    versions = sorted((str(v.version) for v in registry.versions(MODEL_NAME)), key=int)
    while len(versions) < 2:
        versions.append(_train(env, feature_mode="none", seed=len(versions))["model_version"])
    a, b = versions[-2:]
    registry.promote(MODEL_NAME, a)
    real_tag = registry.tag_version

    def blip(*args, **kwargs):
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(registry, "tag_version", blip)
    out = promote(ReviewOutcome(APPROVED, [], challenger=b, champion=a))
    assert out.decision == "promoted" and _champion() == b
    assert any("could not be written" in n for n in out.notes)
    monkeypatch.setattr(registry, "tag_version", real_tag)
    _, cfg, store = env
    log_review(cfg, store, out, with_tsne=False)
    tags = mlflow.MlflowClient().get_model_version(MODEL_NAME, b).tags
    assert tags.get("review.decision") == "promoted" and tags.get("review.run_id"), tags


def test_an_unreachable_registry_is_an_error_not_an_empty_registry(tmp_path, monkeypatch):
    """'Nothing registered' only when the registry says so: a review must not refuse (exit 0 under a
    scheduler) or promote a first model, and --skip-if-done must not retrain, because a server was down."""
    import mlflow

    from etl import registry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    def use(uri: str) -> None:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        use(f"sqlite:///{tmp_path}/empty.db")
        assert registry.versions("never-registered") == []
        assert registry.alias_version("never-registered") is None
        assert registry.find_by_tags("never-registered", {"k": "v"}) is None
        use("http://127.0.0.1:9")  # nothing listens there
        for look_up in (lambda: registry.versions("ctr-model"), lambda: registry.alias_version("ctr-model")):
            with pytest.raises(mlflow.exceptions.MlflowException):
                look_up()
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def test_ctr_rows_are_read_in_one_order_whatever_the_files(env):
    """Training batches depend on the snapshot only: rows come ordered by their impression key, which is
    unique, not in the order files and tasks happen to return them."""
    from training.ctr.data import ROW_ORDER, read_ctr_frame

    _, _, store = env
    frame = read_ctr_frame(store, store.version("ctr_train"), list(DATES), with_vector=False)
    keys = list(frame[ROW_ORDER].itertuples(index=False, name=None))
    assert len(keys) > 1000 and keys == sorted(keys) and len(set(keys)) == len(keys)
    assert list(frame.index) == list(range(len(frame)))


def test_skip_if_done_hash_is_the_resolved_inputs_not_how_they_were_named():
    """A null table_version and the number it resolves to, or default and explicit equal dates, are the
    same training; a model setting or another snapshot is not."""
    import dataclasses

    from etl.config import CtrConf
    from etl.registry import Snapshot, ctr_config_hash

    snap, train = Snapshot(7, "fv", ("2026-11-22",)), ["2026-11-20", "2026-11-21"]
    base = ctr_config_hash(dataclasses.asdict(CtrConf()), snap, train)
    same = CtrConf(table_version=7, train_dates=train, eval_dates=["2026-11-22"], threads=8)
    assert ctr_config_hash(dataclasses.asdict(same), snap, train) == base
    assert ctr_config_hash(dataclasses.asdict(CtrConf(lr=0.01)), snap, train) != base
    assert ctr_config_hash(dataclasses.asdict(CtrConf()), Snapshot(8, "fv", ("2026-11-22",)), train) != base
    assert ctr_config_hash(dataclasses.asdict(CtrConf()), snap, train[1:]) != base


def test_a_model_whose_encoder_saw_the_eval_dates_is_neither_trained_nor_promoted(env, tmp_path, spark):
    """An encoder trained on the eval date (or a later one) has seen the eval clicks in its PVs' click
    histories: train_ctr refuses such a cluster-id model, and the review refuses one registered anyway."""
    import dataclasses

    from etl import registry
    from etl.config import load_config
    from etl.contracts import CTR_MODEL, ENCODER_MODEL
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow, start_run
    from tests.conftest import write_config
    from training.ctr.data import CtrDataError, dates_after_eval_start
    from training.ctr.pipeline import train_and_register

    assert dates_after_eval_start(["2026-11-18", "2026-11-23"], ["2026-11-22", "2026-11-21"]) == ["2026-11-23"]
    assert dates_after_eval_start(DATES[:-1], [DATES[-1]]) == []

    cfg = load_config(write_config(tmp_path, {"ctr": CTR, "review": REVIEW}))
    store = TableStore(spark, cfg)
    setup_mlflow(cfg)
    try:
        with start_run(cfg, "an encoder") as run:  # a version with lineage tags only: no weights are read here
            enc = registry.register_version(ENCODER_MODEL, str(tmp_path), run.info.run_id,
                                            {"data.dates": ",".join(DATES)})
        write_ctr_train(spark, store, rows_per_date=2000, feature_version=f"{ENCODER_MODEL}-v{enc.version}.clusters-v1")

        def train(mode):
            return train_and_register(dataclasses.replace(cfg, ctr=dataclasses.replace(cfg.ctr, feature_mode=mode)),
                                      store, progress=lambda m: None)["model_version"]

        with pytest.raises(CtrDataError, match=rf"trained on courier_train date\(s\) \['{DATES[-1]}'\], on or after"):
            train("cluster_id")
        v_none = train("none")  # no image feature: the encoder takes no part
        registry.tag_version(ENCODER_MODEL, enc.version, {"data.dates": ",".join(DATES[:-1])})
        v_cluster = train("cluster_id")
        assert registry.promote(CTR_MODEL, v_none) is None and _champion() == v_none

        # Registered before the encoder's dates were known to overlap (here: re-tagged): the review refuses.
        registry.tag_version(ENCODER_MODEL, enc.version, {"data.dates": ",".join(DATES)})
        out = _review((None, cfg, store), v_cluster)
        assert out.decision == "refused" and _champion() == v_none
        assert len(out.reasons) == 1 and out.reasons[0].startswith(f"v{v_cluster}: the image encoder"), out.reasons
        registry.tag_version(ENCODER_MODEL, enc.version, {"data.dates": ",".join(DATES[:-1])})
        out = _review((None, cfg, store), v_cluster)
        assert out.decision in ("promoted", "rejected"), out.reasons

        # Re-clustered twice (new feature versions; their clusterings are not in this registry). A
        # champion without an image feature is re-scored on the challenger's rows as they are; one whose
        # features cannot be rebuilt (its clustering is gone) makes the review refuse, not crash.
        write_ctr_train(spark, store, rows_per_date=2000,
                        feature_version=f"{ENCODER_MODEL}-v{enc.version}.courier-clusters-v77")
        v_gone = train("cluster_id")
        write_ctr_train(spark, store, rows_per_date=2000,
                        feature_version=f"{ENCODER_MODEL}-v{enc.version}.courier-clusters-v78")
        v_new = train("cluster_id")
        registry.promote(CTR_MODEL, v_none)
        out = _review((None, cfg, store), v_new)
        assert out.decision in ("promoted", "rejected"), out.reasons
        assert out.reports[v_none]["overall"]["rows"] == out.reports[v_new]["overall"]["rows"] == 2000
        registry.promote(CTR_MODEL, v_gone)
        out = _review((None, cfg, store), v_new)
        assert out.decision == "refused" and _champion() == v_gone
        assert "courier-clusters-v77' cannot be rebuilt" in out.reasons[0] and "courier-clusters" in out.reasons[0]

        # An encoder this registry does not hold (deleted, or another registry's): its dates cannot be
        # checked, so a model with an image feature is refused; one without reads no encoder.
        write_ctr_train(spark, store, rows_per_date=2000,
                        feature_version=f"{ENCODER_MODEL}-v999.courier-clusters-v79")
        with pytest.raises(CtrDataError, match=r"courier-encoder-v999.courier-clusters-v79' cannot be found"):
            train("cluster_id")
        assert train("none")
    finally:
        setup_mlflow(env[1])  # the module's registry again


def test_a_vector_champion_on_a_snapshot_without_item_vector_is_refused(env, tmp_path, spark):
    """The next attach left item_vector out (features.include_vector: false): the vector-mode champion
    cannot be re-scored on the challenger's snapshot, so the review refuses (exit 2) with the reason
    instead of failing, and @champion stays."""
    import dataclasses
    import shutil

    from etl import registry
    from etl.config import load_config
    from etl.contracts import CTR_MODEL
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow
    from tests.conftest import write_config
    from training.ctr.pipeline import train_and_register

    cfg = load_config(write_config(tmp_path, {"ctr": CTR, "review": REVIEW}))
    store = TableStore(spark, cfg)
    setup_mlflow(cfg)
    try:
        def train(mode):
            return train_and_register(dataclasses.replace(cfg, ctr=dataclasses.replace(cfg.ctr, feature_mode=mode)),
                                      store, progress=lambda m: None)["model_version"]

        write_ctr_train(spark, store, rows_per_date=1000)
        v_vector = train("vector")
        registry.promote(CTR_MODEL, v_vector)
        shutil.rmtree(store.path("ctr_train"))  # what the error of a mixed schema says: rebuild every date
        write_ctr_train(spark, store, rows_per_date=1000, with_vector=False)
        v_cluster = train("cluster_id")
        out = _review((None, cfg, store), v_cluster)
        assert out.decision == "refused" and out.exit_code == 2 and _champion() == v_vector, out.reasons
        assert "item_vector" in out.reasons[0] and f"v{v_vector}" in out.reasons[0], out.reasons
    finally:
        setup_mlflow(env[1])  # the module's registry again
