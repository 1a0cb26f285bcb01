"""Benchmark of stage 1 (`etl.build.build_date`, what `spark-submit jobs/build_samples.py` runs per date).

    python bench/build_samples_bench.py [--sizes 1,2] [--rounds 2] [--out /tmp/courier_bench]

Input: the simulator's ``bench`` preset (50,000 users, 20,000 items, one date, ~5.2M impressions,
~0.87M JSON lines, ~200 MB) scaled by *size*: size s = the preset with ``users = 50,000 * s`` (items,
rates, seed and date unchanged), so the search log grows linearly with s while the catalog and its
20,000 images stay fixed. Data goes under --out (default /tmp/courier_bench, outside the repository);
an input already simulated there with the same users/seed is reused.

Config: conf/local.yaml (the project's embedded default) with ``paths.data_root`` set to the bench data,
``spark.master=local[2]`` and --shuffle-partitions / --driver-memory (defaults: local.yaml's 8 / 4g).
Everything runs in ONE Spark session started by `etl.spark.get_spark`, as the job starts it.

Per size, --rounds times, alternately (against the noise of a shared machine):
* floor: ``spark.read.text`` of the same ``*.jsonl`` files, ``from_json`` with the job's full
  ``RAW_EVENT_SCHEMA``, ``groupBy("user_id").agg(count, max(xxhash64(every field)))`` (the hash keeps
  Spark from pruning the parsed schema) to the ``noop`` sink: scan + full parse + one shuffle by user,
  the least any per-user job over this log does.
* build: ``build_date`` for the date into a fresh, empty table root, with the job's own ``progress``
  callback; per-table time = wall time since the previous table was committed (that table's Spark
  work including every not-yet-cached upstream step, the Parquet write and the delta-rs commit);
  ``counts`` = the report's count aggregates + ``report.check()`` + unpersist after the last write.
A last floor closes the sequence. Reported: medians; ratio = median build / median floor.
Once (first size), informational: floor_min (``from_json`` of ``user_id`` only + count) and image
decoding alone (``S.decode_images`` of the date's catalog to ``noop``, a fixed cost per date).

Results are printed, saved as JSON under --out, and (unless ``--results ''``) written into
bench/RESULTS.md, replacing only the section "## build_samples (stage 1)".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## build_samples (stage 1)"
DATE = "2026-11-20"
TABLES = ("quarantine", "items", "item_images", "pv_samples", "ctr_log", "courier_train")


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def machine() -> dict:
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    dirty = git("status", "--porcelain", "--", "etl", "sim", "jobs", "conf")
    return {"cores": os.cpu_count(), "mem_gb": round(mem / 1024 / 1024, 1), "cpu": cpu, "java": java,
            "python": platform.python_version(),
            "git": git("rev-parse", "--short", "HEAD") + (" (etl/sim/jobs/conf modified)" if dirty else "")}


# ---- input ---------------------------------------------------------------------------------------------
def make_input(out: Path, size: float, seed: int) -> dict:
    """Simulate the bench preset scaled to `size` under out/x<size>/data (reused when already there)."""
    import sim

    users = int(round(sim.PRESETS["bench"]["users"] * size))
    data = out / f"x{size:g}" / "data"
    saved = data / "manifest.json"
    m = json.loads(saved.read_text()) if saved.exists() else {}
    if m.get("users") != users or m.get("seed") != seed or DATE not in m.get("dates", {}):
        shutil.rmtree(data, ignore_errors=True)
        name = f"_bench_x{size:g}"
        sim.PRESETS[name] = dict(sim.PRESETS["bench"], users=users)
        try:
            m = sim.simulate(data / "raw", data / "raw" / "images", data / "truth", preset=name, seed=seed,
                             start_date=DATE, progress=lambda s: print("  " + s, flush=True))
        finally:
            sim.PRESETS.pop(name, None)
        saved.write_text(json.dumps(m, default=str))
    day = m["dates"][DATE]
    log_dir = data / "raw" / "search_log" / f"dt={DATE}"
    return {"size": size, "data": data, "log_dir": log_dir, "users": users, "raw_rows": day["raw_rows"],
            "impressions": day["impressions"], "log_mb": sum(p.stat().st_size for p in log_dir.glob("*.jsonl")) / 1e6}


# ---- measured runs -------------------------------------------------------------------------------------
def run_floor(spark, log_dir: Path, minimal: bool = False) -> float:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from etl import samples as S

    t0 = time.perf_counter()
    raw = spark.read.option("pathGlobFilter", "*.jsonl").text(str(log_dir))
    if minimal:
        e = raw.select(F.from_json("value", T.StructType([T.StructField("user_id", T.StringType())])).alias("e"))
        out = e.groupBy("e.user_id").count()
    else:
        e = raw.select(F.from_json("value", S.RAW_EVENT_SCHEMA).alias("e")).select("e.*")
        out = e.groupBy("user_id").agg(F.count("*").alias("n"), F.max(F.xxhash64(*e.columns)).alias("h"))
    out.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def run_image_decode(spark, cfg) -> float:
    from pyspark.sql import functions as F

    from etl import samples as S

    t0 = time.perf_counter()
    items = (spark.read.text(f"{cfg.raw_root}/catalog/dt={DATE}")
             .select(F.from_json("value", S.CATALOG_SCHEMA).alias("c")).select("c.item_id", "c.image_uri")
             .where(F.col("item_id").isNotNull() & F.col("image_uri").isNotNull()))
    S.decode_images(items, cfg.images_root, cfg.samples.image_px, cfg.samples.jpeg_quality) \
        .write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def run_build(spark, cfg, tables_root: Path, label: str) -> dict:
    import dataclasses

    from etl.build import build_date
    from etl.tables import TableStore

    shutil.rmtree(tables_root, ignore_errors=True)
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, tables_root=str(tables_root)))
    store = TableStore(spark, cfg)
    marks: list[tuple[str, float, int]] = []
    line_re = re.compile(r"^\s*\S+ (\w+): staged (\d+) rows")

    def progress(line: str) -> None:  # the job's own per-table callback (staged rows, from the files' stats)
        m = line_re.match(line)
        if m:  # gather/verify/commit lines: their time falls into the next table's / "counts"
            marks.append((m.group(1), time.perf_counter(), int(m.group(2))))

    t0 = time.perf_counter()
    try:
        report = build_date(spark, cfg, store, DATE, f"bench-{label}", progress=progress)
    except Exception as e:  # noqa: BLE001 - keep the tables committed before the failure (the JVM may be gone)
        fail = time.perf_counter()
        tables, last = {}, t0
        for name, t, rows in marks:
            tables[name], last = {"s": t - last, "rows": rows}, t
        nxt = TABLES[len(marks)] if len(marks) < len(TABLES) else "counts"
        return {"total_s": None, "tables": tables, "failed_step": nxt, "failed_after_s": fail - last,
                "error": f"{type(e).__name__}: {(str(e) or '?').splitlines()[0][:160]}"}
    total = time.perf_counter() - t0
    tables, last = {}, t0
    for name, t, rows in marks:
        tables[name], last = {"s": t - last, "rows": rows}, t
    tables["counts"] = {"s": t0 + total - last, "rows": None}
    mb = {n: sum(p.stat().st_size for p in (tables_root / n).rglob("*.parquet")) / 1e6 for n in TABLES}
    shutil.rmtree(tables_root, ignore_errors=True)  # courier_train carries JPEGs inline
    return {"total_s": total, "tables": tables, "table_mb": mb, "counts": report.counts}


def measure(spark, cfg, inp: dict, rounds: int, scratch: Path, extras: bool) -> dict:
    lab = f"x{inp['size']:g}"
    r = {k: v for k, v in inp.items() if k not in ("data", "log_dir")}
    r.update(floors=[], builds=[], loads=[])
    run_floor(spark, inp["log_dir"])  # warm-up (JIT, file cache), discarded
    if extras:
        r["floor_min_s"] = run_floor(spark, inp["log_dir"], minimal=True)
        r["image_decode_s"] = run_image_decode(spark, cfg)
    for i in range(rounds):
        r["loads"].append(loadavg())
        r["floors"].append(run_floor(spark, inp["log_dir"]))
        b = run_build(spark, cfg, scratch / f"tables_{lab}", f"{lab}-{i}")
        if "error" in b:
            r.update(failed=b, floor_s=statistics.median(r["floors"]))
            print(f"[bench] {lab} build FAILED in {b['failed_step']} after {b['failed_after_s']:.0f}s: {b['error']} "
                  "(committed before: " + ", ".join(f"{n} {t['s']:.1f}s" for n, t in b["tables"].items()) + ")",
                  flush=True)
            return r
        r["builds"].append(b)
        print(f"[bench] {lab} round {i}: floor {r['floors'][-1]:.1f}s, build {b['total_s']:.1f}s "
              f"(load {r['loads'][-1]}) " + ", ".join(f"{n} {t['s']:.1f}s" for n, t in b["tables"].items()),
              flush=True)
    r["floors"].append(run_floor(spark, inp["log_dir"]))
    r["loads"].append(loadavg())
    r["floor_s"] = statistics.median(r["floors"])
    r["build_s"] = statistics.median(b["total_s"] for b in r["builds"])
    r["ratio"] = r["build_s"] / r["floor_s"]
    print(f"[bench] {lab}: floor {r['floor_s']:.1f}s (runs {', '.join(f'{x:.1f}' for x in r['floors'])}), "
          f"build {r['build_s']:.1f}s -> ratio {r['ratio']:.2f}", flush=True)
    return r


# ---- report --------------------------------------------------------------------------------------------
def render(all_results: list[dict], meta: dict) -> str:
    results = [r for r in all_results if "failed" not in r]
    m, L = meta["machine"], []
    add = L.append
    add(SECTION)
    add("")
    add(f"Measured {meta['when']} at git {m['git']} by:")
    add("")
    add("```")
    add(meta["command"])
    add("```")
    add("")
    add(f"- Machine: {m['cores']} cores ({m['cpu']}), {m['mem_gb']} GB RAM, Python {m['python']}, {m['java']}, "
        f"Spark {meta['spark']}.")
    add(f"- Spark: `{meta['master']}` (= 2 task threads here), `spark.driver.memory={meta['driver_memory']}`, "
        f"`spark.sql.shuffle.partitions={meta['shuffle_partitions']}` (AQE on, Spark's default), tables "
        f"engine delta-rs, rest of conf/local.yaml unchanged (`samples.image_px={meta['image_px']}`). One "
        "session for every measurement."
        + (f" Extra Spark settings: {', '.join(f'`{k}={v}`' for k, v in meta['spark_conf'].items())}."
           if meta.get("spark_conf") else ""))
    add(f"- Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}; a "
        "load above the core count means other work shared the cores, so the floor is re-measured between builds and medians are used.")
    add("- Input: simulator `bench` preset (seed 7, one date, 20,000 items + images) with `users` scaled; "
        "floor = `read.text` + `from_json(RAW_EVENT_SCHEMA)` + `groupBy(user_id)` (count + hash of every "
        "field) to `noop`; build = `etl.build.build_date` of that date into an empty table root "
        "(report counts checked). Details in the script's docstring.")
    add("")
    add("| size | users | raw lines | impressions | JSON MB | floor s (runs) | build s (runs) | **build / floor** "
        "| build lines/s | build impressions/s | floor lines/s | load avg per round |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        builds = ", ".join(f"{b['total_s']:.1f}" for b in r["builds"])
        add(f"| {r['size']:g}x bench | {r['users']:,} | {r['raw_rows']:,} | {r['impressions']:,} | {r['log_mb']:.0f} "
            f"| {r['floor_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['floors'])}) "
            f"| {r['build_s']:.1f} ({builds}) "
            f"| **{r['ratio']:.2f}** | {r['raw_rows'] / r['build_s']:,.0f} | {r['impressions'] / r['build_s']:,.0f} "
            f"| {r['raw_rows'] / r['floor_s']:,.0f} | {'; '.join(r['loads'])} |")
    add("")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        f_in = b["raw_rows"] / a["raw_rows"]
        add(f"Scaling {a['size']:g}x -> {b['size']:g}x ({f_in:.2f}x input): build {b['build_s'] / a['build_s']:.2f}x "
            f"time, floor {b['floor_s'] / a['floor_s']:.2f}x time.")
        add("")
    if results:
        add("Per table (median over rounds of the wall time since the previous commit; rows written; rows/s):")
    add("")
    add("| step | " + " | ".join(f"{r['size']:g}x s | rows | rows/s" for r in results) + " |")
    add("|---|" + "---|---|---|" * len(results))
    for name in list(TABLES) + ["counts"]:
        cells = []
        for r in results:
            s = statistics.median(b["tables"][name]["s"] for b in r["builds"])
            rows = r["builds"][0]["tables"][name]["rows"]
            cells.append(f"{s:.1f} ({100 * s / r['build_s']:.0f}%) | {'' if rows is None else f'{rows:,}'} | "
                         + ("" if not rows else f"{rows / s:,.0f}"))
        add(f"| {name} | " + " | ".join(cells) + " |")
    add("")
    x = all_results[0]
    if "image_decode_s" in x:
        add(f"Informational ({x['size']:g}x, same session): floor with `from_json` of `user_id` only "
            f"{x['floor_min_s']:.1f} s (full-schema floor {x['floor_s']:.1f} s); decoding the date's 20,000 "
            f"catalog images alone (`S.decode_images` to `noop`, {meta['image_px']} px) {x['image_decode_s']:.1f} s, "
            "a fixed cost per date inside the quarantine step.")
        add("")
    c = results[-1]["builds"][0]["counts"] if results else None
    c and add(f"Counts at {results[-1]['size']:g}x: raw_rows {c['raw_rows']:,}, valid_pv {c['valid_pv']:,}, "
        f"valid_click {c['valid_click']:,}, pv_samples {c['pv_samples']:,}, ctr_log {c['ctr_log']:,}, "
        f"courier_train {c['courier_train']:,}; output Parquet MB: "
        + ", ".join(f"{n} {v:,.0f}" for n, v in results[-1]["builds"][0]["table_mb"].items()) + ".")
    add("")
    for r in all_results:
        if "failed" in r:
            b = r["failed"]
            add(f"**{r['size']:g}x bench ({r['users']:,} users, {r['raw_rows']:,} lines, {r['impressions']:,} "
                f"impressions): build FAILED** in `{b['failed_step']}` after {b['failed_after_s']:.0f} s: `{b['error']}`. "
                f"Floor {r['floor_s']:.1f} s. Steps committed before the failure: "
                + ", ".join(f"{n} {t['s']:.1f} s ({t['rows']:,} rows)" for n, t in b["tables"].items()) + ".")
            add("")
    if meta.get("findings"):
        add(meta["findings"].strip())
        add("")
    return "\n".join(L)


def update_results(path: Path, section: str) -> None:
    """Replace this section in place (or append it); every other section is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2", help="multiples of the bench preset's users (default 1,2)")
    ap.add_argument("--rounds", type=int, default=2, help="floor/build alternations per size")
    ap.add_argument("--out", default="/tmp/courier_bench", help="data root for inputs, tables and JSON")
    ap.add_argument("--shuffle-partitions", type=int, default=None, help="default: conf/local.yaml's")
    ap.add_argument("--driver-memory", default=None, help="default: conf/local.yaml's")
    ap.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                    help="extra spark.* setting (repeatable), added to the config's spark.conf")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="'' = do not write")
    ap.add_argument("--findings", default=None, help="markdown file appended to the section")
    ap.add_argument("--from-json", default=None, help="only re-render the section from a saved JSON")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        from etl.config import load_config, parse_overrides
        from etl.spark import get_spark

        meta = {"when": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                "load_start": loadavg(), "command": shlex.join(["python", "bench/build_samples_bench.py", *sys.argv[1:]])}
        inputs = [make_input(out, float(s), a.seed) for s in a.sizes.split(",")]
        sets = ["spark.master=local[2]"]
        sets += [f"spark.shuffle_partitions={a.shuffle_partitions}"] if a.shuffle_partitions else []
        sets += [f"spark.driver_memory={a.driver_memory}"] if a.driver_memory else []
        extra = dict(kv.split("=", 1) for kv in a.spark_conf)
        sets += [f"spark.conf={json.dumps(extra)}"] if extra else []
        meta["spark_conf"] = extra
        cfgs = [load_config(ROOT / "conf" / "local.yaml", parse_overrides(sets + [f"paths.data_root={i['data']}"]))
                for i in inputs]
        spark = get_spark(cfgs[0], app_name="bench_build_samples")
        conf = spark.sparkContext.getConf()
        meta.update(spark=spark.version, master=spark.sparkContext.master, image_px=cfgs[0].samples.image_px,
                    driver_memory=conf.get("spark.driver.memory"),
                    shuffle_partitions=spark.conf.get("spark.sql.shuffle.partitions"))
        results = []
        try:
            for k, (inp, cfg) in enumerate(zip(inputs, cfgs)):
                results.append(measure(spark, cfg, inp, a.rounds, out, extras=(k == 0)))
                if "failed" in results[-1]:
                    break  # an OOM takes the local JVM down with it
        finally:
            try:
                spark.stop()
            except Exception:  # noqa: BLE001 - after an OOM the local JVM is already gone
                pass
        meta["load_end"] = loadavg()
        saved = {"meta": meta, "results": results}
        (out / "build_samples_last.json").write_text(json.dumps(saved, indent=1, default=str))
        print(f"[bench] raw results: {out / 'build_samples_last.json'}", flush=True)
    if a.findings:
        saved["meta"]["findings"] = Path(a.findings).read_text()
    section = render(saved["results"], saved["meta"])
    print(section)
    if a.results:
        update_results(Path(a.results), section)
        print(f"[bench] wrote the section into {a.results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
