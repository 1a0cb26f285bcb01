"""The per-process training loop of stage 2 (what TorchDistributor or Horovod runs on every rank).

`train_fn(spec)` is self-contained: it takes a plain dict (picklable, no Spark objects), reads its
shard of a pinned `courier_train` snapshot, trains, checkpoints, and writes its result as JSON. Only
torch and the project's training modules are imported at the top: this file runs on bare GPU workers.

Step semantics (every rank, every step, in lock-step):
1. next batch of this rank's shard, padded to `batch_size` rows with masked rows (all_gather needs
   equal shapes); a rank whose shard is exhausted feeds an all-masked batch until every rank is done
   (an all-reduced "has data" flag decides when the epoch ends), so every row is read exactly once;
2. forward under autocast (fp16 + GradScaler on CUDA, bf16 or fp32 on CPU); each rank's loss is its
   share of the global loss (see training/courier.py), so the backward is (loss * world_size);
3. a non-finite loss on any rank skips the step on every rank (counted), and so does a non-finite reduced
   gradient when no GradScaler guards the step (fp32, bf16); `max_bad_steps` consecutive skips abort the
   run with an error.
Files (checkpoints, metrics, the result) go through etl.fs: checkpoint_dir is a local folder or an
s3a:// prefix alike; a worker on another machine reaches the object store with the spec's `storage`.
Resume: the checkpoint holds model, optimizer, scaler and (epoch, batch index); randomness is seeded per step; the reader
is deterministic for (seed, epoch, rank), so skipping the consumed batches continues the same run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field

import torch

from etl import fs
from training import distributed as dist
from training.courier import (CourierLossConfig, CourierModel, ImageEncoder, bn_running_stats,
                              restore_bn_running_stats)

log = logging.getLogger(__name__)

BATCH_KEYS = ("pv_images", "pv_labels", "pv_mask", "click_images", "click_mask")
# Consecutive fp16 steps the GradScaler may skip (halving its scale each time: 2^40 below where it was)
# before the job stops: more than the scale ever needs to settle, far fewer than a frozen run's steps.
SCALER_SKIP_LIMIT = 40


@dataclass
class TrainSpec:
    """Everything a worker needs, as plain values (built by the job on the driver)."""
    urls: list
    train: dict  # etl.config.TrainConf as a dict
    l_pv: int
    l_click: int
    image_px: int
    checkpoint_dir: str
    result_path: str
    resume: bool = False
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    total_rows: int = 0
    extra: dict = field(default_factory=dict)
    storage: dict | None = None  # etl.fs.S3Options as a dict: executors need not share the driver's env


# ---- small helpers ---------------------------------------------------------------------------------
def wants_gpu(use_gpu: bool | None) -> bool:
    """train.use_gpu on this worker: None (auto) = when CUDA is available; True without CUDA is an error."""
    if use_gpu is None:
        return torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is true but CUDA is not available on this worker")
    return bool(use_gpu)


def pick_device(use_gpu: bool) -> torch.device:
    """This rank's device, after `dist.init`: its local rank's GPU (LOCAL_RANK under torchrun, Horovod's
    own local rank under horovodrun, which sets no LOCAL_RANK), else the CPU."""
    return torch.device("cuda", dist.local_rank()) if use_gpu else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None: plain fp32)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def grad_scaler(amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 scales the loss against gradients that underflow; any other precision passes it through."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)


def forward(model, batch: dict, device: torch.device, amp_dtype: torch.dtype | None, **extra):
    """Step 2's forward: (loss, parts) of the model on the batch's BATCH_KEYS tensors, under autocast."""
    with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model(*(batch[k] for k in BATCH_KEYS), **extra)


def update(loss: torch.Tensor, optimizer, scaler: torch.amp.GradScaler, loss_scale: float = 1) -> bool:
    """Step 2's update: the gradients of loss * loss_scale (through the GradScaler), the optimizer step.
    The step goes through `dist.optimizer_step`: under Horovod the scaler must unscale the gradients
    only once they are reduced (a plain `scaler.step` unscaled them while the reduction still ran).
    False when nothing was applied, a finite loss with a non-finite gradient: skipped here (fp32, bf16),
    or by the GradScaler (fp16), which then lowers its scale."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * loss_scale if loss_scale != 1 else loss).backward()
    scaled_by = scaler.get_scale() if scaler.is_enabled() else None
    applied = dist.optimizer_step(optimizer, scaler)
    scaler.update()
    # An enabled GradScaler skips a step whose gradients hold inf/NaN exactly when it lowers its scale.
    return applied and not (scaled_by is not None and scaler.get_scale() < scaled_by)


