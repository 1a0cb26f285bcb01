"""Benchmark of the stage-2 training reader (`training/reader.py`) against the model step it feeds.

    python bench/reader_bench.py [--preset demo] [--days 1] [--data DIR] [--batch-size 32]
                                 [--backbones tiny_cnn,resnet18] [--seconds 20] [--rounds 3]
                                 [--threads 2] [--workers 0,1,2] [--fed 0,1] [--nice 0,19]
                                 [--paired-seconds 0] [--device cpu] [--precision auto]
                                 [--copy-to DIR | --parquet DIR]

Data: the simulator's preset (``demo`` by default: 96 px images) for ``--days`` dates, built by stage 1
(`etl.build.build_date`, real Spark + Delta) into ``--data`` (default bench/out/reader_<preset>_<days>d,
git-ignored); an existing build there is reused. The reader reads the latest ``courier_train`` version's
files (listed with deltalake; no Spark once the table exists).

Measured, each for ``--seconds`` (epoch after epoch, as training runs), world size 1, in this process:

1. parquet: the reader's Parquet reads and batching alone (`_raw_batches`, no JPEG decoding);
2. reader: ``iterate_batches`` to uint8 tensors, prefetch 0, for each ``--workers`` value of
   decode_workers (0: in this process with ``--threads`` decode threads; N: N worker processes);
   images/s, CPU ms per image of this process AND its decode workers (from /proc), and images per
   CPU-second ("per core"); with CUDA, also decode_device=cuda (nvjpeg: "per GPU decode");
3. step: ``CourierModel(ImageEncoder(backbone))`` forward + backward + Adam step on batches already
   decoded and held in memory (cycled), fp32, torch's default intra-op threads;
4. reader+step: the training loop fed by ``iterate_batches(prefetch=2)`` for each ``--fed`` value of
   decode_workers (``auto``: what training would use here, `resolve_decode_workers`) and each
   ``--nice`` value of the reader threads' ``background_nice``. 3 and 4 alternate in ``--rounds``
   rounds of seconds/rounds each (the machine is shared: drifting load then hits all alike); medians
   are reported;
   ``--device cuda`` runs 3-5 on the GPU (``--precision`` as train.precision: auto = fp16 + GradScaler),
   the in-memory batches already there, each step ending with the loss read back as in training; the
   ``--fed`` value ``gpu`` then decodes with torchvision on the GPU (nvjpeg, ``train.gpu_decode``);
5. with ``--paired-seconds S``, for each ``--fed`` value: S seconds of pairs of steps on the same
   batch, fed then in memory, back to back (`bench_paired`): a ratio that drifting load from other
   jobs on a shared machine barely moves.

The first item of every timed loop is taken untimed (start-up: opening the first reader, starting the
decode workers, first kernels); the worker start-up is reported separately (``startup_s``).

``--copy-to DIR`` copies the table version's Parquet files (and their image size) into DIR and exits;
``--parquet DIR`` then reads them where neither deltalake nor Spark is installed (a bare GPU machine).

Images are REAL images (mask 1), PV + history. Ratios: reader / step (headroom of the reader alone) and
(reader+step) / step (the issue's target: >= 0.9). "CPU bound" = step CPU per image / (step + reader
CPU per image): what the loop can reach when the reader and the step share the same cores. Results
print as JSON and as a markdown table; the numbers in bench/RESULTS.md were copied from a run of this
script.
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
GPU_DECODE = "gpu"  # a --fed value: decode with torchvision on --device (nvjpeg) instead of on the CPU


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


def children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's child processes (the decode workers):
    the live ones from /proc, plus those already ended and waited for (getrusage; an epoch that ends
    inside the timed part ends its workers)."""
    import resource

    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    me, total = os.getpid(), ended.ru_utime + ended.ru_stime
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return total
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores: /proc/stat's user, nice,
    system, irq, softirq and steal); 0 where /proc is not there."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# ---- data ------------------------------------------------------------------------------------------
def copied_files(folder: Path) -> tuple[list[str], int]:
    """URLs of the Parquet files copied to ``folder`` by ``--copy-to``, and their image px (from its
    bench_meta.json): a machine without deltalake or Spark reads the same rows."""
    meta = folder / "bench_meta.json"
    files = sorted(folder.glob("*.parquet"))
    if not meta.exists() or not files:
        raise SystemExit(f"--parquet {folder}: needs the *.parquet files and bench_meta.json that --copy-to writes")
    return [f"file://{f}" for f in files], json.loads(meta.read_text())["image_px"]


