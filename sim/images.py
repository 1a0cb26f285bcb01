"""Procedural item images (one PNG per item, vectorised numpy + pillow) and which items get a bad one."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sim.world import (CATEGORIES, DRIFT_BACKGROUND_SHIFT, DRIFT_HUE_DEGREES, HUE_DEGREES, HUES,
                       SCALE_FREQ, _STREAM_BADIMG, _STREAM_RENDER, _rng, _say, _split_counts)

_RENDER_BATCH = 256


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """h in [0, 1), s, v in [0, 1] (same shapes) -> (..., 3) float32."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _render_params(items: dict, seed: int) -> dict:
    rng = _rng(seed, _STREAM_RENDER)
    n = items["n"]
    hue_deg = np.asarray(HUE_DEGREES + (DRIFT_HUE_DEGREES,))[items["hue"]] + rng.uniform(-10, 10, n)
    fill = _hsv_to_rgb(hue_deg / 360.0, rng.uniform(0.55, 0.9, n), rng.uniform(0.7, 0.95, n))
    dark = rng.random(n) < 0.6
    pat = np.where(dark[:, None], fill * 0.45, fill * 0.35 + 0.65).astype(np.float32)
    freq = np.where(items["scale"] == 1, SCALE_FREQ[1], SCALE_FREQ[0]) * rng.uniform(0.9, 1.1, n)
    return dict(
        fill=fill, pat=pat, freq=freq,
        cx=rng.uniform(-0.15, 0.15, n), cy=rng.uniform(-0.15, 0.15, n),
        radius=rng.uniform(0.52, 0.72, n), rot=np.deg2rad(rng.uniform(-25, 25, n)),
        prot=np.deg2rad(rng.uniform(-20, 20, n)), phase=rng.random((n, 2)),
        bg=rng.uniform(0.80, 0.95, n) - DRIFT_BACKGROUND_SHIFT * (items["hue"] == len(HUES)),
        grad_angle=2 * np.pi * items["category"] / len(CATEGORIES) + rng.uniform(-0.2, 0.2, n),
    )


