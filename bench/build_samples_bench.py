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

Once per session, untimed: a warm-up (the log's files hashed by ``scan_files``, one floor): the first
Spark jobs and Python workers of a session pay start-up costs later dates do not.

Per size, --rounds times, alternately (against the noise of a shared machine):
* floor: ``spark.read.text`` of the same ``*.jsonl`` files, ``from_json`` with every field of the job's
  ``S.EVENT_FIELDS`` (the build itself parses with ``S.parse_json_lines``: ``from_json`` for the lines
  ``S.plain_line`` admits, its strict Python parser for the rest), ``groupBy("user_id").agg(count, max(xxhash64(every field)))`` (the hash keeps
  Spark from pruning the parsed schema) to the ``noop`` sink: scan + full parse + one shuffle by user,
  the least any per-user job over this log does.
* build: ``build_date`` for the date into a fresh, empty table root, with the job's own ``progress``
  callback; per-table time = wall time since the previous table was committed (that table's Spark
  work including every not-yet-cached upstream step, the Parquet write and the delta-rs commit);
  ``counts`` = the report's count aggregates + ``report.check()`` + unpersist after the last write.
A last floor closes the sequence. Reported: medians; ratio = median build / median floor.
Once (first size), informational: floor_min (``from_json`` of ``user_id`` only + count); with
--image-spark-alone also image decoding alone in Spark (``S.decode_images`` of the build's image plan to
``noop``, after the first build).

Floors of issue 15, measured in every round of every size, in the same session, each part of the build
reported as a ratio against its floor (medians over rounds):
* (a) events floor = the floor above. Events part of the build = wall time from ``build_date``'s start
  to its "ctr_log: staged" progress line (= the "inputs gathered" time + the per-table marks quarantine,
  items, item_images, pv_samples, ctr_log; i.e. gather incl. file hashing and the catalog, parse,
  validate, dedupe, sessionize, history, labels, pv_samples, ctr_log and the quarantine) minus the
  build's image decoding (below). Target <= 5x.
* (b) image floor = the same files the build decodes (its own ``plan_images`` result, captured)
  read, decoded, centre-cropped, resized to image_px and JPEG-encoded at jpeg_quality with plain PIL in
  a ``ProcessPoolExecutor(os.cpu_count())`` (pool start-up included; no verify/sha256). Build image
  time = wall time of the build's own ``materialize(S.decode_images(...))`` call in ``compute``
  (``etl.build.materialize`` wrapped by the bench: binaryFile read + join + decode + checkpoint).
  Reported as floor_b / build_image (target >= 0.8).
* (c) write floor = the committed courier_train partition read back, ``localCheckpoint(eager=True)``
  (rows in executor memory, spilling to disk if they do not fit), then ``df.write.parquet`` with the
  table's codec (``etl.catalog.COURIER_TRAIN.compression``) to a temp folder, timed (without the
  partition column, as ``TableStore.stage_partition`` writes it). Build
  courier_train time = the seconds printed in its "courier_train: staged N rows, X s" progress line
  (the stage call only; the report counts before it, and the sum of the image bytes that chooses
  the broadcast look-up, are not in it). Target <= 1.5x.
* Across sizes: least-squares fit time = a + b * size over the issue's sizes run (0.25x and up; a =
  fixed overhead per date, target <= 10 s), and over every size run when a smaller one (e.g. 0.02x,
  where the build time is nearly all fixed cost) was run too; the 2x/1x time ratio when both are run
  (target <= 2.2). The catalogue and its 20,000 images do not grow with size, so their per-item work
  (decoding is per new item: the catalogue is incremental) lands in the intercept; the fits are also
  given for the build less its image decoding.