def _resized_jpeg(args) -> bytes:
    """One item image re-encoded at px x px (PIL, JPEG quality 90); an empty slot (padding) stays empty."""
    import io

    from PIL import Image

    data, px = args
    if not data:
        return data
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((px, px), Image.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def copy_files(urls, px: int, dest: Path, resize_px=None) -> None:
    """--copy-to: the Parquet files (numbered: the plan sorts by URL, as it sorts the table's) and their
    image size into ``dest``; with ``resize_px`` every image is re-encoded at that size (a larger-image
    variant of the same rows, e.g. the paper's 224 px, made on all cores) and written in row groups of
    512 rows."""
    import multiprocessing

    import pyarrow as pa
    import pyarrow.parquet as pq

    from etl import fs

    dest.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("spawn").Pool() as pool:
        for i, u in enumerate(urls):
            out = dest / f"part-{i:05d}.parquet"
            if not resize_px:
                fs.copy_to_local(u, str(out))
                continue
            filesystem, path = fs.filesystem(u)
            table = pq.read_table(path, filesystem=filesystem)
            for name in ("pv_images", "click_images"):
                col = table.column(name).combine_chunks()
                flat = pool.map(_resized_jpeg, [(b, resize_px) for b in col.values.to_pylist()], chunksize=64)
                images = pa.ListArray.from_arrays(col.offsets, pa.array(flat, type=col.type.value_type), type=col.type)
                table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), images)
            pq.write_table(table, out, row_group_size=512)
    (dest / "bench_meta.json").write_text(json.dumps({"image_px": resize_px or px, "files": len(urls)}))
    print(f"[bench] copied {len(urls)} file(s) to {dest}" + (f", images at {resize_px} px" if resize_px else ""))


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
    """Take one item untimed (start-up: opening the first reader, starting decode workers, first
    kernels), then consume until exhausted or `seconds` elapsed; returns (items, units counted, wall
    seconds) of the timed part. ``timed.cpu``: CPU seconds of this process (all threads) and of its
    child processes (decode workers) in the timed part; ``timed.others``: the share of the machine's
    cores that OTHER processes kept busy meanwhile (0: a quiet machine; the machine is shared);
    ``timed.startup``: seconds of the first item."""
    it = iter(iterable)
    t0 = time.perf_counter()
    next(it, None)
    timed.startup = time.perf_counter() - t0
    n = units = 0
    t0, c0, k0, m0 = time.perf_counter(), time.process_time(), children_cpu_s(), machine_busy_s()
    for item in it:
        n += 1
        units += count(item)
        if time.perf_counter() - t0 >= seconds:
            break
    wall = time.perf_counter() - t0
    timed.cpu_self = time.process_time() - c0
    timed.cpu = timed.cpu_self + children_cpu_s() - k0
    timed.others = max(0.0, machine_busy_s() - m0 - timed.cpu) / (wall * (os.cpu_count() or 1))
    return n, units, wall


def epochs(urls, first_epoch: int, **kw):
    """The reader's batches over epochs first_epoch, first_epoch + 1, ... without end (as training runs
    them; a fast GPU step finishes the bench preset's epoch in seconds): close it when done."""
    from training.reader import iterate_batches

    for epoch in itertools.count(first_epoch):
        yield from iterate_batches(urls, rank=0, world_size=1, seed=0, epoch=epoch, **kw)


def decoding(workers, device) -> dict:
    """The reader's decoding arguments for a --fed value: ``gpu`` decodes on ``device`` (nvjpeg), a
    number in that many worker processes (0: in this process's threads)."""
    on_gpu = workers == GPU_DECODE
    return {"decode_workers": 0 if on_gpu else workers, "decode_device": device if on_gpu else None}


def real_images(cols) -> int:
    return int((cols["pv_mask"] != 0).sum() + (cols["click_mask"] != 0).sum())


def raw_epochs(urls, batch_size):
    """The reader's undecoded batches over epochs 0, 1, ... without end. Chained like `epochs`: when an
    epoch is one shuffle window, its first batch does the epoch's only Parquet read, and `timed` takes
    the first item untimed, so a single epoch would time slicing alone."""
    import training.reader as R

    for epoch in itertools.count():
        plan = R.plan_epoch(urls, rank=0, world_size=1, seed=0, epoch=epoch)
        yield from R._raw_batches(plan, batch_size, 0, epoch, 0)