def _render_batch(items: dict, prm: dict, idx: np.ndarray, px: int, seed: int) -> np.ndarray:
    """Render items idx (all of one shape and one pattern) -> (B, px, px, 3) uint8, pure numpy."""
    f32 = np.float32
    shape, pattern = int(items["shape"][idx[0]]), int(items["pattern"][idx[0]])
    assert (items["shape"][idx] == shape).all() and (items["pattern"][idx] == pattern).all()
    g = (np.arange(px, dtype=f32) + 0.5) / px * 2 - 1  # pixel centres in [-1, 1]
    X = g[None, None, :]
    Y = g[None, :, None]
    col = lambda a: np.asarray(a[idx], dtype=f32)[:, None, None]
    cx, cy, r, rot, prot, freq = (col(prm[k]) for k in ("cx", "cy", "radius", "rot", "prot", "freq"))
    dx, dy = X - cx, Y - cy
    c, s = np.cos(rot) / r, np.sin(rot) / r
    u = c * dx + s * dy  # silhouette frame, in radii
    v = c * dy - s * dx
    # signed distance (in radii, > 0 inside) of the silhouette
    if shape == 0:
        sd = 1.0 - np.sqrt(u * u + v * v)
    elif shape == 1:
        sd = 0.84 - np.maximum(np.abs(u), np.abs(v))
    else:
        apex, base, half = -1.33, 0.67, 1.15
        norm = math.hypot(base - apex, half)
        sd = np.minimum(base - v, ((v - apex) * half - (base - apex) * np.abs(u)) / norm)
    alpha = np.clip(sd * (r * (px / 2)) + 0.5, 0, 1)  # anti-aliased edge, one pixel wide
    # pattern mask in the silhouette's frame, turned by a small extra angle
    if pattern == 0:
        m = None
    else:
        ph = np.asarray(prm["phase"][idx], dtype=f32)
        ph0, ph1 = ph[:, 0][:, None, None], ph[:, 1][:, None, None]
        pc, ps = np.cos(prot) * freq, np.sin(prot) * freq
        pu = pc * u + ps * v + ph0  # in pattern periods
        if pattern == 1:  # stripes
            m = np.clip(0.5 + 2.5 * np.sin(2 * np.pi * pu), 0, 1)
        else:
            pv = pc * v - ps * u + ph1
            if pattern == 2:  # dots
                du, dv = pu % 1.0 - 0.5, pv % 1.0 - 0.5
                m = (du * du + dv * dv < 0.09).astype(f32)
            else:  # checks
                m = ((np.floor(pu) + np.floor(pv)) % 2).astype(f32)
    fill = np.asarray(prm["fill"][idx], dtype=f32)[:, None, None, :]
    pat = np.asarray(prm["pat"][idx], dtype=f32)[:, None, None, :]
    ga = col(prm["grad_angle"])
    bg = col(prm["bg"]) + 0.07 * (X * np.cos(ga) + Y * np.sin(ga))
    noise = _rng(seed, _STREAM_RENDER, 1 + int(idx[0])).standard_normal(alpha.shape, dtype=f32)
    grey = bg * (1 - alpha) + 0.03 * noise  # background + grey-level pixel noise everywhere
    img = alpha[..., None] * fill
    if m is not None:
        img += (alpha * m)[..., None] * (pat - fill)
    img += grey[..., None]
    np.clip(img, 0, 1, out=img)
    img *= 255
    img += 0.5
    return img.astype(np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _corrupt_bytes(good: bytes, rng: np.random.Generator) -> bytes:
    """Bytes that fail Image.open/verify/load: a PNG cut inside its header, or a signature + garbage."""
    if rng.random() < 0.5:
        return good[: int(rng.integers(0, 30))]
    junk = rng.integers(0, 256, int(rng.integers(64, 512)), dtype=np.uint8).tobytes()
    return good[:8] + b"\x00\x00\x00\x0dJUNK" + junk


def _write_images(items: dict, images_root: Path, px: int, seed: int,
                  progress: Callable[[str], None] | None) -> None:
    t0 = time.perf_counter()
    images_root.mkdir(parents=True, exist_ok=True)
    prm = _render_params(items, seed)
    rng_bad = _rng(seed, _STREAM_BADIMG, 1)
    n = items["n"]
    status = items["image_status"]
    # batches of one (shape, pattern) so each pixel computes only its own silhouette and pattern
    order = np.lexsort((np.arange(n), items["pattern"], items["shape"]))
    groups = np.split(order, np.flatnonzero(np.diff(items["shape"][order] * 8 + items["pattern"][order])) + 1)
    for group in groups:
        for start in range(0, len(group), _RENDER_BATCH):
            idx = group[start:start + _RENDER_BATCH]
            batch = _render_batch(items, prm, idx, px, seed)
            for k, i in enumerate(idx.tolist()):
                path = images_root / f"{items['item_id'][i]}.png"
                if status[i] == 1:  # image_missing
                    if path.exists() or path.is_symlink():
                        path.unlink()
                    continue
                data = _png_bytes(batch[k])
                if status[i] == 2:  # image_corrupt
                    data = _corrupt_bytes(data, rng_bad)
                with open(path, "wb") as fh:
                    fh.write(data)
    _say(progress, f"simulate: rendered {n} images ({px}px) in {time.perf_counter() - t0:.1f}s")


def _pick_bad_images(items: dict, cfg: dict, seed: int, rate: float, n_days: int) -> list[dict]:
    rng = _rng(seed, _STREAM_BADIMG)
    minimum = int(cfg.get("min_bad_images_per_kind", 0)) if rate > 0 else 0
    per_day = []
    for d in range(n_days):
        new = np.flatnonzero(items["first_day"] == d)
        total = int(round(rate * len(new))) if rate > 0 else 0
        n_missing, n_corrupt = _split_counts(total, 2, minimum)
        n_missing = min(n_missing, len(new))
        n_corrupt = min(n_corrupt, len(new) - n_missing)
        chosen = rng.permutation(new)[: n_missing + n_corrupt]
        items["image_status"][chosen[:n_missing]] = 1
        items["image_status"][chosen[n_missing:]] = 2
        per_day.append({"image_missing": int(n_missing), "image_corrupt": int(n_corrupt)})
    return per_day