* Memory: per build, the driver JVM's peak RSS (VmHWM of /proc/<jvm pid>/status, reset through
  /proc/<pid>/clear_refs before the build where permitted) and the peak of its heap pools (JMX
  peak usage, reset before the build) against -Xmx (``spark.driver.memory``); the Python driver's
  peak RSS (``ru_maxrss``, whole run).

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
ISSUE_SIZES = (0.25, 1, 2)  # the sizes issue 15 sets its targets at
EARLIER = "### Earlier results (kept for reference)"
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
        schema = T.StructType([T.StructField(n, S._SPARK_TYPES[t]) for n, t in S.EVENT_FIELDS.items()])
        e = raw.select(F.from_json("value", schema).alias("e")).select("e.*")
        out = e.groupBy("user_id").agg(F.count("*").alias("n"), F.max(F.xxhash64(*e.columns)).alias("h"))
    out.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def warm_up(spark, log_dir: Path) -> float:
    """Untimed, once per session before any measurement: the session's first Spark jobs and its first
    Python workers pay JVM class loading and the workers' start (~10 s of the first date's input
    gathering, measured), which every later date of a job does not; left in, it lands in whichever
    size runs first and in the fitted fixed overhead per date."""
    from etl.inputs import discover, scan_files

    t0 = time.perf_counter()
    scan_files(spark, discover(spark, str(log_dir.parent), DATE, ["_*", ".*"]).read)  # binaryFile + mapInPandas
    run_floor(spark, log_dir)
    return time.perf_counter() - t0


def run_image_decode(spark, cfg, plan) -> float:
    """Image decoding alone in Spark: the build's image plan read and decoded as in compute, to noop."""
    from etl import samples as S
    from etl.inputs import image_files
    from etl.spark import file_open_cost

    sc = cfg.samples
    t0 = time.perf_counter()
    with file_open_cost(spark, plan.mean_bytes):  # as compute plans it
        S.decode_images(image_files(spark, plan), sc.image_px, sc.jpeg_quality, sc.max_image_pixels) \
            .write.format("noop").mode("overwrite").save()
    return time.perf_counter() - t0


def _pil_floor_one(args) -> int:
    """Floor (b), one file: read, decode, centre-crop, resize, JPEG-encode with plain PIL."""
    import io

    from PIL import Image

    from etl.images import square_jpeg

    path, px, quality = args
    with open(path, "rb") as fh:
        data = fh.read()
    try:  # the simulated input holds corrupt files on purpose (the build quarantines them)
        with Image.open(io.BytesIO(data)) as img:
            return len(square_jpeg(img.convert("RGB"), px, quality))  # the build's own crop/resize/encode
    except Exception:  # noqa: BLE001
        return -1


