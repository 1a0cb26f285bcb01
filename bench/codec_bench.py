"""The Parquet codec of `courier_train`, measured where it costs: the stage-1 write and the training reader.

    python bench/codec_bench.py [--size 0.25] [--codecs snappy,zstd] [--rounds 3] [--seconds 10]
                                [--read-seconds 3] [--batch-size 128] [--threads 2] [--out /tmp/courier_bench]
                                [--reuse-tables] [--keep] [--results [PATH]] [--from-json FILE]

Input: the simulator's ``bench`` preset scaled by --size, as bench/build_samples_bench.py simulates it
under --out (x<size>/data), read-only (bench/layout_bench.py's `bench_input`). One date is built with
``etl.build.build_date`` (conf/local.yaml, ``spark.master=local[2]``) into a scratch table root,
out/codec_x<size>/tables, deleted at the end unless --keep; --reuse-tables skips the build when the
table is there. The committed `courier_train` partition is the row set every codec writes.

Measured, per codec in --codecs (the first is the reference the others are compared with):
1. Storage and write time: the partition's rows held in executor memory (``localCheckpoint(eager=True)``
   of the committed rows read back), then ``df.write.option("compression", codec).parquet`` into a fresh
   folder, timed (what ``TableStore`` does for the table, with that codec); --rounds rounds, the codecs
   alternating within each round; medians. The last round's files stay for the readers.
2. The training reader over each codec's files (Spark stopped first): ``training.reader.iterate_batches``
   (batch --batch-size PVs, world size 1, prefetch 0, JPEGs decoded in this process with --threads
   threads), real images (mask 1) per second, --seconds per measurement; and the reads alone (Parquet
   decompression and assembly, no JPEG decoding: the reader's ``_raw_batches``), --read-seconds. The codecs
   alternate within each of --rounds rounds; medians. The first batch of each is untimed (start-up).
Ratios against the reference: storage as the ratio of bytes; write time and images/s as the median over
rounds of each round's ratio (the two measured back to back, under about the same load). "others" = the
share of the cores other processes kept busy meanwhile (the machine is shared).

Saved as out/codec_last.json, printed as a markdown section; --results inserts it in bench/RESULTS.md
under "## courier_train codec" (newest run first); --from-json FILE renders a saved run again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from build_samples_bench import DATE, loadavg  # noqa: E402
from layout_bench import (append_results, bench_args, build_tables, delta_files, finish_run, in_memory, inline_batches,  # noqa: E402
                          inline_raw, local_path, measured_by, own_cpu_s, parquet_size, print_reader_round,
                          reader_medians, real_images, release, run_timed, start_run)
from reader_bench import machine_busy_s  # noqa: E402

PARENT = "## courier_train codec"


# ---- writes (Spark) ------------------------------------------------------------------------------------
def timed_write(df, codec: str, folder: Path) -> dict:
    """One Parquet write of df with `codec` into a fresh folder: seconds, bytes, files, others."""
    shutil.rmtree(folder, ignore_errors=True)
    t0, c0, m0 = time.perf_counter(), own_cpu_s(), machine_busy_s()
    df.write.option("compression", codec).parquet(str(folder))
    wall = time.perf_counter() - t0
    others = max(0.0, machine_busy_s() - m0 - (own_cpu_s() - c0)) / (wall * (os.cpu_count() or 1))
    return {"s": wall, "others": others, **parquet_size(folder)}


def measure_writes(spark, cfg, codecs: list[str], folder: Path, rounds: int) -> dict:
    from pyspark.sql import functions as F

    from etl import catalog as T
    from etl.tables import TableStore

    rows = TableStore(spark, cfg).read(T.COURIER_TRAIN).where(F.col("dt") == DATE).drop("dt")
    t0 = time.perf_counter()
    mem = in_memory(rows)
    print(f"[codec] {mem.count():,} rows in memory: {time.perf_counter() - t0:.1f}s", flush=True)
    runs: dict = {c: [] for c in codecs}
    try:
        for r in range(rounds):
            for c in codecs:
                runs[c].append(timed_write(mem, c, folder / c))
            print(f"[codec] write round {r}: " + ", ".join(
                f"{c} {runs[c][-1]['s']:.1f}s {runs[c][-1]['bytes'] / 1e6:,.0f} MB (others "
                f"{100 * runs[c][-1]['others']:.0f}%)" for c in codecs) + f" (load {loadavg()})", flush=True)
    finally:
        release(mem)
    return {c: {"runs": [x["s"] for x in v], "s": statistics.median(x["s"] for x in v),
                "others": [x["others"] for x in v], "bytes": v[-1]["bytes"], "files": v[-1]["files"]}
            for c, v in runs.items()}


def file_codecs(folder: Path) -> list[str]:
    """The codecs the written files' column chunks actually carry (a check that the option took)."""
    import pyarrow.parquet as pq

    seen = set()
    for p in folder.rglob("*.parquet"):
        meta = pq.ParquetFile(p).metadata
        for g in range(meta.num_row_groups):
            seen.update(meta.row_group(g).column(i).compression for i in range(meta.num_columns))
    return sorted(seen)


# ---- readers (no Spark) --------------------------------------------------------------------------------
def measure_readers(urls: dict, a) -> dict:
    out: dict = {f"{c}{kind}": [] for c in urls for kind in ("", "_read")}
    for r in range(a.rounds):
        epoch = r + 1
        for c, u in urls.items():
            out[c].append(run_timed(inline_batches(u, a.batch_size, epoch, a.threads, a.px), a.seconds,
                                    lambda b: b.num_images))
            out[f"{c}_read"].append(run_timed(inline_raw(u, a.batch_size, epoch), a.read_seconds, real_images))
        print_reader_round("codec", r, out)
    return reader_medians(out)


