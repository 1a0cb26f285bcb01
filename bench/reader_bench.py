"""Benchmark of the stage-2 training reader (`training/reader.py`) against the model step it feeds.

    python bench/reader_bench.py [--preset demo] [--days 1] [--data DIR] [--batch-size 32]
                                 [--backbones tiny_cnn,resnet18] [--seconds 20] [--threads 1,2]

Data: the simulator's preset (``demo`` by default: 96 px images) for ``--days`` dates, built by stage 1
(`etl.build.build_date`, real Spark + Delta) into ``--data`` (default bench/out/reader_<preset>_<days>d,
git-ignored); an existing build there is reused. The reader reads the latest ``courier_train`` version's
files (listed with deltalake; no Spark once the table exists).

Measured, each for ``--seconds`` (or one epoch, whichever is shorter), world size 1, in this process:

1. parquet: the reader's Petastorm reads and batching alone (`_raw_batches`, no JPEG decoding);
2. reader: ``iterate_batches`` to uint8 tensors, prefetch 0 (decode in the caller's time), for each
   ``--threads`` value of decode_threads;
3. step: ``CourierModel(ImageEncoder(backbone))`` forward + backward + Adam step on batches already
   decoded and held in memory (cycled), fp32, torch's default intra-op threads;
4. reader+step: the training loop fed by ``iterate_batches(prefetch=2)`` (reading and decoding in a
   background thread while the step runs). 3 and 4 alternate in ``--rounds`` rounds of seconds/rounds
   each (the machine is shared: drifting load then hits both alike); medians are reported.

The first item of every timed loop is taken untimed (start-up: opening the first reader, first kernels).

Images are REAL images (mask 1), PV + history. Ratios: reader / step (headroom of the reader alone) and
(reader+step) / step (the issue's target: >= 0.9). Results print as JSON and as a markdown table; the
numbers in bench/RESULTS.md were copied from a run of this script.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DATE0 = "2026-11-20"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def cpu_name() -> str:
    try:
        return next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    except OSError:
        return "?"


# ---- data ------------------------------------------------------------------------------------------
def ensure_table(data: Path, preset: str, days: int) -> tuple[list[str], int]:
    """URLs of the latest courier_train version under data/ (built first if missing), and image px."""
    from deltalake import DeltaTable

    table = data / "data" / "tables" / "courier_train"
    meta = data / "bench_meta.json"
    if not (DeltaTable.is_deltatable(str(table)) and meta.exists()):
        from conftest import write_config

        from etl.build import build_date
        from etl.config import load_config
        from sim import simulate
        from etl.spark import get_spark
        from etl.tables import TableStore

        data.mkdir(parents=True, exist_ok=True)
        from sim import PRESETS

        # item images at the preset's rendered size (demo: 96 px), the table's image size
        cfg = load_config(write_config(data, {"spark": {"shuffle_partitions": 4},
                                              "samples": {"image_px": PRESETS[preset]["image_px"]}}))
        t0 = time.perf_counter()
        manifest = simulate(cfg.raw_root, cfg.images_root, cfg.truth_root, preset=preset, seed=7, days=days,
                            progress=None)
        print(f"[bench] simulate {preset} {days}d: {time.perf_counter() - t0:.0f}s", flush=True)
        spark = get_spark(cfg)
        store = TableStore(spark, cfg)
        for d in sorted(manifest["dates"]):
            t0 = time.perf_counter()
            build_date(spark, cfg, store, d, "reader-bench")
            print(f"[bench] build {d}: {time.perf_counter() - t0:.0f}s", flush=True)
        spark.stop()
        meta.write_text(json.dumps({"preset": preset, "days": days, "image_px": cfg.samples.image_px}))
    px = json.loads(meta.read_text())["image_px"]
    return sorted(DeltaTable(str(table)).file_uris()), px


# ---- measurements ----------------------------------------------------------------------------------
def timed(iterable, seconds: float, count):
    """Take one item untimed (start-up: opening the first reader, first kernels), then consume until
    exhausted or `seconds` elapsed; returns (items, units counted, wall seconds) of the timed part."""
    it = iter(iterable)
    next(it, None)
    n = units = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for item in it:
        n += 1
        units += count(item)
        if time.perf_counter() - t0 >= seconds:
            break
    timed.cpu = time.process_time() - c0  # CPU seconds of this process (all threads) in the timed part
    return n, units, time.perf_counter() - t0


def real_images(cols) -> int:
    return int((cols["pv_mask"] != 0).sum() + (cols["click_mask"] != 0).sum())


def bench_parquet(urls, batch_size, seconds):
    import training.reader as R

    plan = R.plan_epoch(urls, rank=0, world_size=1, seed=0, epoch=0)
    n, imgs, wall = timed(R._raw_batches(plan, batch_size, 0, 0, 0), seconds, real_images)
    return {"batches": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall,
            "cpu_ms_per_image": 1e3 * timed.cpu / max(imgs, 1)}


def bench_reader(urls, batch_size, seconds, threads, px):
    from training.reader import iterate_batches

    it = iterate_batches(urls, batch_size=batch_size, rank=0, world_size=1, seed=0, epoch=0,
                         decode_threads=threads, image_px=px, prefetch=0)
    n, imgs, wall = timed(it, seconds, lambda b: b.num_images)
    it.close()
    return {"batches": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall, "decode_threads": threads,
            "cpu_ms_per_image": 1e3 * timed.cpu / max(imgs, 1)}


def make_model(backbone: str):
    import torch

    from training.courier import CourierModel, ImageEncoder

    torch.manual_seed(0)
    model = CourierModel(ImageEncoder(backbone, dim=256))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-6)
    return model, opt


def step(model, opt, batch) -> None:
    opt.zero_grad(set_to_none=True)
    loss, _ = model(*batch.model_inputs())
    loss.backward()
    opt.step()


def bench_step(batches, backbone, seconds):
    model, opt = make_model(backbone)

    def run():
        for b in itertools.cycle(batches):
            step(model, opt, b)
            yield b

    n, imgs, wall = timed(run(), seconds, lambda b: b.num_images)
    return {"steps": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall,
            "cpu_ms_per_image": 1e3 * timed.cpu / max(imgs, 1)}


def bench_reader_step(urls, batch_size, backbone, seconds, threads, px):
    from training.reader import iterate_batches

    model, opt = make_model(backbone)
    it = iterate_batches(urls, batch_size=batch_size, rank=0, world_size=1, seed=0, epoch=1,
                         decode_threads=threads, image_px=px, prefetch=2)

    def run():
        for b in it:
            step(model, opt, b)
            yield b

    n, imgs, wall = timed(run(), seconds, lambda b: b.num_images)
    it.close()
    return {"steps": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall, "decode_threads": threads,
            "cpu_ms_per_image": 1e3 * timed.cpu / max(imgs, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--data", default=None, help="folder of the built tables (reused when present)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbones", default="tiny_cnn,resnet18")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", default="1,2", help="decode_threads values for the reader-alone runs")
    ap.add_argument("--rounds", type=int, default=3, help="alternating step / reader+step rounds per backbone")
    args = ap.parse_args(argv)

    import torch

    from training.reader import count_rows, iterate_batches, quiet_petastorm_warnings, row_groups

    quiet_petastorm_warnings()
    data = Path(args.data or ROOT / "bench" / "out" / f"reader_{args.preset}_{args.days}d").resolve()
    urls, px = ensure_table(data, args.preset, args.days)
    threads = [int(t) for t in args.threads.split(",")]
    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "loadavg_start": loadavg()},
           "data": {"preset": args.preset, "days": args.days, "rows": count_rows(urls), "files": len(urls),
                    "row_groups": len(row_groups(urls)), "image_px": px, "batch_size": args.batch_size,
                    "bytes": sum(os.path.getsize(u[len("file://"):] if u.startswith("file://") else u)
                                 for u in urls)},
           "seconds": args.seconds}
    print(json.dumps(out["data"]), flush=True)
    bench_parquet(urls, args.batch_size, 1.0)  # warm-up: imports, page cache
    out["parquet"] = bench_parquet(urls, args.batch_size, args.seconds)
    print("[bench] parquet", json.dumps(out["parquet"]), flush=True)
    out["reader"] = [bench_reader(urls, args.batch_size, args.seconds, t, px) for t in threads]
    for r in out["reader"]:
        print("[bench] reader", json.dumps(r), flush=True)
    best_threads = max(out["reader"], key=lambda r: r["images_per_s"])["decode_threads"]
    mem = list(itertools.islice(iterate_batches(urls, batch_size=args.batch_size, rank=0, world_size=1, seed=0,
                                                epoch=0, image_px=px), 8))
    out["models"] = {}
    reader_best = max(r["images_per_s"] for r in out["reader"])
    for backbone in args.backbones.split(","):
        # Alternate step / reader+step rounds so that drifting load on the shared machine hits both alike.
        rounds = []
        for _ in range(args.rounds):
            s = bench_step(mem, backbone, args.seconds / args.rounds)
            rs = bench_reader_step(urls, args.batch_size, backbone, args.seconds / args.rounds, best_threads, px)
            rounds.append({"step": s["images_per_s"], "reader_step": rs["images_per_s"],
                           "ratio": rs["images_per_s"] / s["images_per_s"],
                           "step_cpu_ms_per_image": s["cpu_ms_per_image"],
                           "reader_step_cpu_ms_per_image": rs["cpu_ms_per_image"]})
            print(f"[bench] {backbone} round", json.dumps(rounds[-1]), flush=True)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        # Load-independent estimate: CPU per image of the step alone vs of the reader alone; the reader
        # shares the CPU with the step, so the loop can reach at most step / (step + reader) of the step.
        reader_cpu = min(r["cpu_ms_per_image"] for r in out["reader"])
        out["models"][backbone] = {"rounds": rounds, "step_images_per_s": med["step"],
                                   "reader_step_images_per_s": med["reader_step"],
                                   "reader_step_over_step": med["ratio"],
                                   "reader_over_step": reader_best / med["step"],
                                   "step_cpu_ms_per_image": med["step_cpu_ms_per_image"],
                                   "cpu_bound_ratio": med["step_cpu_ms_per_image"]
                                   / (med["step_cpu_ms_per_image"] + reader_cpu)}
    out["machine"]["loadavg_end"] = loadavg()

    print(json.dumps(out, indent=1))
    print("\n| measurement | images/s | CPU ms / image | ratio |\n|---|---|---|---|")
    p = out["parquet"]
    print(f"| Parquet reads only (no decode) | {p['images_per_s']:.0f} | {p['cpu_ms_per_image']:.3f} | |")
    for r in out["reader"]:
        print(f"| reader, decode_threads={r['decode_threads']} | {r['images_per_s']:.0f} | "
              f"{r['cpu_ms_per_image']:.3f} | |")
    for name, m in out["models"].items():
        print(f"| {name}: model step on in-memory tensors | {m['step_images_per_s']:.1f} | "
              f"{m['step_cpu_ms_per_image']:.2f} | reader alone / step = {m['reader_over_step']:.0f} |")
        print(f"| {name}: reader (prefetch 2) + step | {m['reader_step_images_per_s']:.1f} | | "
              f"median {m['reader_step_over_step']:.2f} (rounds "
              f"{', '.join(format(r['ratio'], '.2f') for r in m['rounds'])}); CPU bound {m['cpu_bound_ratio']:.3f} |")
    return out


if __name__ == "__main__":
    main()
