"""Registry review: may a challenger `ctr-model` version replace the current @champion?

1. Both models are scored on the challenger's evaluation snapshot (ctr_train Delta version,
   feature_version and eval dates, from its lineage tags). A champion evaluated on another snapshot
   (an earlier day's, or before a re-cluster) is re-scored on the challenger's eval impressions when it
   never trained on them (`not_rescorable`), with the features of its own feature_version (attached
   here with its clustering when that differs: the cluster ids of two clusterings mean different
   things); otherwise the review refuses. It refuses too when a model's image encoder was trained on an
   eval date or a later one (its cluster ids would carry the eval labels: training.ctr.pipeline.encoder_leak).
2. Both models are **re-scored** here (not trusted from their training runs) on the same impressions,
   with the same GAUC grouping and the same cold-start item set (eval items seen in neither model's
   training dates).
3. Gates (config `review:`), all must pass:
   - eval rows >= min_eval_rows (otherwise refused: too little evidence for any decision);
   - AUC(challenger) >= AUC(champion) - auc_tol, and the same for GAUC with gauc_tol;
   - no category with >= min_category_rows eval rows loses more than category_regression_limit AUC.
   A NaN metric of one model fails its gate: nothing is promoted on an undefined number; undefined for
   both (the eval rows are one class, or no group holds both) is a refusal. A category whose eval rows
   are all clicks or all non-clicks is not gated (no model has an AUC there: it holds no evidence, and
   gating it would reject every challenger on that snapshot).
4. Promotion = setting the alias `champion` on the challenger (etl.registry.promote). With no champion
   yet, the challenger is promoted only when `allow_first` is given (and it has enough eval rows and
   finite metrics).

`gate_checks` is the pure part (reports in, gates out); `validate` reads the registry and the data and
decides (approved / rejected / refused) without writing anything; `promote` moves the alias of an
approved challenger; `run_review` is the two in that order.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field

from etl import catalog as T
from etl.contracts import CHAMPION, CTR_MODEL as MODEL_NAME

log = logging.getLogger(__name__)

PROMOTED, REJECTED, REFUSED = "promoted", "rejected", "refused"
APPROVED = "approved"  # every gate passed; becomes PROMOTED once the alias moved


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass
class ReviewOutcome:
    decision: str  # promoted | rejected | refused
    reasons: list[str]
    challenger: str | None = None  # version numbers as strings
    champion: str | None = None
    snapshot: str | None = None
    gates: list[Gate] = field(default_factory=list)
    reports: dict = field(default_factory=dict)  # version -> metrics report on the snapshot
    tags: dict = field(default_factory=dict)  # version -> lineage tags
    curves: dict = field(default_factory=dict)  # version -> [{epoch, train_loss, eval_auc, ...}]
    others: list[dict] = field(default_factory=list)  # other versions on the same snapshot (logged metrics)
    # multi_cluster models: version -> [{level, ids, auc, gauc, auc_gain, gauc_gain}], the gain being the
    # model's metric minus the metric with that level's ids hidden (scored as "no usable image")
    level_gains: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the models were compared, where it is not plain

    @property
    def exit_code(self) -> int:
        return {PROMOTED: 0, REJECTED: 1, REFUSED: 2}[self.decision]

    def status(self) -> dict:
        """The decision for schedulers (jobs/review_model.py --status-file), which tell a crash from a rejection."""
        return {"decision": self.decision, "challenger": self.challenger, "champion_before": self.champion,
                "reasons": self.reasons}


def _bad(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def gate_checks(challenger: dict, champion: dict, review) -> list[Gate]:
    """The promotion gates for two metric reports (training.ctr.metrics.evaluate_predictions) of the same
    rows. Pure: no registry, no data."""
    gates = []
    rows = challenger["overall"]["rows"]
    gates.append(Gate("min_eval_rows", rows >= review.min_eval_rows, f"{rows} eval rows (need >= {review.min_eval_rows})"))
    for metric, tol in (("auc", review.auc_tol), ("gauc", review.gauc_tol)):
        a, b = challenger["overall"][metric], champion["overall"][metric]
        if _bad(a) and _bad(b):  # the same rows rank nothing (one class; no group with both): no evidence
            gates.append(Gate("metrics_defined", False, f"{metric.upper()} undefined for both models on these "
                                                         "eval rows: no evidence either way"))
            continue
        if _bad(a) or _bad(b):
            gates.append(Gate(metric, False, f"{metric.upper()} undefined (challenger {a}, champion {b})"))
            continue
        gates.append(Gate(metric, a >= b - tol, f"{metric.upper()} {a:.4f} vs champion {b:.4f} "
                                                f"(delta {a - b:+.4f}, tolerance -{tol})"))
    worst, regressed, skipped, one_class = None, [], [], []
    for cat, m in sorted(challenger["by_category"].items()):
        c = champion["by_category"].get(cat)
        if c is None or m["rows"] < review.min_category_rows:
            skipped.append(cat)
            continue
        if m["positives"] in (0, m["rows"]):  # the same rows for both: no model can rank them, no evidence
            one_class.append(cat)
            continue
        if _bad(m["auc"]) or _bad(c["auc"]):  # both classes, yet no AUC: the model's scores are not numbers
            regressed.append(f"{cat} (AUC undefined)")
            continue
        delta = m["auc"] - c["auc"]
        worst = delta if worst is None else min(worst, delta)
        if delta < -review.category_regression_limit:
            regressed.append(f"{cat} {delta:+.4f}")
    detail = (f"worst category delta {worst:+.4f} (limit -{review.category_regression_limit})" if worst is not None
              else "no category large enough to gate")
    if regressed:
        detail = f"regressed: {', '.join(regressed)}; " + detail
    if skipped:
        detail += f"; not gated (< {review.min_category_rows} rows): {', '.join(skipped)}"
    if one_class:
        detail += f"; not gated (one class, AUC undefined for any model): {', '.join(one_class)}"
    gates.append(Gate("categories", not regressed, detail))
    return gates


def first_model_checks(report: dict, review) -> list[Gate]:
    o = report["overall"]
    return [Gate("min_eval_rows", o["rows"] >= review.min_eval_rows,
                 f"{o['rows']} eval rows (need >= {review.min_eval_rows})"),
            Gate("metrics_defined", not (_bad(o["auc"]) or _bad(o["gauc"])),
                 f"AUC {o['auc']:.4f}, GAUC {o['gauc']:.4f}")]


def run_review(cfg, store, challenger_version: str | None = None, allow_first: bool = False) -> ReviewOutcome:
    """Validate the challenger, then promote it when approved. Needs MLflow set up."""
    return promote(validate(cfg, store, challenger_version, allow_first))


def promote(outcome: ReviewOutcome) -> ReviewOutcome:
    """Deployment of an approved challenger: @champion moves to it (the registry's only alias change),
    provided @champion is still the version it was compared with; a review that finished meanwhile
    may have moved it, and this challenger was never compared with that one. The registry has no
    compare-and-set for aliases, so the re-read and the move are two calls: two reviews that finish
    within that moment can both move it (the scheduled refresh runs one review at a time)."""
    from etl import registry

    if outcome.decision == APPROVED:
        now = registry.alias_version(MODEL_NAME, CHAMPION)
        now = str(now.version) if now is not None else None
        if now != outcome.champion:
            outcome.decision = REFUSED
            outcome.reasons.append(f"@{CHAMPION} moved from {_v(outcome.champion)} to {_v(now)} during the review: "
                                   f"review v{outcome.challenger} again against it")
            return outcome
        registry.promote(MODEL_NAME, outcome.challenger)
        outcome.decision = PROMOTED
        # The decision goes with the alias, before the report (log_review adds the review run's id): a report
        # that fails would leave @champion tagged with an earlier review's verdict, and that version is never
        # reviewed again. The alias has moved: a failing tag (a registry blip) must not hide that; log_review
        # tags the version again.
        try:
            registry.tag_version(MODEL_NAME, outcome.challenger, registry.review_tags(PROMOTED, ""))
        except Exception as exc:  # noqa: BLE001 - the promotion stands; the tag is retried by log_review
            log.warning("v%s is @%s, but its review tags could not be written yet: %s", outcome.challenger,
                        CHAMPION, exc)
            outcome.notes.append(f"the review tags of v{outcome.challenger} could not be written with the alias "
                                 f"move ({type(exc).__name__}); the report below writes them")
    return outcome


def _v(version: str | None) -> str:
    return f"v{version}" if version is not None else "none"


def validate(cfg, store, challenger_version: str | None = None, allow_first: bool = False) -> ReviewOutcome:
    """Registry + data side of the review, read-only: the challenger's and champion's lineage, both
    re-scored on the pinned snapshot, the gates, and the decision (approved / rejected / refused)."""
    import numpy as np

    from etl import registry
    from etl.registry import Snapshot
    from training.ctr import data as ctr_data
    from training.ctr.metrics import evaluate_predictions
    from training.ctr.pipeline import encoder_leak
    from training.ctr.train import level_scores, load_registered, score_frame

    versions = registry.versions(MODEL_NAME)
    if not versions:
        return ReviewOutcome(REFUSED, [f"no {MODEL_NAME} version is registered: run jobs/train_ctr.py first"])
    by_number = {str(v.version): v for v in versions}
    chall_v = str(challenger_version) if challenger_version else max(by_number, key=int)
    if chall_v not in by_number:
        return ReviewOutcome(REFUSED, [f"{MODEL_NAME} has no version {chall_v} (have {sorted(by_number, key=int)})"])
    chall = by_number[chall_v]
    champ = registry.alias_version(MODEL_NAME, CHAMPION)
    out = ReviewOutcome(REFUSED, [], challenger=chall_v, champion=str(champ.version) if champ else None)
    try:
        snap = Snapshot.from_tags(chall.tags)
    except ValueError as exc:
        out.reasons.append(f"challenger v{chall_v}: {exc}")
        return out
    out.snapshot = snap.key
    if champ is not None and str(champ.version) == chall_v:
        out.reasons.append(f"v{chall_v} already holds @{CHAMPION}: nothing to review")
        return out
    if champ is None and not allow_first:
        out.reasons.append(f"no @{CHAMPION} yet: promoting the first model needs the explicit --allow-first flag")
        return out
    if champ is not None:
        try:
            champ_snap = Snapshot.from_tags(champ.tags)
        except ValueError as exc:
            out.reasons.append(f"champion v{champ.version}: {exc}")
            return out
        diff = snap.differences(champ_snap)
        why_not = diff and not_rescorable(champ.tags, snap)
        if why_not:
            out.reasons.append(
                f"evaluation snapshots differ (challenger v{chall_v} vs champion v{champ.version}): {'; '.join(diff)}; "
                f"the champion cannot be re-scored on the challenger's: {why_not}. Retrain the challenger with "
                f"ctr.table_version={champ_snap.table_version} and ctr.eval_dates={list(champ_snap.eval_dates)} on "
                "the same feature version, or review against a champion on this snapshot")
            return out
        if diff:
            out.notes.append(
                f"champion v{champ.version} was evaluated on {champ_snap.key} ({'; '.join(diff)}): it is re-scored "
                "here on the challenger's eval impressions, which it never trained on"
                + (f", with the features of its own feature_version {champ_snap.feature_version!r}"
                   if champ_snap.feature_version != snap.feature_version else ""))

    models = {chall_v: chall} if champ is None else {chall_v: chall, str(champ.version): champ}
    own_fv = {v: mv.tags["feature_version"] for v, mv in models.items()}
    # A model whose image encoder saw the eval dates scores higher than it would on new data.
    leaks = [f"v{v}: {leak}" for v, mv in models.items()
             if (leak := encoder_leak(own_fv[v], mv.tags.get("feature_mode", ""), list(snap.eval_dates)))]
    if leaks:
        out.reasons.extend(leaks)
        return out

    # Re-score every model on the pinned snapshot.
    loaded = {v: load_registered(mv) for v, mv in models.items()}
    vector_models = [f"v{v}" for v, (m, _) in loaded.items() if m.spec.feature_mode == "vector"]
    train_dates = sorted({d for _, tags in loaded.values() for d in tags.get("train.dates", "").split(",") if d})
    try:  # e.g. a vector-mode champion on a snapshot attached without item_vector: no evidence, not a crash
        ev = ctr_data.read_ctr_frame(store, snap.table_version, list(snap.eval_dates), bool(vector_models))
        tr = (ctr_data.read_ctr_frame(store, snap.table_version, train_dates, bool(vector_models))
              if train_dates else None)
    except ctr_data.CtrDataError as exc:
        vector = vector_models and "item_vector" in str(exc)
        whose = f"the vector-mode model(s) {', '.join(vector_models)}" if vector else "the models"
        out.reasons.append(f"ctr_train v{snap.table_version} cannot be read for {whose}: {exc}")
        return out
    if ev.empty:
        out.reasons.append(f"the snapshot {snap.key} has no rows (were its partitions replaced and vacuumed?)")
        return out
    fv = ctr_data.feature_version_of(ev)
    if fv != snap.feature_version:
        out.reasons.append(f"ctr_train v{snap.table_version} eval rows carry feature_version {fv!r}, the tags say "
                           f"{snap.feature_version!r}: the snapshot is not what the models were evaluated on")
        return out
    seen = ctr_data.seen_items(tr) if tr is not None else set()
    cold = set(ev["item_id"].unique().tolist()) - seen
    # The same impressions for every model, each with the features of its own feature version (a model
    # without an image feature reads none).
    try:
        frames = {v: ev if own_fv[v] == fv or model.spec.feature_mode == "none"
                  else _rows_with_features(cfg, store, snap, own_fv[v], ev) for v, (model, _) in loaded.items()}
    except _rebuild_errors() as exc:
        out.reasons.append(f"the champion's features of feature_version {own_fv[str(champ.version)]!r} cannot be "
                           f"rebuilt for the challenger's eval impressions: {exc}")
        return out
    for v, (model, tags) in loaded.items():
        probs = score_frame(model, frames[v], [tr] if tr is not None and frames[v] is ev else None)
        if not np.isfinite(probs).all():
            # The challenger's: it fails its gates (rejected). The champion's, or a first model's: nothing to
            # compare with, a refusal (a person decides, as for metrics undefined for both).
            out.decision = REJECTED if v == chall_v and champ is not None else REFUSED
            out.reports, out.level_gains = {}, {}
            role = "challenger" if v == chall_v else "champion"
            out.reasons = [f"{role} v{v}'s scores on {snap.key} are not numbers ({int((~np.isfinite(probs)).sum())} "
                           f"of {len(probs)} NaN or infinite): nothing is promoted on undefined metrics"]
            return out
        out.reports[v] = evaluate_predictions(frames[v], probs, cold_items=cold, group_col=cfg.ctr.gauc_by)
        out.tags[v] = tags
        out.curves[v] = _curve(tags.get("run_id"))
        full = out.reports[v]["overall"]
        for name, n_ids, hidden in level_scores(model, frames[v]):
            o = evaluate_predictions(frames[v], hidden, cold_items=cold, group_col=cfg.ctr.gauc_by)["overall"]
            out.level_gains.setdefault(v, []).append(
                {"level": name, "ids": n_ids, "auc": o["auc"], "gauc": o["gauc"],
                 "auc_gain": full["auc"] - o["auc"], "gauc_gain": full["gauc"] - o["gauc"]})
    out.others = [{"version": str(v.version), "feature_mode": v.tags.get("feature_mode"),
                   "auc": _float(v.tags.get("eval.auc")), "gauc": _float(v.tags.get("eval.gauc"))}
                  for v in versions if v.tags.get("eval.snapshot") == snap.key]

    if champ is None:
        out.gates = first_model_checks(out.reports[chall_v], cfg.review)
    else:
        out.gates = gate_checks(out.reports[chall_v], out.reports[str(champ.version)], cfg.review)
    failed = [g for g in out.gates if not g.passed]
    if any(g.name in ("min_eval_rows", "metrics_defined") for g in failed):
        out.decision = REFUSED
        out.reasons = [f"{g.name}: {g.detail}" for g in failed]
        return out
    if failed:
        out.decision = REJECTED
        out.reasons = [f"{g.name}: {g.detail}" for g in failed]
    else:
        out.decision = APPROVED
        out.reasons = ["first model, promoted with --allow-first"] if champ is None else ["every gate passed"]
    return out


def _rebuild_errors() -> tuple:
    """What `_rows_with_features` raises when a champion's features cannot be rebuilt (its clustering
    or encoder gone from the registry, its item_clusters rows or item images missing): a refusal with
    the reason, not a crash."""
    from etl.registry import RegistryError
    from etl.tables import TableError
    from features.pipeline import FeatureError
    from training.ctr.data import CtrDataError

    return (CtrDataError, FeatureError, RegistryError, TableError)


def not_rescorable(champion_tags: dict, snap) -> str | None:
    """Why a champion evaluated on another snapshot cannot be re-scored on the challenger's `snap`
    (None when it can). It can when it never trained on those eval dates (its training dates, the
    validation dates among them, all precede them) and its features can be rebuilt for those
    impressions: its own feature version names a clustering, or is the snapshot's, or it reads no
    image feature."""
    from etl import registry

    if not champion_tags.get("train.dates"):
        return "its training dates are unknown (no train.dates tag)"
    from training.ctr.data import dates_after_eval_start

    seen = dates_after_eval_start(champion_tags["train.dates"].split(","), list(snap.eval_dates))
    if seen:
        return f"it trained on {seen}, on or after the challenger's first eval date {min(snap.eval_dates)}"
    fv = champion_tags.get("feature_version")
    if fv != snap.feature_version and champion_tags.get("feature_mode") != "none":
        if champion_tags.get("feature_mode") == "vector":
            return f"a vector-mode champion of another feature_version ({fv!r}) is scored on its own snapshot only"
        if registry.clusters_ref_of(fv) is None:
            return f"its feature_version {fv!r} names no courier-clusters version to rebuild its features with"
    return None


def _rows_with_features(cfg, store, snap, feature_version: str, ev):
    """The snapshot's eval impressions (the rows of `ev`, in its order) with the features of another
    feature version, attached here with that version's clustering (features.pipeline.attached_rows)."""
    from etl import registry
    from features.pipeline import attached_rows
    from training.ctr import data as ctr_data

    impressions = (store.read(T.CTR_TRAIN, snap.table_version, partitions={"dt": list(snap.eval_dates)})
                   .select(*T.CTR_LOG.columns, "dt"))
    frame = attached_rows(store.spark, cfg, store, impressions, registry.clusters_ref_of(feature_version),
                          ctr_data.BASE_COLUMNS + ctr_data.LEVEL_COLUMNS)
    frame = frame.sort_values(ctr_data.ROW_ORDER, kind="mergesort", ignore_index=True)
    if not frame[ctr_data.ROW_ORDER].equals(ev[ctr_data.ROW_ORDER]):  # one row per impression, as attach promises
        raise ctr_data.CtrDataError(f"the eval impressions attached with {feature_version!r} are not the snapshot's "
                                    f"{len(ev)} rows ({len(frame)} rows)")
    return frame


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _curve(run_id: str | None) -> list[dict]:
    import mlflow

    if not run_id:
        return []
    client = mlflow.MlflowClient()
    points: dict[int, dict] = {}
    for key in ("train_loss", "eval_auc", "eval_logloss"):
        try:
            for m in client.get_metric_history(run_id, key):
                points.setdefault(int(m.step), {"epoch": int(m.step)})[key] = m.value
        except Exception:  # noqa: BLE001 - a run without a curve is reported as such, not an error
            pass
    return [points[k] for k in sorted(points)]