# ---- report --------------------------------------------------------------------------------------------
def paired(xs: list[float], ys: list[float]) -> str:
    rs = [x / y for x, y in zip(xs, ys) if y]
    return f"**{statistics.median(rs):.3f}** ({', '.join(f'{r:.2f}' for r in rs)})" if rs else "n/a"


def render(res: dict) -> str:
    m, w, rd, codecs = res["machine"], res["writes"], res["readers"], res["codecs"]
    ref = codecs[0]
    mb = lambda b: b / 1e6  # noqa: E731
    ips = lambda k: [x["images_per_s"] for x in rd[k]["rounds"]]  # noqa: E731
    L = [f"### {', '.join(codecs)} at {res['size']:g}x, {res['when']}", ""]
    add = L.append
    L.extend(measured_by(res))
    add(f"- Machine: nproc {m['cores']} ({m['cpu']}), {m['mem_gb']} GB RAM, Python {m['python']}, Spark "
        f"{res['spark']} (`{res['master']}`), {m['java']}, torch {res['versions']['torch']}, pyarrow "
        f"{res['versions']['pyarrow']}. Load average at start {res['load_start']}, at end {res['load_end']}.")
    add(f"- Data: simulator `bench` preset x{res['size']:g} ({res['input']['users']:,} users), date {DATE}: "
        f"`courier_train` {res['rows']:,} rows (committed by `build_date` as {mb(res['committed']['bytes']):,.1f} MB, "
        f"codecs {', '.join(res['committed']['codecs'])}). Writes: the rows in executor memory, then "
        f"`df.write.option(\"compression\", codec).parquet`, {res['rounds']} rounds, codecs alternating; readers: "
        f"`training.reader.iterate_batches`, batch {res['batch_size']} PVs, {res['threads']} decode threads, "
        f"prefetch 0, {res['seconds']:g} s decoded and {res['read_seconds']:g} s reads only (no JPEG decoding) per "
        f"measurement, codecs alternating; medians. Files' codecs as written: "
        + "; ".join(f"{c}: {', '.join(res['file_codecs'][c])}" for c in codecs) + ".")
    add("")
    add("| codec | Parquet MB (files) | **vs " + ref + "** | write s, median (runs) | **vs " + ref + "** "
        "| reader images/s, decoded | **vs " + ref + "** | reads only images/s | **vs " + ref + "** "
        "| reader CPU ms / image |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for c in codecs:
        x = w[c]
        add(f"| {c} | {mb(x['bytes']):,.1f} ({x['files']}) | {x['bytes'] / w[ref]['bytes']:.3f} | {x['s']:.1f} "
            f"({', '.join(f'{s:.1f}' for s in x['runs'])}) | {paired(x['runs'], w[ref]['runs'])} "
            f"| {rd[c]['images_per_s']:,.0f} | {paired(ips(c), ips(ref))} | {rd[c + '_read']['images_per_s']:,.0f} "
            f"| {paired(ips(c + '_read'), ips(ref + '_read'))} | {rd[c]['cpu_ms_per_image']:.3f} |")
    add("")
    others_w = max(max(w[c]["others"]) for c in codecs)
    others_r = max(rd[k]["others_max"] for k in rd)
    add(f"Ratios of write time and images/s: median of the per-round ratios (each round's codecs back to back), "
        f"then each round's. Other processes kept up to {100 * others_w:.0f} % of the cores busy during a write and "
        f"up to {100 * others_r:.0f} % during a reader measurement.")
    add("")
    return "\n".join(L)


# ---- main ----------------------------------------------------------------------------------------------
def measure(a, argv) -> dict:
    out, inp, scratch, cfg, res = start_run(a, argv, "codec")
    codecs = [c.strip() for c in a.codecs.split(",") if c.strip()]
    res["codecs"] = codecs
    try:
        from etl.spark import get_spark

        spark = get_spark(cfg, app_name="bench_codec")
        res.update(spark=spark.version, master=spark.sparkContext.master)
        try:
            res["build"] = build_tables(spark, cfg, a.reuse_tables)
            committed = Path(cfg.tables_root) / "courier_train"
            files = delta_files(committed)
            res["committed"] = {"bytes": sum(os.path.getsize(local_path(u)) for u in files), "files": len(files),
                                "codecs": file_codecs(committed)}
            res["writes"] = measure_writes(spark, cfg, codecs, scratch / "writes", a.rounds)
        finally:
            spark.stop()
        urls = {c: sorted(str(p) for p in (scratch / "writes" / c).glob("*.parquet")) for c in codecs}
        res["file_codecs"] = {c: file_codecs(scratch / "writes" / c) for c in codecs}
        import pyarrow.parquet as pq

        res["rows"] = sum(pq.ParquetFile(u).metadata.num_rows for u in urls[codecs[0]])
        res["readers"] = measure_readers(urls, a)
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return finish_run(res, out, "codec")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_args(ap, size=0.25)
    ap.add_argument("--codecs", default="snappy,zstd", help="Parquet codecs; the first is the reference")
    a = ap.parse_args(argv)
    res = json.loads(Path(a.from_json).read_text()) if a.from_json else measure(a, argv)
    section = render(res)
    print(section)
    if a.results:
        append_results(Path(a.results), section, PARENT)
        print(f"[codec] inserted the section in {a.results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
