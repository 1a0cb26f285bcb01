"""The reproduction experiment: the analogue of the paper's Tables 5, 6 and B1 on the simulated log.

    python bench/quality/run_quality.py --data-root /tmp/cq/demo --preset demo --seeds 0,1,2 \
        --steps 30 --clusters 128 --out /tmp/cq/quality.json

One process (after stage 1). Stage 1 is built once through the existing jobs (simulate_search_log +
spark-submit build_samples) when the data root lacks its tables, and reused otherwise. Then, for every
seed (seed-major, so a partial run still has whole seeds):

  1. encoders: untrained (random init), SimCLR, SimSiam, supervised (category), COURIER and the four
     COURIER ablations, each pre-trained with `training.train.train_fn` in this process (world size 1,
     gloo group of one; no TorchDistributor) on courier_train minus its last date (the CTR eval date);
  2. embeddings of every item image (`features.embed.embed_array`), spherical FAISS k-means
     (`features.clustering.train_kmeans` / `assign`), NMI/purity vs the simulator's hidden style
     (`features.quality`);
  3. the ctr_train frame built in pandas with the stage-4 column contract (item_cluster_id,
     history_cluster_ids, sim_scores, item_vector, feature_version) from ctr_log;
  4. `training.ctr.train.fit_and_evaluate` per row: no image feature; cluster ID of every encoder;
     COURIER's vector and SimScore. Metrics: AUC, GAUC (by PV) overall and on the cold-start slice
     (eval impressions of items never seen on a training date).

Results go to --out (JSON, rewritten after every unit) and a markdown summary is printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# encoder variants: name -> train overrides (None: untrained)
ENCODERS = {
    "untrained": None,
    "simclr": {"method": "simclr"},
    "simsiam": {"method": "simsiam"},
    "supervised": {"method": "supervised"},
    "courier": {"method": "courier"},
    "courier_wo_ucs": {"method": "courier", "use_ucs": False},
    "courier_wo_contrast": {"method": "courier", "use_contrast": False},
    "courier_wo_reconstruction": {"method": "courier", "reconstruction": "self_attention"},
    "courier_wo_negpv": {"method": "courier", "use_negatives": False},
    # the paper's pre-training regime (issue 12): in-batch negatives from one query (= category in the
    # simulated log), and the batch-size sweep (Table 7's analogue; same number of steps, so larger
    # batches also see more PVs)
    "courier_by_query": {"method": "courier", "batch_grouping": "query"},
    "courier_by_query_b64": {"method": "courier", "batch_grouping": "query", "batch_size": 64},
    "courier_by_query_b128": {"method": "courier", "batch_grouping": "query", "batch_size": 128},
    "courier_b128": {"method": "courier", "batch_size": 128},
    "simclr_by_query": {"method": "simclr", "batch_grouping": "query"},
    "simclr_b128": {"method": "simclr", "batch_size": 128},
    "simclr_by_query_b128": {"method": "simclr", "batch_grouping": "query", "batch_size": 128},
    # not encoders: a hidden attribute itself as the "cluster id" (evaluation-only references of what an
    # image feature can add to this CTR model; never a model input outside these rows). Their coarser
    # levels are the ideal hierarchy: hue family, then hue + pattern (the two heaviest taste attributes).
    "oracle_style": "truth:style",
    "oracle_hue": "truth:hue",
}
TRAINED = [e for e, v in ENCODERS.items() if isinstance(v, dict)]
ORACLES = [e for e, v in ENCODERS.items() if isinstance(v, str)]
# the encoders of table (d), fine id alone vs with the coarser levels, and of table (e), the pre-training regime
LEVEL_ENCODERS = ["courier", "simclr", "simsiam", "untrained"]
REGIME_ENCODERS = ["courier", "courier_b128", "courier_by_query", "courier_by_query_b64", "courier_by_query_b128",
                   "simclr", "simclr_by_query", "simclr_b128", "simclr_by_query_b128"]
# CTR rows: (row name, encoder or None, feature mode)
CTR_ROWS = ([("none", None, "none")] + [(f"{e}:cluster_id", e, "cluster_id") for e in ENCODERS]
            + [("courier:vector", "courier", "vector"), ("courier:simscore", "courier", "simscore")]
            # with --levels: the fine id plus every coarser level (features.levels)
            + [(f"{e}:multi_cluster", e, "multi_cluster")
               for e in dict.fromkeys(LEVEL_ENCODERS + REGIME_ENCODERS + ["oracle_style"])])
# ENCODERS order puts oracle_style:cluster_id after the ablations; it is reported in table (a) as a reference
# prior cost guesses (s) before anything is measured; replaced by measured averages
PRIOR = {"train_step": 4.0, "embed": 10.0, "ctr": 40.0}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- stage 1 -------------------------------------------------------------------------------------
def ensure_stage1(args, conf_path: str, overrides: list[str]) -> float:
    """Build stage 1 with the existing jobs when the data root lacks its tables; seconds spent."""
    from etl.config import load_config, parse_overrides

    cfg = load_config(conf_path, parse_overrides(overrides))
    tables = ["items", "item_images", "ctr_log", "courier_train"]
    if all(os.path.exists(os.path.join(cfg.tables_root, t, "_delta_log")) for t in tables):
        log(f"stage 1: reusing the tables under {cfg.tables_root}")
        return 0.0
    t0 = time.perf_counter()
    py = sys.executable
    sets = sum((["--set", o] for o in overrides), [])
    env = {**os.environ, "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", py),
           "PYSPARK_DRIVER_PYTHON": os.environ.get("PYSPARK_DRIVER_PYTHON", py),
           "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    log(f"stage 1: simulating preset {args.preset} into {cfg.raw_root}")
    subprocess.run([py, os.path.join(ROOT, "jobs/simulate_search_log.py"), "--conf", conf_path, *sets,
                    "--preset", args.preset], check=True, env=env)
    with open(os.path.join(cfg.raw_root, "manifest.json")) as fh:
        dates = sorted(json.load(fh)["dates"])
    log(f"stage 1: build_samples {dates[0]}..{dates[-1]}")
    spark_submit = os.path.join(os.path.dirname(py), "spark-submit")
    subprocess.run([spark_submit, "--master", f"local[{os.cpu_count() or 2}]", "--driver-memory", "4g",
                    "--driver-java-options", f"-Dlog4j.configurationFile=file:{ROOT}/conf/log4j2.properties",
                    os.path.join(ROOT, "jobs/build_samples.py"), "--conf", conf_path, *sets,
                    "--date", dates[0], "--end-date", dates[-1]], check=True, env=env)
    return time.perf_counter() - t0


# ---- loading -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    item_ids: np.ndarray  # (N,) str, items with a decodable image
    images: np.ndarray  # (N, 3, px, px) uint8
    categories: np.ndarray  # (N,) str
    styles: pd.DataFrame  # truth: item_id, hue, pattern, shape, scale
    train_files: list
    ctr_train: pd.DataFrame
    ctr_eval: pd.DataFrame
    cat_list: list
    eval_date: str


def load_data(spark, cfg, image_px: int) -> Data:
    from etl.tables import TableStore
    from features.embed import decode_image
    from training.ctr.data import split_dates
    from training.launch import split_holdout

    store = TableStore(spark, cfg)
    files = store.files("courier_train")
    train_files, holdout = split_holdout(files, True)
    imgs = store.read("item_images").select("item_id", "image").toPandas()
    items = store.read("items").select("item_id", "category").toPandas()
    decoded = [decode_image(b, image_px) for b in imgs["image"]]
    ok = np.array([a is not None for a in decoded])
    item_ids = imgs["item_id"].to_numpy()[ok]
    images = np.stack([a for a in decoded if a is not None])
    cat = items.set_index("item_id")["category"].reindex(item_ids).fillna("<null>").to_numpy()
    styles = pd.read_parquet(os.path.join(cfg.truth_root, "item_styles.parquet"))
    log_df = store.read("ctr_log").toPandas()
    tr, ev = split_dates(sorted(log_df["dt"].unique().tolist()), None, None, cfg.ctr.eval_last_n_dates)
    ctr_train = log_df[log_df["dt"].isin(tr)].reset_index(drop=True)
    ctr_eval = log_df[log_df["dt"].isin(ev)].reset_index(drop=True)
    cat_list = sorted(c for c in items["category"].dropna().unique().tolist())
    log(f"data: {len(item_ids)} items with images ({(~ok).sum()} undecodable) at {image_px}px; courier_train "
        f"{sum(f.num_records or 0 for f in train_files)} PVs for pre-training (held out: "
        f"{sum(f.num_records or 0 for f in holdout)} PVs of the eval date); ctr_log train {len(ctr_train)} rows "
        f"{tr}, eval {len(ctr_eval)} rows {ev}")
    return Data(item_ids, images, cat, styles, train_files, ctr_train, ctr_eval, cat_list, ev[0])


# ---- stage 2: encoders ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_encoder(cfg, data: Data, overrides: dict, seed: int, args, workdir: str, reuse: bool = False):
    """train_fn in this process (world size 1); returns (encoder, result dict). With `reuse`, an encoder
    this script already trained in `workdir` with the same settings (settings.json) is loaded instead."""
    import torch

    from training.courier import ImageEncoder
    from training.launch import make_spec
    from training.train import train_fn

    os.makedirs(workdir, exist_ok=True)
    settings = {"overrides": overrides, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "backbone": args.backbone, "image_px": args.image_px, "data_root": args.data_root}
    settings_path, result_path = os.path.join(workdir, "settings.json"), os.path.join(workdir, "result.json")
    if reuse and os.path.exists(settings_path) and os.path.exists(result_path):
        with open(settings_path) as fh:
            same = json.load(fh) == json.loads(json.dumps(settings))
        if same:
            with open(result_path) as fh:
                result = json.load(fh)
            encoder = ImageEncoder(args.backbone, dim=cfg.train.dim, proj_head=cfg.train.proj_head)
            encoder.load_state_dict(torch.load(result["encoder_path"], map_location="cpu", weights_only=True))
            log(f"reusing the encoder trained in {workdir} (same settings)")
            return encoder.eval(), {**result, "reused": True}
    spec = dataclasses.asdict(make_spec(cfg, data.train_files, workdir, None, False))
    spec["image_px"] = args.image_px
    t = spec["train"]
    t.update({"backbone": args.backbone, "max_steps": args.steps, "epochs": max(t["epochs"], 1000), "seed": seed,
              "batch_size": args.batch_size, "lr": args.lr, "checkpoint_every": 10 ** 9,
              "log_every": max(args.steps // 4, 1), "backend": "ddp", "num_workers": 1,
              # mixed batches unless a variant groups them, whatever the config's default
              "batch_grouping": "none",
              "use_gpu": torch.cuda.is_available(), **overrides})  # a variant's overrides win
    if t["method"] == "supervised":
        spec["extra"]["categories"] = data.cat_list
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    result = train_fn(spec)  # also written to result_path (the spec's result_path)
    with open(settings_path, "w") as fh:
        json.dump(settings, fh)
    encoder = ImageEncoder(t["backbone"], dim=t["dim"], proj_head=t["proj_head"])
    encoder.load_state_dict(torch.load(result["encoder_path"], map_location="cpu", weights_only=True))
    return encoder.eval(), result


def untrained_encoder(cfg, seed: int, args):
    import torch

    from training.courier import ImageEncoder

    torch.manual_seed(seed)  # what train_fn starts from for this seed
    return ImageEncoder(args.backbone, dim=cfg.train.dim, proj_head=cfg.train.proj_head).eval()


# ---- stage 3: embeddings + clusters ----------------------------------------------------------------
@dataclasses.dataclass
class Feats:
    cluster_of: np.ndarray  # (N+1,) int; last entry = NO_IMAGE_CLUSTER_ID (unknown/no image)
    unit: np.ndarray  # (N+1, d) float32; last row zeros
    ok: np.ndarray  # (N+1,) bool
    quality: dict
    version: str
    levels_of: np.ndarray | None = None  # (N+1, K) coarser ids (--levels), last row reserved


def item_features(encoder, data: Data, k: int, seed: int, args, version: str) -> Feats:
    import torch

    from features import NO_IMAGE_CLUSTER_ID
    from features.clustering import assign, build_index, cluster_stats, level_parents, normalize, train_kmeans
    from features.embed import embed_array
    from features.quality import purity_nmi, style_labels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = encoder.to(device)
    if device == "cuda":
        chunks = []
        with torch.inference_mode():
            for s in range(0, len(data.images), 512):
                chunks.append(encoder.encode(torch.from_numpy(data.images[s:s + 512]).to(device)).float().cpu().numpy())
        emb = np.concatenate(chunks)
    else:
        emb = embed_array(encoder, data.images, batch_size=256)
    centroids = train_kmeans(emb, k, niter=args.kmeans_iters, seed=1234 + seed)
    ids, _ = assign(build_index(centroids, "flat"), emb)
    unit, ok = normalize(emb)
    m = ids >= 0
    q = {"clusters": cluster_stats(ids, k)}
    for attr in ("style", "hue", "pattern", "shape", "scale"):
        pur, nmi = purity_nmi(ids[m], style_labels(data.styles, data.item_ids[m], attr))
        q[f"nmi_{attr}"], q[f"purity_{attr}"] = nmi, pur
    q["nmi_category"] = purity_nmi(ids[m], data.categories[m])[1]
    n, d = unit.shape
    cluster_of = np.full(n + 1, NO_IMAGE_CLUSTER_ID, np.int64)
    cluster_of[:n] = ids
    unit_all = np.zeros((n + 1, d), np.float32)
    unit_all[:n] = unit
    levels_of = None
    if args.levels:  # the same nested levels build_clusters makes (features.levels)
        parents = level_parents(centroids, args.levels, args.kmeans_iters, 1234 + seed)
        levels_of = np.full((n + 1, len(args.levels)), NO_IMAGE_CLUSTER_ID, np.int64)
        levels_of[:n][m] = parents[:, ids[m]].T
        for j, lk in enumerate(args.levels):
            q[f"nmi_hue_level{lk}"] = purity_nmi(levels_of[:n][m, j], style_labels(data.styles, data.item_ids[m], "hue"))[1]
            q[f"nmi_style_level{lk}"] = purity_nmi(levels_of[:n][m, j],
                                                   style_labels(data.styles, data.item_ids[m], "style"))[1]
    return Feats(cluster_of, unit_all, np.append(ok, False), q, version, levels_of)


def oracle_features(data: Data, version: str, attribute: str = "style") -> Feats:
    """A hidden attribute (the style tuple, or one attribute such as hue) as cluster id and a one-hot as the
    'embedding' (reference rows only); its levels are the ideal hierarchy: hue family, then hue + pattern."""
    from features.quality import purity_nmi, style_labels

    truth = {a: style_labels(data.styles, data.item_ids, a) for a in ("style", "hue", "pattern", "shape", "scale")}
    codes, uniques = pd.factorize(truth[attribute])
    n = len(codes)
    unit = np.zeros((n + 1, len(uniques)), np.float32)
    unit[np.arange(n), codes] = 1.0
    cluster_of = np.append(codes.astype(np.int64), -1)
    coarse = [pd.factorize(truth["hue"])[0], pd.factorize(truth["hue"] + "/" + truth["pattern"])[0]]
    levels_of = np.vstack([np.stack(coarse, axis=1), [[-1, -1]]]).astype(np.int64)
    scores = {a: purity_nmi(codes, labels) for a, labels in truth.items()}  # (purity, NMI)
    q = {f"nmi_{a}": nmi for a, (_, nmi) in scores.items()}
    q.update(nmi_category=purity_nmi(codes, data.categories)[1], purity_style=scores["style"][0], styles=len(uniques))
    return Feats(cluster_of, unit, np.append(np.ones(n, bool), False), q, version, levels_of)


# ---- stage 4: the ctr_train frame (pandas, same contract as features.attach.attach) ----------------
def attach_pandas(log_df: pd.DataFrame, feats: Feats | None, item_index: pd.Index, with_vector: bool) -> pd.DataFrame:
    """ctr_log rows + item_cluster_id, history_cluster_ids, sim_scores (+ item_vector), feature_version.
    feats None: every item gets the reserved id and 0 scores (the no-image-feature row)."""
    from features import NO_IMAGE_CLUSTER_ID, NO_IMAGE_SIM_SCORE

    out = log_df.copy()
    hist = out["history"].to_numpy()
    lens = np.fromiter((0 if h is None else len(h) for h in hist), np.int64, len(hist))
    flat = np.concatenate([np.asarray(h, dtype=object) for h in hist if h is not None and len(h)] or [np.zeros(0, object)])
    splits = np.cumsum(lens)[:-1]
    if feats is None:
        out["item_cluster_id"] = NO_IMAGE_CLUSTER_ID
        hc = np.full(len(flat), NO_IMAGE_CLUSTER_ID, np.int32)
        sims = np.full(len(flat), NO_IMAGE_SIM_SCORE, np.float32)
        version = "none"
    else:
        ii = item_index.get_indexer(out["item_id"].to_numpy())  # -1 -> last entry (reserved)
        hi = item_index.get_indexer(flat)
        out["item_cluster_id"] = feats.cluster_of[ii].astype(np.int32)
        hc = feats.cluster_of[hi].astype(np.int32)
        rows = np.repeat(np.arange(len(out)), lens)
        sims = np.empty(len(flat), np.float32)
        for s in range(0, len(flat), 200_000):
            a, b = ii[rows[s:s + 200_000]], hi[s:s + 200_000]
            sims[s:s + 200_000] = np.einsum("ij,ij->i", feats.unit[a], feats.unit[b])
        sims[~(feats.ok[ii[rows]] & feats.ok[hi])] = NO_IMAGE_SIM_SCORE
        if with_vector:
            out["item_vector"] = list(feats.unit[ii])
        if feats.levels_of is not None:
            out["item_cluster_levels"] = list(feats.levels_of[ii])
            hl = feats.levels_of[hi]
            out["history_cluster_levels"] = [list(x) for x in np.split(hl, splits)] if len(out) else []
        version = feats.version
    out["history_cluster_ids"] = np.split(hc, splits) if len(out) else []
    out["sim_scores"] = np.split(sims, splits) if len(out) else []
    out["feature_version"] = version
    return out


def spark_attach_check(spark, cfg, feats: Feats, item_ids: np.ndarray, frame: pd.DataFrame) -> dict:
    """The same frame through features.attach.attach on the Spark session: time and equality."""
    from pyspark.sql import types as T

    from etl.tables import TableStore
    from features.attach import attach

    t0 = time.perf_counter()
    store = TableStore(spark, cfg)
    n = len(item_ids)
    pdf = pd.DataFrame({"item_id": item_ids, "cluster_id": feats.cluster_of[:n].astype(np.int32),
                        "vec": [v if o else None for v, o in zip(feats.unit[:n].tolist(), feats.ok[:n])]})
    schema = T.StructType([T.StructField("item_id", T.StringType()), T.StructField("cluster_id", T.IntegerType()),
                           T.StructField("vec", T.ArrayType(T.FloatType()))])
    fdf = spark.createDataFrame(pdf, schema)
    dates = sorted(frame["dt"].unique().tolist())
    from pyspark.sql import functions as F

    sdf = attach(store.read("ctr_log").where(F.col("dt").isin(dates)), fdf, feats.version, False,
                 feats.unit.shape[1]).toPandas()
    secs = time.perf_counter() - t0
    key = ["pv_id", "item_id", "user_id"]
    a = frame.sort_values(key).reset_index(drop=True)
    b = sdf.sort_values(key).reset_index(drop=True)
    same_ids = bool(len(a) == len(b) and (a["item_cluster_id"].to_numpy() == b["item_cluster_id"].to_numpy()).all()
                    and all(list(x) == list(y) for x, y in zip(a["history_cluster_ids"], b["history_cluster_ids"])))
    max_sim = max((float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float)))) for x, y in
                   zip(a["sim_scores"], b["sim_scores"]) if len(x)), default=0.0)
    return {"spark_attach_s": secs, "rows": len(b), "same_cluster_ids": same_ids, "max_sim_diff": max_sim}


# ---- the experiment ------------------------------------------------------------------------------
def summarize_ctr(res) -> dict:
    r = res.report
    pick = lambda m: {k: float(m[k]) for k in ("auc", "gauc", "rows", "positives") if k in m}  # noqa: E731
    return {"overall": pick(r["overall"]), "cold_start": pick(r.get("cold_start", {})),
            "warm": pick(r.get("warm", {})), "cold_items": len(res.cold_items),
            "curve": res.curve, "seconds": res.seconds}


class Eta:
    def __init__(self, units: list[tuple[str, float]]):
        self.todo = list(units)  # (kind, amount)
        self.cost: dict[str, list] = {}
        self.t0 = time.perf_counter()

    def done(self, kind: str, amount: float, seconds: float) -> None:
        self.cost.setdefault(kind, []).append(seconds / max(amount, 1e-9))
        for i, (k, a) in enumerate(self.todo):
            if k == kind and a == amount:
                del self.todo[i]
                break

    def line(self) -> str:
        per = {k: float(np.mean(v)) for k, v in self.cost.items()}
        left = sum(a * per.get(k, PRIOR[k]) for k, a in self.todo)
        return f"elapsed {time.perf_counter() - self.t0:.0f}s, ~{left:.0f}s left ({len(self.todo)} units)"


def run(args) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from etl.config import load_config, parse_overrides
    from etl.spark import get_spark
    from training.ctr.train import fit_and_evaluate

    t_start = time.perf_counter()
    overrides = [f"paths.data_root={args.data_root}", *args.set]
    stage1_s = ensure_stage1(args, args.conf, overrides)
    cfg = load_config(args.conf, parse_overrides(overrides))
    import torch

    torch.set_num_threads(args.threads)
    spark = get_spark(cfg, app_name="quality")
    t0 = time.perf_counter()
    data = load_data(spark, cfg, args.image_px)
    load_s = time.perf_counter() - t0
    item_index = pd.Index(data.item_ids)
    encoders = [e for e in ENCODERS if e in args.encoders]
    rows = [r for r in CTR_ROWS if (r[1] is None or r[1] in encoders) and r[2] in args.modes
            and (r[2] != "multi_cluster" or args.levels)]
    ctr = dataclasses.replace(cfg.ctr, epochs=args.ctr_epochs, threads=args.threads,
                              batch_size=args.ctr_batch_size or cfg.ctr.batch_size)
    units = []
    for _ in args.seeds:
        units += [("train_step", args.steps)] * sum(e in TRAINED for e in encoders)
        units += [("embed", 1)] * len(encoders) + [("ctr", 1)] * len(rows)
    eta = Eta(units)
    out = {"args": vars(args), "machine": machine(), "stage1_s": stage1_s, "load_s": load_s,
           "data": {"items": len(data.item_ids), "ctr_train_rows": len(data.ctr_train),
                    "ctr_eval_rows": len(data.ctr_eval), "eval_date": data.eval_date,
                    "pretrain_pvs": sum(f.num_records or 0 for f in data.train_files)},
           "seeds": {}, "timing": {}}
    none_train = attach_pandas(data.ctr_train, None, item_index, False)
    none_eval = attach_pandas(data.ctr_eval, None, item_index, False)
    timing = out["timing"]

    def save():
        out["wall_s"] = time.perf_counter() - t_start
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(out, fh, indent=1, default=float)
            os.replace(tmp, args.out)

    for n_done, seed in enumerate(args.seeds):
        elapsed = time.perf_counter() - t_start
        per_seed = (elapsed - stage1_s) / n_done if n_done else None
        if args.budget_min and per_seed and elapsed + per_seed > args.budget_min * 60:
            log(f"stopping before seed {seed}: {elapsed:.0f}s elapsed + ~{per_seed:.0f}s per seed would pass "
                f"--budget-min {args.budget_min}; reporting {n_done} seed(s)")
            out["stopped_early"] = {"seeds_done": n_done, "elapsed_s": elapsed, "per_seed_s": per_seed}
            break
        res = out["seeds"][str(seed)] = {"encoders": {}, "ctr": {}}
        ctr_s = dataclasses.replace(ctr, seed=seed)

        def fit(row, tr, ev, mode):
            t1 = time.perf_counter()
            r = summarize_ctr(fit_and_evaluate(tr, ev, ctr_s, mode))
            secs = time.perf_counter() - t1
            timing.setdefault("ctr_fit", []).append(secs)
            eta.done("ctr", 1, secs)
            res["ctr"][row] = r
            o, c = r["overall"], r["cold_start"]
            log(f"seed {seed} {row}: AUC {o['auc']:.4f} GAUC {o['gauc']:.4f} cold AUC {c.get('auc', float('nan')):.4f} "
                f"({secs:.0f}s) | {eta.line()}")
            save()

        if "none" in [r[0] for r in rows]:
            fit("none", none_train, none_eval, "none")
        for enc_name in encoders:
            ov = ENCODERS[enc_name]
            t1 = time.perf_counter()
            if enc_name in ORACLES:
                encoder, info = None, {"steps": 0}
            elif ov is None:
                encoder, info = untrained_encoder(cfg, seed, args), {"steps": 0}
            else:
                log(f"seed {seed}: pre-training {enc_name} ({args.steps} steps, {args.backbone}, "
                    f"batch {ov.get('batch_size', args.batch_size)}, {args.image_px}px) | {eta.line()}")
                encoder, result = train_encoder(cfg, data, ov, seed, args,
                                                os.path.join(args.workdir, f"s{seed}", enc_name), args.reuse_encoders)
                secs = time.perf_counter() - t1
                timing.setdefault("train", []).append({"encoder": enc_name, "seconds": secs})
                eta.done("train_step", args.steps, secs)
                info = {"steps": result["steps"], "skipped": result["skipped"], "seconds": secs,
                        "loss_first": result["losses"][0] if result["losses"] else None,
                        "loss_last_10": float(np.mean(result["losses"][-10:])) if result["losses"] else None,
                        "images_per_s": result["images_per_s"]}
            t2 = time.perf_counter()
            feats = (oracle_features(data, f"{enc_name}-s{seed}", ov.split(":")[1]) if enc_name in ORACLES else
                     item_features(encoder, data, args.clusters, seed, args, f"{enc_name}-s{seed}"))
            esecs = time.perf_counter() - t2
            timing.setdefault("embed_cluster", []).append(esecs)
            eta.done("embed", 1, esecs)
            res["encoders"][enc_name] = {**info, **feats.quality}
            log(f"seed {seed} {enc_name}: NMI style {feats.quality['nmi_style']:.3f} hue {feats.quality['nmi_hue']:.3f} "
                f"pattern {feats.quality['nmi_pattern']:.3f} category {feats.quality['nmi_category']:.3f} "
                f"(embed+k-means {esecs:.0f}s) | {eta.line()}")
            my_rows = [r for r in rows if r[1] == enc_name]
            if not my_rows:
                continue
            t3 = time.perf_counter()
            need_vec = any(r[2] == "vector" for r in my_rows)
            tr = attach_pandas(data.ctr_train, feats, item_index, need_vec)
            ev = attach_pandas(data.ctr_eval, feats, item_index, need_vec)
            timing.setdefault("attach_pandas", []).append(time.perf_counter() - t3)
            if args.spark_attach_check and "spark_attach" not in out:
                out["spark_attach"] = {**spark_attach_check(spark, cfg, feats, data.item_ids, ev),
                                       "pandas_attach_s_eval_only": None}
                t4 = time.perf_counter()
                attach_pandas(data.ctr_eval, feats, item_index, False)
                out["spark_attach"]["pandas_attach_s_eval_only"] = time.perf_counter() - t4
                log(f"spark attach check: {out['spark_attach']}")
            for row, _, mode in my_rows:
                fit(row, tr, ev, mode)
            del tr, ev
        log(f"seed {seed} done | {eta.line()}")
    out["wall_s"] = time.perf_counter() - t_start
    out["tables"] = tables(out)
    save()
    spark.stop()
    return out


def merge_results(paths: list[str]) -> dict:
    """One results dict from runs over the same data and settings with different encoders: per seed, the
    union of their CTR rows and encoders. Refuses runs whose settings (other than the encoders, modes and
    output) differ, or whose shared rows (e.g. `none`) disagree."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    fixed = lambda a: {k: v for k, v in a.items() if k not in ("encoders", "modes", "out", "workdir")}  # noqa: E731
    out = {**runs[0], "seeds": {}}
    for path, r in zip(paths, runs):
        if fixed(r["args"]) != fixed(runs[0]["args"]):
            raise SystemExit(f"{path}: settings differ from {paths[0]}'s; only runs of the same settings merge")
        for seed, res in r["seeds"].items():
            into = out["seeds"].setdefault(seed, {"ctr": {}, "encoders": {}})
            for row, rep in res["ctr"].items():
                if row in into["ctr"] and into["ctr"][row]["overall"] != rep["overall"]:
                    raise SystemExit(f"{path}: seed {seed} row {row} differs from an earlier run's")
                into["ctr"][row] = rep
            into["encoders"].update(res["encoders"])
    return out