def embedding_sample(store, cfg, max_items: int = 1500, seed: int = 0, encoder_version: str | None = None):
    """(embeddings, {"category": .., "hidden hue": ..}) for the t-SNE panel, or None when there is nothing
    to draw. The rows of `encoder_version` (the reviewed model's encoder) or, when None, of the largest
    encoder_version; at most max_items, chosen in Spark by a stable hash of item_id. The hue comes from
    the simulator's truth table (evaluation only) when present."""
    import numpy as np
    import pandas as pd
    from pyspark.sql import functions as F

    if not store.exists(T.ITEM_EMBEDDINGS):
        return None
    sdf = store.read(T.ITEM_EMBEDDINGS)
    if "embedding" not in sdf.columns or "item_id" not in sdf.columns:
        return None
    if "encoder_version" in sdf.columns:
        from etl.registry import version_number

        have = [r[0] for r in sdf.select("encoder_version").distinct().collect() if r[0]]
        if encoder_version is None and have:
            encoder_version = max(have, key=version_number)  # v10 is newer than v9
        if encoder_version not in have:
            return None  # the reviewed encoder's embeddings are gone: no panel rather than another encoder's
        sdf = sdf.where(F.col("encoder_version") == encoder_version)
    from features.clustering import sample_items

    emb = sample_items(sdf.where(F.col("embedding").isNotNull()).dropDuplicates(["item_id"]), max_items,
                       seed).select("item_id", "embedding").toPandas()
    if emb.empty:
        return None
    colourings = {}
    if store.exists(T.ITEMS):
        cats = store.read(T.ITEMS).select("item_id", "category").toPandas().drop_duplicates("item_id")
        colourings["category"] = emb[["item_id"]].merge(cats, on="item_id", how="left")["category"].fillna("?").to_numpy()
    from etl import fs

    truth = fs.join(cfg.truth_root, "item_styles.parquet")  # local or on the object store
    if fs.exists(truth):
        styles = pd.read_parquet(io.BytesIO(fs.read_bytes(truth)), columns=["item_id", "hue"])
        colourings["hidden hue"] = emb[["item_id"]].merge(styles, on="item_id", how="left")["hue"].fillna("?").to_numpy()
    return np.stack(emb["embedding"].to_numpy()).astype(np.float32), colourings


