"""Driver memory and time of build_clusters' k-means sample: collected and normalised as the build does it
(features.clustering.sample_items + collect_matrix + normalize), as a ratio to its floor, the matrix
itself (1.0x: its rows must be in memory once), beside the same sample collected with toPandas + np.stack
and normalised in one piece (what the build did before).

    python bench/kmeans_sample_bench.py [--rows 300000] [--dim 256] [--sample 1000000] [--rounds 2]

Each measurement runs in a fresh Python process with its own local[2] Spark session (the peak of one
process does not carry over to the next), alternating. Peak = the driver's Python process RSS sampled
every 50 ms while the sample is collected and normalised, less its RSS before; the JVM's heap is not in
it. Input: a Parquet table of `--rows` (item_id, array<float> of `--dim`) written once under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mb() -> int:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) // 1024


def measure(way: str, path: str, sample: int) -> dict:
    import numpy as np
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from features import clustering as K

    spark = (SparkSession.builder.master("local[2]").config("spark.driver.memory", "6g")
             .config("spark.driver.maxResultSize", "4g")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    emb = spark.read.parquet(path)
    before = _rss_mb()
    peak, stop = [before], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    if way == "build":
        x = K.collect_matrix(K.sample_items(emb, sample, 1), "embedding")
        K.normalize(x)
    else:  # the earlier way: one toPandas, one stack, normalised in one piece (float64 norms, as normalize)
        rows = emb.orderBy(F.xxhash64("item_id", F.lit(1)), "item_id").limit(sample).select("embedding").toPandas()
        x = np.stack(rows["embedding"].to_numpy()).astype(np.float32)
        del rows
        finite = np.isfinite(x).all(axis=1)
        safe = np.where(finite[:, None], x, 0.0).astype(np.float32)
        norms = np.linalg.norm(safe.astype(np.float64), axis=1)
        out = np.zeros_like(safe)
        out[finite] = (safe[finite] / norms[finite, None]).astype(np.float32)
    seconds = time.perf_counter() - t0
    stop.set()
    spark.stop()
    return {"way": way, "rows": len(x), "matrix_mb": x.nbytes / 2**20, "peak_extra_mb": peak[0] - before,
            "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--sample", type=int, default=1_000_000, help="features.kmeans_sample")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="/tmp/courier_kmeans_sample")
    ap.add_argument("--one", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)  # a child's measurement
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], a.sample)))
        return 0
    path = os.path.join(a.out, f"emb_{a.rows}x{a.dim}.parquet")
    if not os.path.exists(path):
        from pyspark.sql import SparkSession
        from pyspark.sql import functions as F

        spark = SparkSession.builder.master("local[2]").getOrCreate()
        spark.range(a.rows).select(
            F.format_string("i%07d", "id").alias("item_id"),
            F.expr(f"transform(sequence(1, {a.dim}), j -> cast(sin(id * 7 + j * 13) as float))").alias("embedding"),
        ).write.parquet(path)
        spark.stop()
    results = []
    for r in range(a.rounds):
        for way in ("build", "toPandas"):
            out = subprocess.run([sys.executable, __file__, "--sample", str(a.sample), "--one", way, path],
                                 capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"round {r} {way}: {res['rows']} rows, matrix {res['matrix_mb']:.0f} MB, driver Python peak "
                  f"+{res['peak_extra_mb']} MB ({res['peak_extra_mb'] / res['matrix_mb']:.1f}x the matrix), "
                  f"{res['seconds']:.1f} s", flush=True)
    for way in ("build", "toPandas"):
        mine = [x for x in results if x["way"] == way]
        print(f"{way}: peak {min(x['peak_extra_mb'] for x in mine)}-{max(x['peak_extra_mb'] for x in mine)} MB, "
              f"time {sorted(x['seconds'] for x in mine)[len(mine) // 2]:.1f} s (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
