"""The GPU check behind bench/gpu_check.sh: the real COURIER training step and FAISS on the GPU(s).

Rows of the table it prints (markdown, also written as JSON with --json):
1. swin_t, 224 px, fp16 autocast + GradScaler, one optimizer step of the COURIER loss on a batch of
   ``--batch`` PVs per GPU (each PV = l_pv + l_click = 10 images, the paper's 64 PVs -> 640 images):
   images/s and peak GPU memory, with gradient checkpointing off and on. The paper-scale target is
   >= 3000 images/s per H100-class GPU.
2. The same step under DDP/NCCL over every visible GPU (one process per GPU, the PV items gathered
   across ranks with gradients, as in training): total images/s and per GPU.
3. faiss-gpu: spherical k-means of 1e6 x 256 random vectors into 1e4 centroids (--kmeans-iters
   iterations), then the assignment of all 1e6 vectors (nearest centroid); skipped with a message when
   faiss is not importable.
4. The training reader's JPEG decoding at 224 px (``--batch`` PVs x 10 synthetic product-like
   JPEGs, quality 90): torchvision.io.decode_jpeg on the GPU (nvjpeg, batched), through the reader's own
   decoder (``training.reader._TensorDecoder``, what ``train.gpu_decode`` uses), in images/s per GPU,
   against one CPU core running ``training.jpeg.decode_one`` (what the decode worker processes run:
   simplejpeg where installed, else PIL; the same pixels) in images/s per core, and the largest pixel
   difference between the two.
5. The trainer end to end: ``training.train.train_fn`` (what TorchDistributor runs) in one DDP process
   per GPU over NCCL on a synthetic courier_train Parquet file: the reader (nvjpeg decoding), fp16 +
   GradScaler, the epoch's all-reduced flags, a checkpoint, and a resume from it. Its images/s include
   the reader, decoding and start-up; rows 1-2 are the step alone.

Imports only torch, torchvision, numpy, pillow (simplejpeg if present), pyyaml and the project's
training model, loss and reader modules (no Spark, MLflow, deltalake or petastorm): it runs on a bare
GPU machine. The step's batches are synthetic uint8 images made on the GPU: rows 1-2 measure the model
step, not the reader (row 4 measures its JPEG decoding; bench/reader_bench.py the whole reader).

Exit status: 0 all rows ran; 1 a row failed (its error is in the table); 77 no CUDA device (printed
at once, nothing measured). ``--smoke`` runs every row on CPU at toy sizes (tiny_cnn, 32 px, gloo,
faiss-cpu when importable) to check the code path where no GPU is available; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

EXIT_NO_GPU = 77  # the conventional "skipped" status of test harnesses (automake, meson)
TARGET_IMAGES_PER_S = 3000  # per H100-class GPU, swin_t 224 px fp16 (issue 10)


def _train_dict(backbone: str, grad_checkpointing: bool) -> dict:
    """The training settings the job would use (etl.config's TrainConf defaults: the paper's COURIER)."""
    from etl.config import TrainConf

    t = dataclasses.asdict(TrainConf())
    t.update(backbone=backbone, grad_checkpointing=grad_checkpointing, pretrained_path=None)
    return t


def _batch(batch: int, l_pv: int, l_click: int, px: int, device, seed: int) -> dict:
    """Synthetic PVs: random pixels, every slot a real item, the first PV item clicked."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    labels = torch.zeros(batch, l_pv, dtype=torch.long, device=device)
    labels[:, 0] = 1
    return {
        "pv_images": torch.randint(0, 256, (batch, l_pv, 3, px, px), dtype=torch.uint8, device=device, generator=g),
        "pv_labels": labels,
        "pv_mask": torch.ones(batch, l_pv, dtype=torch.long, device=device),
        "click_images": torch.randint(0, 256, (batch, l_click, 3, px, px), dtype=torch.uint8, device=device,
                                      generator=g),
        "click_mask": torch.ones(batch, l_click, dtype=torch.long, device=device),
    }


