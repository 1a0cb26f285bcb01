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

# Rows per chunk where a whole matrix is worked through in pieces (its float64 temporaries ~0.1 GB at d=256).
_CHUNK_ROWS = 1 << 14

# clusters key -> deserialised faiss index: the latest one only, per Python process (a worker lives as long as
# the session: each clustering it met would otherwise stay, ~100 MB at C = 1e5)
_INDEXES: dict = {}


# A sample's order: rows by this key, then item_id (xxhash64 is the same on any cluster and Spark version).
SAMPLE_KEY = "_sample_key"
# The sample's cut is found in this many key ranges (by the key's top 16 bits): one range's keys reach
# the driver, ~N / 65,536 of them, never the whole sample's.
_KEY_SHIFT = 48


def sample_items(df: DataFrame, n: int, seed: int) -> DataFrame:
    """At most n rows of df: the n smallest by (xxhash64(item_id, seed), item_id), in that order - the
    same sample on any cluster and run. The rows stay on the executors (sorted there); to find the n-th
    key, the driver reads the row count of each key range, then the keys of the one range it falls in.
    item_id must be unique and not null (the caller checks): rows tied with the n-th would all be kept."""
    from pyspark.sql import functions as F

    keyed = df.withColumn(SAMPLE_KEY, F.xxhash64("item_id", F.lit(seed)))
    key_range = F.shiftright(SAMPLE_KEY, _KEY_SHIFT)  # floor(key / 2^48): the ranges keep the key's order
    counts = sorted((r[0], r[1]) for r in keyed.groupBy(key_range).count().collect())
    if sum(c for _, c in counts) > n:
        before = 0
        for first, count in counts:  # the range holding the n-th row, and its rank there
            if before + count >= n:
                break
            before += count
        last = (keyed.where(key_range == first).select(SAMPLE_KEY, "item_id")
                .orderBy(SAMPLE_KEY, "item_id").limit(n - before).collect()[-1])
        key, item = F.col(SAMPLE_KEY), F.col("item_id")
        keyed = keyed.where((key < last[0]) | ((key == last[0]) & (item <= last[1])))
    return keyed.orderBy(SAMPLE_KEY, "item_id").drop(SAMPLE_KEY)


def collect_matrix(df: DataFrame, column: str) -> np.ndarray:
    """The array<float> `column` of df (no nulls) as one (rows, dim) float32 matrix, in df's row order.

    Each Arrow batch is packed into one binary value on the executors, and the driver copies partition
    after partition into the matrix: its memory is the matrix plus one partition, never a Python object
    per row (toPandas + np.stack held ~3 copies of a 10 GB k-means sample). Arrays of different
    lengths are refused."""
    import pyarrow as pa
    import pyarrow.compute as pc

    packed = T.StructType([T.StructField("rows", T.LongType()), T.StructField("dim", T.LongType()),
                           T.StructField("data", T.BinaryType())])

    def pack(batches):
        for b in batches:
            arrays = b.column(0)
            lengths = pc.list_value_length(arrays)
            if arrays.null_count or len(pc.unique(lengths)) > 1:
                dim = -1  # told to the driver, which names the problem
                data = b""
            else:
                dim = lengths[0].as_py() if len(b) else 0
                data = pc.list_flatten(arrays).to_numpy(zero_copy_only=False).astype(np.float32).tobytes()
            yield pa.RecordBatch.from_pydict({"rows": [len(b)], "dim": [dim], "data": [data]},
                                             schema=pa.schema([("rows", pa.int64()), ("dim", pa.int64()),
                                                               ("data", pa.binary())]))

    rows = df.count()
    out = None
    at = 0
    for r in df.select(column).mapInArrow(pack, packed).toLocalIterator():
        if r["rows"] == 0:
            continue
        if r["dim"] < 0 or (out is not None and r["dim"] != out.shape[1]):
            raise ValueError(f"{column}: arrays of different lengths, or null arrays; a matrix needs one length")
        if out is None:
            out = np.empty((rows, r["dim"]), np.float32)
        if at + r["rows"] > rows:
            raise ValueError(f"{column}: more rows than the {rows} counted (the input changed while read)")
        out[at:at + r["rows"]] = np.frombuffer(r["data"], np.float32).reshape(r["rows"], r["dim"])
        at += r["rows"]
    if out is None:
        return np.zeros((0, 0), np.float32)
    if at != rows:
        raise ValueError(f"{column}: {at} rows read, {rows} counted (the input changed while read)")
    return out