def bench_parquet(urls, batch_size, seconds):
    n, imgs, wall = timed(raw_epochs(urls, batch_size), seconds, real_images)
    return {"batches": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall,
            "cpu_ms_per_image": 1e3 * timed.cpu / max(imgs, 1)}


def bench_reader(urls, batch_size, seconds, workers, threads, px, device=None):
    it = epochs(urls, 0, batch_size=batch_size, decode_workers=workers, decode_threads=threads,
                decode_device=device, image_px=px, prefetch=0)
    n, imgs, wall = timed(it, seconds, lambda b: b.num_images)
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    it.close()
    cpu_ms = 1e3 * timed.cpu / max(imgs, 1)
    return {"batches": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall,
            "decode_workers": workers, "decode_threads": threads if not workers else None,
            "decode_device": None if device is None else str(device),
            "cpu_ms_per_image": cpu_ms, "images_per_cpu_s": 1e3 / max(cpu_ms, 1e-9), "startup_s": timed.startup,
            "cpu_ms_per_image_this_process": 1e3 * timed.cpu_self / max(imgs, 1), "others": timed.others}


def make_model(backbone: str, device="cpu"):
    import torch

    from training.courier import CourierModel, ImageEncoder

    torch.manual_seed(0)
    model = CourierModel(ImageEncoder(backbone, dim=256)).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-6)
    return model, opt


class Stepper:
    """The training step of `training/train.py` on ``device`` (its `forward` and `update`): the batch
    moved there (non-blocking), the forward under autocast (``precision`` as in train.precision: auto =
    fp16 + GradScaler on CUDA, fp32 on CPU), backward, Adam. On CUDA each step ends with a synchronize
    (the loss read back, as the training loop does every step), so a step's time is its GPU time."""

    def __init__(self, backbone: str, device="cpu", precision: str = "fp32"):
        import torch

        from training.train import autocast_dtype, grad_scaler

        self.device = torch.device(device)
        self.model, self.opt = make_model(backbone, self.device)
        self.amp = autocast_dtype(precision, self.device)
        self.scaler = grad_scaler(self.amp)

    def __call__(self, batch) -> None:
        from training.train import forward, update

        batch = batch.to(self.device, non_blocking=True)
        loss, _ = forward(self.model, batch.as_dict(), self.device, self.amp)
        update(loss, self.opt, self.scaler)
        if self.device.type == "cuda":
            float(loss.item())


def bench_step(batches, backbone, seconds, device="cpu", precision="fp32"):
    step = Stepper(backbone, device, precision)

    def run():
        for b in itertools.cycle(batches):
            step(b)
            yield b

    n, imgs, wall = timed(run(), seconds, lambda b: b.num_images)
    return {"steps": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall,
            "cpu_ms_per_image": 1e3 * timed.cpu / max(imgs, 1), "others": timed.others}


def bench_reader_step(urls, batch_size, backbone, seconds, workers, threads, px, nice, device="cpu",
                      precision="fp32"):
    """The training loop fed by the reader; ``workers == "gpu"``: decoded on ``device`` (nvjpeg)."""
    step = Stepper(backbone, device, precision)
    it = epochs(urls, 1, batch_size=batch_size, decode_threads=threads, image_px=px, prefetch=2,
                background_nice=nice, **decoding(workers, device))

    def run():
        for b in it:
            step(b)
            yield b

    n, imgs, wall = timed(run(), seconds, lambda b: b.num_images)
    it.close()
    return {"steps": n, "images": imgs, "seconds": wall, "images_per_s": imgs / wall, "decode_workers": workers,
            "cpu_ms_per_image": 1e3 * timed.cpu / max(imgs, 1), "others": timed.others}


