"""FAISS k-means on L2-normalised embeddings (inner product) and cluster assignment, on the driver
(numpy) and inside Spark (a vectorised Arrow UDF with a broadcast serialised index).

Two index kinds, for training and serving alike:
- ``flat``: exact inner-product search over the centroids (IndexFlatIP); cost ~N*C*d.
- ``hnsw``: an HNSW graph over the centroids (large C, e.g. the paper's 1e5): each assignment costs
  ~log C distance computations instead of C, so k-means at C=1e5 stays hours-not-days (see
  bench/RESULTS.md); the assignment is approximate (recall set by ``hnsw_ef_search``).
"""
from __future__ import annotations

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from features import NO_IMAGE_CLUSTER_ID, content_key

ASSIGNMENT_SCHEMA = T.StructType([
    T.StructField("item_id", T.StringType()),
    T.StructField("cluster_id", T.IntegerType()),
    T.StructField("distance", T.FloatType()),  # 1 - cos(item, centroid); null for the reserved id
])

# clusters key -> deserialised faiss index: the latest one only, per Python process (a worker lives as long as
# the session: each clustering it met would otherwise stay, ~100 MB at C = 1e5)
_INDEXES: dict = {}


def sample_items(df: DataFrame, n: int, seed: int) -> DataFrame:
    """At most n rows of df, chosen by a stable hash of item_id: the same sample on any cluster and run."""
    from pyspark.sql import functions as F

    return df.orderBy(F.xxhash64("item_id", F.lit(seed)), "item_id").limit(n)


def normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 rows, ok mask). A row with NaN/inf or zero norm is not ok (left as zeros)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1) if x.size else np.ones(len(x), bool)
    safe = np.where(finite[:, None], x, 0.0).astype(np.float32) if x.size else x
    # The norm in float64, as Spark's unit_vector takes it: in float32 the squares of a finite row of
    # values over ~1e19 overflow to inf, and the row would read as all zeros yet count as ok.
    norms = np.linalg.norm(safe.astype(np.float64), axis=1) if x.size else np.zeros(len(x))
    ok = finite & (norms > 0)
    out = np.zeros_like(safe)
    out[ok] = (safe[ok] / norms[ok, None]).astype(np.float32)
    return out, ok


def index_type(n_clusters: int, large_c_threshold: int) -> str:
    return "hnsw" if n_clusters >= large_c_threshold else "flat"


def make_index(d: int, kind: str, hnsw_m: int = 32, ef_search: int = 128):
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(d)
    index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = max(40, hnsw_m * 2)
    index.hnsw.efSearch = ef_search
    return index


