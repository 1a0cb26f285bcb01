"""Benchmark of stage 3's FAISS k-means (features.clustering.train_kmeans) and the scaling it implies.

    python bench/kmeans_bench.py [--cases 100000x1024,...] [--iters 10] [--threads 2]

Data: N x 256 float32 drawn from a mixture of 2,000 Gaussian blobs (seeded), L2-normalised by
train_kmeans, spherical k-means (inner product). Each case runs `--iters` iterations and reports seconds
per iteration; k-means is linear in iterations, so 20 iterations = 2 x the 10-iteration time.
Index kinds: `flat` (exact, cost ~ N*C*d per iteration) and `hnsw` (the large-C path: an HNSW graph over
the centroids rebuilt each iteration, cost ~ N*log(C)*d + C*log(C)*d). A case is NxC or NxC:hnsw.
The extrapolation to the paper's 6e7 x 256 -> 1e5: flat from the measured N*C*d rate of the largest
flat case, hnsw from the measured per-point cost of the largest hnsw case (times log C ratio).

`--yardstick NxC` (cases skipped with `--cases ''`): the drift yardstick the build takes after k-means,
`features.clustering.leave_one_out_distances` over the N training rows of a flat C-centroid index, against
its floor measured in the same run (the FAISS search it cannot avoid: `normalize` + `index.search(., 2)`
over the same chunks), and with the per-cluster sums taken by `np.add.at` (the earlier code); medians of
--rounds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT = "100000x1024,300000x1024,1000000x1024,200000x4096,200000x16384:hnsw,1000000x100000:hnsw"


def data(n: int, d: int = 256, blobs: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(blobs, d)).astype(np.float32)
    x = centres[rng.integers(0, blobs, n)]
    x += 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return x


def yardstick(case: str, rounds: int, threads: int) -> None:
    from features import clustering as K

    n, c = (int(float(v)) for v in case.split("x"))
    x = data(n)
    index = K.build_index(K.train_kmeans(x, c, niter=3, seed=1, max_sample=n), "flat")
    chunk = 1 << 16

    def floor():
        for lo in range(0, n, chunk):
            xn, ok = K.normalize(x[lo:lo + chunk])
            index.search(xn[ok], 2)

    def add_at(labels, rows, k):
        sums = np.zeros((k, rows.shape[1]), np.float64)
        np.add.at(sums, labels, rows)
        return sums

    def timed(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    sparse_sums = K._sums_by_label
    times: dict = {"floor": [], "leave_one_out": [], "leave_one_out_add_at": []}
    for _ in range(rounds):
        times["floor"].append(timed(floor))
        times["leave_one_out"].append(timed(lambda: K.leave_one_out_distances(x, index, chunk)))
        K._sums_by_label = add_at
        try:
            times["leave_one_out_add_at"].append(timed(lambda: K.leave_one_out_distances(x, index, chunk)))
        finally:
            K._sums_by_label = sparse_sums
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"yardstick": {"N": n, "C": c, "threads": threads, "runs_s": times,
                                    "median_s": {k: round(v, 2) for k, v in med.items()},
                                    "ratio_to_floor": round(med["leave_one_out"] / med["floor"], 2),
                                    "add_at_ratio_to_floor": round(med["leave_one_out_add_at"] / med["floor"], 2)}}),
          flush=True)


def main() -> int:
    import faiss

    from features.clustering import train_kmeans

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=DEFAULT)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--yardstick", default=None, help="NxC: time leave_one_out_distances against its search floor")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    if args.yardstick:
        yardstick(args.yardstick, args.rounds, args.threads)
    rows = []
    cache: dict = {}
    for case in filter(None, args.cases.split(",")):
        size, _, kind = case.partition(":")
        n, c = (int(float(v)) for v in size.split("x"))
        kind = kind or "flat"
        x = cache.get(n)
        if x is None:
            cache.clear()
            x = cache[n] = data(n)
        t0 = time.perf_counter()
        train_kmeans(x, c, niter=args.iters, seed=1, max_sample=n, kind=kind, hnsw_m=32, ef_search=64)
        s = time.perf_counter() - t0
        rows.append({"N": n, "C": c, "kind": kind, "iters": args.iters, "seconds": round(s, 2),
                     "s_per_iter": round(s / args.iters, 3),
                     "gflops_equiv": round(2 * n * c * 256 * args.iters / s / 1e9, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        return 0
    n_p, c_p, iters_p = 6e7, 1e5, 20
    flat = max((r for r in rows if r["kind"] == "flat"), key=lambda r: r["N"] * r["C"], default=None)
    hnsw = max((r for r in rows if r["kind"] == "hnsw"), key=lambda r: r["N"] * r["C"], default=None)
    out = {"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, faiss {faiss.__version__}, "
                      f"threads {args.threads}, GPUs {faiss.get_num_gpus()}", "cases": rows}
    if flat:
        rate = flat["N"] * flat["C"] / flat["s_per_iter"]  # point-centroid pairs per second
        out["paper_flat_hours"] = round(n_p * c_p / rate * iters_p / 3600, 1)
    if hnsw:
        per_point = hnsw["s_per_iter"] / hnsw["N"] / math.log2(hnsw["C"])
        out["paper_hnsw_hours"] = round(per_point * n_p * math.log2(c_p) * iters_p / 3600, 2)
    print(json.dumps({k: v for k, v in out.items() if k != "cases"}), flush=True)
    print("\n| N | C | index | s / iteration | 20 iterations (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']:,} | {r['C']:,} | {r['kind']} | {r['s_per_iter']} | {20 * r['s_per_iter']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