def bench_paired(urls, batch_size, backbone, seconds, workers, threads, px, min_pairs=3, memory=None,
                 quiet_share=0.1, nice=0, device="cpu", precision="fp32"):
    """The fed step and the in-memory step on the SAME batch, back to back, pair after pair: step k is
    fed by ``iterate_batches(prefetch=2)`` (timed from asking the iterator for the batch to the end of
    the optimizer step; the reader decodes the batch that replaces it in the pipeline meanwhile, in
    this process or its workers), then the same batch, already in memory, goes through the same step
    again (nothing of the reader runs then: the pipeline is full). Load from other jobs drifts over
    seconds, so the ratio of two adjacent steps on the same input is robust to it where whole-segment
    throughputs are not. Returns the median and the pooled (sum of in-memory times / sum of fed times)
    ratio over the pairs taken in ``seconds`` (at least ``min_pairs``). ``memory`` (a list of decoded
    batches): the control, "fed" from memory instead of the reader: its ratio shows the bias of the
    pairing itself (1.0 when there is none)."""
    step = Stepper(backbone, device, precision)
    if memory is not None:
        it = (b for b in itertools.cycle(memory))
    else:
        it = epochs(urls, 2, batch_size=batch_size, decode_threads=threads, image_px=px, prefetch=2,
                    background_nice=nice, **decoding(workers, device))
    step(next(it))  # start-up: workers, first kernels
    time.sleep(1.0)  # let the pipeline fill
    fed, mem, others, workers_cpu = [], [], [], [0.0, 0.0]
    t_end = time.perf_counter() + seconds
    while len(fed) < min_pairs or time.perf_counter() < t_end:
        t0, k0, c0, m0 = time.perf_counter(), children_cpu_s(), time.process_time(), machine_busy_s()
        b = next(it, None)
        if b is None:
            break
        step(b)
        t1, k1 = time.perf_counter(), children_cpu_s()
        step(b)
        t2, k2 = time.perf_counter(), children_cpu_s()
        ours = time.process_time() - c0 + k2 - k0
        others.append(max(0.0, machine_busy_s() - m0 - ours) / ((t2 - t0) * (os.cpu_count() or 1)))
        fed.append(t1 - t0)
        mem.append(t2 - t1)
        workers_cpu[0] += k1 - k0
        workers_cpu[1] += k2 - k1
    it.close()
    ratios = [m / f for m, f in zip(mem, fed)]
    quiet = [r for r, o in zip(ratios, others) if o < quiet_share]
    # decode workers' CPU that spilled over into the in-memory steps (it should be ~0: they refill the
    # pipeline during the fed step); the pairing is only fair when it is small
    spill = workers_cpu[1] / max(sum(workers_cpu), 1e-9) if decoding(workers, device)["decode_workers"] else None
    return {"pairs": len(fed), "decode_workers": workers, "median_ratio": statistics.median(ratios),
            "pooled_ratio": sum(mem) / sum(fed), "ratios": ratios, "worker_cpu_share_in_memory_steps": spill,
            "others": others, "quiet_pairs": len(quiet), "quiet_median": statistics.median(quiet) if quiet else None}