def train_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, max_sample: int | None = None,
                 kind: str = "flat", hnsw_m: int = 32, ef_search: int = 128, verbose: bool = False) -> np.ndarray:
    """Spherical k-means (inner product on normalised rows) -> unit centroids (k, d) float32.

    Trains on a seeded sample of at most max_sample rows. Rows that are not ok (NaN, zero) are left out.
    """
    import faiss

    xn, ok = normalize(x)
    xn = xn[ok]
    if len(xn) < k:
        raise ValueError(f"k-means needs at least n_clusters={k} usable embeddings, got {len(xn)}")
    if max_sample and len(xn) > max_sample:
        xn = xn[np.sort(np.random.default_rng(seed).choice(len(xn), max_sample, replace=False))]
    d = xn.shape[1]
    cp = faiss.ClusteringParameters()
    cp.niter, cp.seed, cp.verbose, cp.spherical = niter, seed, verbose, True
    cp.max_points_per_centroid = max(len(xn) // k + 1, 256)  # we sampled already: no second subsample
    cp.min_points_per_centroid = 1
    clus = faiss.Clustering(d, k, cp)
    # GPU when faiss-gpu is installed and sees a device (flat only: HNSW has no GPU version).
    index = make_index(d, kind, hnsw_m, ef_search)
    if kind == "flat" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    clus.train(xn, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32)
    return normalize(centroids)[0]


def level_parents(centroids: np.ndarray, levels: list[int], niter: int = 20, seed: int = 1234) -> np.ndarray:
    """Coarser cluster ids of every fine centroid: (len(levels), C) int32, levels coarsest first.

    Hierarchical: the finest listed level is a k-means of the C fine centroids, each coarser one a
    k-means of the level below's centroids, so the ids nest (a fine id has exactly one id per level,
    and two fine ids with the same level-k id share every coarser id)."""
    parents = np.zeros((len(levels), len(centroids)), np.int32)
    below, to_below = centroids, np.arange(len(centroids))  # centroids of the level below; fine id -> its id there
    for row, k in reversed(list(enumerate(levels))):
        upper = train_kmeans(below, k, niter, seed)
        ids, _ = assign(build_index(upper, "flat"), below)
        if (ids < 0).any():
            raise ValueError("a centroid could not be assigned to a coarser level")
        parents[row] = ids[to_below]
        below, to_below = upper, parents[row]
    return parents


def build_index(centroids: np.ndarray, kind: str, hnsw_m: int = 32, ef_search: int = 128):
    index = make_index(centroids.shape[1], kind, hnsw_m, ef_search)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def serialize(index) -> np.ndarray:
    """uint8 array of the index (what Spark broadcasts and MLflow stores)."""
    import faiss

    return faiss.serialize_index(index)


def deserialize(data) -> object:
    import faiss

    arr = data if isinstance(data, np.ndarray) else np.frombuffer(bytes(data), dtype=np.uint8)
    return faiss.deserialize_index(arr)


def assign(index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x -> (cluster ids int32, cosine distances float32); NO_IMAGE_CLUSTER_ID and NaN for rows
    that cannot be assigned (NaN/inf, zero norm)."""
    xn, ok = normalize(x)
    ids = np.full(len(xn), NO_IMAGE_CLUSTER_ID, np.int32)
    dist = np.full(len(xn), np.nan, np.float32)
    if ok.any():
        sims, nn = index.search(xn[ok] if not ok.all() else xn, 1)
        ids[ok] = nn[:, 0].astype(np.int32)
        dist[ok] = (1.0 - sims[:, 0]).astype(np.float32)
    return ids, dist


def cluster_stats(ids: np.ndarray, k: int) -> dict:
    """Sizes over the assigned items (reserved ids excluded): empty clusters and imbalance
    (FAISS's factor k*sum(n_i^2)/N^2: 1 = perfectly balanced)."""
    ids = ids[ids >= 0]
    sizes = np.bincount(ids, minlength=k) if len(ids) else np.zeros(k, int)
    n = int(sizes.sum())
    return {"items": n, "clusters": k, "empty_clusters": int((sizes == 0).sum()),
            "min_size": int(sizes.min()), "max_size": int(sizes.max()), "mean_size": n / k,
            "median_size": float(np.median(sizes)),
            "imbalance": float(k * (sizes.astype(float) ** 2).sum() / n ** 2) if n else float("nan")}


def _cached_index(key: str, index_bc, threads: int):
    index = _INDEXES.get(key)
    if index is None:
        import faiss

        faiss.omp_set_num_threads(threads)  # Spark already runs one Python worker per core
        _INDEXES.clear()
        index = _INDEXES[key] = deserialize(index_bc.value)
    return index


def assign_frame(df: DataFrame, index_bc, key: str, dim: int, threads: int = 1,
                 keep: tuple[str, ...] = ()) -> DataFrame:
    """(item_id, embedding array<float>, *keep) -> (item_id, cluster_id, distance, *keep) with the
    broadcast index; `keep` columns pass through unchanged (e.g. embedding, dt: no second encoder run, no join).

    Vectorised: each Arrow batch's list column is viewed as one (n, d) float32 matrix (no per-row
    Python) and searched in one FAISS call. A null, wrong-length, NaN or zero embedding gets
    NO_IMAGE_CLUSTER_ID and a null distance. Batch size: spark.sql.execution.arrow.maxRecordsPerBatch.
    """
    key = content_key(key, index_bc.value)  # the executors' index cache must not mix up two indexes
    def run(batches):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from features.clustering import _cached_index, assign

        index = None
        for rb in batches:
            n = rb.num_rows
            emb = rb.column(1)
            lengths = pc.fill_null(pc.list_value_length(emb), 0).to_numpy(zero_copy_only=False)
            good = lengths == dim
            x = np.full((n, dim), np.nan, np.float32)
            if good.all() and emb.null_count == 0:  # the common case: one zero-copy view
                x = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
            elif good.any():
                sub = emb.filter(pa.array(good))
                x[good] = sub.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            index = index or _cached_index(key, index_bc, threads)
            ids, dist = assign(index, x)
            cols = [rb.column(0), pa.array(ids, pa.int32()), pa.array(dist, pa.float32(), mask=np.isnan(dist))]
            cols += [emb if c == "embedding" else rb.column(2 + extra.index(c)) for c in keep]
            yield pa.RecordBatch.from_arrays(cols, names=names)

    schema = T.StructType(ASSIGNMENT_SCHEMA.fields + [df.schema[c] for c in keep])
    names = schema.fieldNames()
    extra = [c for c in keep if c != "embedding"]
    return df.select("item_id", "embedding", *extra).mapInArrow(run, schema)