def machine() -> dict:
    import platform

    import torch

    return {"host_cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": os.getloadavg()}


# ---- tables --------------------------------------------------------------------------------------
TABLES = {
    "(a) image feature source (cluster ID), the analogue of Table 5":
        ["none", "untrained:cluster_id", "simclr:cluster_id", "simsiam:cluster_id", "supervised:cluster_id",
         "courier:cluster_id", "oracle_style:cluster_id"],
    "(b) COURIER ablations (cluster ID), the analogue of Table 6":
        ["courier:cluster_id", "courier_wo_ucs:cluster_id", "courier_wo_contrast:cluster_id",
         "courier_wo_reconstruction:cluster_id", "courier_wo_negpv:cluster_id"],
    "(c) how COURIER's embedding enters the CTR model, the analogue of Table B1":
        ["none", "courier:vector", "courier:simscore", "courier:cluster_id"],
    "(d) multi-granularity cluster ids (--levels): the fine id alone vs with every coarser level":
        ["none"] + [f"{e}:{m}" for e in LEVEL_ENCODERS for m in ("cluster_id", "multi_cluster")],
    "(e) the paper's pre-training regime: within-query batches and the batch size (Table 7's analogue)":
        ["none"] + [f"{e}:{m}" for e in REGIME_ENCODERS for m in ("cluster_id", "multi_cluster")],
    "(f) references: the hidden attributes themselves as the image feature (what this CTR model can gain)":
        ["none", "oracle_style:cluster_id", "oracle_hue:cluster_id", "oracle_style:multi_cluster"],
}


