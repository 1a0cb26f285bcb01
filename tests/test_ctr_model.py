"""The CTR model on a synthetic ctr_train (real Spark + Delta): it learns cluster-ID signal, every image
feature mode trains, weights round-trip without pickle, contract violations are clear errors."""
from __future__ import annotations

import math

import pytest

from tests.ctr_synth import DATES, synth_frame, write_ctr_train

CTR = {"epochs": 3, "layers": [64, 32], "batch_size": 256, "lr": 0.005, "id_dim": 8, "cluster_dim": 8,
       "item_buckets": 65536, "user_buckets": 4096}


@pytest.fixture(scope="module")
def table(spark, tmp_path_factory):
    from etl.config import load_config
    from etl.tables import TableStore
    from tests.conftest import write_config

    tmp = tmp_path_factory.mktemp("ctr_model")
    cfg = load_config(write_config(tmp, {"ctr": CTR}))
    store = TableStore(spark, cfg)
    version = write_ctr_train(spark, store, rows_per_date=2000)
    return cfg, store, version


@pytest.fixture(scope="module")
def frames(table):
    from training.ctr.pipeline import load_frames, resolve_dates

    cfg, store, _ = table
    version, train_dates, eval_dates = resolve_dates(store, cfg.ctr)
    return load_frames(store, version, train_dates, eval_dates, with_vector=True)


def test_snapshot_is_pinned_and_dates_split(table, frames):
    cfg, store, version = table
    tr, ev, snap = frames
    assert snap.table_version == version and snap.feature_version == "fv-test"
    assert snap.eval_dates == (DATES[-1],)
    assert sorted(tr["dt"].unique()) == DATES[:2] and len(tr) == 4000 and len(ev) == 2000


@pytest.fixture(scope="module")
def results(table, frames):
    from training.ctr.train import fit_and_evaluate

    cfg, _, _ = table
    tr, ev, _ = frames
    return {mode: fit_and_evaluate(tr, ev, cfg.ctr, mode) for mode in ("none", "cluster_id", "simscore", "vector")}


def test_cluster_ids_beat_no_image_feature_on_cold_items(results):
    none, cluster = results["none"].report, results["cluster_id"].report
    # The label is a cluster match and every eval item is new: only the image feature can help.
    assert cluster["overall"]["auc"] > none["overall"]["auc"] + 0.1, (cluster["overall"], none["overall"])
    assert cluster["overall"]["auc"] > 0.65
    assert cluster["overall"]["gauc"] > none["overall"]["gauc"]
    assert cluster["cold_start"]["rows"] == 2000  # all eval items are new
    assert cluster["cold_start"]["auc"] == pytest.approx(cluster["overall"]["auc"])


def test_every_mode_trains_and_reports(results):
    for mode, r in results.items():
        assert len(r.curve) == 3 and all(math.isfinite(p["train_loss"]) for p in r.curve), mode
        assert r.curve[-1]["train_loss"] < r.curve[0]["train_loss"], mode
        assert set(r.report["by_category"]) == {"cat0", "cat1", "cat2", "cat3"}
        assert r.data_stats["eval"]["rows_without_image"] > 0
    assert results["simscore"].report["overall"]["auc"] > results["none"].report["overall"]["auc"] + 0.1


