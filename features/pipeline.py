"""Orchestration of stages 3-4 (what the jobs call): read tables, run the transforms, write in as few
commits as possible, and return a report whose counts add up. Jobs stay thin: config, session, MLflow.

Writes (each one Delta commit; see etl.tables.TableStore.replace_partitions):
- item_embeddings: partitions (encoder_version, dt)   dt = the item's first-seen date
- item_clusters:   partitions (feature_version, dt)
- ctr_train:       partitions (dt)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from etl import catalog as T, registry
from etl.config import Config
from etl.contracts import CLUSTERS_MODEL
from etl.tables import TableStore, commit_metadata
from features import NO_IMAGE_CLUSTER_ID
from features import attach as A
from features import clustering as K
from features.embed import embed_images
from etl.registry import (ClustersSpec, EncoderSpec, RegistryError, clusters_index_bytes, clusters_spec, encoder_spec,
                          encoder_state_bytes, parse_ref, register_clusters)

log = logging.getLogger(__name__)

REFRESH_DATE = "refresh_date"  # item_clusters / ctr_train commit metadata: the day whose refresh committed the rows
# item_clusters commit metadata: the ctr_train dates that refresh attempt went on to re-attach (JSON list)
ATTACH_DATES = "attach_dates"
# ctr_train commit metadata of a refresh: the item_clusters version its rows were attached after
CLUSTERS_VERSION = "item_clusters_version"


class FeatureError(RuntimeError):
    pass


@dataclass
class Report:
    job: str
    counts: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)  # table -> new version (absent: not written)
    info: dict = field(default_factory=dict)
    identities: list = field(default_factory=list)  # (text, left, right)

    def check(self) -> None:
        bad = [f"{t}: {a} != {b}" for t, a, b in self.identities if a != b]
        if bad:
            raise FeatureError(f"{self.job}: counts do not add up: " + "; ".join(bad))

    def render(self) -> str:
        lines = [f"[{self.job}] " + ", ".join(f"{k}={v}" for k, v in self.counts.items())]
        lines += [f"[{self.job}] check {t}: {a} = {b} {'ok' if a == b else 'MISMATCH'}" for t, a, b in self.identities]
        if self.versions:
            lines.append(f"[{self.job}] tables: " + ", ".join(f"{t} v{v}" for t, v in self.versions.items()))
        lines += [f"[{self.job}] {k}: {v}" for k, v in self.info.items()]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)


# ---- shared pieces ------------------------------------------------------------------------------
@dataclass
class Encoder:
    spec: EncoderSpec
    state_bc: object


@dataclass
class Clusters:
    spec: ClustersSpec
    index_bc: object
    level_parents: np.ndarray | None = None  # (levels, C): coarser ids per fine id; None = one level

    def level_map(self, spark) -> DataFrame | None:
        """(cluster_id, cluster_levels) for every fine id and the reserved id (every level reserved),
        or None for a one-level clustering: a small table, broadcast where it is joined."""
        if self.level_parents is None:
            return None
        k = len(self.level_parents)
        rows = [(int(c), [int(x) for x in self.level_parents[:, c]]) for c in range(self.level_parents.shape[1])]
        rows.append((NO_IMAGE_CLUSTER_ID, [NO_IMAGE_CLUSTER_ID] * k))
        return spark.createDataFrame(rows, "cluster_id int, cluster_levels array<int>")


def load_encoder(spark, ref: str, held: "_Cache | None" = None) -> Encoder:
    """The encoder's weights broadcast to the executors; destroyed when `held` ends (else the caller's)."""
    spec = encoder_spec(ref)
    return Encoder(spec, _broadcast(spark, encoder_state_bytes(spec), held))


def load_clusters(spark, ref: str, held: "_Cache | None" = None) -> Clusters:
    """The clustering's index broadcast to the executors; destroyed when `held` ends (else the caller's)."""
    spec = clusters_spec(ref)
    data = np.frombuffer(clusters_index_bytes(spec), dtype=np.uint8)
    return Clusters(spec, _broadcast(spark, data, held), registry.clusters_level_parents(spec))


def _broadcast(spark, value, held: "_Cache | None"):
    return held.broadcast(spark, value) if held is not None else spark.sparkContext.broadcast(value)


def _embed(cfg: Config, enc: Encoder, keep=()) -> Callable[[DataFrame], DataFrame]:
    f = cfg.features
    return lambda df: embed_images(df, enc.spec, enc.state_bc, f.embed_batch_size, f.executor_threads, keep=keep)


def _assign(cfg: Config, clu: Clusters, keep=()) -> Callable[[DataFrame], DataFrame]:
    return lambda df: K.assign_frame(df, clu.index_bc, clu.spec.clusters_version, clu.spec.dim,
                                     cfg.features.executor_threads, keep=keep)


def _arrow_batch(spark, cfg: Config) -> None:
    # Rows per Arrow batch = per FAISS search call / encoder chunk: thousands amortise the Python hop.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.features.attach_batch_size))


def _partition_stats(files, key: str) -> dict:
    """{value of `key`: (rows, oldest, newest)} over a table's files: the partition's row count (the files'
    statistics) and the oldest and newest modification time of its files (ms; None when not recorded)."""
    rows: dict = {}
    times: dict = {}
    for f in files:
        v = f.partition_values.get(key)
        rows[v] = rows.get(v, 0) + (f.num_records or 0)
        if f.modified_ms is not None:
            times.setdefault(v, []).append(f.modified_ms)
    return {v: (n, min(times[v]) if v in times else None, max(times[v]) if v in times else None)
            for v, n in rows.items()}


def ctr_log_digests(files) -> dict:
    """{dt: sha256 of the names of the date's ctr_log data files (with their folder), sorted}. Delta never
    rewrites a file: a date's rows change only with its set of files (any rebuild writes new ones, forced
    or not), and a copy of the tables root keeps the names whatever it does to their times."""
    names: dict = {}
    for f in files:
        names.setdefault(f.partition_values.get("dt"), []).append("/".join(f.uri.rsplit("/", 2)[-2:]))
    return {d: hashlib.sha256("\n".join(sorted(n)).encode()).hexdigest() for d, n in names.items() if d}


@dataclass(frozen=True)
class LogSnapshot:
    """The ctr_log an attach reads: one version (the published one; a build publishing meanwhile changes
    nothing here), its files, and the digest of each date's files (`ctr_log_digests`). `record`: ctr_train
    takes the digests (a new table, or one that has the column: etl.tables refuses to mix two schemas)."""
    version: int | None
    files: list
    digests: dict
    record: bool

    def read(self, store: TableStore, dates) -> DataFrame:
        return store.read(T.CTR_LOG, self.version, partitions={"dt": list(dates)})

    def stamp(self, ctr_train: DataFrame, dates) -> DataFrame:
        """ctr_train rows of `dates` with the digest of the ctr_log files they were attached from."""
        if not self.record:
            return ctr_train
        known = [x for d in sorted(dates) if d in self.digests for x in (F.lit(d), F.lit(self.digests[d]))]
        digest = F.element_at(F.create_map(*known), F.col("dt").cast("string")) if known else F.lit(None)
        return ctr_train.select(*[c for c in ctr_train.columns if c != "dt"],
                                digest.cast("string").alias(T.CTR_LOG_DIGEST), "dt")


def records_digests(store: TableStore) -> bool:
    """Whether ctr_train takes ctr_log digests: a new table, or one written since the column exists."""
    return not store.exists(T.CTR_TRAIN) or T.CTR_LOG_DIGEST in store.columns(T.CTR_TRAIN)


def log_snapshot(store: TableStore) -> LogSnapshot:
    version = store.version(T.CTR_LOG)
    files = store.files(T.CTR_LOG, version)
    record = records_digests(store)
    if not record:
        log.warning("%s predates %s: a rebuilt ctr_log date is found by its row count and file times only; "
                    "attach every date under a new tables root (or drop %s) to record them",
                    T.CTR_TRAIN, T.CTR_LOG_DIGEST, T.CTR_TRAIN)
    return LogSnapshot(version, files, ctr_log_digests(files), record)


def _attached(store: TableStore) -> dict:
    """{dt: (feature_version, ctr_log digest or None)} of the ctr_train partitions; a partition holding
    more than one pair (none written here) maps to (None, None): attached again."""
    if not store.exists(T.CTR_TRAIN):
        return {}
    train = store.read(T.CTR_TRAIN)
    digest = F.col(T.CTR_LOG_DIGEST) if T.CTR_LOG_DIGEST in train.columns else F.lit(None).cast("string")
    out: dict = {}
    for row in train.select("dt", "feature_version", digest.alias("digest")).distinct().collect():
        pair = (row["feature_version"], row["digest"])
        out[row["dt"]] = pair if out.get(row["dt"], pair) == pair else (None, None)
    return out


def stale_dates(fv: str, digests: dict, attached: dict, log_stats: dict, train_stats: dict) -> set:
    """The dates whose ctr_train partition must be attached again: a ctr_log date (`log_stats`' keys)
    whose partition is missing, of another feature version than `fv`, or attached from ctr_log files that
    were replaced since (a rebuild: new raw files, other settings or rules, or forced); and an attached
    date whose ctr_log has no rows now (rebuilt empty: its ctr_train partition is emptied).

    digests: {dt: digest of ctr_log's files now} (`ctr_log_digests`); attached: {dt: (feature_version,
    recorded digest)} (`_attached`); *_stats: {dt: (rows, oldest, newest file time)} (`_partition_stats`).
    Where the partition recorded a digest, the digests decide, whatever the files' times say (a copy that
    keeps or resets them, a build that published while the attach ran). Rows attached without one (a
    ctr_train older than the column): the row counts, from the tables' statistics, differ; or, where a
    rebuild kept the count but changed labels or histories, its ctr_log files are newer than the date's
    ctr_train files."""
    stale = set()
    for d, (rows, _, log_newest) in log_stats.items():
        version, then = attached.get(d, (None, None))
        train_rows, train_oldest, _ = train_stats.get(d, (0, None, None))
        if version != fv:
            stale.add(d)
        elif then is not None:
            if then != digests.get(d):
                stale.add(d)
        elif rows != train_rows or (None not in (log_newest, train_oldest) and log_newest > train_oldest):
            stale.add(d)
    return stale | {d for d in attached if d not in log_stats}


def _rows_in(store: TableStore, name: str, key: str, values, **fixed) -> dict:
    """{value: rows} of the table's partitions key=value (with the `fixed` partition values), 0 for none."""
    stats = _partition_stats([f for f in store.files(name)
                              if all(f.partition_values.get(k) == v for k, v in fixed.items())], key)
    return {v: stats[v][0] if v in stats else 0 for v in values}


