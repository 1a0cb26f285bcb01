"""Held-out check of a pre-trained encoder: does user-intention reconstruction rank the clicked items of
a page above the skipped ones?

`pv_ranking_auc`: for every held-out PV sample, reconstruct each PV item from the user's click history
with the encoder's embeddings (R_pv^j = softmax(E_pv^j E_click^T) E_click, the paper's eq. 2-3), score
the item by Sim(j, j) = cos(E_pv^j, R_pv^j), and take the AUC of clicked vs skipped items within the
page (ties count 1/2). The figure is the mean over pages that have both classes, weighted by their
number of items (a GAUC over PVs). 0.5 is chance; an encoder that learned the users' visual taste ranks
clicked items higher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.courier import ImageEncoder, reconstruct


def _page_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return float(wins.mean())


@torch.no_grad()
def pv_ranking_auc(encoder: ImageEncoder, batches, device: str | torch.device = "cpu") -> dict:
    """{"pv_auc": weighted mean per-page AUC, "pages": pages scored, "items": items scored}."""
    encoder = encoder.to(device).eval()
    total, weight, pages = 0.0, 0, 0
    for b in batches:
        pv_mask, click_mask = b.pv_mask.bool().to(device), b.click_mask.bool().to(device)
        e_pv = _embed(encoder, b.pv_images.to(device), pv_mask)
        e_click = _embed(encoder, b.click_images.to(device), click_mask)
        r_pv, _ = reconstruct(e_pv, e_click, click_mask)
        sim = F.cosine_similarity(e_pv, r_pv, dim=-1)  # Sim(j, j), (B, l_pv)
        labels = b.pv_labels.to(device)
        for i in range(sim.shape[0]):
            keep = pv_mask[i] & click_mask[i].any()
            y = labels[i][keep]
            if y.numel() == 0 or y.min() == y.max():
                continue  # a page needs a clicked and a skipped item
            total += _page_auc(sim[i][keep], y) * y.numel()
            weight += y.numel()
            pages += 1
    return {"pv_auc": total / weight if weight else float("nan"), "pages": pages, "items": weight}


def _embed(encoder: ImageEncoder, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    B, L = mask.shape
    out = torch.zeros(B, L, encoder.dim, device=images.device)
    if mask.any():
        out[mask] = encoder.encode(images[mask]).float()
    return out