def test_a_cluster_the_training_rows_never_held_reads_the_no_image_row(results, frames, tmp_path):
    import numpy as np
    import torch

    from training.ctr.train import WEIGHTS, load_model, save_model, score_frame

    _, ev, _ = frames
    trained = results["cluster_id"].model
    assert bool(trained.cluster.seen.all())  # every cluster of the synthetic table is in its training dates
    rows = ev.head(300)

    def as_cluster(c):  # the target and every history item in cluster c
        return rows.assign(item_cluster_id=c, history_cluster_ids=[[c] * len(h) for h in rows["history_cluster_ids"]])

    no_image = score_frame(trained, as_cluster(-1))
    # An id past the table (a cluster first filled after training, met when a champion is re-scored on
    # newer dates) scores as no image instead of failing.
    np.testing.assert_allclose(score_frame(trained, as_cluster(10_000)), no_image, rtol=1e-6)
    c = int(rows["item_cluster_id"].max())
    assert not np.allclose(score_frame(trained, as_cluster(c)), no_image)  # a trained cluster reads its row
    # The same model where the training rows lacked cluster c: c now scores as no image.
    save_model(trained, str(tmp_path / "m"))
    unseen = load_model(str(tmp_path / "m"))
    unseen.cluster.seen[c + 2] = False  # row = id + 2
    np.testing.assert_allclose(score_frame(unseen, as_cluster(c)), no_image, rtol=1e-6)
    # A model saved before `seen` existed reads every row as trained (its scores are unchanged).
    state = torch.load(tmp_path / "m" / WEIGHTS, weights_only=True)
    del state["cluster.seen"]
    torch.save(state, tmp_path / "m" / WEIGHTS)
    old = load_model(str(tmp_path / "m"))
    assert bool(old.cluster.seen.all())
    np.testing.assert_allclose(score_frame(old, rows), score_frame(trained, rows), rtol=1e-6)


def test_the_no_image_row_starts_at_zero_so_an_unseen_cluster_reads_no_signal():
    """Where no training item lacks an image the no-image row gets no gradient: what an unseen cluster
    reads is then its initial value, zero (no signal), not a random vector of the clusters' scale."""
    import torch

    from training.ctr.model import CLUSTER_INIT_STD, NO_IMAGE_ROW, ClusterEmbedding

    torch.manual_seed(0)
    emb = ClusterEmbedding(8, 4, CLUSTER_INIT_STD)
    emb.mark_seen(torch.tensor([2, 3, 4]))
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.1)
    for _ in range(5):  # trained on clusters 2-4 only
        optimizer.zero_grad()
        emb(torch.tensor([2, 3, 4])).pow(2).sum().neg().backward()
        optimizer.step()
    assert emb.weight[2:5].abs().sum() > 0
    unseen = emb(torch.tensor([5, 7, 100]))
    assert torch.equal(unseen, torch.zeros(3, 4))
    assert torch.equal(emb.weight[NO_IMAGE_ROW], torch.zeros(4))


def test_an_id_never_seen_in_training_reads_a_trained_or_zero_row():
    """HashedEmbedding sends unseen ids to row 0: trained by id dropout where there is some, zero where
    there is none (the query table: a query first seen on an eval date), never a random initial row."""
    import torch

    from training.ctr.model import HashedEmbedding

    torch.manual_seed(0)
    query = HashedEmbedding(16, 4)
    query.mark_seen(torch.tensor([3, 5]))
    optimizer = torch.optim.Adam(query.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        query(torch.tensor([3, 5])).pow(2).sum().neg().backward()
        optimizer.step()
    assert query(torch.tensor([3])).abs().sum() > 0 and torch.equal(query(torch.tensor([7, 9])), torch.zeros(2, 4))
    assert HashedEmbedding(16, 4, dropout=0.1).emb.weight[0].abs().sum() > 0  # trained by the dropout instead


def test_weights_round_trip_with_weights_only_load(results, frames, tmp_path):
    import numpy as np

    from training.ctr.train import load_model, save_model, score_frame

    _, ev, _ = frames
    r = results["cluster_id"]
    save_model(r.model, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))  # torch.load(weights_only=True) inside
    np.testing.assert_allclose(score_frame(loaded, ev), r.eval_probs, rtol=1e-5, atol=1e-6)


def test_same_seed_same_model(table, frames):
    import numpy as np

    from training.ctr.train import fit_and_evaluate

    cfg, _, _ = table
    tr, ev, _ = frames
    a = fit_and_evaluate(tr.head(1500), ev.head(500), cfg.ctr, "cluster_id")
    b = fit_and_evaluate(tr.head(1500), ev.head(500), cfg.ctr, "cluster_id")
    np.testing.assert_array_equal(a.eval_probs, b.eval_probs)