def _dates(df: DataFrame) -> list[str]:
    return sorted(r["dt"] for r in df.select("dt").distinct().collect())


class _Cache:
    """The frames one step materialises (persisted, then counted) and the values it broadcasts (an index,
    an encoder's weights), released together when the step ends, finished or failed: a long-lived session
    (a backfill of many dates, a scheduler's worker) must not keep every day's copies in memory."""

    def __init__(self) -> None:
        self._frames: list[DataFrame] = []
        self._broadcasts: list = []

    def __enter__(self) -> "_Cache":
        return self

    def __exit__(self, *exc) -> None:
        while self._frames:
            self._frames.pop().unpersist()
        while self._broadcasts:  # after the frames: nothing computed from them is kept
            self._broadcasts.pop().destroy()

    def broadcast(self, spark, value):
        bc = spark.sparkContext.broadcast(value)
        self._broadcasts.append(bc)
        return bc

    def persist(self, df: DataFrame) -> tuple[DataFrame, int]:
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        self._frames.append(df)
        return df, df.count()


# ---- stage 3a: embeddings -----------------------------------------------------------------------
def embed_items(spark, cfg: Config, store: TableStore, dates: list[str] | None, run_id: str = "",
                job: str = "embed_items") -> Report:
    """item_images (the given first-seen dates, default all) -> item_embeddings of the encoder_ref."""
    _arrow_batch(spark, cfg)
    with _Cache() as cache:
        enc = load_encoder(spark, cfg.features.encoder_ref, cache)
        ev = enc.spec.encoder_version
        images = store.read(T.ITEM_IMAGES)
        if dates:
            images = images.where(F.col("dt").isin(dates))
        todo = dates or _dates(images)
        r = Report(job, info={"encoder": enc.spec.ref, "encoder_version": ev, "dates": todo})
        out, n = cache.persist(_embed(cfg, enc, keep=("dt",))(images.select("item_id", "image", "dt")))
        undecodable = out.where(F.col("embedding").isNull()).count()
        r.counts = {"item_images": images.count(), "item_embeddings": n, "embedded": n - undecodable,
                    "undecodable": undecodable}
        r.identities = [("item_images = item_embeddings", r.counts["item_images"], n)]
        r.check()  # verify, before the commit: a mismatch writes nothing
        r.versions[T.ITEM_EMBEDDINGS] = store.replace_partitions(out, T.ITEM_EMBEDDINGS, by="dt", values=todo,
                                                                 fixed={"encoder_version": ev}, job=job,
                                                                 run_id=run_id)
    return r


# ---- stage 3b: clusters -------------------------------------------------------------------------
def _sample_matrix(emb: DataFrame, n: int, seed: int) -> np.ndarray:
    """At most n usable embeddings, chosen by a stable hash of item_id (same sample on any cluster)."""
    return K.collect_matrix(K.sample_items(emb.where(F.col("embedding").isNotNull()), n, seed), "embedding")