def empty_batch(batch_size: int, l_pv: int, l_click: int, px: int) -> dict:
    """A batch whose every slot is padding: what a rank with no rows left feeds."""
    return {
        "pv_images": torch.zeros(batch_size, l_pv, 3, px, px, dtype=torch.uint8),
        "pv_labels": torch.zeros(batch_size, l_pv, dtype=torch.long),
        "pv_mask": torch.zeros(batch_size, l_pv, dtype=torch.long),
        "click_images": torch.zeros(batch_size, l_click, 3, px, px, dtype=torch.uint8),
        "click_mask": torch.zeros(batch_size, l_click, dtype=torch.long),
    }


def pad_batch(batch: dict, batch_size: int) -> dict:
    """Pad a (possibly short) batch to batch_size rows with zeros (= masked)."""
    out = {}
    for k in BATCH_KEYS:
        t = torch.as_tensor(batch[k])
        n = t.shape[0]
        if n > batch_size:
            raise ValueError(f"batch of {n} rows is larger than batch_size {batch_size}")
        out[k] = t if n == batch_size else torch.cat([t, t.new_zeros((batch_size - n, *t.shape[1:]))])
    return out


def build_model(train: dict, gather, num_classes: int = 0):
    """CourierModel for method courier; BaselineModel for simclr / simsiam / supervised."""
    encoder = ImageEncoder(train["backbone"], dim=train["dim"], pretrained_path=train.get("pretrained_path"),
                           grad_checkpointing=train["grad_checkpointing"], proj_head=train["proj_head"])
    if train["method"] != "courier":
        from training.baselines import BaselineModel

        return BaselineModel(encoder, train["method"], gather, num_classes=max(num_classes, 1))
    loss_cfg = CourierLossConfig(tau=train["tau"], use_ucs=train["use_ucs"], use_contrast=train["use_contrast"],
                                 reconstruction=train["reconstruction"], use_negatives=train["use_negatives"],
                                 proj_head=train["proj_head"])
    return CourierModel(encoder, loss_cfg, gather=gather)


def save_state(obj, path: str) -> None:
    """torch.save to a local path or an object-store URI, atomically (etl.fs.write_bytes)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    fs.write_bytes(path, buf.getvalue())


def load_state(path: str):
    """torch.load(weights_only=True) from a local path or an object-store URI: tensors and plain
    containers only, nothing else is unpickled."""
    return torch.load(io.BytesIO(fs.read_bytes(path)), map_location="cpu", weights_only=True)


def state_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values (not of the file torch.save wrote):
    the same weights give the same digest whichever attempt saved them."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def last_checkpoint(checkpoint_dir: str) -> str | None:
    path = fs.join(checkpoint_dir, "last.pt")
    return path if fs.exists(path) else None


def save_checkpoint(checkpoint_dir, model, optimizer, scaler, position: dict, keep: int = 0) -> str:
    """step-<global step>.pt and last.pt; then only the `keep` newest step files stay (0: all). Each holds
    the model and the optimizer's state: kept all, they would fill the disk over a long run."""
    fs.makedirs(checkpoint_dir)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "position": {k: torch.tensor(v) for k, v in position.items()},
    }
    path = fs.join(checkpoint_dir, f"step-{position['global_step']:08d}.pt")
    save_state(state, path)
    save_state(state, fs.join(checkpoint_dir, "last.pt"))
    if keep:
        steps = sorted(n for n in fs.list_names(checkpoint_dir) if STEP_FILE.fullmatch(n))
        for old in steps[:-keep]:
            fs.remove(fs.join(checkpoint_dir, old))
    return path


STEP_FILE = re.compile(r"step-\d{8}\.pt")


