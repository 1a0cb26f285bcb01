"""Baseline image pretraining objectives compared with COURIER (paper sec. 4.2.3, appendix E).

* SimCLR: NT-Xent over two augmented views, negatives from the global batch (tau=0.2 in the paper).
* SimSiam: predictor MLP + stop-gradient, negative cosine (no negatives, no gather needed).
* Supervised: linear classifier over the item category, cross-entropy.

Every loss returns this rank's share of the global mean, exactly like ``training.courier``: the sum over
ranks is the single-process loss on the concatenated batch, so under DDP (which averages gradients)
the trainer backwards ``loss * world_size()``; see the module docstring of ``training/courier.py``.

Only torch / torchvision / numpy are imported.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from training import distributed as D
from training.courier import _global_count, encode_real, on_real_rows
from training.distributed import gather_with_grad

Gather = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Augmentation (SimCLR / SimSiam views)
# --------------------------------------------------------------------------------------------------
def _augment_pipeline(size: tuple[int, int], strength: float):
    from torchvision.transforms import v2

    s = strength
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


def augment(images: torch.Tensor, size: Optional[int] = None, strength: float = 1.0) -> torch.Tensor:
    """A light SimCLR-style view of each image of a batch (B, 3, H, W), uint8 or float in [0, 1].

    Random resized crop (scale 0.2-1), horizontal flip, colour jitter (p 0.8), grayscale (p 0.2).
    torchvision.transforms.v2 draws one set of random parameters per call, so the transform is applied
    image by image to get independent views (torch's global RNG; seed it for reproducible views).
    Returns the same dtype and device, spatial size ``size`` (default: the input's).
    """
    if images.ndim != 4:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(images.shape)}")
    hw = (size, size) if size is not None else tuple(images.shape[-2:])
    pipe = _augment_pipeline(hw, strength)
    return torch.stack([pipe(img) for img in images])


# --------------------------------------------------------------------------------------------------
# SimCLR
# --------------------------------------------------------------------------------------------------
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2, gather: Gather = gather_with_grad,
                 rank: Optional[int] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NT-Xent (SimCLR) over the global batch.

    z1, z2 (n, d): the two views of this rank's n images. Anchors are the 2n local views; candidates are
    the 2N views of every rank (gathered with gradients) except the anchor itself; the positive is the
    other view of the same image. Returns sum over local anchors / (2N global anchors).
    mask (n,): 0 marks padding images (the trainer pads every rank to the same n): they are neither
    anchors nor candidates, and the global anchor count only counts real ones.
    """
    n, d = z1.shape
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z = F.normalize(torch.cat([z1, z2], dim=0).to(dtype), dim=-1)  # (2n, d) local anchors
    z_all = gather(z)  # (2N, d), rank blocks of [view1; view2]
    rank = D.rank() if rank is None else rank
    idx = torch.arange(2 * n, device=z.device)
    self_idx = rank * 2 * n + idx
    pos_idx = rank * 2 * n + (idx + n) % (2 * n)
    with torch.autocast(z.device.type, enabled=False):  # keep the logits in fp32 under fp16 autocast
        logits = z @ z_all.t() / tau  # (2n, 2N)
    logits = logits.masked_fill(
        torch.arange(z_all.shape[0], device=z.device)[None, :] == self_idx[:, None], float("-inf")
    )
    if mask is None:
        per = torch.logsumexp(logits, dim=1) - logits.gather(1, pos_idx[:, None]).squeeze(1)
        return per.sum() / z_all.shape[0]
    real = torch.cat([mask, mask]).bool()  # (2n,)
    real_all = gather(real.to(dtype)).bool()  # (2N,)
    logits = logits.masked_fill(~real_all[None, :], float("-inf"))
    pos = logits.gather(1, pos_idx[:, None]).squeeze(1)
    per = torch.logsumexp(torch.where(real[:, None], logits, torch.zeros_like(logits)), dim=1) - pos
    per = torch.where(real, per, torch.zeros_like(per))
    return per.sum() / real_all.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# SimSiam
# --------------------------------------------------------------------------------------------------
class SimSiamPredictor(nn.Module):
    """h: bottleneck MLP predictor (SimSiam: d -> d/4 -> d, BN + ReLU in the hidden layer)."""

    def __init__(self, dim: int = 256, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or max(dim // 4, 1)
        self.net = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        bn = self.net[1]
        if not (self.training and z.shape[0] == 1):
            return self.net(z)
        # BatchNorm has no batch statistics of a single row (a rank's last batch can hold one real image):
        # that row is normalised with the running statistics, which it leaves as they are.
        bn.eval()
        try:
            return self.net(z)
        finally:
            bn.train()


def simsiam_loss(z1: torch.Tensor, z2: torch.Tensor, predictor: nn.Module, gather: Gather = gather_with_grad,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L = 1/2 D(h(z1), sg(z2)) + 1/2 D(h(z2), sg(z1)), D = -cos. Share of the global mean over the real
    (mask 1) images; the predictor h sees only those (padding in its BatchNorm's batch statistics would
    move the real rows' predictions with the batch's share of padding)."""
    keep = torch.ones(z1.shape[0], dtype=torch.bool, device=z1.device) if mask is None else mask.bool()
    p1, p2 = on_real_rows(predictor, z1, keep), on_real_rows(predictor, z2, keep)
    per = -0.5 * (F.cosine_similarity(p1, z2.detach(), dim=-1) + F.cosine_similarity(p2, z1.detach(), dim=-1))
    if mask is None:
        n = torch.tensor(float(per.numel()), device=per.device, dtype=per.dtype)
        return per.sum() / _global_count(n, gather)
    per = torch.where(mask.bool(), per, torch.zeros_like(per))
    return per.sum() / _global_count(mask.bool().sum().to(per.dtype), gather).clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Supervised (item category)
# --------------------------------------------------------------------------------------------------
class CategoryClassifier(nn.Module):
    def __init__(self, dim: int = 256, num_classes: int = 1000):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.fc(e)


def supervised_loss(e: torch.Tensor, category: torch.Tensor, classifier: nn.Module,
                    mask: Optional[torch.Tensor] = None, gather: Gather = gather_with_grad) -> torch.Tensor:
    """Cross-entropy of a linear classifier over item categories (N,) on embeddings e (N, d); items with
    mask 0 (padding) or category < 0 (unknown) are ignored. Share of the global mean."""
    keep = category >= 0
    if mask is not None:
        keep = keep & mask.bool()
    logits = classifier(e).float() if e.dtype == torch.float16 else classifier(e)
    per = F.cross_entropy(logits, category.clamp_min(0), reduction="none")
    per = torch.where(keep, per, torch.zeros_like(per))
    return per.sum() / _global_count(keep.sum().to(per.dtype), gather).clamp_min(1)


# --------------------------------------------------------------------------------------------------
# The baselines as one module the trainer can run in place of CourierModel (train.method)
# --------------------------------------------------------------------------------------------------
class BaselineModel(nn.Module):
    """SimCLR / SimSiam / supervised pre-training on the same images and encoder as COURIER.

    forward() takes CourierModel's arguments (plus `categories` (B, l_pv) for supervised) and returns
    (loss share, components). The images are every PV and history slot of the batch; only the real ones
    (mask 1) go through the backbone, padded slots get zero embeddings (every rank still gathers its
    full, equal shape) and take no part in the loss.
    """

    def __init__(self, encoder: nn.Module, method: str, gather: Gather = gather_with_grad, tau: float = 0.2,
                 num_classes: int = 64):
        super().__init__()
        if method not in ("simclr", "simsiam", "supervised"):
            raise ValueError(f"unknown baseline method {method!r}")
        self.encoder, self.method, self.gather, self.tau = encoder, method, gather, tau
        self.predictor = SimSiamPredictor(encoder.dim) if method == "simsiam" else None
        self.classifier = CategoryClassifier(encoder.dim, num_classes) if method == "supervised" else None

    def _embed(self, images, mask):
        e = encode_real(self.encoder, images, mask.bool())
        return self.encoder.project(e) if self.encoder.proj is not None else e  # SimCLR's head, if any

    def forward(self, pv_images, pv_labels, pv_mask, click_images, click_mask, categories=None):
        if self.method == "supervised":
            if categories is None:
                raise ValueError("the supervised baseline needs item categories")
            e = encode_real(self.encoder, pv_images.flatten(0, 1), pv_mask.reshape(-1).bool())
            loss = supervised_loss(e, categories.reshape(-1), self.classifier, mask=pv_mask.reshape(-1),
                                   gather=self.gather)
            return loss, {"loss": loss.detach()}
        images = torch.cat([pv_images.flatten(0, 1), click_images.flatten(0, 1)])
        mask = torch.cat([pv_mask.reshape(-1), click_mask.reshape(-1)])
        v1, v2 = augment(images), augment(images)  # two independent views of every image
        z1, z2 = self._embed(v1, mask), self._embed(v2, mask)
        if self.method == "simclr":
            loss = nt_xent_loss(z1, z2, self.tau, self.gather, mask=mask)
        else:
            loss = simsiam_loss(z1, z2, self.predictor, self.gather, mask=mask)
        return loss, {"loss": loss.detach()}