def measure_step(args, grad_checkpointing: bool, distributed: bool = False) -> dict:
    """Images/s and peak memory of the training step (this process; DDP when `distributed`)."""
    import torch

    from training import distributed as dist
    from training.train import autocast_dtype, build_model, forward, grad_scaler, update

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    t = _train_dict(args.backbone, grad_checkpointing)
    raw = build_model(t, dist.gather_with_grad_for("ddp")).to(device)
    model = dist.wrap_model(raw, "ddp") if distributed else raw
    optimizer = torch.optim.Adam(raw.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    amp = autocast_dtype(args.precision, device)
    scaler = grad_scaler(amp)
    batch = _batch(args.batch, 5, 5, args.px, device, seed=dist.rank())
    images = args.batch * 10
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():  # the trainer's step
        loss, _ = forward(model, batch, device, amp)
        update(loss, optimizer, scaler, dist.loss_scale_for_backward("ddp"))
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if distributed:
            dist.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    out = {"images_per_s": images * args.steps / elapsed, "step_s": elapsed / args.steps,
           "loss": float(loss.detach().float().item()),
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    del model, raw, optimizer
    return out


def _ddp_worker(local_rank: int, world: int, port: int, args, out_path: str) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    from training import distributed as dist

    with dist.joined("ddp", process_group_backend="nccl" if args.device == "cuda" else "gloo"):
        r = measure_step(args, grad_checkpointing=args.ddp_grad_checkpointing, distributed=True)
        totals = dist.all_reduce_sum(torch.tensor([r["images_per_s"]], dtype=torch.float64,
                                                  device="cuda" if args.device == "cuda" else "cpu"))
        if local_rank == 0:
            with open(out_path, "w") as fh:
                json.dump({**r, "images_per_s": float(totals.item()), "world": world}, fh)


def measure_ddp(args) -> dict:
    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if args.device == "cuda" else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        mp.spawn(_ddp_worker, args=(world, port, args, out), nprocs=world, join=True)
        with open(out) as fh:
            return json.load(fh)


def measure_faiss(args) -> dict:
    import numpy as np

    try:
        import faiss
    except ImportError as e:
        return {"skipped": f"faiss is not importable ({e}); install faiss-gpu to run this row"}
    gpu = args.device == "cuda"
    if gpu and not hasattr(faiss, "StandardGpuResources"):
        return {"skipped": "faiss is importable but has no GPU support (faiss-cpu); install faiss-gpu"}
    x = np.random.default_rng(0).standard_normal((args.kmeans_n, 256), dtype=np.float32)
    faiss.normalize_L2(x)
    km = faiss.Kmeans(256, args.kmeans_k, niter=args.kmeans_iters, spherical=True, gpu=gpu, seed=1,
                      max_points_per_centroid=max(1, args.kmeans_n // args.kmeans_k + 1), verbose=False)
    t0 = time.perf_counter()
    km.train(x)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, assign = km.index.search(x, 1)
    assign_s = time.perf_counter() - t0
    return {"train_s": train_s, "assign_s": assign_s, "n": args.kmeans_n, "k": args.kmeans_k,
            "iters": args.kmeans_iters, "clusters_used": int(len(np.unique(assign))), "gpu": gpu}


def _jpegs(n: int, px: int, seed: int = 0) -> list:
    """n product-like JPEGs (quality 90): a coloured shape on a noisy gradient, different each time."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    ramp = np.linspace(0, 1, px, dtype=np.float32)
    for _ in range(n):
        base = rng.uniform(60, 200, 3).astype(np.float32)
        img = base * (0.7 + 0.3 * ramp[None, :, None]) + rng.normal(0, 8, (px, px, 3)).astype(np.float32)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        a, b = sorted(rng.integers(px // 8, px - px // 8, 2))
        ImageDraw.Draw(pil).ellipse([a, a, b + 1, b + 1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure_decode(args) -> dict:
    """The reader's JPEG decoding: on the device with torchvision (the reader's _TensorDecoder) vs one CPU
    core (what each decode worker process does)."""
    import numpy as np
    import torch

    from training import jpeg
    from training.reader import _TensorDecoder

    px = args.decode_px
    l_pv = l_click = 5
    n = args.batch * (l_pv + l_click)
    data = _jpegs(n, px)
    cols = {"pv_mask": np.ones((args.batch, l_pv), dtype=bool),
            "click_mask": np.ones((args.batch, l_click), dtype=bool),
            "pv_images": np.array(data[:args.batch * l_pv], dtype=object).reshape(args.batch, l_pv),
            "click_images": np.array(data[args.batch * l_pv:], dtype=object).reshape(args.batch, l_click)}
    scratch = np.empty((px, px, 3), dtype=np.uint8)
    t0 = time.process_time()
    cpu = [jpeg.decode_one(d, px, scratch).copy() for d in data]
    cpu_per_core = n / max(time.process_time() - t0, 1e-9)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    decoder = _TensorDecoder(device, px)
    for _ in range(args.warmup):
        decoder.submit(cols)()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        pv, click, _, _ = decoder.submit(cols)()  # the decoder synchronizes its stream before returning
    dev_per_s = n * args.steps / (time.perf_counter() - t0)
    got = torch.cat([pv.reshape(-1, 3, px, px), click.reshape(-1, 3, px, px)]).cpu().numpy()
    def abs_diffs(ref):  # |device pixels - reference pixels|, every image, (3, H, W) each
        return np.stack([np.abs(g.astype(np.int16) - c) for g, c in zip(got, ref)])

    diffs = abs_diffs(cpu)
    out = {"decode": True, "images_per_s": dev_per_s, "cpu_images_per_s_per_core": cpu_per_core,
           "px": px, "images": n, "max_abs_diff_vs_pil": int(diffs.max()),
           "mean_abs_diff_vs_cpu": float(diffs.mean()), "p999_abs_diff_vs_cpu": float(np.quantile(diffs, 0.999)),
           "device": str(device)}
    try:  # libjpeg-turbo's fast (nearest) chroma upsampling: is that what the device decoder does?
        import simplejpeg

        fdiff = abs_diffs([simplejpeg.decode_jpeg(d, colorspace="RGB", fastupsample=True).transpose(2, 0, 1)
                           for d in data])
        out.update(max_abs_diff_vs_cpu_fastupsample=int(fdiff.max()),
                   mean_abs_diff_vs_cpu_fastupsample=float(fdiff.mean()))
    except ImportError:
        pass
    return out


def _courier_train_file(path: str, rows: int, px: int, l_pv: int = 5, l_click: int = 5) -> None:
    """A courier_train-shaped Parquet file (the reader's columns) of `rows` synthetic PVs: every slot an
    image, the first PV item the positive."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = _jpegs(rows * (l_pv + l_click), px)
    pv = [images[i * l_pv:(i + 1) * l_pv] for i in range(rows)]
    click = [images[rows * l_pv + i * l_click:rows * l_pv + (i + 1) * l_click] for i in range(rows)]
    ints = pa.list_(pa.int32())
    pq.write_table(pa.table({
        "sample_id": pa.array([f"s{i:06d}" for i in range(rows)]),
        "query": pa.array(["q"] * rows),
        "pv_labels": pa.array([[1] + [0] * (l_pv - 1)] * rows, ints),
        "pv_mask": pa.array([[1] * l_pv] * rows, ints),
        "pv_images": pa.array(pv, pa.list_(pa.binary())),
        "click_mask": pa.array([[1] * l_click] * rows, ints),
        "click_images": pa.array(click, pa.list_(pa.binary())),
    }), path)


def _trainer_worker(local_rank: int, world: int, port: int, spec: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    from training import distributed as dist
    from training.train import train_fn

    with dist.joined("ddp", process_group_backend="nccl" if spec["train"]["use_gpu"] else "gloo"):
        train_fn(spec)


def measure_trainer(args) -> dict:
    """The trainer itself (`training.train.train_fn`, what TorchDistributor runs): one DDP process per
    device over NCCL (gloo on CPU) on a synthetic courier_train file, fp16 + GradScaler, JPEGs decoded
    as train.gpu_decode auto does (nvjpeg on CUDA), a checkpoint; then a resume from it for one more step."""
    import torch
    import torch.multiprocessing as mp

    from training.train import TrainSpec

    world = torch.cuda.device_count() if args.device == "cuda" else 2
    steps = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "part-00000.parquet")
        rows = world * args.batch * (steps + 1)
        _courier_train_file(data, rows, args.px)
        train = _train_dict(args.backbone, False)
        train.update(batch_size=args.batch, max_steps=steps, precision=args.precision, use_gpu=args.device == "cuda",
                     checkpoint_every=steps, log_every=max(1, steps // 2), decode_workers=0)
        ckpt = os.path.join(tmp, "checkpoints")
        spec = dataclasses.asdict(TrainSpec(urls=["file://" + data], train=train, l_pv=5, l_click=5, image_px=args.px,
                                            checkpoint_dir=ckpt, result_path=os.path.join(ckpt, "result.json"),
                                            total_rows=rows))

        def run(spec):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            t0 = time.perf_counter()
            mp.spawn(_trainer_worker, args=(world, port, spec), nprocs=world, join=True)
            with open(spec["result_path"]) as fh:
                return json.load(fh), time.perf_counter() - t0

        first, wall = run(spec)
        resumed, _ = run({**spec, "resume": True, "train": {**train, "max_steps": steps + 1}})
    losses = first["losses"]
    if len(losses) != steps or not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
        raise RuntimeError(f"trainer: {len(losses)} losses for {steps} steps, or not finite: {losses}")
    if resumed["steps"] != steps + 1:
        raise RuntimeError(f"trainer: the resumed run ended at step {resumed['steps']}, not {steps + 1}")
    return {"trainer": True, "images_per_s": first["images_per_s"], "world": world, "steps": steps,
            "first_loss": losses[0], "last_loss": losses[-1], "resumed_to": resumed["steps"], "wall_s_run": wall}


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="PVs per GPU per step (10 images each; paper: 64)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kmeans-n", type=int, default=1_000_000)
    p.add_argument("--kmeans-k", type=int, default=10_000)
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--decode-px", type=int, default=224, help="JPEG size of the decode row")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--smoke", action="store_true", help="every row on CPU at toy sizes (code path check only)")
    args = p.parse_args(argv)

    import torch

    if args.smoke:
        args.device, args.backbone, args.px, args.precision = "cpu", "tiny_cnn", 32, "fp32"
        args.batch, args.steps, args.warmup = min(args.batch, 4), min(args.steps, 2), 1
        args.kmeans_n, args.kmeans_k, args.kmeans_iters = 4000, 16, 5
        args.decode_px = min(args.decode_px, 32)
    elif not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (torch.cuda.is_available() is "
              f"False): nothing measured; run it on a machine with a GPU (exit {EXIT_NO_GPU})", flush=True)
        return EXIT_NO_GPU
    else:
        args.device, args.backbone, args.px, args.precision = "cuda", "swin_t", 224, "fp16"
    args.ddp_grad_checkpointing = False
    names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
             if args.device == "cuda" else ["cpu (smoke)"])
    print(f"gpu_check: torch {torch.__version__}, {len(names)} device(s): {', '.join(names)}; "
          f"{args.backbone} {args.px} px {args.precision}, {args.batch} PVs x 10 images per device per step",
          flush=True)

    rows, failed = [], False

    def run(name, fn):
        nonlocal failed
        t0 = time.perf_counter()
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not hide the others
            failed = True
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        r["wall_s"] = time.perf_counter() - t0
        if args.device == "cuda":  # the next row (the DDP workers above all) gets the memory this one cached,
            # failed or not
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        rows.append((name, r))
        print(f"gpu_check: {name}: {json.dumps(r)}", flush=True)

    if args.device == "cuda":
        torch.cuda.set_device(0)
    run("train step, grad checkpointing off", lambda: measure_step(args, grad_checkpointing=False))
    run("train step, grad checkpointing on", lambda: measure_step(args, grad_checkpointing=True))
    run("DDP step over all devices", lambda: measure_ddp(args))
    run("faiss k-means + assignment", lambda: measure_faiss(args))
    run(f"JPEG decode {args.decode_px} px (reader)", lambda: measure_decode(args))
    run("trainer end to end (train_fn)", lambda: measure_trainer(args))

    print()
    print(f"| check | images/s (total) | images/s per device | peak memory GiB | other |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | - | - | - | FAILED: {r['error']} |")
        elif "skipped" in r:
            print(f"| {name} | - | - | - | skipped: {r['skipped']} |")
        elif "decode" in r:
            dev = "GPU (nvjpeg)" if args.device == "cuda" else "CPU torchvision (smoke)"
            met = "met" if r["images_per_s"] >= TARGET_IMAGES_PER_S else "NOT met"
            target = f"; target >= {TARGET_IMAGES_PER_S}/GPU: {met}" if args.device == "cuda" else ""
            print(f"| {name} | {_fmt(r['images_per_s'])} | {_fmt(r['images_per_s'])} | - | {dev} vs the CPU decode "
                  f"{r['cpu_images_per_s_per_core']:.0f} images/s per CPU core (= "
                  f"{r['images_per_s'] / r['cpu_images_per_s_per_core']:.1f} cores' worth); pixel difference max "
                  f"{r['max_abs_diff_vs_pil']}, mean {r['mean_abs_diff_vs_cpu']:.2f}{target} |")
        elif "trainer" in r:
            print(f"| {name} | {_fmt(r['images_per_s'])} | {_fmt(r['images_per_s'] / r['world'])} | - | "
                  f"{r['world']} process(es), {r['steps']} steps, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
                  f"checkpoint resumed to step {r['resumed_to']} (reader, decode and startup included) |")
        elif "train_s" in r:
            print(f"| {name} | - | - | - | {r['n']:,} x 256 -> {r['k']:,}, {r['iters']} iters: k-means "
                  f"{r['train_s']:.1f} s, assignment {r['assign_s']:.2f} s ({'GPU' if r['gpu'] else 'CPU'}) |")
        else:
            world = r.get("world", 1)
            per = r["images_per_s"] / world
            target = (f"target >= {TARGET_IMAGES_PER_S}/GPU: {'met' if per >= TARGET_IMAGES_PER_S else 'NOT met'}"
                      if args.device == "cuda" else "smoke (CPU): not a measurement")
            print(f"| {name} | {_fmt(r['images_per_s'])} | {_fmt(per)} | {_fmt(r['peak_mem_gib'], '.2f')} | "
                  f"{world} process(es), {r['step_s']:.3f} s/step; {target} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": names, "args": vars(args), "rows": dict(rows)}, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