def current_clusters_match(cfg: Config, store: TableStore) -> ClustersSpec | None:
    """The clusters_ref version when it already is what build_clusters would make (same encoder version,
    C, iterations, sample, seed, levels, index kind and its HNSW settings, drift quantile) and
    item_clusters holds it; else None."""
    try:
        mv = registry.resolve(cfg.features.clusters_ref)  # once: an alias moved meanwhile must not mix two versions
        spec = registry.clusters_spec_of(mv)
    except RegistryError:
        return None
    return spec if _built_as_configured(cfg, mv, spec) and _item_clusters_hold(store, spec.feature_version) else None


def _built_as_configured(cfg: Config, mv, spec: ClustersSpec) -> bool:
    """A courier-clusters version built from the encoder at features.encoder_ref with today's settings."""
    f, tags = cfg.features, mv.tags or {}
    try:
        enc = encoder_spec(f.encoder_ref)
    except RegistryError:
        return False
    same = (spec.encoder_version == enc.encoder_version and tags.get("n_clusters") == str(f.n_clusters)
            and tags.get("kmeans_iters") == str(f.kmeans_iters) and tags.get("kmeans_sample") == str(f.kmeans_sample)
            and tags.get("kmeans_seed") == str(f.kmeans_seed)
            and spec.levels == tuple(f.levels) and spec.far_quantile == f.drift_far_quantile)
    kind = K.index_type(f.n_clusters, f.large_c_threshold)
    # A version built before its HNSW settings were tagged has none: taken as built with these.
    return same and tags.get("index_type", kind) == kind and (kind != "hnsw" or (
        tags.get("hnsw_m", str(f.hnsw_m)) == str(f.hnsw_m)
        and tags.get("hnsw_ef_search", str(f.hnsw_ef_search)) == str(f.hnsw_ef_search)))


def _item_clusters_hold(store: TableStore, fv: str) -> bool:
    return store.exists(T.ITEM_CLUSTERS) and any(fl.partition_values.get("feature_version") == fv
                                                 for fl in store.files(T.ITEM_CLUSTERS))