def _quiet(pr: dict) -> str:
    return "" if pr["quiet_median"] is None else f"; {pr['quiet_pairs']} quiet pairs: median {pr['quiet_median']:.2f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--data", default=None, help="folder of the built tables (reused when present)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbones", default="tiny_cnn,resnet18")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2, help="decode_threads when decode_workers is 0")
    ap.add_argument("--workers", default="0,1,2", help="decode_workers values for the reader-alone runs")
    ap.add_argument("--fed", default="0,1", help="decode_workers values for the reader+step runs ('auto' allowed)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating step / reader+step rounds per backbone")
    ap.add_argument("--quiet", type=float, default=0.1,
                    help="a round is quiet when other processes kept less than this share of the cores busy")
    ap.add_argument("--nice", default=None,
                    help="background_nice values of the reader's threads for the reader+step runs (default: the "
                         "reader's BACKGROUND_NICE; e.g. 0,19 to compare)")
    ap.add_argument("--device", default="cpu", help="where the model step runs (cuda: the step on the GPU)")
    ap.add_argument("--precision", default="auto",
                    help="as train.precision: auto = fp16 + GradScaler on CUDA, fp32 on CPU")
    ap.add_argument("--parquet", default=None,
                    help="read the Parquet files --copy-to copied into this folder (no deltalake or Spark needed)")
    ap.add_argument("--copy-to", default=None,
                    help="copy the table version's Parquet files and image size into this folder, then exit")
    ap.add_argument("--resize-px", type=int, default=None,
                    help="with --copy-to: re-encode every image at this size (e.g. 224, the paper's)")
    ap.add_argument("--paired-seconds", type=float, default=0.0,
                    help="per --fed (and --nice) value: seconds of paired fed / in-memory steps on the same batch (0: none)")
    args = ap.parse_args(argv)

    import torch

    from training.reader import (BACKGROUND_NICE, available_cores, count_rows, gpu_decode_supported,
                                 iterate_batches, quiet_petastorm_warnings, resolve_decode_workers, row_groups)

    quiet_petastorm_warnings()
    if args.parquet:
        urls, px = copied_files(Path(args.parquet).resolve())
    else:
        data = Path(args.data or ROOT / "bench" / "out" / f"reader_{args.preset}_{args.days}d").resolve()
        urls, px = ensure_table(data, args.preset, args.days)
    if args.copy_to:
        copy_files(urls, px, Path(args.copy_to), args.resize_px)
        return {}
    device = torch.device(args.device)
    parse = lambda v: v if v in ("auto", GPU_DECODE) else int(v)  # noqa: E731
    workers = [parse(w) for w in args.workers.split(",")]
    nices = [int(v) for v in args.nice.split(",")] if args.nice else [BACKGROUND_NICE]
    # (decode_workers, background_nice) of each reader+step variant; its key names both when several nices
    fed = [(parse(w), n) for n in nices for w in args.fed.split(",")]
    key = (lambda w, n: f"{w} nice {n}") if len(nices) > 1 else (lambda w, n: str(w))  # noqa: E731
    auto = resolve_decode_workers("auto")
    out = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "available_cores": available_cores(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads(), "auto_decode_workers": auto,
                       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                       "loadavg_start": loadavg()},
           "data": {"preset": args.preset, "days": args.days, "rows": count_rows(urls), "files": len(urls),
                    "row_groups": len(row_groups(urls)), "image_px": px, "batch_size": args.batch_size,
                    "bytes": sum(os.path.getsize(u[len("file://"):] if u.startswith("file://") else u)
                                 for u in urls)},
           "seconds": args.seconds, "args": vars(args)}
    print(json.dumps(out["data"]), json.dumps(out["machine"]), flush=True)
    bench_parquet(urls, args.batch_size, 1.0)  # warm-up: imports, page cache
    out["parquet"] = bench_parquet(urls, args.batch_size, args.seconds)
    print("[bench] parquet", json.dumps(out["parquet"]), flush=True)
    out["reader"] = []
    for w in workers:
        out["reader"].append(bench_reader(urls, args.batch_size, args.seconds, w, args.threads, px))
        print("[bench] reader", json.dumps(out["reader"][-1]), flush=True)
    if torch.cuda.is_available() and gpu_decode_supported("cuda:0"):
        out["reader"].append(bench_reader(urls, args.batch_size, args.seconds, 0, args.threads, px, device="cuda:0"))
        print("[bench] reader", json.dumps(out["reader"][-1]), flush=True)
    mem = [b.to(device) for b in itertools.islice(iterate_batches(urls, batch_size=args.batch_size, rank=0,
                                                                  world_size=1, seed=0, epoch=0, image_px=px), 8)]
    out["models"] = {}
    cpu_reader = {r["decode_workers"]: r["cpu_ms_per_image"] for r in out["reader"] if not r["decode_device"]}
    for backbone in args.backbones.split(","):
        # Alternate step / reader+step rounds so that drifting load on the shared machine hits all alike.
        rounds = []
        for _ in range(args.rounds):
            s = bench_step(mem, backbone, args.seconds / args.rounds, device, args.precision)
            r = {"step": s["images_per_s"], "step_cpu_ms_per_image": s["cpu_ms_per_image"], "loadavg": loadavg(),
                 "others": s["others"]}
            for w, nice in fed:
                rs = bench_reader_step(urls, args.batch_size, backbone, args.seconds / args.rounds,
                                       auto if w == "auto" else w, args.threads, px, nice, device, args.precision)
                k = key(w, nice)
                r[f"reader_step[{k}]"] = rs["images_per_s"]
                r[f"ratio[{k}]"] = rs["images_per_s"] / s["images_per_s"]
                r[f"reader_step_cpu_ms_per_image[{k}]"] = rs["cpu_ms_per_image"]
                r["others"] = max(r["others"], rs["others"])  # the busiest of the round's segments
            rounds.append(r)
            print(f"[bench] {backbone} round", json.dumps(r), flush=True)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "loadavg"}
        # rounds in which other processes kept less than --quiet of the machine busy in every segment
        quiet = [r for r in rounds if r["others"] < args.quiet]
        m = {"rounds": rounds, "step_images_per_s": med["step"], "step_cpu_ms_per_image": med["step_cpu_ms_per_image"],
             "fed": {}}
        for w, nice in fed:
            n, k = auto if w == "auto" else w, key(w, nice)
            # Load-independent estimate: CPU per image of the step alone vs of the reader alone (this
            # process + its decode workers); sharing the cores, the loop reaches at most step / (step + reader).
            reader_cpu = cpu_reader.get(n)
            m["fed"][k] = {"decode_workers": n, "background_nice": nice,
                           "reader_step_images_per_s": med[f"reader_step[{k}]"],
                           "reader_step_over_step": med[f"ratio[{k}]"],
                           "ratios": [r[f"ratio[{k}]"] for r in rounds],
                           "quiet_rounds": len(quiet),
                           "quiet_median": statistics.median(r[f"ratio[{k}]"] for r in quiet) if quiet else None,
                           "cpu_bound_ratio": None if reader_cpu is None else
                           med["step_cpu_ms_per_image"] / (med["step_cpu_ms_per_image"] + reader_cpu)}
        if args.paired_seconds > 0:
            m["paired_control"] = bench_paired(urls, args.batch_size, backbone, args.paired_seconds, 0, args.threads,
                                               px, memory=mem, quiet_share=args.quiet, device=device,
                                               precision=args.precision)
            print(f"[bench] {backbone} paired control (memory)", json.dumps(m["paired_control"]), flush=True)
            for w, nice in fed:
                pr = bench_paired(urls, args.batch_size, backbone, args.paired_seconds,
                                  auto if w == "auto" else w, args.threads, px, quiet_share=args.quiet, nice=nice,
                                  device=device, precision=args.precision)
                m["fed"][key(w, nice)]["paired"] = pr
                print(f"[bench] {backbone} paired decode_workers={w} background_nice={nice}", json.dumps(pr), flush=True)
        out["models"][backbone] = m
    out["machine"]["loadavg_end"] = loadavg()

    print(json.dumps(out, indent=1))
    print("\n| measurement | images/s | CPU ms / image (incl. workers) | images / CPU-s | ratio |")
    print("|---|---|---|---|---|")
    p = out["parquet"]
    print(f"| Parquet reads only (no decode) | {p['images_per_s']:.0f} | {p['cpu_ms_per_image']:.3f} | | |")
    for r in out["reader"]:
        what = (f"decode on {r['decode_device']} (torchvision)" if r["decode_device"] else
                f"decode_workers={r['decode_workers']}" if r["decode_workers"]
                else f"decode_workers=0 (decode_threads={r['decode_threads']})")
        print(f"| reader alone, {what} | {r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.3f} "
              f"(this process {r['cpu_ms_per_image_this_process']:.3f}) | {r['images_per_cpu_s']:.0f} | "
              f"start-up {r['startup_s']:.2f} s |")
    for name, m in out["models"].items():
        print(f"| {name}: model step on in-memory tensors ({args.device}, {args.precision}) | "
              f"{m['step_images_per_s']:.1f} | "
              f"{m['step_cpu_ms_per_image']:.2f} | | |")
        if "paired_control" in m:
            pr = m["paired_control"]
            print(f"| {name}: control: in-memory step paired with itself on the same batch ({pr['pairs']} pairs) "
                  f"| | | | median {pr['median_ratio']:.2f}, pooled {pr['pooled_ratio']:.2f}{_quiet(pr)} |")
        for w, f in m["fed"].items():
            bound = "" if f["cpu_bound_ratio"] is None else f"; CPU bound {f['cpu_bound_ratio']:.3f}"
            label = (f"decoded on {device} (torchvision)" if w.startswith(GPU_DECODE) else
                     f"decode_workers={w}" + (f" = {f['decode_workers']}" if w.startswith("auto") else "")
                     + f", reader threads at nice {f['background_nice']}")
            quiet = ("" if f["quiet_median"] is None else
                     f"; {f['quiet_rounds']} quiet round(s): median {f['quiet_median']:.2f}")
            print(f"| {name}: reader (prefetch 2, {label}) + step | {f['reader_step_images_per_s']:.1f} | | | "
                  f"median {f['reader_step_over_step']:.2f} (rounds "
                  f"{', '.join(format(x, '.2f') for x in f['ratios'])}){quiet}{bound} |")
            if "paired" in f:
                pr = f["paired"]
                print(f"| {name}: same, paired with the in-memory step on the same batch ({pr['pairs']} pairs) | | | | "
                      f"median {pr['median_ratio']:.2f}, pooled {pr['pooled_ratio']:.2f}{_quiet(pr)} |")
    return out


if __name__ == "__main__":
    main()
