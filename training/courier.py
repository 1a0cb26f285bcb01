"""COURIER model and loss (stage 2), in the style of facebookresearch/moco ``moco/builder.py``.

Paper: "COURIER: Contrastive User Intention Reconstruction for Large-Scale Visual Recommendation",
section 3 (method), 4.3.2 (ablations) and appendix D (projection head). Notation follows the paper:

    E_pv    (B, l_pv, d)     embeddings of the page-view (PV) item images, E_pv^j = IB(I_pv^j)
    E_click (B, l_click, d)  embeddings of the user's click-history images (index 0 = most recent click)
    R_pv    (B, l_pv, d)     user intention reconstruction, R_pv^j = softmax(E_pv^j E_click^T) E_click
    Sim(a, b) = cos(E_pv^a, R_pv^b)                                                       (eq. 4)
    L_pv  = sum_{b: y_b = 1} -log softmax_a(Sim(a, b) / tau)[a = b]                     (eq. 5-6)
    L_ucs = same loss with the latest click as target and the older clicks as history   (sec. 3.4)
    L     = L_pv + L_ucs                                                                 (eq. 7)

Only torch / torchvision / numpy (and ``training.distributed``, itself torch only) are imported here:
this module must import on a bare GPU worker.

Distributed normalisation convention (used by every loss in this module and in ``baselines.py``)
------------------------------------------------------------------------------------------------
Each rank returns its *share* of the global loss::

    loss_r = (sum of the per-target losses of rank r's targets) / (number of targets in the GLOBAL batch)

so that ``sum_r loss_r`` is exactly the loss a single process would compute on the concatenated batch
(mean over all positives of the global batch), and -- because ``gather_with_grad`` sums the gradients
flowing back into each rank's embeddings (``torch.distributed.nn.functional.all_gather`` backward is a
reduce-scatter with SUM) -- calling ``loss_r.backward()`` on every rank gives each rank's inputs exactly
the single-process gradient.  DistributedDataParallel then *averages* parameter gradients over the
``world_size`` ranks, which would divide the single-process gradient by ``world_size``.  Therefore:

* trainer under DDP: ``(loss * world_size()).backward()``  (or scale the lr; with Adam the scale only
  interacts with eps, but keep it exact);
* logging: ``all_reduce(loss.detach(), SUM)`` is the global loss (the mean over ranks of
  ``loss * world_size`` is the same number);
* with world size 1 all of this reduces to the plain mean over positives.

A ``gather`` whose backward *averages* (Horovod's ``hvd.allgather``) must have its gradient multiplied by
``world_size`` to fit this convention.  All ranks must pass tensors of the same shape (fixed
``B, l_pv, l_click`` per rank, padded), as ``all_gather`` requires.

``gather_with_grad``, ``rank()`` and ``world_size()`` are ``training.distributed``'s: one set of helpers
that gives the same answers under DDP, Horovod and a single process; a loss finds its own rank's block
of a gather at position ``rank()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from etl.config import RECONSTRUCTION_MODES  # the allowed values are the config's
from training import distributed as D
from training.distributed import gather_with_grad  # the default gather of every loss below

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



# --------------------------------------------------------------------------------------------------
# Counts over ranks (rank, world size and the gathers are training.distributed's)
# --------------------------------------------------------------------------------------------------
def _global_count(n: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum of a per-rank count over ranks, through the same ``gather`` (no extra sync on the host)."""
    return gather(n.detach().reshape(1)).sum()


# --------------------------------------------------------------------------------------------------
# Image encoder (the paper's IB + linear head to d)
# --------------------------------------------------------------------------------------------------
class _TinyCNN(nn.Module):
    """A few conv stages for CPU tests; ``stages`` are what gradient checkpointing wraps."""

    def __init__(self, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        self.stages = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(chans[i + 1]),
                    nn.ReLU(inplace=True),
                )
                for i in range(3)
            ]
        )
        self.out_dim = chans[-1]