def test_contract_violations_are_clear_errors(table):
    from training.ctr.data import CtrDataError, encode, feature_version_of, split_dates

    cfg, _, _ = table
    f = synth_frame(1, DATES[0], 50, 0)
    bad = f.copy()
    bad.at[3, "sim_scores"] = [0.5] * (len(bad.at[3, "history"]) + 1)
    with pytest.raises(CtrDataError, match="1 rows have sim_scores not aligned with history"):
        encode(bad, 5, 1024, 1024)
    bad = f.copy()
    bad["item_cluster_id"] = bad["item_cluster_id"].astype("float")
    bad.loc[0, "item_cluster_id"] = None
    with pytest.raises(CtrDataError, match="null item_cluster_id"):
        encode(bad, 5, 1024, 1024)
    bad = f.copy()  # a null inside a row's history cluster ids (a null list is an empty history)
    row = next(i for i, h in enumerate(bad["history_cluster_ids"]) if h is not None and len(h))
    bad.at[row, "history_cluster_ids"] = [None, *list(bad.at[row, "history_cluster_ids"])[1:]]
    with pytest.raises(CtrDataError, match="history_cluster_ids: 1 null element"):
        encode(bad, 5, 1024, 1024)
    mixed = f.copy()
    mixed.loc[0, "feature_version"] = "other"
    with pytest.raises(CtrDataError, match="feature_version"):
        feature_version_of(mixed)
    with pytest.raises(CtrDataError, match="must all precede"):
        split_dates(DATES, [DATES[2]], [DATES[1]], 1)
    with pytest.raises(CtrDataError, match="no partition"):
        split_dates(DATES, None, ["2030-01-01"], 1)
    with pytest.raises(CtrDataError, match="need more than"):
        split_dates(DATES[:1], None, None, 1)


def test_confident_predictions_keep_their_order():
    """Logits of 20 and 18 are different scores: rounded to float32 probabilities both read 1.0 and tie."""
    import numpy as np
    import torch

    from tests.ctr_synth import synth_frame
    from training.ctr.data import encode
    from training.ctr.metrics import auc
    from training.ctr.train import predict

    data = encode(synth_frame(1, DATES[0], 3, 0), 5, 1024, 1024)

    class Logits(torch.nn.Module):  # the model's interface: a batch dict in, one logit per row out
        def forward(self, batch):
            return torch.tensor([20.0, 18.0, -2.0])[: len(batch["item"])]

    probs = predict(Logits(), data)
    assert probs.dtype == np.float64 and probs[0] > probs[1] > probs[2]
    assert auc(np.array([1, 0, 0]), probs) == 1.0