def load_checkpoint(path: str, model, optimizer, scaler) -> dict:
    state = load_state(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # a disabled scaler (fp32/bf16, or a CPU run) saved {}: an enabled one keeps its defaults
        scaler.load_state_dict(state["scaler"])
    return {k: int(v) for k, v in state["position"].items()}


class _Tracker:
    """Rank 0's metrics: MLflow when a run id is given, a JSONL file always, a periodic progress line.
    Both are buffered and written just before each checkpoint and at the end, so an object store's JSONL
    is not rewritten per step (an object cannot be appended to) and a remote tracking server gets one
    request per checkpoint, not one per step. A resumed run trains again the steps after its last
    checkpoint and records only those past the last step already written: each step is recorded once."""

    def __init__(self, spec: TrainSpec, total_steps: int | None):
        self.enabled = dist.rank() == 0
        self.total = total_steps
        self.t0 = time.perf_counter()
        self.images = 0
        self.mlflow = None
        if self.enabled and spec.mlflow_run_id:
            import mlflow

            mlflow.set_tracking_uri(spec.mlflow_tracking_uri)
            self.mlflow = mlflow
            self.run_id = spec.mlflow_run_id
        self.jsonl = fs.join(spec.checkpoint_dir, "metrics.jsonl") if self.enabled else None
        self.pending: list[str] = []
        self.pending_metrics: list = []  # mlflow.entities.Metric, sent at the next flush
        # Also without spec.resume: a run resumed before its first checkpoint starts from step 0, but it
        # may have recorded steps (records come just before a checkpoint, whose save may have failed).
        self.recorded_through = _recorded_through(self.jsonl) if self.enabled else 0
        self.first_step: int | None = None  # this attempt's first step (a resumed run starts past 1)

    def step(self, step: int, metrics: dict, images: int, every: int) -> None:
        self.images += images
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step = step
        elapsed = time.perf_counter() - self.t0
        metrics = {**metrics, "images_per_s": self.images / max(elapsed, 1e-9)}
        if step > self.recorded_through:  # else recorded by the run this one resumes (and trained the same)
            self.pending.append(json.dumps({"step": step, **metrics}) + "\n")
            if self.mlflow:
                self.pending_metrics += [self.mlflow.entities.Metric(k, float(v), int(time.time() * 1000), step)
                                         for k, v in metrics.items()]
        if step % every == 0 or step == 1:
            eta = ""
            if self.total:
                per_step = elapsed / (step - self.first_step + 1)  # this attempt's steps in this attempt's time
                eta = f" eta {(self.total - step) * per_step:.0f}s"
            print(f"[train] step {step}{'/' + str(self.total) if self.total else ''} "
                  f"loss {metrics['loss']:.4f} {metrics['images_per_s']:.1f} img/s{eta}", flush=True)

    def flush(self):
        # MLflow first: the JSONL says what was recorded, so a kill between the two repeats points, never loses them.
        if self.mlflow and self.pending_metrics:  # log_batch splits them into requests within MLflow's limits
            try:
                self.mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=self.pending_metrics)
                self.pending_metrics = []
            except Exception as exc:  # noqa: BLE001 - see below
                # A tracking server's blip must not stop the run before the checkpoint this flush precedes
                # (every rank would lose the steps since the last one): the points stay pending for the
                # next flush, and metrics.jsonl below holds them meanwhile (a kill before that flush loses
                # them in MLflow only).
                log.warning("%d metric points not logged to MLflow yet (%s: %s); retried at the next flush, "
                            "kept in metrics.jsonl", len(self.pending_metrics), type(exc).__name__,
                            " ".join(str(exc).split())[:200])
        if self.jsonl and self.pending:
            fs.append_text(self.jsonl, "".join(self.pending))
            self.pending = []

    def close(self):
        self.flush()
        if self.pending_metrics:  # refused at the last flush too: said, as metrics.jsonl now holds them alone
            log.warning("%d metric points never reached MLflow run %s; %s holds every step's",
                        len(self.pending_metrics), self.run_id, self.jsonl)


def _recorded_through(jsonl: str) -> int:
    """The last step a run's metrics.jsonl holds (0 when there is none): where a resumed run's records go
    on. A last line cut short (a kill or a full disk during its append) is dropped from the file."""
    if not fs.exists(jsonl):
        return 0
    text = fs.read_text(jsonl)
    whole = text[:text.rfind("\n") + 1]  # the complete lines
    if whole != text:
        fs.write_text(jsonl, whole)
    lines = whole.splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


