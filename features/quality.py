"""Cluster quality against the simulator's hidden styles (evaluation only: truth is never a model input)."""
from __future__ import annotations

import numpy as np


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def purity_nmi(clusters, labels) -> tuple[float, float]:
    """Purity (share of items in their cluster's majority label) and NMI (arithmetic-mean normalisation,
    as sklearn's default) of a clustering against labels."""
    clusters = np.asarray(clusters)
    _, c = np.unique(clusters, return_inverse=True)
    _, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1))
    np.add.at(table, (c, y), 1)
    n = table.sum()
    purity = float(table.max(axis=1).sum() / n)
    hc, hy = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    pxy = table / n
    px, py = pxy.sum(axis=1, keepdims=True), pxy.sum(axis=0, keepdims=True)
    nz = pxy > 0
    mi = float((pxy[nz] * np.log(pxy[nz] / (px @ py)[nz])).sum())
    nmi = mi / ((hc + hy) / 2) if hc + hy > 0 else 1.0
    return purity, float(nmi)


def style_labels(item_styles, item_ids, attribute: str = "style"):
    """Hidden label per item: one attribute (hue, pattern, shape, scale) or the whole style tuple."""
    s = item_styles.set_index("item_id").loc[list(item_ids)]
    if attribute == "style":
        return (s["hue"].astype(str) + "/" + s["pattern"].astype(str) + "/" + s["shape"].astype(str) + "/"
                + s["scale"].astype(str)).to_numpy()
    return s[attribute].astype(str).to_numpy()
