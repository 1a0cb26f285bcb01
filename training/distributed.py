"""Backend-agnostic distributed helpers for the COURIER trainer: torch DDP ("ddp") or Horovod ("horovod").

Tiny named functions in the style of facebookresearch/moco (``concat_all_gather`` & co.), so that the
trainer never branches on the backend itself. They are the only place the project asks who it is:
``rank()``, ``world_size()`` and the gathers follow one backend (``current_backend()``), so the
trainer, the reader's sharding and the losses (``training.courier``, ``training.baselines``, which find
their own block of a gather at ``rank()``) agree under DDP (TorchDistributor, torchrun), Horovod and a
single process::

    from training import distributed as D
    D.init(backend)                                   # backend: "ddp" | "horovod"
    raw = CourierModel(encoder, cfg, gather=D.gather_with_grad_for(backend))
    model = D.wrap_model(raw, backend)                # DDP(raw) | raw
    opt = D.wrap_optimizer(torch.optim.Adam(raw.parameters(), ...), raw, backend)
    D.broadcast_parameters(raw, opt)                  # Horovod: rank 0's weights/state everywhere
    loss, comps = model(...)
    scaler.scale(loss * D.loss_scale_for_backward(backend)).backward()
    D.optimizer_step(opt, scaler)                     # Horovod: synchronize, then step; then scaler.update()
    global_loss = D.all_reduce_sum(loss.detach())     # the single-process loss on the global batch
    D.shutdown(backend)                               # after deleting model and optimizer

Loss / gradient convention (see ``training.courier``'s module docstring): every rank's loss is its
*share* (sum of its targets' -log p / number of targets in the GLOBAL batch), so the sum over ranks is
the single-process loss on the concatenated batch, and the gathers used for in-batch negatives SUM the
gradients flowing back into each rank's embeddings. Both backends then AVERAGE parameter gradients over
ranks: DDP always, Horovod because ``hvd.DistributedOptimizer`` uses ``op=hvd.Average`` (its default,
kept here). Hence, for both backends::

    (loss * loss_scale_for_backward(backend)).backward()   # loss_scale_for_backward = world_size()

gives every rank exactly the single-process gradient after the averaging. (The alternative,
``op=hvd.Sum`` without the scale, is numerically the same; we keep Average so that the two backends
share one trainer line and Horovod's gradient compression/fp16 paths see averaged magnitudes.)

Gathers with gradients:

* ddp: ``torch.distributed.nn.functional.all_gather``; backward = reduce-scatter SUM, the convention above;
* horovod: ``hvd.allgather`` whose backward AVERAGES the incoming gradient over ranks
  (``allreduce(grad, average=True)``); ``horovod_gather_with_grad`` multiplies that gradient by the
  world size so it is the SUM, like torch's.

Both concatenate the ranks' blocks in rank order: rank r's block is at position ``rank()``.
``gather_with_grad`` is the one for whichever backend is initialised (identity in a single process);
``gather_with_grad_for(backend)`` names the backend's own.

Horovod is imported lazily: this module imports (and the "ddp" backend works) without Horovod.
Horovod is installed by ``scripts/install_horovod.sh``.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from etl.config import TRAIN_BACKENDS as BACKENDS  # the allowed values are the config's

log = logging.getLogger(__name__)

# torch.distributed.nn.functional.all_gather warns (FutureWarning) on every call; it is the collective
# measured to keep gradients here, so silence exactly that message.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated", category=FutureWarning
)

Backend = Literal["ddp", "horovod"]

_backend: Optional[str] = None  # set by init()


def _check(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; one of {BACKENDS}")
    return backend


def _hvd():
    """``horovod.torch``, imported on first use (clear error when it is not installed)."""
    try:
        import horovod.torch as hvd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'horovod' backend needs Horovod with PyTorch support: run `bash scripts/install_horovod.sh` "
            f"(import failed: {e})"
        ) from e
    return hvd


def _hvd_on() -> bool:
    hvd = sys.modules.get("horovod.torch")  # never imports Horovod just to ask
    return hvd is not None and hvd.is_initialized()


def current_backend() -> Optional[str]:
    """The backend in use: the one ``init`` set up, else whichever is initialised, else None (1 process)."""
    if _backend is not None:
        return _backend
    if dist.is_available() and dist.is_initialized():
        return "ddp"
    if _hvd_on():
        return "horovod"
    return None


# --------------------------------------------------------------------------------------------------
# Process group lifecycle
# --------------------------------------------------------------------------------------------------
def init(backend: Backend = "ddp", process_group_backend: Optional[str] = None,
         timeout_s: Optional[float] = None) -> None:
    """Join the job's process group. Idempotent.

    ddp: ``torch.distributed.init_process_group`` from the environment (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE as set by TorchDistributor or torchrun), gloo on CPU and nccl when CUDA is available
    unless ``process_group_backend`` says otherwise (a trainer on the CPU of a GPU machine passes
    "gloo"); with nccl, sets the CUDA device to LOCAL_RANK. ``timeout_s``: how long a rank waits in a
    collective for its peers (torch's default: 10 min for nccl, 30 for gloo); rank 0's checkpoint
    and final writes happen while the others wait in the next collective, so a slow store must not
    reach it (``train.collective_timeout_min``).
    horovod: ``hvd.init()`` (gloo or MPI controller as launched by horovodrun / horovod.spark.run);
    sets the CUDA device to ``hvd.local_rank()``.
    """
    global _backend
    _check(backend)
    if backend == "ddp":
        if not dist.is_initialized():
            pg = process_group_backend or ("nccl" if torch.cuda.is_available() else "gloo")
            timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            dist.init_process_group(backend=pg, init_method="env://", **timeout)
        if "nccl" in dist.get_backend():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        hvd = _hvd()
        if not hvd.is_initialized():
            hvd.init()
        if torch.cuda.is_available():
            torch.cuda.set_device(hvd.local_rank())
    _backend = backend


def shutdown(backend: Optional[Backend] = None, wait_for_peers: bool = True) -> None:
    """Leave the process group. Delete the model and optimizer first (gloo can hang at exit otherwise).

    ddp: first collect the garbage, so that a DDP wrapper or an autograd graph caught in a reference
    cycle (and the gloo work it holds) dies now rather than in the interpreter's finalisation; then
    (``wait_for_peers``) meet every rank at a barrier, so that no rank tears the group (and rank 0 the
    store) down while a peer is still inside a collective. Both against an abort seen now and then at
    exit of a gloo rank whose work had finished ("terminate called without an active exception",
    SIGABRT); it was also seen in a test that destroys its group directly, so they are not shown to
    prevent it. On a failure path pass ``wait_for_peers=False`` (or use `joined`): the peers may never
    reach the barrier.
    """
    global _backend
    backend = backend or current_backend()
    if backend == "ddp" and dist.is_initialized():
        gc.collect()
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
    elif backend == "horovod" and _hvd_on():
        _hvd().shutdown()
    _backend = None


@contextmanager
def joined(backend: Backend = "ddp", process_group_backend: Optional[str] = None, timeout_s: Optional[float] = None):
    """``init`` for the body, then ``shutdown``: waiting for the peers when the body finished, not when
    it raised (a failed peer never reaches the barrier)."""
    init(backend, process_group_backend, timeout_s)
    try:
        yield
    except BaseException:
        shutdown(backend, wait_for_peers=False)
        raise
    shutdown(backend)


def rank() -> int:
    b = current_backend()
    if b == "ddp":
        return dist.get_rank()
    if b == "horovod":
        return _hvd().rank()
    return 0


def local_rank() -> int:
    b = current_backend()
    if b == "ddp":
        return int(os.environ.get("LOCAL_RANK", "0"))
    if b == "horovod":
        return _hvd().local_rank()
    return 0


def world_size() -> int:
    b = current_backend()
    if b == "ddp":
        return dist.get_world_size()
    if b == "horovod":
        return _hvd().size()
    return 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    b = current_backend()
    if b == "ddp":
        dist.barrier()
    elif b == "horovod":
        _hvd().barrier()


# --------------------------------------------------------------------------------------------------
# Collectives without gradients (metrics, counts)
# --------------------------------------------------------------------------------------------------
def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """``op`` ("sum" | "max") of ``t`` over ranks, as a new tensor (``t`` is not modified; no gradient)."""
    b = current_backend()
    if b == "ddp":
        # NCCL reduces CUDA tensors only ("No backend type associated with device type cpu"): a CPU
        # tensor (a flag, a count) travels through the rank's GPU and comes back.
        via = torch.device("cuda", torch.cuda.current_device()) if (
            t.device.type == "cpu" and dist.get_backend() == "nccl") else t.device
        out = t.detach().to(via, copy=True)
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return out.to(t.device)
    if b == "horovod":
        hvd = _hvd()
        return hvd.allreduce(t.detach(), op={"sum": hvd.Sum, "max": hvd.Max}[op])
    return t.detach().clone()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, as a new tensor (``t`` is not modified; no gradient)."""
    return _all_reduce(t, "sum")


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``t`` over ranks, as a new tensor (no gradient)."""
    return _all_reduce(t, "max")


# --------------------------------------------------------------------------------------------------
# Model / optimizer plumbing
# --------------------------------------------------------------------------------------------------
def loss_scale_for_backward(backend: Optional[Backend] = None) -> int:
    """Multiply the rank's loss share by this before ``backward()``: ``world_size()`` for both backends.

    Both average parameter gradients over ranks (DDP always; Horovod through ``wrap_optimizer``'s
    ``hvd.DistributedOptimizer(op=hvd.Average)``), while the sum of the shares is the global loss; the
    scale turns the average back into the single-process gradient. 1 in a single process.
    """
    if backend is not None:
        _check(backend)
    return world_size()


def wrap_model(model: nn.Module, backend: Backend, **ddp_kwargs) -> nn.Module:
    """DDP(model) for "ddp" (device_ids = the model's GPU when it is on one); the model itself for
    "horovod" (it syncs gradients in the optimizer)."""
    _check(backend)
    if backend == "horovod" or not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # DDP refuses device_ids for a module on the CPU, as when a GPU machine trains on its CPU
    on = next(model.parameters()).device
    if on.type == "cuda" and "device_ids" not in ddp_kwargs:
        ddp_kwargs["device_ids"] = [on]
    return DDP(model, **ddp_kwargs)


def wrap_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, backend: Backend,
                   **hvd_kwargs) -> torch.optim.Optimizer:
    """"horovod": ``hvd.DistributedOptimizer`` over the model's named parameters with op=Average (the
    default; see ``loss_scale_for_backward``); "ddp": the optimizer itself (DDP reduces in backward)."""
    _check(backend)
    if backend == "ddp":
        return optimizer
    hvd = _hvd()
    hvd_kwargs.setdefault("op", hvd.Average)
    state = optimizer.state_dict() if optimizer.state else None
    wrapped = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), **hvd_kwargs)
    if state is not None:  # Horovod builds a new optimizer from the param groups: keep e.g. a resumed state
        wrapped.load_state_dict(state)
    _accept_set_to_none(wrapped)
    return wrapped


def _accept_set_to_none(optimizer: torch.optim.Optimizer) -> None:
    """Horovod 0.28's ``DistributedOptimizer.zero_grad()`` takes no arguments; give it torch's
    ``zero_grad(set_to_none=True)`` signature (same guard against in-flight reductions). The class is
    Horovod's per-optimizer dynamic subclass, so nothing else is affected."""
    cls = type(optimizer)
    horovod_zero_grad = cls.zero_grad

    def zero_grad(self, set_to_none: bool = True):
        if getattr(self, "_handles", None):
            return horovod_zero_grad(self)  # raises Horovod's "zero_grad before step" race error
        return super(cls, self).zero_grad(set_to_none=set_to_none)

    cls.zero_grad = zero_grad


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Every gradient the optimizer holds is finite. Read after the reduction, so every rank answers the same."""
    peaks = [p.grad.detach().abs().amax().float() for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]  # amax propagates NaN; a peak, unlike a norm, cannot overflow
    return not peaks or bool(torch.isfinite(torch.stack(peaks)).all())


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional["torch.amp.GradScaler"] = None) -> bool:
    """``optimizer.step()`` (through ``scaler.step`` when a GradScaler is enabled), right for both backends;
    False, with nothing applied, when no enabled GradScaler guards the step (fp32, bf16) and a reduced
    gradient is not finite (an enabled scaler skips such a step itself).

    Horovod's DistributedOptimizer reduces gradients asynchronously while backward runs and waits for
    them in ``step()``; a GradScaler unscales (and checks for inf) *before* calling ``step()``, i.e.
    on gradients that are still being reduced in place, and the reduced, still-scaled values would
    land afterwards. So for Horovod: ``synchronize()`` first, then step inside ``skip_synchronize()``
    (Horovod's documented AMP recipe). DDP has reduced everything by the end of backward.
    """
    def step() -> bool:
        if scaler is not None and scaler.is_enabled():
            scaler.step(optimizer)
            return True
        if not grads_finite(optimizer):
            return False
        optimizer.step()
        return True

    if hasattr(optimizer, "skip_synchronize"):  # hvd.DistributedOptimizer
        optimizer.synchronize()
        with optimizer.skip_synchronize():
            return step()
    return step()


def broadcast_parameters(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                         root_rank: int = 0) -> None:
    """Make every rank start from ``root_rank``'s weights, buffers and optimizer state.

    horovod: ``hvd.broadcast_optimizer_state`` (only when some rank's optimizer has state, e.g. after a
    resume), then ``hvd.broadcast_parameters(model.state_dict())``. Horovod initialises an empty
    optimizer state by taking one ``step()`` with zero gradients, which is not a no-op with weight decay
    (Adam moves every weight by ~lr): fresh optimizers are therefore left alone (identical on every
    rank anyway), and the parameters are broadcast last so that no such step survives.
    ddp: broadcasts the state dict's tensors with ``torch.distributed.broadcast`` (DDP's constructor
    already does this for the module it wraps; the optimizer state is created identically everywhere).
    Single process: nothing.
    """
    b = current_backend()
    if b == "horovod":
        hvd = _hvd()
        if optimizer is not None:
            has_state = all_reduce_max(torch.tensor([1 if optimizer.state else 0]))  # one decision for all
            if int(has_state.item()):
                hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank)
        hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    elif b == "ddp" and world_size() > 1:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=root_rank)


# --------------------------------------------------------------------------------------------------
# Gathers that keep gradients (in-batch negatives from every rank)
# --------------------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) of every rank along dim 0 -> (world_size() * N, ...), in rank order.

    Gradients flow back to every rank's ``x`` summed over ranks (the convention above). Uses the
    initialised backend: ``torch.distributed.nn.functional.all_gather`` under DDP,
    ``horovod_gather_with_grad`` under Horovod; identity in a single process or with one rank. Every
    rank must call it with the same shape.
    """
    b = current_backend()
    if b is None or world_size() == 1:
        return x
    if b == "horovod":
        return horovod_gather_with_grad(x)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def horovod_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Horovod counterpart of the DDP gather: (N, ...) per rank -> (world * N, ...), in rank order.

    ``hvd.allgather``'s backward averages the gradient over ranks; ``_ScaleGrad`` multiplies it by the
    world size so each rank's ``x`` receives the SUM of the gradients every rank sends to its block, as
    with ``torch.distributed.nn.functional.all_gather``. Every rank must pass the same shape.
    Identity in a single process.
    """
    hvd = _hvd()
    n = hvd.size()
    if n == 1:
        return x
    y = _ScaleGrad.apply(hvd.allgather(x), float(n))
    if y.shape[0] != n * x.shape[0]:
        raise ValueError(
            f"horovod_gather_with_grad: ranks passed different first dimensions (gathered {y.shape[0]} rows "
            f"from {n} ranks, {x.shape[0]} here); pad every rank's batch to the same shape"
        )
    return y


def gather_with_grad_for(backend: Backend) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``gather=`` to pass to ``training.courier.CourierModel`` / the losses for ``backend``."""
    _check(backend)
    return gather_with_grad if backend == "ddp" else horovod_gather_with_grad