def _paired(out, seeds, row, part, metric):
    """Per-seed difference to the no-image row of the same seed (same CTR seed and data)."""
    d = []
    for s in seeds:
        a, b = out["seeds"][s]["ctr"].get(row), out["seeds"][s]["ctr"].get("none")
        if a and b and metric in a[part] and metric in b[part]:
            d.append(a[part][metric] - b[part][metric])
    return d


def _pm(values, digits=4) -> str:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return "n/a"
    sign = "+" if v.mean() >= 0 else ""
    return f"{sign}{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"


def tables(out: dict) -> str:
    seeds = list(out["seeds"])
    parts = []
    for title, names in TABLES.items():
        lines = [f"**{title}**", "",
                 "| row | n | AUC | ΔAUC vs none | GAUC | ΔGAUC vs none | cold-start AUC | Δcold AUC vs none "
                 "| cold GAUC | NMI style | AUC per seed |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in names:
            got = [out["seeds"][s]["ctr"].get(row) for s in seeds]
            got = [g for g in got if g is not None]
            if not got:
                continue
            enc = None if row == "none" else row.split(":")[0]
            nmi = [out["seeds"][s]["encoders"].get(enc, {}).get("nmi_style") for s in seeds] if enc else []
            dz = lambda part, m: ("-" if row == "none" else _pm(_paired(out, seeds, row, part, m)))  # noqa: E731
            lines.append("| " + " | ".join([
                row, str(len(got)), _ms([g["overall"]["auc"] for g in got]), dz("overall", "auc"),
                _ms([g["overall"]["gauc"] for g in got]), dz("overall", "gauc"),
                _ms([g["cold_start"].get("auc") for g in got]), dz("cold_start", "auc"),
                _ms([g["cold_start"].get("gauc") for g in got]),
                _ms(nmi, 3) if enc else "-",
                " / ".join(f"{g['overall']['auc']:.4f}" for g in got)]) + " |")
        parts.append("\n".join(lines))
    encs = [e for e in ENCODERS if any(e in out["seeds"][s]["encoders"] for s in seeds)]
    # with --levels: how well each coarser level separates the hue family (the heaviest taste attribute)
    level_keys = [f"nmi_hue_level{k}" for k in out["args"].get("levels") or []]
    lines = ["**Encoders: cluster quality vs the hidden truth (NMI; k-means C = %s) and pre-training loss**"
             % out["args"]["clusters"], "",
             "| encoder | NMI style | NMI hue | NMI pattern | NMI shape | NMI scale | NMI category | purity style "
             + "".join(f"| NMI hue, level {k[len('nmi_hue_level'):]} " for k in level_keys)
             + "| loss first → last 10 |", "|---|---|---|---|---|---|---|---|" + "---|" * len(level_keys) + "---|"]
    for e in encs:
        rs = [out["seeds"][s]["encoders"][e] for s in seeds if e in out["seeds"][s]["encoders"]]
        loss = ("-" if rs[0].get("loss_first") is None else
                f"{np.mean([r['loss_first'] for r in rs]):.3f} → {np.mean([r['loss_last_10'] for r in rs]):.3f}")
        lines.append("| " + " | ".join([e] + [_ms([r.get(k) for r in rs], 3) for k in
                                              ("nmi_style", "nmi_hue", "nmi_pattern", "nmi_shape", "nmi_scale",
                                               "nmi_category", "purity_style", *level_keys)] + [loss]) + " |")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _ms(values, digits=4) -> str:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], float)
    if len(v) == 0:
        return "n/a"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", default=os.path.join(ROOT, "conf", "local.yaml"))
    p.add_argument("--data-root", default=os.path.join(ROOT, "data", "quality"),
                   help="stage 1 is built here when its tables are missing, else reused")
    p.add_argument("--preset", default="demo", choices=("tiny", "demo", "bench"))
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--steps", type=int, default=30, help="pre-training steps per encoder")
    p.add_argument("--batch-size", type=int, default=32, help="PVs per pre-training step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone", default="tiny_cnn")
    p.add_argument("--image-px", type=int, default=96)
    p.add_argument("--clusters", type=int, default=128)
    p.add_argument("--levels", default=[], type=lambda s: [int(x) for x in s.split(",") if x],
                   help="coarser cluster levels, coarsest first (e.g. 8,32): adds the multi_cluster rows")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--ctr-epochs", type=int, default=3)
    p.add_argument("--ctr-batch-size", type=int, default=None, help="default: ctr.batch_size of the config")
    p.add_argument("--budget-min", type=float, default=None,
                   help="do not start a seed that would end past this many minutes (the run reports whole seeds)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--encoders", default=",".join(ENCODERS), type=lambda s: s.split(","))
    p.add_argument("--modes", default="none,cluster_id,vector,simscore,multi_cluster", type=lambda s: s.split(","))
    p.add_argument("--spark-attach-check", action="store_true",
                   help="once: build the eval frame through features.attach on Spark too (time + equality)")
    p.add_argument("--workdir", default=None, help="encoder checkpoints (default: <data-root>/quality_runs)")
    p.add_argument("--reuse-encoders", action="store_true",
                   help="load an encoder this script trained before in the workdir with the same settings "
                        "(its settings.json) instead of training it again (e.g. to re-run only the CTR rows)")
    p.add_argument("--out", default=None, help="results JSON (default: <data-root>/quality_results.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--report-only", default=None, metavar="JSON[,JSON..]",
                   help="print the tables of results JSONs and exit (several: runs of the same data and settings "
                        "with different encoders, e.g. run side by side, merged per seed)")
    args = p.parse_args(argv)
    if args.report_only:
        print(tables(merge_results(args.report_only.split(","))))
        return 0
    unknown = set(args.encoders) - set(ENCODERS)
    if unknown:
        p.error(f"unknown encoders {sorted(unknown)}; one of {list(ENCODERS)}")
    args.workdir = args.workdir or os.path.join(args.data_root, "quality_runs")
    args.out = args.out or os.path.join(args.data_root, "quality_results.json")
    out = run(args)
    print("\n" + out["tables"])
    print(f"\nwall {out['wall_s']:.0f}s (stage 1 {out['stage1_s']:.0f}s); results {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