def normalize(x: np.ndarray, chunk: int = _CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised float32 rows, ok mask). A row with NaN/inf or zero norm is not ok (left as zeros).
    Chunk by chunk: the output and one chunk's temporaries at a time (k-means samples reach 10 GB)."""
    x = np.asarray(x)
    out = np.zeros(x.shape, np.float32)
    ok = np.zeros(len(x), bool)
    for lo in range(0, len(x), chunk):
        # The norm in float64, as Spark's unit_vector takes it: in float32 the squares of a finite row of
        # values over ~1e19 overflow to inf, and the row would read as all zeros yet count as ok.
        part = np.asarray(x[lo:lo + chunk], np.float32).astype(np.float64)
        finite = np.isfinite(part).all(axis=1)
        part[~finite] = 0.0
        norms = np.linalg.norm(part, axis=1)
        good = finite & (norms > 0)
        out[lo:lo + chunk][good] = (part[good] / norms[good, None]).astype(np.float32)
        ok[lo:lo + chunk] = good
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
    if not ok.all():  # the usable rows moved up in place, chunk by chunk: no second copy of the sample
        m = 0
        for lo in range(0, len(xn), _CHUNK_ROWS):
            part = xn[lo:lo + _CHUNK_ROWS][ok[lo:lo + _CHUNK_ROWS]]  # a copy; written at m <= lo
            xn[m:m + len(part)] = part
            m += len(part)
        xn = xn[:m]
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


def _sums_by_label(labels: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(k, d) float64: the sum of the rows of each label, as the sparse one-hot (k, m) matrix times rows.
    ~10x faster than np.add.at (which adds one row at a time through a Python-level buffer)."""
    from scipy import sparse

    one_hot = sparse.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(k, len(labels)))
    return np.asarray(one_hot @ rows.astype(np.float64))


def leave_one_out_distances(x: np.ndarray, index, chunk: int = 1 << 16) -> np.ndarray:
    """Cosine distances of the k-means training rows x (raw) as if each row had not been trained on ->
    float32, one per usable row (rows `normalize` rejects are left out).

    A training row pulled its own centroid towards itself, so it sits nearer to it than an unseen item
    of the same distribution: at a few dozen rows per cluster, 15-40 % of unseen items land beyond the
    training rows' own 95th-percentile distance. The drift measure compares new items against this
    instead: for row x_i of cluster k, the spherical centroid without it, c_k^(-i) = (S_k - x_i) /
    ||S_k - x_i|| (S_k: the sum of cluster k's unit rows), or the second-nearest centroid where that is
    nearer. Two passes over x in chunks (the sums need every row's cluster first); x stays as it is."""
    n_centroids, d = index.ntotal, index.d
    S = np.zeros((n_centroids, d), np.float64)  # S_k = sum_{i in k} x_i over unit rows
    nearest, second_sim = [], []
    for lo in range(0, len(x), chunk):
        xn, ok = normalize(x[lo:lo + chunk])
        xn = xn[ok]
        sims, nn = index.search(xn, 2)  # (m, 2): nearest and second-nearest centroid
        if (nn[:, 0] < 0).any():
            raise ValueError("a training row found no centroid in the index")
        S += _sums_by_label(nn[:, 0], xn, n_centroids)
        nearest.append(nn[:, 0])
        # no second centroid (C = 1): FAISS gives id -1 (and -FLT_MAX), so the own one always wins
        second_sim.append(np.where(nn[:, 1] >= 0, sims[:, 1], -np.inf))
    out = []
    for at, lo in enumerate(range(0, len(x), chunk)):
        xn, ok = normalize(x[lo:lo + chunk])
        xn = xn[ok]
        rest = S[nearest[at]] - xn  # (m, d): S_k - x_i, the cluster without row i
        norm = np.linalg.norm(rest, axis=1)
        # a cluster of one row has no centroid left: only another centroid can be its nearest
        own_sim = np.where(norm > 0, np.einsum("ij,ij->i", rest, xn) / np.where(norm > 0, norm, 1.0), -np.inf)
        # 1 - cos, at most 2 (a lone row of a one-centroid clustering has no centroid at all)
        out.append(np.minimum(1.0 - np.maximum(own_sim, second_sim[at]), 2.0).astype(np.float32))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


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