def bn_running_stats(module: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Copies of the running statistics that a forward in train mode updates (module's BatchNorm layers)."""
    return [
        (m, {k: getattr(m, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")})
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


def restore_bn_running_stats(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    """Put back what bn_running_stats copied: as if the forwards since had not run."""
    with torch.no_grad():
        for m, bufs in saved:
            for k, v in bufs.items():
                getattr(m, k).copy_(v)


def _checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``checkpoint(block, x)`` (use_reentrant=False) that does not update BatchNorm running stats twice.

    The backward pass re-runs ``block``'s forward; for BatchNorm in train mode that would apply the
    running-stat momentum a second time, so the recomputation restores those buffers afterwards.
    """
    calls = [0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return block(inp)
        saved = bn_running_stats(block)  # recomputation in backward
        try:  # finally: non-reentrant checkpoint may stop the recomputation early with an exception
            return block(inp)
        finally:
            restore_bn_running_stats(saved)

    return checkpoint(run, x, use_reentrant=False)


def _read_local_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local state dict (never downloaded); unwraps {"state_dict": ...}, a COURIER checkpoint
    ({"model": ...}, the whole model: its encoder's keys start with "encoder.") and DDP's "module." prefix."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith("encoder.backbone.") for k in state):  # a CourierModel's: keep its encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def _one_value_uses_running_stats(bn: nn.Module, args: tuple) -> None:
    """BatchNorm has no batch statistics of one value per channel (one real image in a batch whose stage
    is 1 x 1, e.g. resnet's last at <= 32 px, where torch raises): that forward normalises with the
    running statistics and leaves them as they are, as the SimSiam predictor does for its single row."""
    x = args[0]
    if bn.training and x.numel() == x.shape[1]:
        bn.training, bn._one_value = False, True


def _back_to_train(bn: nn.Module, args: tuple, out: torch.Tensor) -> None:
    if getattr(bn, "_one_value", False):
        bn.training, bn._one_value = True, False


class ImageEncoder(nn.Module):
    """Backbone (classifier removed) + linear head to ``dim``; optional projection MLP for the loss only.

    ``pretrained_path``: a local state dict, never downloaded. Either a torchvision backbone state dict
    (e.g. ImageNet weights; its classifier keys ``fc.*`` / ``head.*`` are reported as unexpected and
    the new linear head stays randomly initialised, as in the paper's appendix E) or a full
    ``ImageEncoder.state_dict()`` (keys starting with ``backbone.``), e.g. a COURIER checkpoint.

    Inputs: float images already normalised, or uint8 images (B, 3, H, W) which are scaled to [0, 1]
    and ImageNet-normalised here.
    """

    def __init__(
        self,
        backbone: str = "swin_t",
        dim: int = 256,
        pretrained_path: Optional[str] = None,
        grad_checkpointing: bool = False,
        proj_head: bool = False,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.dim = dim
        self.grad_checkpointing = grad_checkpointing
        self.backbone, feat_dim, self._family = self._build_backbone(backbone)
        self.embed = nn.Linear(feat_dim, dim)  # the replaced output layer, random init (appendix E)
        # Projection head (appendix D ablation): used only inside the loss, dropped downstream.
        self.proj = (
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)) if proj_head else None
        )
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(_one_value_uses_running_stats)
                m.register_forward_hook(_back_to_train)
        self.load_report: Optional[dict[str, list[str]]] = None
        if pretrained_path:
            self.load_pretrained(pretrained_path)
        else:
            log.warning("ImageEncoder(%s): no pretrained_path, the encoder starts from random init", backbone)

    @staticmethod
    def _build_backbone(name: str) -> tuple[nn.Module, int, str]:
        import torchvision.models as tvm

        if name == "tiny_cnn":
            m = _TinyCNN()
            return m, m.out_dim, "tiny"
        if name.startswith("resnet") and hasattr(tvm, name):
            m = getattr(tvm, name)(weights=None)
            feat_dim = m.fc.in_features
            m.fc = nn.Identity()
            return m, feat_dim, "resnet"
        if name in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"):
            m = getattr(tvm, name)(weights=None)
            feat_dim = m.head.in_features
            m.head = nn.Identity()
            return m, feat_dim, "swin"
        raise ValueError(f"unknown backbone {name!r}: use tiny_cnn, resnet18/34/50/101/152 or swin_t/s/b")

    def load_pretrained(self, path: str) -> dict[str, list[str]]:
        state = _read_local_state_dict(path)
        full = any(k.startswith("backbone.") for k in state)  # a whole ImageEncoder, else a bare backbone
        result = (self if full else self.backbone).load_state_dict(state, strict=False)  # classifier keys
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        backbone_missing = [k for k in missing if k.startswith("backbone.") or not full]
        if backbone_missing:  # another backbone's weights, or no weights at all: never train from random init
            raise ValueError(f"train.pretrained_path {path}: {len(backbone_missing)} of the {self.backbone_name} "
                             f"backbone's weights are not in it (e.g. {backbone_missing[:3]}); it holds "
                             f"{len(state)} tensors, e.g. {list(state)[:3]}")
        self.load_report = {"missing": missing, "unexpected": unexpected}
        (log.warning if missing else log.info)(
            "ImageEncoder(%s): loaded %s (%s state dict); missing keys %s; unexpected keys %s",
            self.backbone_name, path, "encoder" if full else "backbone", missing, unexpected,
        )
        return self.load_report

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return _checkpointed(block, x)
        return block(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        if self._family == "tiny":
            for stage in b.stages:
                x = self._block(stage, x)
            return x.mean(dim=(2, 3))
        if self._family == "resnet":
            x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
                for block in layer:  # checkpoint per residual block
                    x = self._block(block, x)
            return torch.flatten(b.avgpool(x), 1)
        # swin: features = [patch embed, stage, merge, stage, merge, stage, merge, stage]
        for stage in b.features:
            if isinstance(stage, nn.Sequential) and type(stage[0]).__name__.startswith("SwinTransformerBlock"):
                for block in stage:  # checkpoint per transformer (attention) block, as in appendix E
                    x = self._block(block, x)
            else:
                x = stage(x)
        return b.flatten(b.avgpool(b.permute(b.norm(x))))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> E (N, dim): the embedding used downstream (before any projection)."""
        if images.dtype == torch.uint8:
            images = (images.to(self._mean.dtype) / 255.0 - self._mean) / self._std
        return self.embed(self.features(images))

    def project(self, e: torch.Tensor) -> torch.Tensor:
        """Projection head g(E) for the 'with projection head' ablation (loss only)."""
        if self.proj is None:
            raise RuntimeError("ImageEncoder built without proj_head=True")
        return self.proj(e)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)


# --------------------------------------------------------------------------------------------------
# User intention reconstruction (sec. 3.2) and its ablation variants (sec. 4.3.2)
# --------------------------------------------------------------------------------------------------
def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim restricted to ``mask``; exactly 0 on masked entries; all-0 rows
    (no real key at all) give all-0 weights instead of NaN."""
    mask = mask.bool()
    has_key = mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf"))  # padding clicks: -inf before softmax
    scores = torch.where(has_key, scores, torch.zeros_like(scores))  # avoid softmax(all -inf) = NaN
    return torch.softmax(scores, dim=-1) * has_key  # exp(-inf) = 0 exactly on padding


def reconstruct(
    e_pv: torch.Tensor,
    e_click: torch.Tensor,
    click_mask: torch.Tensor,
    mode: str = "attention",
    mha: Optional[nn.MultiheadAttention] = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """User intention reconstruction. Returns (R_pv (B, l_pv, d), weights alpha (B, l_pv, l_click)).

    mode="attention" (COURIER, eq. 2-3): R_pv^j = sum_k alpha_k E_click^k, alpha = softmax(E_pv^j E_click^T)
        over the real clicks; plain attention with no projections, so R_pv^j lies in the simplex spanned
        by the clicks. ``scale`` multiplies the logits (eq. 1 writes 1/sqrt(d_K); eq. 3 and DESIGN use 1).
    mode="self_attention" ("w/o Reconstruction"): the target does not attend. The clicks attend to each
        other, H = softmax(E_click E_click^T) E_click, and are mean-pooled over real clicks into one user
        vector u that is the reconstruction of every PV item of the sample: R_pv^j = u. Still no
        projections; the returned weights are u's (query-independent) weights over the clicks.
    mode="multihead" (ablation): nn.MultiheadAttention(query=E_pv, key=value=E_click) with learned
        projections; weights are averaged over heads. R leaves the simplex of the clicks.

    Samples without any real click get R = 0 and weights 0 (the loss excludes their targets).
    """
    cmask = click_mask.bool()
    has_click = cmask.any(dim=-1)  # (B,)
    if mode == "attention":
        scores = torch.einsum("bjd,bkd->bjk", e_pv, e_click) * scale  # E_pv^j . E_click^k
        alpha = _masked_softmax(scores, cmask[:, None, :])  # (B, l_pv, l_click), simplex over real clicks
        r = torch.einsum("bjk,bkd->bjd", alpha, e_click)  # R_pv^j = sum_k alpha_k E_click^k
        return r, alpha
    if mode == "self_attention":
        scores = torch.einsum("bqd,bkd->bqk", e_click, e_click) * scale  # clicks attend to clicks
        a = _masked_softmax(scores, cmask[:, None, :])  # (B, l_click, l_click)
        q_w = cmask.to(a.dtype) / cmask.sum(-1, keepdim=True).clamp_min(1).to(a.dtype)  # mean over real queries
        w = torch.einsum("bq,bqk->bk", q_w, a)  # (B, l_click): u = sum_k w_k E_click^k
        alpha = w[:, None, :].expand(-1, e_pv.shape[1], -1)
        r = torch.einsum("bjk,bkd->bjd", alpha, e_click)
        return r, alpha
    if mode == "multihead":
        if mha is None:
            raise ValueError("mode='multihead' needs an nn.MultiheadAttention (see Reconstruction)")
        # rows without clicks: let them attend to the padding (finite) and zero them afterwards
        kpm = ~cmask & has_click[:, None]
        w_dtype = mha.out_proj.weight.dtype
        r, alpha = mha(e_pv.to(w_dtype), e_click.to(w_dtype), e_click.to(w_dtype), key_padding_mask=kpm,
                       need_weights=True, average_attn_weights=True)
        keep = has_click[:, None, None].to(r.dtype)
        return (r * keep).to(e_pv.dtype), (alpha * keep).to(e_pv.dtype)
    raise ValueError(f"unknown reconstruction mode {mode!r}; one of {RECONSTRUCTION_MODES}")


class Reconstruction(nn.Module):
    """Holds the learned projections of the multihead ablation; parameter-free for the other modes."""

    def __init__(self, mode: str = "attention", dim: int = 256, num_heads: int = 4):
        super().__init__()
        if mode not in RECONSTRUCTION_MODES:
            raise ValueError(f"unknown reconstruction mode {mode!r}; one of {RECONSTRUCTION_MODES}")
        self.mode = mode
        self.mha = nn.MultiheadAttention(dim, num_heads, batch_first=True) if mode == "multihead" else None

    def forward(self, e_pv, e_click, click_mask):
        return reconstruct(e_pv, e_click, click_mask, mode=self.mode, mha=self.mha)


# --------------------------------------------------------------------------------------------------
# Contrastive loss (sec. 3.3, batched over the global batch)
# --------------------------------------------------------------------------------------------------
def contrastive_loss(
    e_pv: torch.Tensor,
    r_pv: torch.Tensor,
    pv_labels: torch.Tensor,
    pv_mask: torch.Tensor,
    tau: float = 0.05,
    use_negatives: bool = True,
    gather: Callable[[torch.Tensor], torch.Tensor] = gather_with_grad,
    rank: Optional[int] = None,
    target_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """L_contrast (eq. 4-6) with all PV items of the global batch in every denominator.

    Sim(a, b) = cos(E_pv^a, R_pv^b). For each local positive column b (label 1 and pv_mask 1):
        loss_b = -log( exp(Sim(b, b)/tau) / sum_{a in D} exp(Sim(a, b)/tau) )
    where a runs over D = every real PV item (pv_mask 1) of every rank (E_pv gathered with gradients;
    R_pv stays local). Negative-label items are in D (they are negatives) but their own columns are not
    optimised; padding items are never in D. ``use_negatives=False`` ("w/o Neg PV") keeps only the
    positive items (label 1) of the global batch in D. ``rank`` (default: ``training.distributed.rank()``)
    is this worker's position in ``gather``'s output, which must concatenate equal-shaped blocks in rank
    order.
    ``target_mask`` (optional, same shape) further restricts which positive columns are optimised (COURIER
    drops targets without any click history); it does not change the denominators.

    Returns this rank's share: sum_b loss_b / (number of positive columns in the GLOBAL batch), so that
    the sum over ranks equals the single-process loss on the concatenated batch (see the module
    docstring: under DDP, backward ``loss * world_size``). A worker without positives returns 0 that
    still has a grad_fn and still takes part in the gather's backward (no collective is skipped); when
    the global batch has no positive at all every rank returns 0.
    """
    B, L, d = e_pv.shape
    n_local = B * L
    dtype = torch.promote_types(e_pv.dtype, torch.float32)  # fp16 under autocast -> logits in fp32
    valid = pv_mask.reshape(n_local).bool()
    positive = pv_labels.reshape(n_local).bool() & valid  # y = 1 real items
    in_denom = valid if use_negatives else positive  # "w/o Neg PV": label-0 items leave the denominator
    pos = positive if target_mask is None else positive & target_mask.reshape(n_local).bool()  # columns b

    z = F.normalize(e_pv.reshape(n_local, d).to(dtype), dim=-1)  # E_pv^a / |E_pv^a|
    r = F.normalize(r_pv.reshape(n_local, d).to(dtype), dim=-1)  # R_pv^b / |R_pv^b|
    # one collective: [E_pv | in_denom | pos] of every rank; gradients flow back into E_pv only
    packed = gather(torch.cat([z, in_denom[:, None].to(dtype), pos[:, None].to(dtype)], dim=1))
    z_all, denom_all, pos_all = packed[:, :d], packed[:, d].bool(), packed[:, d + 1]

    with torch.autocast(e_pv.device.type, enabled=False):  # autocast would run this matmul in fp16
        logits = z_all @ r.t() / tau  # (N_global, n_local): Sim(a, b) / tau
    rank = D.rank() if rank is None else rank
    own = rank * n_local + torch.arange(n_local, device=e_pv.device)  # global index of a = b
    # D for column b, plus b itself so that unused columns never have an empty (all -inf) denominator
    in_col = denom_all[:, None] | (torch.arange(logits.shape[0], device=e_pv.device)[:, None] == own[None, :])
    log_denom = torch.logsumexp(logits.masked_fill(~in_col, float("-inf")), dim=0)  # log sum_a exp(Sim(a,b)/tau)
    pos_logit = logits.gather(0, own[None, :]).squeeze(0)  # Sim(b, b) / tau
    per_col = torch.where(pos, log_denom - pos_logit, torch.zeros_like(pos_logit))  # -log p(a = b), y_b = 1
    n_global = pos_all.sum().clamp_min(1)  # positives of the global batch (>= 1 to stay finite)
    return per_col.sum() / n_global


def reconstruction_loss(
    e_pv: torch.Tensor,
    r_pv: torch.Tensor,
    pv_labels: torch.Tensor,
    pv_mask: torch.Tensor,
    stopgrad_target: bool = False,
    gather: Callable[[torch.Tensor], torch.Tensor] = gather_with_grad,
) -> torch.Tensor:
    """"w/o Contrast": non-contrastive 1 - cos(E_pv^b, R_pv^b) on positive columns only (no negatives,
    like SimSiam's objective; ``stopgrad_target`` detaches E_pv as SimSiam's stop-gradient would).
    Same normalisation as ``contrastive_loss`` (share of the global mean over positives)."""
    pos = (pv_labels.bool() & pv_mask.bool()).reshape(-1)
    dtype = torch.promote_types(e_pv.dtype, torch.float32)
    target = e_pv.detach() if stopgrad_target else e_pv
    cos = F.cosine_similarity(target.reshape(pos.numel(), -1).to(dtype), r_pv.reshape(pos.numel(), -1).to(dtype), dim=-1)
    per = torch.where(pos, 1.0 - cos, torch.zeros_like(cos))
    return per.sum() / _global_count(pos.sum().to(dtype), gather).clamp_min(1)


# --------------------------------------------------------------------------------------------------
# COURIER objective L = L_pv + L_ucs (eq. 7)
# --------------------------------------------------------------------------------------------------
@dataclass
class CourierLossConfig:
    tau: float = 0.05  # temperature (sec. 4.3.1: 0.05 best)
    use_ucs: bool = True  # False: "w/o UCS"
    use_contrast: bool = True  # False: "w/o Contrast" (1 - cos on positives, no negatives)
    reconstruction: str = "attention"  # "attention" | "self_attention" ("w/o Reconstruction") | "multihead"
    use_negatives: bool = True  # False: "w/o Neg PV"
    proj_head: bool = False  # True: "w projection" (appendix D), loss on g(E)
    num_heads: int = 4  # multihead ablation only
    stopgrad_target: bool = False  # w/o Contrast only: SimSiam-style stop-gradient on E_pv


def courier_loss(
    e_pv: torch.Tensor,
    pv_labels: torch.Tensor,
    pv_mask: torch.Tensor,
    e_click: torch.Tensor,
    click_mask: torch.Tensor,
    cfg: CourierLossConfig = CourierLossConfig(),
    mha: Optional[nn.MultiheadAttention] = None,
    projector: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    gather: Callable[[torch.Tensor], torch.Tensor] = gather_with_grad,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_pv + L_ucs on encoder outputs. Returns (this rank's share of L, components for logging).

    e_pv (B, l_pv, d), pv_labels (B, l_pv) 0/1, pv_mask (B, l_pv) 1 = real item,
    e_click (B, l_click, d), click_mask (B, l_click); click index 0 is the most recent click.

    L_pv: targets (optimised columns) are the real PV items with label 1 of samples that have at least
    one real click; the denominators hold every real PV item of the global batch (only the label-1
    ones when ``use_negatives=False``).
    L_ucs (sec. 3.4): the sequence is the user's clicks that have an image (``usable_clicks_first``);
    target = its latest click (as a 1-item "PV list", label 1), history = its older clicks. A sample
    with fewer than 2 usable clicks has no sequence loss: it is neither a target nor in any denominator
    (the denominator holds every rank's targets, all positives). Each term is normalised by its own
    global number of optimised targets (module docstring). Components: the detached shares l_pv, l_ucs, loss, and the LOCAL target counts
    n_pos_pv, n_pos_ucs.
    """
    if cfg.proj_head:
        if projector is None:
            raise ValueError("cfg.proj_head needs projector= (ImageEncoder.project)")
        e_pv, e_click = projector(e_pv), projector(e_click)  # loss on g(E); E itself is used downstream
    pv_mask, click_mask = pv_mask.bool(), click_mask.bool()
    # the loss runs in (at least) fp32 even under fp16 autocast: tau = 0.05 makes logits up to 20
    dtype = torch.promote_types(e_pv.dtype, torch.float32)
    with torch.autocast(e_pv.device.type, enabled=False):
        return _courier_loss_fp32(e_pv.to(dtype), pv_labels, pv_mask, e_click.to(dtype), click_mask, cfg, mha, gather)


def usable_clicks_first(e_click: torch.Tensor, click_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The click sequence with its usable clicks (mask 1) moved to the front, order kept.

    e_click (B, l_click, d), click_mask (B, l_click) bool -> the same shapes, where index 0 is the most
    recent click that has an image. A click whose image is missing is not part of the sequence (sec.
    3.4 sorts the user's clicked *images* by time), so the latest usable click is the UCS target."""
    order = torch.argsort((~click_mask).to(torch.int8), dim=1, stable=True)  # real clicks first, stable
    return e_click.gather(1, order[..., None].expand_as(e_click)), click_mask.gather(1, order)


def _courier_loss_fp32(e_pv, pv_labels, pv_mask, e_click, click_mask, cfg, mha, gather):
    def one(e_t, labels, t_mask, e_hist, h_mask):
        r, _ = reconstruct(e_t, e_hist, h_mask, mode=cfg.reconstruction, mha=mha)
        has_hist = h_mask.any(-1, keepdim=True).expand_as(t_mask)  # a target needs a click history
        if cfg.use_contrast:
            loss = contrastive_loss(e_t, r, labels, t_mask, cfg.tau, cfg.use_negatives, gather,
                                    target_mask=has_hist)
        else:
            loss = reconstruction_loss(e_t, r, labels.bool() & has_hist, t_mask, cfg.stopgrad_target, gather)
        return loss, (labels.bool() & t_mask & has_hist).sum()

    l_pv, n_pv = one(e_pv, pv_labels, pv_mask, e_click, click_mask)
    comps = {"l_pv": l_pv.detach(), "n_pos_pv": n_pv.detach()}
    total = l_pv
    if cfg.use_ucs:
        e_seq, seq_mask = usable_clicks_first(e_click, click_mask)  # index 0 = latest click with an image
        # a sequence needs a target and a history: with fewer than 2 usable clicks it is no UCS target
        # and, since the UCS "PV list" is the batch of targets, no negative either
        in_ucs = seq_mask[:, :1] & seq_mask[:, 1:].any(-1, keepdim=True)  # (B, 1)
        l_ucs, n_ucs = one(e_seq[:, :1], torch.ones_like(in_ucs), in_ucs, e_seq[:, 1:], seq_mask[:, 1:])
        total = total + l_ucs
        comps.update(l_ucs=l_ucs.detach(), n_pos_ucs=n_ucs.detach())
    comps["loss"] = total.detach()
    return total, comps


class CourierLoss(nn.Module):
    """nn.Module wrapper of ``courier_loss`` owning the multihead ablation's parameters."""

    def __init__(self, cfg: CourierLossConfig = CourierLossConfig(), dim: int = 256,
                 gather: Callable[[torch.Tensor], torch.Tensor] = gather_with_grad):
        super().__init__()
        self.cfg = cfg
        self.gather = gather
        self.reconstruction = Reconstruction(cfg.reconstruction, dim, cfg.num_heads)

    def forward(self, e_pv, pv_labels, pv_mask, e_click, click_mask, projector=None):
        return courier_loss(e_pv, pv_labels, pv_mask, e_click, click_mask, self.cfg,
                            mha=self.reconstruction.mha, projector=projector, gather=self.gather)


def on_real_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n, d) = fn of the rows of x (n, ...) where keep (n,) is True, in one batch; the other rows are zero.
    Padded slots so never enter fn's BatchNorm batch statistics (nor its running ones)."""
    out = fn(x[keep])
    return out.new_zeros(keep.numel(), out.shape[-1]).index_put((keep.nonzero().squeeze(1),), out)


def encode_real(encoder: ImageEncoder, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n, d) embeddings of images (n, 3, H, W), zero where keep is False: padded slots (blank images)
    never enter the backbone's BatchNorm statistics, which stage 3 embeds with."""
    return on_real_rows(encoder.encode, images, keep)


class CourierModel(nn.Module):
    """Encoder + COURIER loss in one module (what DDP wraps), like MoCo's builder.

    forward(pv_images (B, l_pv, 3, H, W), pv_labels, pv_mask, click_images (B, l_click, 3, H, W),
    click_mask) -> (loss share, components). Only real (unmasked) images go through the backbone, in
    one batch; padded slots get zero embeddings (they are masked out of the loss anyway).
    """

    def __init__(self, encoder: ImageEncoder, cfg: CourierLossConfig = CourierLossConfig(),
                 gather: Callable[[torch.Tensor], torch.Tensor] = gather_with_grad):
        super().__init__()
        if cfg.proj_head and encoder.proj is None:
            raise ValueError("cfg.proj_head=True needs ImageEncoder(proj_head=True)")
        self.encoder = encoder
        self.loss = CourierLoss(cfg, encoder.dim, gather)

    def embed_padded(self, pv_images, pv_mask, click_images, click_mask):
        B, lp = pv_mask.shape
        lc = click_mask.shape[1]
        imgs = torch.cat([pv_images.flatten(0, 1), click_images.flatten(0, 1)], dim=0)
        keep = torch.cat([pv_mask.reshape(-1), click_mask.reshape(-1)]).bool()
        out = encode_real(self.encoder, imgs, keep)
        return out[: B * lp].view(B, lp, -1), out[B * lp:].view(B, lc, -1)

    def forward(self, pv_images, pv_labels, pv_mask, click_images, click_mask):
        e_pv, e_click = self.embed_padded(pv_images, pv_mask, click_images, click_mask)
        proj = self.encoder.project if self.loss.cfg.proj_head else None
        return self.loss(e_pv, pv_labels, pv_mask, e_click, click_mask, projector=proj)