def test_config_rejects_bad_ctr_and_review_values(tmp_path):
    from etl.config import ConfigError, load_config
    from tests.conftest import write_config

    for section, values, msg in [("ctr", {"feature_mode": "pixels"}, "feature_mode"),
                                 ("ctr", {"layers": [64, 0]}, "layers"),
                                 ("ctr", {"bogus": 1}, "unknown key"),
                                 ("ctr", {"train_dates": ["2026-11-20"], "eval_dates": ["2026-11-20"]}, "overlap"),
                                 ("review", {"auc_tol": -0.1}, "auc_tol")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(write_config(tmp_path, {section: values}))


def test_validation_split_is_the_last_training_dates_never_an_eval_date():
    from training.ctr.data import split_dates, validation_split

    days = [f"2026-11-{d}" for d in range(20, 26)]
    tr, ev = split_dates(days, None, None, eval_last_n=2)
    fit_dates, valid = validation_split(tr, 1)
    assert (fit_dates, valid) == (days[:3], [days[3]]) and not set(valid) & set(ev)
    assert validation_split(tr, 2) == (days[:2], days[2:4])
    # Too few training dates to hold one out, or validation off: fit on all, keep the last epoch.
    assert validation_split(days[:1], 1) == (days[:1], []) and validation_split(tr, 0) == (tr, [])


def test_epochs_are_chosen_on_validation_dates_and_the_eval_dates_choose_nothing(table, frames):
    import dataclasses

    import numpy as np
    import torch

    from training.ctr.train import best_epochs, fit_and_evaluate

    cfg, _, _ = table
    tr, ev, _ = frames
    ctr = dataclasses.replace(cfg.ctr, epochs=6, early_stopping_patience=1)
    a = fit_and_evaluate(tr, ev, ctr, "cluster_id", validation_dates=[DATES[1]])
    sel = a.selection
    assert sel["refit"] and sel["validation_dates"] == [DATES[1]] and 1 <= sel["epochs"] <= 6
    assert all("valid_auc" in p for p in a.curve) and sel["epochs"] == best_epochs(a.curve)
    # Early stopping: the selection fit ran until `patience` epochs without a better validation AUC.
    assert len(a.curve) == min(6, sel["epochs"] + 1)
    # Flipping every eval label changes the eval curve but neither the choice nor the model; nor does an
    # eval row's cluster id that no training row has (it once sized the cluster table, and so every
    # initial weight after it).
    flipped = ev.assign(label=1 - ev["label"])
    unseen = int(max(tr["item_cluster_id"].max(), max(max(h, default=0) for h in tr["history_cluster_ids"]))) + 50
    flipped.iloc[0, flipped.columns.get_loc("item_cluster_id")] = unseen
    b = fit_and_evaluate(tr, flipped, ctr, "cluster_id", validation_dates=[DATES[1]])
    assert b.selection == sel
    assert [p["eval_auc"] for p in b.curve] != [p["eval_auc"] for p in a.curve]
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
    np.testing.assert_array_equal(a.eval_probs[1:], b.eval_probs[1:])


def test_in_vector_mode_the_eval_rows_change_nothing_the_model_trains_on(table, frames):
    """A history item borrows the vector of the same item seen as an impression: the training rows'
    histories borrowed from eval rows too, so which eval rows existed changed the model (the first
    training day's histories look back before the table, to items shown only on an eval date)."""
    import dataclasses

    import torch

    from training.ctr.train import fit_and_evaluate

    cfg, _, _ = table
    tr, ev, _ = frames
    ctr = dataclasses.replace(cfg.ctr, epochs=1)
    shown = ev.copy()
    history_items = sorted({h for hist in tr["history"] for h in hist})[:20]
    shown["item_id"] = [history_items[k % 20] if k < 200 else x for k, x in enumerate(shown["item_id"])]
    a, b = (fit_and_evaluate(tr, e, ctr, "vector") for e in (ev, shown))
    assert a.data_stats["train"] == b.data_stats["train"]
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k


def _with_levels(frame, per_level=4):
    """One coarser level: fine cluster c -> c // per_level (the reserved id stays reserved)."""
    coarse = lambda c: -1 if c < 0 else c // per_level  # noqa: E731
    return frame.assign(item_cluster_levels=[[coarse(c)] for c in frame["item_cluster_id"]],
                        history_cluster_levels=[[[coarse(c)] for c in h] for h in frame["history_cluster_ids"]])


def test_multi_cluster_mode_reads_every_level_and_round_trips(table, frames, tmp_path):
    import dataclasses
    import json

    import numpy as np
    import torch

    from training.ctr.data import CtrDataError, encode
    from training.ctr.train import fit_and_evaluate, load_model, save_model, score_frame

    cfg, _, _ = table
    tr, ev, _ = frames
    tr, ev = _with_levels(tr), _with_levels(ev)
    data = encode(ev, 5, 1024, 1024)
    # +2 offsets: the reserved id -1 -> row 1, padding -> row 0; aligned with the history.
    assert data.item_levels.shape == (len(ev), 1) and data.hist_levels.shape == (len(ev), 5, 1)
    assert data.item_levels.min() >= 1 and int(data.item_levels.max()) == (12 - 1) // 4 + 2
    assert bool(((data.hist_levels[..., 0] > 0) == data.hist_mask).all())
    ctr = dataclasses.replace(cfg.ctr, epochs=2)
    multi = fit_and_evaluate(tr, ev, ctr, "multi_cluster")
    none = fit_and_evaluate(tr, ev, ctr, "none")
    assert multi.spec.level_rows == [3 + 2] and multi.report["overall"]["auc"] > none.report["overall"]["auc"] + 0.1
    # concat (the default): the item representation is [id | fine | level 1]; sum: [id | fine + level 1]
    from training.ctr.model import CTRModel, ModelSpec
    assert multi.spec.level_combine == ctr.level_combine == "concat"
    batch = data.take(torch.arange(4))
    width = lambda m: m.item_repr(batch["item"], batch["item_cluster"], batch["item_vec"],  # noqa: E731
                                  batch["item_levels"]).shape[-1]
    assert width(multi.model) == multi.spec.id_dim + 2 * multi.spec.cluster_dim
    summed = fit_and_evaluate(tr, ev, dataclasses.replace(ctr, level_combine="sum"), "multi_cluster")
    assert summed.spec.level_combine == "sum" and width(summed.model) == multi.spec.id_dim + multi.spec.cluster_dim
    # A spec written before level_combine existed is a "sum" model and loads as one.
    old = json.loads(summed.spec.to_json())
    del old["level_combine"]
    assert ModelSpec.from_json(json.dumps(old)) == summed.spec
    with pytest.raises(ValueError, match="level_combine"):
        CTRModel(dataclasses.replace(multi.spec, level_combine="mean"))
    save_model(multi.model, str(tmp_path / "m"))
    np.testing.assert_allclose(score_frame(load_model(str(tmp_path / "m")), ev), multi.eval_probs, rtol=1e-6)
    # The gain per level (the review's): hiding a level scores exactly as rows whose ids at that level are
    # the reserved no-image id; the coarse level carries the signal here (the fine id too).
    from training.ctr.train import level_scores
    scored = level_scores(multi.model, ev)
    assert [(name, n) for name, n, _ in scored] == [
        ("level 1 (coarse)", len({c // 4 for c in ev["item_cluster_id"] if c >= 0})),
        ("cluster id (fine)", len({c for c in ev["item_cluster_id"] if c >= 0}))]
    coarse_hidden = ev.assign(item_cluster_levels=[[-1] for _ in range(len(ev))],
                              history_cluster_levels=[[[-1] for _ in h] for h in ev["history_cluster_ids"]])
    fine_hidden = ev.assign(item_cluster_id=-1, history_cluster_ids=[[-1 for _ in h] for h in ev["history_cluster_ids"]])
    np.testing.assert_allclose(scored[0][2], score_frame(multi.model, coarse_hidden), rtol=1e-6)
    np.testing.assert_allclose(scored[1][2], score_frame(multi.model, fine_hidden), rtol=1e-6)
    assert not np.allclose(scored[0][2], multi.eval_probs) and not np.allclose(scored[1][2], multi.eval_probs)
    assert level_scores(none.model, ev) == []
    # Without the level columns the mode refuses, and misaligned levels are a contract error.
    with pytest.raises(CtrDataError, match="multi_cluster needs"):
        fit_and_evaluate(frames[0], frames[1], ctr, "multi_cluster")
    bad = ev.copy()
    bad.at[bad.index[0], "history_cluster_levels"] = [[0]] * (len(bad.at[bad.index[0], "history"]) + 1)
    with pytest.raises(CtrDataError, match="history_cluster_levels is not aligned"):
        encode(bad, 5, 1024, 1024)