def log_review(cfg, store, outcome: ReviewOutcome, with_tsne: bool = True, job: str = "review_model") -> str:
    """The review's record, also for refusals (it says why): an MLflow run with the report (review.md,
    PNGs), the decision as tags and the metrics; the challenger version tagged with the decision. Prints
    the one-screen summary; returns the run id."""
    import tempfile

    import mlflow

    from etl import registry
    from etl.tracking import start_run
    from training.ctr.report import summary_text, write_report

    fv = (outcome.tags.get(outcome.challenger) or {}).get("feature_version", "")
    encoder = registry.encoder_version_of(fv)
    tsne = embedding_sample(store, cfg, encoder_version=encoder) if with_tsne and outcome.reports else None
    with start_run(cfg, f"review-{MODEL_NAME}-v{outcome.challenger or 'none'}", tags={"courier.job": job}) as run:
        with tempfile.TemporaryDirectory() as tmp:
            write_report(outcome, tmp, tsne)
            mlflow.log_artifacts(tmp, "review")
        mlflow.set_tags({"review.decision": outcome.decision, "review.challenger": str(outcome.challenger),
                         "review.champion_before": str(outcome.champion), "review.snapshot": str(outcome.snapshot)})
        for v, rep in outcome.reports.items():
            role = "challenger" if v == outcome.challenger else "champion"
            mlflow.log_metrics({f"{role}.auc": rep["overall"]["auc"], f"{role}.gauc": rep["overall"]["gauc"]})
            for k, g in enumerate(outcome.level_gains.get(v, []), 1):
                mlflow.log_metrics({f"{role}.level{k}.auc_gain": g["auc_gain"], f"{role}.level{k}.gauc_gain": g["gauc_gain"]})
        run_id = run.info.run_id
    # Every decision on a challenger, a refusal before any scoring too (else an earlier review's tag would
    # stand); never on a version that already held @champion (its own review's tag stays).
    if outcome.challenger and outcome.challenger != outcome.champion:
        registry.tag_version(MODEL_NAME, outcome.challenger, registry.review_tags(outcome.decision, run_id))
    print(summary_text(outcome), flush=True)
    print(f"report: MLflow run {run_id}, artifacts review/review.html (plots inline; also review.md + PNGs); "
          f"UI: mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri} --host 127.0.0.1", flush=True)
    return run_id


def review_and_report(cfg, store, version=None, allow_first=False, with_tsne=True) -> ReviewOutcome:
    """validate -> promote -> log_review (what jobs/review_model.py does)."""
    outcome = promote(validate(cfg, store, version, allow_first))
    log_review(cfg, store, outcome, with_tsne)
    return outcome