def run_image_floor(cfg, plan) -> dict:
    """Floor (b): the build's planned image files through plain PIL in a process pool on every core."""
    from concurrent.futures import ProcessPoolExecutor
    from urllib.parse import unquote, urlparse

    paths = [unquote(urlparse(q).path) if q.startswith("file:") else q for _, q in plan.to_read]
    jobs = [(p, cfg.samples.image_px, cfg.samples.jpeg_quality) for p in paths]
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        sizes = list(pool.map(_pil_floor_one, jobs, chunksize=max(1, len(jobs) // (workers * 16))))
    return {"s": time.perf_counter() - t0, "images": len(jobs), "failed": sum(n < 0 for n in sizes),
            "jpeg_mb": sum(n for n in sizes if n > 0) / 1e6, "workers": workers}


def run_write_floor(spark, store, scratch: Path) -> dict:
    """Floor (c): the committed courier_train rows in memory, then written to Parquet by Spark with the
    table's codec (etl.catalog: the same encoding work the build's write does)."""
    from pyspark.sql import functions as F

    from etl import catalog as T

    df = store.read(T.COURIER_TRAIN).where(F.col("dt") == DATE).drop("dt")
    t0 = time.perf_counter()
    mem = df.localCheckpoint(eager=True)
    t_load = time.perf_counter() - t0
    folder = scratch / "write_floor"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    writer = mem.write.option("compression", T.COURIER_TRAIN.compression) if T.COURIER_TRAIN.compression else mem.write
    writer.mode("overwrite").parquet(str(folder))
    t_write = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in folder.rglob("*.parquet")) / 1e6
    mem._jdf.queryExecution().logical().rdd().unpersist(False)
    shutil.rmtree(folder, ignore_errors=True)
    return {"s": t_write, "load_s": t_load, "mb": mb}


# ---- driver memory -------------------------------------------------------------------------------------
def jvm_pid(spark) -> int:
    return int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())


def reset_memory_peaks(spark) -> None:
    try:
        Path(f"/proc/{jvm_pid(spark)}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    try:
        for pool in spark.sparkContext._jvm.java.lang.management.ManagementFactory.getMemoryPoolMXBeans():
            pool.resetPeakUsage()
    except Exception:  # noqa: BLE001 - informational only
        pass


def memory_peaks(spark) -> dict:
    import resource

    out = {"py_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        st = dict(l.split(":", 1) for l in Path(f"/proc/{jvm_pid(spark)}/status").read_text().splitlines() if ":" in l)
        out["jvm_hwm_mb"] = int(st["VmHWM"].split()[0]) / 1024
        out["jvm_rss_mb"] = int(st["VmRSS"].split()[0]) / 1024
        jvm = spark.sparkContext._jvm
        mf = jvm.java.lang.management.ManagementFactory
        heap = [p for p in mf.getMemoryPoolMXBeans() if str(p.getType().toString()) == "Heap memory"]
        out["heap_max_mb"] = jvm.java.lang.Runtime.getRuntime().maxMemory() / 2**20
        out["heap_pool_peaks_mb"] = {str(p.getName()): p.getPeakUsage().getUsed() / 2**20 for p in heap}
        out["heap_peak_sum_mb"] = sum(out["heap_pool_peaks_mb"].values())
    except Exception as e:  # noqa: BLE001 - informational only (the JVM may be gone after an OOM)
        out["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


MATERIALIZED = ("catalog", "deduped", "unknown", "events", "labelled", "rejected", "samples")


class BuildProbes:
    """Wraps etl.build's `materialize` and `plan_images` (and marks `S.decode_images`) for one build:
    the wall time of every materialized step, which one is the image decoding, and the image plan."""

    def __init__(self):
        import etl.build as B
        import etl.samples as S

        self.B, self.S = B, S
        self.steps: list[tuple[str, float]] = []
        self.plan = None
        self._next_is_images = False

    def __enter__(self):
        B, S = self.B, self.S
        self._orig = (B.materialize, B.plan_images, S.decode_images)
        materialize, plan_images, decode_images = self._orig
        plain = iter(MATERIALIZED)

        def timed(df):
            name = "decoded" if self._next_is_images else next(plain, f"step{len(self.steps)}")
            self._next_is_images = False
            t0 = time.perf_counter()
            out = materialize(df)
            self.steps.append((name, time.perf_counter() - t0))
            return out

        def planned(*a, **k):
            self.plan = plan_images(*a, **k)
            return self.plan

        def decode(*a, **k):
            self._next_is_images = True
            return decode_images(*a, **k)

        B.materialize, B.plan_images, S.decode_images = timed, planned, decode
        return self

    def __exit__(self, *exc):
        self.B.materialize, self.B.plan_images, self.S.decode_images = self._orig
        return False


def run_build(spark, cfg, tables_root: Path, label: str) -> dict:
    import dataclasses

    from etl.build import build_date
    from etl.spark import codegen_compilations
    from etl.tables import TableStore

    shutil.rmtree(tables_root, ignore_errors=True)
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, tables_root=str(tables_root)))
    store = TableStore(spark, cfg)
    marks: list[tuple[str, float, int]] = []
    stage_s: dict[str, float] = {}
    phases: dict[str, float] = {}
    line_re = re.compile(r"^\s*\S+ (\w+): staged (\d+) rows, ([\d.]+)s")
    phase_re = re.compile(r"^\s*\S+ (inputs gathered and fingerprinted|computed and staged|verified and published): "
                          r"([\d.]+)s")

    def progress(line: str) -> None:  # the job's own per-table callback (staged rows, from the files' stats)
        m = line_re.match(line)
        if m:  # gather/verify/commit lines: their time falls into the next table's / "counts"
            marks.append((m.group(1), time.perf_counter(), int(m.group(2))))
            stage_s[m.group(1)] = float(m.group(3))
        elif m := phase_re.match(line):  # cumulative seconds since build_date started
            phases[m.group(1).split()[0]] = float(m.group(2))

    reset_memory_peaks(spark)
    compiled = codegen_compilations(spark)
    t0 = time.perf_counter()
    try:
        with BuildProbes() as probes:
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
    compiled = codegen_compilations(spark) - compiled
    mem = memory_peaks(spark)
    tables, last = {}, t0
    for name, t, rows in marks:
        tables[name], last = {"s": t - last, "rows": rows}, t
    tables["counts"] = {"s": t0 + total - last, "rows": None}
    steps = dict(probes.steps)
    image_s = steps.get("decoded", 0.0)
    upto_ctr = next(t for name, t, _ in marks if name == "ctr_log") - t0
    mb = {n: sum(p.stat().st_size for p in (tables_root / n).rglob("*.parquet")) / 1e6 for n in TABLES}
    floor_c = run_write_floor(spark, store, tables_root.parent)
    shutil.rmtree(tables_root, ignore_errors=True)  # courier_train carries JPEGs inline
    return {"total_s": total, "tables": tables, "table_mb": mb, "counts": report.counts, "stage_s": stage_s,
            "phases": phases, "materialized_s": steps, "image_s": image_s, "upto_ctr_log_s": upto_ctr,
            "events_s": upto_ctr - image_s, "train_s": stage_s["courier_train"], "floor_c": floor_c,
            "memory": mem, "plan": probes.plan, "compiled": compiled}


def measure(spark, cfg, inp: dict, rounds: int, scratch: Path, extras: bool, image_spark_alone: bool = False) -> dict:
    lab = f"x{inp['size']:g}"
    r = {k: v for k, v in inp.items() if k not in ("data", "log_dir")}
    r.update(floors=[], builds=[], loads=[])
    run_floor(spark, inp["log_dir"])  # warm-up (JIT, file cache), discarded
    if extras:
        r["floor_min_s"] = run_floor(spark, inp["log_dir"], minimal=True)
    r["floors_b"] = []
    for i in range(rounds):
        r["loads"].append(loadavg())
        r["floors"].append(run_floor(spark, inp["log_dir"]))
        b = run_build(spark, cfg, scratch / f"tables_{lab}", f"{lab}-{i}")
        plan = b.pop("plan", None)
        if plan is not None and "error" not in b:
            r["floors_b"].append(run_image_floor(cfg, plan))
            if extras and image_spark_alone and i == 0:
                r["image_decode_s"] = run_image_decode(spark, cfg, plan)
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
        print(f"[bench] {lab} round {i}: events {b['events_s']:.1f}s vs floor (a) {r['floors'][-1]:.1f}s; "
              f"images {b['image_s']:.1f}s vs floor (b) {r['floors_b'][-1]['s']:.1f}s; courier_train "
              f"{b['train_s']:.1f}s vs floor (c) {b['floor_c']['s']:.1f}s; materialized "
              + ", ".join(f"{n} {s:.1f}s" for n, s in b["materialized_s"].items())
              + f"; JVM peak RSS {b['memory'].get('jvm_hwm_mb', float('nan')):.0f} MB; "
              f"{b['compiled']} classes compiled from generated code", flush=True)
    r["floors"].append(run_floor(spark, inp["log_dir"]))
    r["loads"].append(loadavg())
    r["floor_s"] = statistics.median(r["floors"])
    r["build_s"] = statistics.median(b["total_s"] for b in r["builds"])
    r["ratio"] = r["build_s"] / r["floor_s"]
    med = lambda f: statistics.median(f(b) for b in r["builds"])  # noqa: E731
    r["parts"] = {
        "events_s": med(lambda b: b["events_s"]), "image_s": med(lambda b: b["image_s"]),
        "train_s": med(lambda b: b["train_s"]), "floor_b_s": statistics.median(x["s"] for x in r["floors_b"]),
        "floor_c_s": med(lambda b: b["floor_c"]["s"]), "floor_c_load_s": med(lambda b: b["floor_c"]["load_s"]),
        "jvm_hwm_mb": max(b["memory"].get("jvm_hwm_mb", 0) for b in r["builds"]),
        "heap_peak_mb": max(b["memory"].get("heap_peak_sum_mb", 0) for b in r["builds"]),
        "heap_max_mb": r["builds"][0]["memory"].get("heap_max_mb"),
        "py_maxrss_mb": max(b["memory"].get("py_maxrss_mb", 0) for b in r["builds"]),
    }
    p = r["parts"]
    p["events_ratio"] = p["events_s"] / r["floor_s"]
    p["image_ratio"] = p["floor_b_s"] / p["image_s"] if p["image_s"] else None
    p["train_ratio"] = p["train_s"] / p["floor_c_s"]
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
    add(f"### Run {meta['when']} (floors of issue 15)")
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
    if meta.get("warm_up_s") is not None:
        add(f"- Session warm-up before the first size (untimed): {meta['warm_up_s']:.1f} s (first Spark jobs and "
            "Python workers; later dates of a job do not pay it).")
    add("- Input: simulator `bench` preset (seed 7, one date, 20,000 items + images) with `users` scaled; "
        "floor = `read.text` + `from_json(EVENT_FIELDS)` + `groupBy(user_id)` (count + hash of every "
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
    if "floor_min_s" in x:
        add(f"Informational ({x['size']:g}x, same session): floor with `from_json` of `user_id` only "
            f"{x['floor_min_s']:.1f} s (full-schema floor {x['floor_s']:.1f} s)"
            + (f"; decoding the build's image plan alone in Spark (`S.decode_images` to `noop`, {meta['image_px']} px) "
               f"{x['image_decode_s']:.1f} s" if "image_decode_s" in x else "") + ".")
        add("")
    L.extend(render_floors(results))
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


def fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least squares y = a + b x; None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def old_gen(r: dict) -> float:
    """Peak of the old-generation heap pool over the builds (the pools peak at different times, so
    their peaks do not add up to a heap peak)."""
    return max((v for b in r["builds"] for k, v in b["memory"].get("heap_pool_peaks_mb", {}).items()
                if "Old" in k or "Tenured" in k), default=float("nan"))


def render_floors(results: list[dict]) -> list[str]:
    """The issue-15 table: each part of the build against its floor, scaling fit and driver memory."""
    results = [r for r in results if "parts" in r]
    if not results:
        return []
    L = []
    add = L.append
    add("Against the floors of issue 15 (same session, same rounds; medians over rounds; what each number sums is in "
        "the script's docstring):")
    add("")
    add("| size | events part s | floor (a) s | **events / (a)** (<= 5) | build images s | floor (b) s (images, workers) "
        "| **(b) / images** (>= 0.8) | courier_train s | floor (c) s (+ to memory) | **train / (c)** (<= 1.5) "
        "| build total s | JVM peak RSS MB | old-gen peak / heap max MB |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p, fb = r["parts"], r["floors_b"][0]
        ok = lambda good: "" if good else " ✗"  # noqa: E731
        add(f"| {r['size']:g}x | {p['events_s']:.1f} | {r['floor_s']:.1f} | **{p['events_ratio']:.1f}**{ok(p['events_ratio'] <= 5)} "
            f"| {p['image_s']:.1f} | {p['floor_b_s']:.1f} ({fb['images']:,}, {fb['workers']}) "
            f"| **{p['image_ratio']:.2f}**{ok(p['image_ratio'] >= 0.8)} | {p['train_s']:.1f} "
            f"| {p['floor_c_s']:.1f} (+{p['floor_c_load_s']:.1f}) | **{p['train_ratio']:.2f}**{ok(p['train_ratio'] <= 1.5)} "
            f"| {r['build_s']:.1f} | {p['jvm_hwm_mb']:,.0f} | {old_gen(r):,.0f} / {p['heap_max_mb']:,.0f} |")
    add("")
    b0 = results[0]["builds"][0]
    add(f"Build steps at {results[0]['size']:g}x, first round (materialized = wall time of each `materialize` in "
        "`etl.build`; decoded = the image decoding): "
        + ", ".join(f"{n} {s:.1f} s" for n, s in b0["materialized_s"].items())
        + f"; inputs gathered at {b0['phases'].get('inputs', float('nan')):.1f} s, ctr_log staged at "
        f"{b0['upto_ctr_log_s']:.1f} s, computed and staged at {b0['phases'].get('computed', float('nan')):.1f} s, "
        f"published at {b0['phases'].get('verified', float('nan')):.1f} s; stage calls: "
        + ", ".join(f"{n} {s:.1f} s" for n, s in b0["stage_s"].items()) + ".")
    add("")
    if all("compiled" in b for r in results for b in r["builds"]):
        first = results[0]
        add("Classes compiled from generated code per build, in run order (the rest come from Spark's code "
            "cache; a class compiled anew also starts cold, before the JIT has compiled it): "
            + "; ".join(f"{r['size']:g}x " + ", ".join(str(b["compiled"]) for b in r["builds"]) for r in results)
            + f". The session's first build ({first['size']:g}x, round 0: compiles its classes and runs them "
            f"cold, as a job's first date does) took {first['builds'][0]['total_s']:.1f} s, against "
            f"{first['build_s']:.1f} s (median) at that size.")
        add("")
    # The issue's fit is over its sizes (0.25x and up); a smaller size, when run, shows the intercept
    # directly instead of by extrapolation, so the fit over every size is reported beside it.
    issue_sizes = [r for r in results if r["size"] >= min(ISSUE_SIZES)]
    subsets = [(issue_sizes, "the issue's sizes")]
    if len(issue_sizes) < len(results):
        subsets.append((results, "every size run"))
    for subset, what in subsets:
        xs = [r["size"] for r in subset]
        lines = []
        for label, get in (("build total", lambda r: r["build_s"]),
                           ("build total less images", lambda r: r["build_s"] - r["parts"]["image_s"]),
                           ("events part", lambda r: r["parts"]["events_s"]),
                           ("images", lambda r: r["parts"]["image_s"]),
                           ("courier_train", lambda r: r["parts"]["train_s"])):
            f = fit(xs, [get(r) for r in subset])
            if f:
                lines.append(f"{label} {f[0]:.1f} s + {f[1]:.1f} s/size")
        if lines:
            add(f"Least-squares fit time = a + b * size over {what}, {', '.join(f'{x:g}' for x in xs)} "
                f"(a = fixed overhead per date, target <= 10 s for the build; the bench's catalogue and its "
                f"20,000 images are the same at every size, so their decoding lands in a): " + "; ".join(lines) + ".")
        else:
            add(f"Fixed overhead per date (intercept) over {what}: not measured (one size only).")
    by = {r["size"]: r for r in results}
    if 1 in by and 2 in by:
        add(f"2x / 1x build time: {by[2]['build_s'] / by[1]['build_s']:.2f} (target <= 2.2).")
    else:
        add("2x / 1x build time: not measured (1x and 2x not both run).")
    add("")
    return L


def update_results(path: Path, section: str) -> None:
    """Replace this section in place (or append it); every other section is left as it is. What the
    section held before is kept below the new run, under EARLIER (newest first)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if m := pat.search(text):
        old = m.group(0)[len(SECTION) + 1:].replace(EARLIER + "\n", "").strip("\n")
        new = section.rstrip("\n") + "\n\n" + EARLIER + "\n\n" + old + "\n\n" if old else section + "\n"
        text = text[:m.start()] + new + text[m.end():]
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
    ap.add_argument("--image-spark-alone", action="store_true",
                    help="also time S.decode_images of the build's image plan alone in Spark (first size, once)")
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
            meta["warm_up_s"] = warm_up(spark, inputs[0]["log_dir"])
            print(f"[bench] session warm-up (untimed): {meta['warm_up_s']:.1f}s", flush=True)
            for k, (inp, cfg) in enumerate(zip(inputs, cfgs)):
                results.append(measure(spark, cfg, inp, a.rounds, out, extras=(k == 0),
                                       image_spark_alone=a.image_spark_alone))
                # Saved after every size: an interrupted run keeps the sizes it finished (--from-json renders them).
                meta["load_end"] = loadavg()
                (out / "build_samples_last.json").write_text(
                    json.dumps({"meta": meta, "results": results}, indent=1, default=str))
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