# ---- the loop --------------------------------------------------------------------------------------
def train_fn(spec_dict: dict) -> dict:
    """Train on this rank's shard; rank 0 writes checkpoints, the final encoder and the result JSON."""
    from training.reader import iterate_batches, resolve_decode_workers, resolve_gpu_decode

    spec = TrainSpec(**spec_dict)
    if spec.storage is not None:
        fs.configure(spec.storage)
    t = spec.train
    backend = t["backend"]
    use_gpu = wants_gpu(t["use_gpu"])
    dist.init(backend, "nccl" if use_gpu else "gloo",  # gloo when a GPU machine trains on its CPU
              timeout_s=60.0 * t["collective_timeout_min"])
    rank, world = dist.rank(), dist.world_size()
    device = pick_device(use_gpu)
    torch.manual_seed(t["seed"])  # the same initial weights on every rank
    categories = {c: i for i, c in enumerate(spec.extra.get("categories", []))}
    model = build_model(t, dist.gather_with_grad_for(backend), len(categories)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    amp_dtype = autocast_dtype(t["precision"], device)
    scaler = grad_scaler(amp_dtype)
    position = {"epoch": 0, "batch": 0, "global_step": 0, "skipped": 0}
    if spec.resume:
        path = last_checkpoint(spec.checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {spec.checkpoint_dir}")
        position = load_checkpoint(path, model, optimizer, scaler)
        if rank == 0:
            print(f"[train] resumed from {path} at step {position['global_step']}", flush=True)
    raw_model = model
    model = dist.wrap_model(model, backend)
    optimizer = dist.wrap_optimizer(optimizer, raw_model, backend)
    dist.broadcast_parameters(raw_model, optimizer)

    # JPEG decoding: on the GPU (nvjpeg) when asked or auto on CUDA, else in worker processes
    gpu_decode = resolve_gpu_decode(t.get("gpu_decode", "auto"), device)
    decode_workers = 0 if gpu_decode else resolve_decode_workers(t.get("decode_workers", "auto"),
                                                                 device_type=device.type)
    if rank == 0:
        how = (f"on {device} (torchvision)" if gpu_decode else f"{decode_workers} worker process(es) per rank"
               if decode_workers else f"{t['decode_threads']} thread(s) in each training process")
        print(f"[train] JPEG decoding: {how}", flush=True)
    # With batch_grouping each group's last batch per shuffle window is short: more steps than this.
    steps_per_epoch = math.ceil(spec.total_rows / (t["batch_size"] * world)) if spec.total_rows else None
    total_steps = t["max_steps"] or (steps_per_epoch * t["epochs"] if steps_per_epoch else None)
    tracker = _Tracker(spec, total_steps)
    bad_in_a_row, scaler_skips, losses = 0, 0, []
    # A run resumed from its final checkpoint (it had reached max_steps; e.g. its registration failed)
    # trains no further step: the same weights as the run that was not interrupted.
    stop = bool(t["max_steps"]) and position["global_step"] >= t["max_steps"]
    try:
        for epoch in range(position["epoch"], t["epochs"]):
            if stop:
                break
            skip = position["batch"] if epoch == position["epoch"] else 0
            batches = iterate_batches(spec.urls, batch_size=t["batch_size"], rank=rank, world_size=world,
                                      seed=t["seed"], epoch=epoch, skip_batches=skip,
                                      decode_threads=t["decode_threads"], decode_workers=decode_workers,
                                      decode_device=device if gpu_decode else None, image_px=spec.image_px,
                                      group_by=None if t["batch_grouping"] == "none" else t["batch_grouping"])
            batch_index = skip
            try:  # the reader's decode workers end with the epoch, or here on an error
                while True:
                    raw = next(batches, None)
                    has_data = dist.all_reduce_max(
                        torch.tensor([0 if raw is None else 1], dtype=torch.long, device=device))
                    if int(has_data.item()) == 0:
                        break  # every rank's shard is exhausted
                    batch = (pad_batch(raw.as_dict(), t["batch_size"]) if raw is not None
                             else empty_batch(t["batch_size"], spec.l_pv, spec.l_click, spec.image_px))
                    extra = {}
                    if t["method"] == "supervised":  # the PV's searched category labels its items
                        cat = torch.full((t["batch_size"], spec.l_pv), -1, dtype=torch.long)
                        for i, q in enumerate(raw.queries if raw is not None else []):
                            cat[i] = categories.get(q, -1)
                        extra["categories"] = cat.to(device)
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    images = batch["pv_mask"].sum() + batch["click_mask"].sum()  # this rank's real images
                    # Randomness (e.g. swin's stochastic depth) drawn per step: a resumed run draws the same.
                    torch.manual_seed(hash((t["seed"], rank, position["global_step"])) % (2 ** 62))
                    # The forward updates BatchNorm's running statistics; a step skipped below puts them back,
                    # or one fp16 overflow would leave NaN statistics for evaluation (training uses the batch's).
                    bn_stats = bn_running_stats(raw_model)
                    loss, parts = forward(model, batch, device, amp_dtype, **extra)
                    # The global loss is the sum of the ranks' shares; a bad value anywhere skips everywhere. The
                    # same all-reduce sums the ranks' image counts (ranks' batches differ: short, or exhausted).
                    summed = dist.all_reduce_sum(torch.stack([loss.detach().float(), images.float()]))
                    global_loss, global_images = summed[:1], int(summed[1].item())
                    batch_index += 1
                    # A finite loss can still have non-finite gradients: update() applies nothing (fp32, bf16), or
                    # the GradScaler skips the step and halves its scale (fp16). A few such fp16 skips in a row
                    # are the scale settling; many mean no scale gives finite gradients (at 0 every later step is
                    # skipped: a frozen model reported as training). Either is a skipped step.
                    finite = bool(torch.isfinite(global_loss).all())
                    if not (finite and update(loss, optimizer, scaler, dist.loss_scale_for_backward(backend))):
                        restore_bn_running_stats(bn_stats)
                        position["skipped"] += 1
                        by_scaler = finite and scaler.is_enabled()
                        scaler_skips, bad_in_a_row = scaler_skips + by_scaler, bad_in_a_row + (not by_scaler)
                        if bad_in_a_row >= t["max_bad_steps"] or scaler_skips >= SCALER_SKIP_LIMIT:
                            what = (f"{scaler_skips} consecutive fp16 steps skipped by the GradScaler (no loss scale "
                                    f"gives finite gradients; scale now {scaler.get_scale():g})" if by_scaler else
                                    f"{bad_in_a_row} consecutive steps with a non-finite loss or gradient")
                            raise FloatingPointError(
                                f"{what} (last at epoch {epoch}, batch {batch_index}); lower train.lr, or under fp16 "
                                f"use train.precision fp32/bf16")
                        continue
                    bad_in_a_row = scaler_skips = 0
                    position.update(epoch=epoch, batch=batch_index, global_step=position["global_step"] + 1)
                    step = position["global_step"]
                    losses.append(float(global_loss.item()))
                    metrics = {"loss": losses[-1],
                               **{k: float(dist.all_reduce_sum(v.detach().float().reshape(1)).item())
                                  for k, v in parts.items() if torch.is_tensor(v)}}
                    tracker.step(step, metrics, global_images, t["log_every"])
                    if step % t["checkpoint_every"] == 0 and rank == 0:
                        # Records first: a kill between the two trains these steps again on resume and records
                        # them once; the other order would lose them.
                        tracker.flush()
                        save_checkpoint(spec.checkpoint_dir, raw_model, optimizer, scaler, position,
                                        t["keep_checkpoints"])
                    if t["max_steps"] and step >= t["max_steps"]:
                        stop = True
                        break
            finally:
                batches.close()
            if stop:
                break
            position.update(epoch=epoch + 1, batch=0)
    except BaseException:
        # A failing run keeps the records of the steps it trained (a diverging loss is what one wants to
        # see); a resume trains them again and does not record them twice. The run's own error is raised.
        with contextlib.suppress(Exception):
            tracker.flush()
        raise
    tracker.close()
    result = {"rank": rank, "world_size": world, "steps": position["global_step"], "skipped": position["skipped"],
              "losses": losses, "images": tracker.images,  # real images of the steps taken, every rank's
              "images_per_s": tracker.images / max(time.perf_counter() - tracker.t0, 1e-9)}
    if rank == 0:
        save_checkpoint(spec.checkpoint_dir, raw_model, optimizer, scaler, position, t["keep_checkpoints"])
        encoder_path = fs.join(spec.checkpoint_dir, "encoder.pt")  # the encoder alone, for stage 3
        save_state(raw_model.encoder.state_dict(), encoder_path)
        result["encoder_path"] = encoder_path
        fs.write_text(spec.result_path, json.dumps(result))
    # Free the model before tearing the group down: gloo can hang at exit otherwise (DESIGN.md).
    del model, raw_model, optimizer
    dist.shutdown(backend)
    return result