def _register_clusters(index, centroids, parents, stats: dict, sizes: dict, run_id: str, tags: dict):
    """The index, centroids, level parents and cluster sizes as the run's artifacts, registered as a new
    courier-clusters version (no alias yet: it moves only after item_clusters holds the version, so that
    readers never see one without the other)."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, os.path.join(tmp, "index.faiss"))
        np.save(os.path.join(tmp, "centroids.npy"), centroids)
        if parents is not None:
            np.save(os.path.join(tmp, "levels.npy"), parents)
        with open(os.path.join(tmp, "stats.json"), "w") as fh:
            json.dump({**stats, "sizes": {str(k): v for k, v in sorted(sizes.items())}}, fh)
        return register_clusters(tmp, run_id, tags)


def _require_embedded(store: TableStore, items: DataFrame, emb: DataFrame, ev: str) -> None:
    """Every item with an image has a row of encoder version ev (null when the image did not decode);
    one without would be clustered as having no image (a refresh revisits a clustered item only when its
    date is rebuilt, `changed_items`)."""
    images = store.read(T.ITEM_IMAGES).select("item_id")
    todo = (items.join(images, on="item_id", how="left_semi").join(emb.select("item_id"), on="item_id", how="left_anti")
            .groupBy("dt").count().orderBy("dt").collect())
    if todo:
        dates = [r["dt"] for r in todo]
        raise FeatureError(f"{sum(r['count'] for r in todo)} items with an image have no embedding of {ev} "
                           f"(first seen {dates[0]}..{dates[-1]}, {len(dates)} date(s)): run jobs/embed_items.py "
                           "for those dates (or all) first")


def _require_published(cfg: Config, store: TableStore, fv: str) -> None:
    """A clustering is usable once build_clusters wrote its item_clusters (a failed or running build's
    registered version is not)."""
    if not _item_clusters_hold(store, fv):
        raise FeatureError(f"item_clusters has no rows of {fv} ({cfg.features.clusters_ref}): run "
                           "jobs/build_clusters.py first, or name a clustering it published")


def _refuse_a_reused_feature_version(store: TableStore, fv: str) -> None:
    """A fresh clusters version's feature_version is in no table. It is when the registry numbers versions
    from 1 again over old tables (a new tracking database)."""
    used = _item_clusters_hold(store, fv) or store.exists(T.CTR_TRAIN) and bool(
        store.read(T.CTR_TRAIN).where(F.col("feature_version") == fv).limit(1).collect())
    if used:
        raise FeatureError(
            f"feature_version {fv!r} is already in item_clusters or ctr_train, from another clustering: the MLflow "
            "registry restarted its version numbers (a new tracking server or database over old tables). Nothing "
            "was written and the new version was removed. Point tables_root at a new folder, or keep the "
            "registry that made these tables.")


def _write_item_clusters(store: TableStore, r: Report, assigned: DataFrame, n_assigned: int, dates: list[str],
                         fv: str, job: str, run_id: str) -> None:
    """item_clusters of feature version fv: every item once, checked before the commit (nothing written
    on a mismatch) and after it, before any alias can move."""
    n_items = r.counts["items"]
    r.identities = [("items = assigned + no_image", n_items, r.counts["assigned"] + r.counts["no_image"]),
                    ("items = rows assigned", n_items, n_assigned)]
    r.check()
    r.versions[T.ITEM_CLUSTERS] = store.replace_partitions(
        assigned.select("item_id", "cluster_id", "distance", "dt"), T.ITEM_CLUSTERS, by="dt", values=dates,
        fixed={"feature_version": fv}, job=job, run_id=run_id)
    r.counts["item_clusters"] = sum(_rows_in(store, T.ITEM_CLUSTERS, "dt", dates, feature_version=fv).values())
    r.identities.append(("items = item_clusters", n_items, r.counts["item_clusters"]))
    r.check()


def _may_hold(store: TableStore, r: Report, fv: str) -> bool:
    """Whether item_clusters may hold rows of fv after a failure: its commit returned, or it landed and
    then its version lookup (or a SIGTERM) failed; when even that cannot be read, taking back is safe."""
    try:
        return T.ITEM_CLUSTERS in r.versions or _item_clusters_hold(store, fv)
    except Exception:  # noqa: BLE001 - emptying partitions that hold nothing of fv changes no row
        return True


def _take_back_item_clusters(store: TableStore, assigned: DataFrame, dates: list[str], fv: str, job: str,
                             run_id: str) -> None:
    """Empty feature version fv's item_clusters partitions again: its registry version is about to go, and
    rows of a version no registry entry describes would be kept for ever (and block the number's reuse)."""
    try:
        store.replace_partitions(assigned.select("item_id", "cluster_id", "distance", "dt").limit(0), T.ITEM_CLUSTERS,
                                 by="dt", values=dates, fixed={"feature_version": fv}, job=job, run_id=run_id)
    except Exception as e:  # noqa: BLE001 - the original failure is the one raised; this one is logged
        log.error("item_clusters keeps the rows of feature_version %s, whose clusters version is removed (%s: %s); "
                  "they are read by nothing", fv, type(e).__name__, e)


def clusters_built_for(cfg: Config, store: TableStore, build_key: str,
                       as_configured: bool = True) -> ClustersSpec | None:
    """The clustering a build_clusters run with this `build_key` registered and committed to
    item_clusters: a retry of a build that finished, or that stopped between that commit and the alias
    move (publish_built then moves it); else None. as_configured: only one built from today's encoder
    and settings (a run cleared after its encoder or features.* changed builds again; the newest build
    with the key is the one a later retry finds)."""
    name, kind, _ = parse_ref(cfg.features.clusters_ref)
    mv = registry.find_by_tags(name, {"build_key": build_key}) if build_key and kind == "alias" else None
    if mv is None:
        return None
    spec = registry.clusters_spec_of(mv)
    if as_configured and not _built_as_configured(cfg, mv, spec):
        return None
    return spec if _item_clusters_hold(store, spec.feature_version) else None


def publish_built(cfg: Config, spec: ClustersSpec) -> str:
    """Point clusters_ref's alias at `spec` (clusters_built_for's) when the build stopped before moving
    it; never back over a newer clustering another build published since. What was done, in words."""
    name, _, alias = parse_ref(cfg.features.clusters_ref)
    now = registry.alias_version(name, alias)
    if now is not None and int(now.version) >= int(spec.version):
        return (f"{cfg.features.clusters_ref} is v{now.version}" + (" already" if str(now.version) == spec.version
                                                                     else f", newer than v{spec.version}"))
    registry.set_alias(name, alias, spec.version)
    return f"{cfg.features.clusters_ref} moved to v{spec.version} (the build had stopped before moving it)"


def build_clusters(spark, cfg: Config, store: TableStore, run_id: str, job: str = "build_clusters",
                   build_key: str = "") -> Report:
    """k-means over item_embeddings of encoder_ref -> a new courier-clusters version (index, centroids,
    stats in MLflow) and item_clusters for every item (reserved id where no usable embedding).
    `build_key` is kept on the version (clusters_built_for finds it)."""
    f = cfg.features
    _, kind_ref, alias = parse_ref(f.clusters_ref)
    if kind_ref != "alias":  # before any work: a version nothing reads would be all it made
        raise FeatureError(f"features.clusters_ref is {f.clusters_ref!r}, a pinned version: build_clusters publishes "
                           "a clustering by moving an alias, which refresh and attach then read. Set it to "
                           f"{CLUSTERS_MODEL}@<alias> (e.g. --set features.clusters_ref={CLUSTERS_MODEL}@current)")
    _arrow_batch(spark, cfg)
    enc = encoder_spec(f.encoder_ref)
    ev = enc.encoder_version
    if not store.exists(T.ITEM_EMBEDDINGS):
        raise FeatureError("item_embeddings does not exist: run jobs/embed_items.py first")
    emb = store.read(T.ITEM_EMBEDDINGS).where(F.col("encoder_version") == ev).select("item_id", "embedding")
    items = store.read(T.ITEMS).select("item_id", "dt")
    # Before the sample (it needs unique ids) and k-means (hours at scale): a table that cannot be clustered.
    for frame, table in ((items, T.ITEMS), (emb, f"{T.ITEM_EMBEDDINGS} of {ev}")):
        dup = frame.groupBy("item_id").count().where("count > 1 or item_id is null").limit(5).collect()
        if dup:
            raise FeatureError(f"{table} holds item ids more than once, or null ones (e.g. "
                               f"{[r['item_id'] for r in dup]})")
    x = _sample_matrix(emb, f.kmeans_sample, f.kmeans_seed)
    if len(x) < f.n_clusters:
        raise FeatureError(f"{len(x)} usable embeddings of {ev} for n_clusters={f.n_clusters}: run embed_items "
                           "for this encoder first, or lower features.n_clusters")
    kind = K.index_type(f.n_clusters, f.large_c_threshold)
    import time

    t0 = time.perf_counter()
    centroids = K.train_kmeans(x, f.n_clusters, f.kmeans_iters, f.kmeans_seed, f.kmeans_sample, kind,
                               f.hnsw_m, f.hnsw_ef_search)
    train_s = time.perf_counter() - t0
    index = K.build_index(centroids, kind, f.hnsw_m, f.hnsw_ef_search)
    parents = K.level_parents(centroids, f.levels, f.kmeans_iters, f.kmeans_seed) if f.levels else None
    data = K.serialize(index)
    key = f"build-{run_id or os.getpid()}"
    _require_embedded(store, items, emb, ev)
    n_items = items.count()
    # Every catalog item gets a row: no embedding (no usable image) -> null -> the reserved id.
    src = items.join(emb, on="item_id", how="left")
    with _Cache() as cache:  # released before the alias moves, and on any failure
        bc = cache.broadcast(spark, data)
        assigned, n = cache.persist(K.assign_frame(src, bc, key, int(x.shape[1]), f.executor_threads,
                                                   keep=("dt",)))
        sizes = {r["cluster_id"]: r["count"] for r in assigned.groupBy("cluster_id").count().collect()}
        ids = np.repeat(np.array(list(sizes), np.int64), np.array(list(sizes.values()), np.int64))
        stats = K.cluster_stats(ids, f.n_clusters)
        # The drift measure's yardstick: the training rows' distances as unseen items would have them.
        base = K.leave_one_out_distances(x, index)
        far = float(np.quantile(base, f.drift_far_quantile)) if len(base) else float("nan")
        mean = float(base.mean()) if len(base) else float("nan")
        tags = registry.clusters_tags(enc, f, int(x.shape[1]), kind, far, mean, len(x), build_key)
        mv = _register_clusters(index, centroids, parents, stats, sizes, run_id, tags)
        fv = clusters_spec(f"{mv.name}/{mv.version}").feature_version
        r = Report(job, info={"encoder": enc.ref, "clusters": f"{mv.name}/{mv.version}", "feature_version": fv,
                              "index_type": kind, "kmeans_seconds": round(train_s, 2), "cluster_stats": stats})
        r.counts = {"items": n_items, "assigned": stats["items"], "no_image": int(sizes.get(NO_IMAGE_CLUSTER_ID, 0)),
                    "trained_on": len(x), "empty_clusters": stats["empty_clusters"]}
        dates = None
        try:
            _refuse_a_reused_feature_version(store, fv)
            dates = _dates(items)
            _write_item_clusters(store, r, assigned, n, dates, fv, job, run_id)
        except BaseException:
            registry.delete_version(mv.name, mv.version)  # no ref may resolve to a clustering never published
            if dates is not None and _may_hold(store, r, fv):  # committed, then the job failed: rows go too
                _take_back_item_clusters(store, assigned, dates, fv, job, run_id)
            raise
    registry.set_alias(mv.name, alias, mv.version)
    r.info["alias"] = f"@{alias} -> v{mv.version}"
    return r


# ---- stage 4: attach ----------------------------------------------------------------------------
def feature_lookup(cfg: Config, store: TableStore, clu: Clusters, enc: Encoder | None, ctr_log: DataFrame,
                   extra_clusters: DataFrame | None = None, extra_embeddings: DataFrame | None = None
                   ) -> tuple[DataFrame, DataFrame]:
    """(features for every item ctr_log mentions, the on-the-fly subset (item_id)). Known items come from
    item_clusters/item_embeddings of the clustering's versions (plus not-yet-committed extras); the
    others are embedded and assigned on the fly with the broadcast index."""
    spec = clu.spec
    clusters = (store.read(T.ITEM_CLUSTERS).where(F.col("feature_version") == spec.feature_version)
                if store.exists(T.ITEM_CLUSTERS) else None)
    embeddings = (store.read(T.ITEM_EMBEDDINGS).where(F.col("encoder_version") == spec.encoder_version)
                  if store.exists(T.ITEM_EMBEDDINGS) else None)
    # Extras win: a rerun after a partial commit, an item of a rebuilt date whose image changed.
    if embeddings is not None and extra_embeddings is not None:
        embeddings = embeddings.join(extra_embeddings.select("item_id"), on="item_id", how="left_anti")
    if clusters is not None and extra_clusters is not None:
        clusters = clusters.join(extra_clusters.select("item_id"), on="item_id", how="left_anti")
    parts_c = [d.select("item_id", "cluster_id") for d in (clusters, extra_clusters) if d is not None]
    parts_e = [d.select("item_id", "embedding") for d in (embeddings, extra_embeddings) if d is not None]
    spark = ctr_log.sparkSession
    if not parts_c:
        parts_c = [spark.createDataFrame([], "item_id string, cluster_id int")]
    if not parts_e:
        parts_e = [spark.createDataFrame([], "item_id string, embedding array<float>")]
    union = lambda ps: ps[0] if len(ps) == 1 else ps[0].unionByName(ps[1])  # noqa: E731
    known = A.known_features(union(parts_c), union(parts_e))
    needed = A.needed_items(ctr_log)
    missing = needed.join(known.select("item_id"), on="item_id", how="left_anti")
    if enc is None:
        raise FeatureError("feature_lookup needs the encoder for items not yet clustered")
    images = store.read(T.ITEM_IMAGES).select("item_id", "image")
    fly = A.on_the_fly_features(missing, images, _embed(cfg, enc), _assign(cfg, clu, keep=("embedding",)))
    return known.join(needed, on="item_id", how="left_semi").unionByName(fly), missing


def attach_dates(spark, cfg: Config, store: TableStore, dates: list[str], run_id: str = "",
                 job: str = "attach_features") -> Report:
    """ctr_log partitions (dates) -> ctr_train partitions, one commit for all of them."""
    _arrow_batch(spark, cfg)
    with _Cache() as cache:
        clu = load_clusters(spark, cfg.features.clusters_ref, cache)
        _require_published(cfg, store, clu.spec.feature_version)
        snap = log_snapshot(store)
        ctr = snap.read(store, dates)
        r = Report(job, info={"feature_version": clu.spec.feature_version, "dates": dates})
        out, missing, n_feats = _attach_with(spark, cfg, store, clu, ctr, cfg.features.include_vector, cache)
        out, _ = cache.persist(snap.stamp(out, dates))
        _count_attached(r, ctr, out, dates)
        r.counts.update({"on_the_fly_items": missing.count(), "feature_items": n_feats})
        r.check()  # verify, before the commit: a mismatch writes nothing
        r.versions[T.CTR_TRAIN] = store.replace_partitions(out, T.CTR_TRAIN, by="dt", values=dates, job=job,
                                                           run_id=run_id)
    return r


def attached_rows(spark, cfg: Config, store: TableStore, ctr_log: DataFrame, clusters_ref: str,
                  columns: list[str]):
    """`columns` of ctr_log rows attached with the clustering `clusters_ref`, collected to pandas and
    written nowhere: the review scores a champion of an older feature version on the impressions its
    challenger is evaluated on, with the features that clustering gives them (its item_clusters rows;
    items it never clustered embedded and assigned on the fly, as its daily refresh would have)."""
    _arrow_batch(spark, cfg)
    with _Cache() as cache:
        clu = load_clusters(spark, clusters_ref, cache)
        out, _, _ = _attach_with(spark, cfg, store, clu, ctr_log, "item_vector" in columns, cache)
        return out.select(*[c for c in columns if c in out.columns]).toPandas()


def _attach_with(spark, cfg: Config, store: TableStore, clu: Clusters, ctr_log: DataFrame, include_vector: bool,
                 cache: _Cache, enc: Encoder | None = None, extra_clusters: DataFrame | None = None,
                 extra_embeddings: DataFrame | None = None) -> tuple[DataFrame, DataFrame, int]:
    """(ctr_log rows attached with the clustering `clu`, the items assigned on the fly, the feature
    items): its encoder loaded (unless given), every item's features looked up once (with the extras of
    `feature_lookup`; materialised, checked unique)."""
    enc = enc or load_encoder(spark, clu.spec.encoder_ref, cache)
    feats, missing = feature_lookup(cfg, store, clu, enc, ctr_log, extra_clusters, extra_embeddings)
    feats, n_feats = cache.persist(feats)
    _check_unique(feats)
    return (A.attach(ctr_log, feats, clu.spec.feature_version, include_vector, clu.spec.dim, clu.level_map(spark)),
            missing, n_feats)


def _check_unique(feats: DataFrame) -> None:
    dup = feats.groupBy("item_id").count().where("count > 1").limit(5).collect()
    if dup:  # a duplicate would multiply impressions: refuse rather than break conservation
        raise FeatureError(f"item features hold item ids more than once: {[r['item_id'] for r in dup]}")


def _count_attached(r: Report, ctr: DataFrame, out: DataFrame, dates: list[str]) -> None:
    """One ctr_train row per ctr_log impression, per date, counted on the materialised rows before they
    are committed; and the impressions whose item has no usable image (the reserved id)."""
    inn = {row["dt"]: row["count"] for row in ctr.groupBy("dt").count().collect()}
    outn, reserved = {}, 0
    for row in out.groupBy("dt").agg(F.count("*").alias("n"), F.sum(
            (F.col("item_cluster_id") == NO_IMAGE_CLUSTER_ID).cast("int")).alias("reserved")).collect():
        outn[row["dt"]], reserved = row["n"], reserved + (row["reserved"] or 0)
    r.counts.update({"ctr_log": sum(inn.values()), "ctr_train": sum(outn.values()), "reserved_item_ids": reserved})
    r.identities += [(f"ctr_log({d}) = ctr_train({d})", inn.get(d, 0), outn.get(d, 0)) for d in dates]


# ---- the daily refresh: plan -> compute -> verify -> commit -------------------------------------------
@dataclass
class RefreshPlan:
    """What one day's refresh touches: the current clustering and its encoder, the items first seen up
    to the day and not yet clustered (`new`, materialised), and the ctr_train partitions to (re)attach."""
    date: str
    clu: Clusters
    enc: Encoder
    clustered: DataFrame  # item_clusters rows of the current feature version
    new: DataFrame
    n_new: int
    log: LogSnapshot | None = None  # the ctr_log the affected partitions are attached from
    new_dates: list[str] = field(default_factory=list)
    affected: list[str] = field(default_factory=list)
    drift_dates: list[str] = field(default_factory=list)  # the dates whose items the drift measure covers
    rebuilt: list[str] = field(default_factory=list)  # dates whose items are embedded again (rebuilt_dates)

    @property
    def fv(self) -> str:
        return self.clu.spec.feature_version

    @property
    def ev(self) -> str:
        return self.clu.spec.encoder_version


def refresh(spark, cfg: Config, store: TableStore, date: str, run_id: str = "", job: str = "refresh_features",
            hook: Callable[[str], None] | None = None) -> Report:
    """Embed the items not yet clustered (first seen up to `date`), assign them to the current clusters,
    and re-attach the ctr_train partitions that need it; everything is computed and materialised before
    the first commit, then item_embeddings, item_clusters and ctr_train are committed in that order.

    A failure before the commits leaves every table as it was; a failure between two commits leaves
    each table whole and consistent on its own, and a rerun completes the rest (merges drop the rows
    they replace). A rerun of a finished day finds nothing to do and commits nothing.
    ``hook(stage)`` is called at "computed" and after each commit (tests inject failures there).
    """
    hook = hook or (lambda stage: None)
    _arrow_batch(spark, cfg)
    with _Cache() as cache:  # every materialised frame is released at the end, failed or not
        plan = plan_refresh(spark, cfg, store, date, cache)
        r = Report(job, info={"date": date, "feature_version": plan.fv})
        staged = compute_refresh(cfg, store, plan, r, cache)
        r.check()  # verify, before any commit: a mismatch writes nothing
        hook("computed")
        commit_refresh(store, plan, staged, r, job, run_id, hook)
    if not r.versions:
        r.info["noop"] = "nothing new since the last run: no table changed"
    return r


def rebuilt_dates(fv: str, digests: dict, attached: dict) -> set:
    """The dates attached with `fv` from ctr_log files that stage 1 has replaced since (a rebuild: its
    item_images too, so an item's image may have changed, or decode now). Partitions that recorded no
    digest (older than the column) are not told apart from a compaction: left out."""
    return {d for d, (version, then) in attached.items()
            if version == fv and then is not None and digests.get(d) not in (None, then)}


# An item's vector from the same pixels can differ in the last bits (the batch it was embedded in);
# another image moves it far more.
SAME_VECTOR_TOLERANCE = 1e-4


def changed_items(cfg: Config, store: TableStore, enc: Encoder, clu: Clusters, clustered: DataFrame,
                  again: DataFrame) -> DataFrame:
    """(item_id, dt) of the items `again` (clustered items of rebuilt dates) whose image now gives another
    vector than item_embeddings holds for `enc`, or another cluster id or distance than `clustered` holds
    (an embed_items run after the rebuild renewed the vector only): a new image, one that decodes now or no
    longer, one gone. Their rows come from the old pixels, so they are embedded and assigned again.
    Costs one embedding pass over those items (a rebuild of every date, as after a rules change, embeds
    the whole catalog once more, as a new encoder does)."""
    images = store.read(T.ITEM_IMAGES).select("item_id", "image")
    now = _embed(cfg, enc, keep=("dt",))(again.join(images, on="item_id", how="inner")
                                          .select("item_id", "image", "dt")).select("item_id", "embedding")
    now = again.join(now, on="item_id", how="left")  # no image: a null vector, as compute_refresh gives it
    # assigned with its vector kept: the encoder runs once per item
    assigned = _assign(cfg, clu, keep=("embedding", "dt"))(now.select("item_id", "embedding", "dt"))
    stored = (store.read(T.ITEM_EMBEDDINGS).where(F.col("encoder_version") == enc.spec.encoder_version)
              .select("item_id", F.col("embedding").alias("stored")))
    was = clustered.select("item_id", F.col("cluster_id").alias("was_id"), F.col("distance").alias("was_distance"))
    pairs = assigned.join(stored, on="item_id", how="left").join(was, on="item_id", how="left")
    a, b = F.col("embedding"), F.col("stored")
    # NaN in the same place of both is the same (unusable) vector; a null element differs from anything
    gap = lambda x, y: F.when(F.isnan(x) & F.isnan(y), F.lit(0.0)).otherwise(F.abs(x - y))  # noqa: E731
    apart = F.aggregate(F.zip_with(a, b, gap), F.lit(0.0).cast("double"),
                        lambda m, d: F.greatest(m, F.coalesce(d.cast("double"), F.lit(float("inf")))))
    vector_differs = (a.isNull() != b.isNull()) | (a.isNotNull() & b.isNotNull() & (
        (F.size(a) != F.size(b)) | ~(apart <= SAME_VECTOR_TOLERANCE)))
    cluster_differs = ~F.col("cluster_id").eqNullSafe(F.col("was_id")) | (
        F.col("distance").isNull() != F.col("was_distance").isNull()) | ~F.coalesce(
        F.abs(F.col("distance") - F.col("was_distance")) <= SAME_VECTOR_TOLERANCE, F.lit(True))
    return pairs.where(vector_differs | cluster_differs).select("item_id", "dt")


def plan_refresh(spark, cfg: Config, store: TableStore, date: str, cache: _Cache) -> RefreshPlan:
    """The items to embed and assign (first seen up to `date`: not in item_clusters of the current
    feature version, or first seen on a date rebuilt since it was attached, `rebuilt_dates`) and the
    ctr_train partitions that need (re)attaching: missing, of another feature version, attached from a
    ctr_log rebuilt since (`stale_dates`), or mentioning one of those items."""
    clu = load_clusters(spark, cfg.features.clusters_ref, cache)
    fv = clu.spec.feature_version
    items = store.read(T.ITEMS).where(F.col("dt") <= date).select("item_id", "dt")
    _require_published(cfg, store, fv)
    snap = log_snapshot(store)
    attached_now = _attached(store)
    attached = {d: v for d, v in attached_now.items() if d <= date}
    rebuilt = sorted(rebuilt_dates(fv, snap.digests, attached))
    clustered = store.read(T.ITEM_CLUSTERS).where(F.col("feature_version") == fv)
    enc = load_encoder(spark, clu.spec.encoder_ref, cache)
    new = items.join(clustered.select("item_id"), on="item_id", how="left_anti")
    if rebuilt:
        again = items.where(F.col("dt").isin(rebuilt)).join(clustered.select("item_id"), on="item_id", how="left_semi")
        new = new.unionByName(changed_items(cfg, store, enc, clu, clustered, again))
    new, n_new = cache.persist(new)
    plan = RefreshPlan(date, clu, enc, clustered, new, n_new)
    plan.rebuilt = rebuilt
    if n_new:
        # with the dates the items' stored rows are in (an item of a rebuilt date may have been first seen
        # on another date before): _merge rewrites those partitions too, so no item is kept twice
        stored_in = [r["dt"] for r in clustered.join(new.select("item_id"), on="item_id", how="left_semi")
                     .select("dt").distinct().collect()] if rebuilt else []
        plan.new_dates = sorted(set(_dates(new)) | set(stored_in))
    clustered_before, attach_left = _earlier_attempts(store, fv, date)
    plan.drift_dates = sorted(set(plan.new_dates) | {date} | clustered_before)
    plan.log = snap
    log_files = [fl for fl in snap.files if fl.partition_values.get("dt") and fl.partition_values["dt"] <= date]
    log_dates = sorted({fl.partition_values["dt"] for fl in log_files})
    stale = stale_dates(fv, snap.digests, attached, _partition_stats(log_files, "dt"),
                        _partition_stats(store.files(T.CTR_TRAIN), "dt") if attached else {})
    # An item is shown or clicked (so in a history) only from its first catalog date on: stage 1 quarantines
    # an event naming an item its catalog did not list by then (unknown_item). So only the ctr_log dates from
    # the earliest new item's on can mention one: a day's refresh reads its own day, not the whole log.
    mention_dates = [d for d in log_dates if plan.new_dates and d >= plan.new_dates[0]]
    if n_new and mention_dates:
        ctr_all = snap.read(store, mention_dates)
        mentions = (ctr_all.select("dt", F.explode(F.array_union(F.array("item_id"), "history")).alias("item_id"))
                    .join(new.select("item_id"), on="item_id", how="left_semi").select("dt").distinct())
        stale |= {row["dt"] for row in mentions.collect()}
    # An earlier attempt that committed item_clusters and stopped before ctr_train: the dates it meant to
    # re-attach (those mentioning its new items, which are no longer new to this attempt).
    stale |= attach_left & set(log_dates)
    # Later dates already attached with another clustering (a day refreshed after a re-cluster while later
    # days were attached: a re-run of an older scheduled day): ctr_train holds one feature version.
    stale |= {d for d, (version, _) in attached_now.items() if d > date and version != fv}
    plan.affected = sorted(stale)
    return plan


def _earlier_attempts(store: TableStore, fv: str, date: str) -> tuple[set[str], set[str]]:
    """What earlier attempts of `date`'s refresh left, from the commit metadata: (the dates whose new
    items they committed to item_clusters of `fv`, the ctr_train dates they planned to re-attach and no
    ctr_train commit of that refresh followed). A retry finds those items clustered already: it measures
    the drift over the same dates (a catch-up covers several) and re-attaches the dates still left."""
    if not store.exists(T.ITEM_CLUSTERS):
        return set(), set()
    dates: set[str] = set()
    attach: list[tuple[int, set[str]]] = []  # (item_clusters version, dates to re-attach) per attempt
    for entry in store.history(T.ITEM_CLUSTERS):
        meta = commit_metadata(entry)
        partition = json.loads(meta.get("partition") or "{}") if meta.get(REFRESH_DATE) == date else {}
        if partition.get("feature_version") == fv:
            dates.update(partition.get("dt", []))
            attach.append((entry["version"], set(json.loads(meta.get(ATTACH_DATES) or "[]"))))
    # The item_clusters version the last ctr_train commit of this day's refresh followed (versions, not
    # clocks: the attempts may run on machines whose clocks differ).
    ctr_commits = map(commit_metadata, store.history(T.CTR_TRAIN)) if attach and store.exists(T.CTR_TRAIN) else []
    done = max((int(m[CLUSTERS_VERSION]) for m in ctr_commits
                if m.get(REFRESH_DATE) == date and m.get(CLUSTERS_VERSION)), default=-1)
    return dates, set().union(*(planned for version, planned in attach if version > done))


def compute_refresh(cfg: Config, store: TableStore, plan: RefreshPlan, r: Report, cache: _Cache) -> dict:
    """Every table's new rows, materialised (nothing committed): the new items' embeddings and cluster
    ids merged into their partitions, and the affected ctr_train partitions re-attached. Fills the
    report's counts, identities and drift measure. Returns {table: (frame, rows)}."""
    f = cfg.features
    staged: dict = {}
    emb_new = clu_new = vectors_new = None
    if plan.n_new:
        images = store.read(T.ITEM_IMAGES).select("item_id", "image")
        emb_new, _ = cache.persist(_embed(cfg, plan.enc, keep=("dt",))(
            plan.new.join(images, on="item_id", how="inner").select("item_id", "image", "dt")))
        src = plan.new.join(emb_new.select("item_id", "embedding"), on="item_id", how="left")
        # every new item's vector for the attach, null where it has no image now: a changed item's
        # stored vector must not stand in for it
        vectors_new = src.select("item_id", "embedding")
        clu_new, _ = cache.persist(_assign(cfg, plan.clu, keep=("dt",))(src.select("item_id", "embedding", "dt")))
        n_assigned = clu_new.where(F.col("cluster_id") >= 0).count()
        r.counts.update({"new_items": plan.n_new, "new_assigned": n_assigned, "new_no_image": plan.n_new - n_assigned})
        staged[T.ITEM_EMBEDDINGS] = cache.persist(_merge(
            store.read(T.ITEM_EMBEDDINGS).where(F.col("encoder_version") == plan.ev)
            if store.exists(T.ITEM_EMBEDDINGS) else None, emb_new, plan, ("item_id", "embedding", "dt")))
        staged[T.ITEM_CLUSTERS] = cache.persist(_merge(plan.clustered, clu_new, plan,
                                                       ("item_id", "cluster_id", "distance", "dt")))
    else:
        r.counts.update({"new_items": 0})
    if plan.rebuilt:  # items of these dates whose image changed count among the new ones
        r.info["rebuilt_dates"] = plan.rebuilt
    _drift(cfg, plan, clu_new, r)
    champion = _champion_version(f.encoder_ref)
    if champion and champion != plan.ev:
        r.info["encoder_note"] = (f"{f.encoder_ref} is {champion} but the clusters belong to {plan.ev}: run "
                                  "embed_items and build_clusters to move the features to it")
    r.info["affected_partitions"] = plan.affected
    if plan.affected:
        ctr = plan.log.read(store, plan.affected)
        out, missing, _ = _attach_with(ctr.sparkSession, cfg, store, plan.clu, ctr, f.include_vector, cache,
                                       plan.enc, extra_clusters=clu_new, extra_embeddings=vectors_new)
        staged[T.CTR_TRAIN] = cache.persist(plan.log.stamp(out, plan.affected))
        _count_attached(r, ctr, staged[T.CTR_TRAIN][0], plan.affected)
        r.counts["on_the_fly_items"] = missing.count()
    return staged


def _merge(old: DataFrame | None, new_rows: DataFrame, plan: RefreshPlan, cols: tuple) -> DataFrame:
    """The new items' partitions: their other rows stay, rows of the new items are replaced."""
    part = new_rows.select(*cols)
    if old is None:
        return part
    return (old.where(F.col("dt").isin(plan.new_dates)).select(*cols)
            .join(plan.new.select("item_id"), "item_id", "left_anti").unionByName(part))


def _drift(cfg: Config, plan: RefreshPlan, clu_new: DataFrame | None, r: Report) -> None:
    """Share of the day's items (first seen on the dates this run touches: the day, and earlier days
    it catches up) farther than the build's far quantile from every centroid; a full re-cluster is due
    above features.drift_threshold.

    Measured on item_clusters as it stands once the run has committed (its stored rows of those dates
    plus the new assignments), not on the new items alone: a retry after item_clusters was committed
    finds no new item, and must still report the drift its first attempt saw, or a scheduler's retry
    would skip the re-cluster. The dates are the first attempt's too (`plan.drift_dates`)."""
    f, spec = cfg.features, plan.clu.spec
    dates = plan.drift_dates
    rows = plan.clustered.where(F.col("dt").isin(dates)).select("item_id", "cluster_id", "distance")
    if clu_new is not None:  # an item of a rebuilt date has a stored row too: the new one counts
        rows = (rows.join(clu_new.select("item_id"), on="item_id", how="left_anti")
                .unionByName(clu_new.select("item_id", "cluster_id", "distance")))
    d = rows.where(F.col("cluster_id") >= 0).agg(
        F.count("*").alias("n"), F.avg("distance").alias("mean"),
        F.avg((F.col("distance") > F.lit(spec.far_distance)).cast("double")).alias("far")).first()
    r.info["drift"] = {"items": d["n"], "far_share": d["far"], "mean_distance": d["mean"],
                       "build_mean_distance": spec.mean_distance, "far_distance": spec.far_distance,
                       "expected_far_share": 1 - spec.far_quantile}
    due = d["far"] is not None and d["far"] > f.drift_threshold
    r.info["recluster_due"] = due
    if due:
        r.info["message"] = (f"FULL RE-CLUSTER IS DUE: {d['far']:.1%} of the {d['n']} items first seen "
                             f"{dates[0]}..{dates[-1]} are farther than the build's {spec.far_quantile:.0%} distance "
                             f"({spec.far_distance:.4f}) from every centroid (threshold {f.drift_threshold:.0%}); "
                             "run jobs/build_clusters.py")


def commit_refresh(store: TableStore, plan: RefreshPlan, staged: dict, r: Report, job: str, run_id: str,
                   hook: Callable[[str], None]) -> None:
    """Embeddings, then clusters, then the CTR rows that use them: each table in one commit."""
    if T.ITEM_EMBEDDINGS in staged:
        r.versions[T.ITEM_EMBEDDINGS] = store.replace_partitions(
            staged[T.ITEM_EMBEDDINGS][0], T.ITEM_EMBEDDINGS, by="dt", values=plan.new_dates,
            fixed={"encoder_version": plan.ev}, job=job, run_id=run_id)
        hook("committed:item_embeddings")
        r.versions[T.ITEM_CLUSTERS] = store.replace_partitions(
            staged[T.ITEM_CLUSTERS][0], T.ITEM_CLUSTERS, by="dt", values=plan.new_dates,
            fixed={"feature_version": plan.fv}, job=job, run_id=run_id,
            extra_metadata={REFRESH_DATE: plan.date, ATTACH_DATES: json.dumps(plan.affected)})
        hook("committed:item_clusters")
    if T.CTR_TRAIN in staged:
        # what a retry of this day reads: which item_clusters commit these rows were attached after
        clusters_version = r.versions.get(T.ITEM_CLUSTERS, store.version(T.ITEM_CLUSTERS))  # this run's commit
        after = {REFRESH_DATE: plan.date, CLUSTERS_VERSION: str(clusters_version)}
        r.versions[T.CTR_TRAIN] = store.replace_partitions(staged[T.CTR_TRAIN][0], T.CTR_TRAIN, by="dt",
                                                           values=plan.affected, job=job, run_id=run_id,
                                                           extra_metadata=after)
        hook("committed:ctr_train")


def _champion_version(ref: str) -> str | None:
    try:
        return encoder_spec(ref).encoder_version
    except RegistryError:
        return None


def refresh_status(r: Report, recluster_built: bool = False) -> dict:
    """The refresh's one-line status for schedulers and operators: new items (assigned / without a usable
    image), the drift share and whether a re-cluster is due, whether one was built for this scheduler run
    already (a run cleared after its re-cluster: its drift is now measured against the clusters it built),
    and the table versions committed."""
    drift = r.info.get("drift") or {}
    return {"date": r.info.get("date"), "feature_version": r.info.get("feature_version"),
            "new_items": r.counts.get("new_items", 0), "new_assigned": r.counts.get("new_assigned", 0),
            "new_no_image": r.counts.get("new_no_image", 0), "drift_far_share": drift.get("far_share"),
            "recluster_due": bool(r.info.get("recluster_due", False)), "recluster_built": recluster_built,
            "committed": dict(r.versions), "noop": not r.versions}


def render_status(status: dict) -> str:
    share = status["drift_far_share"]
    drift = "n/a" if share is None else f"{share:.1%}{' RE-CLUSTER DUE' if status['recluster_due'] else ''}"
    if status.get("recluster_built"):
        drift += " (this run's re-cluster is built)"
    committed = ", ".join(f"{t} v{v}" for t, v in status["committed"].items()) or "nothing (no-op)"
    return (f"{status['date']} items new={status['new_items']} assigned={status['new_assigned']} "
            f"no_image={status['new_no_image']} drift={drift} committed: {committed}")


def log_report(r: Report) -> None:
    """The report printed, and logged to the active MLflow run: counts as metrics, table versions and the
    feature version as tags, the report itself as an artifact."""
    import mlflow

    print(r.render(), flush=True)
    mlflow.log_metrics({k: float(v) for k, v in r.counts.items() if isinstance(v, (int, float))})
    drift = r.info.get("drift") or {}
    mlflow.log_metrics({f"drift_{k}": float(v) for k, v in drift.items() if isinstance(v, (int, float))})
    tags = {f"table_version.{t}": str(v) for t, v in r.versions.items()}
    for key in ("feature_version", "encoder_version", "clusters", "encoder"):
        if key in r.info:
            tags[f"courier.{key}"] = str(r.info[key])
    if "recluster_due" in r.info:
        tags["courier.recluster_due"] = str(r.info["recluster_due"]).lower()
    mlflow.set_tags(tags)
    mlflow.log_text(r.to_json(), f"{r.job}_report.json")
