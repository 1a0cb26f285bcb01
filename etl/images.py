"""Image helpers shared by stage 1 (building item_images) and the readers (decoding)."""
from __future__ import annotations

import hashlib
import io

from etl.config import ConfigError, under_root


def load_and_resize(images_root: str, image_uri: str, px: int, quality: int):
    """(jpeg_bytes, width, height, sha256, reason): reason is None on success, else one of
    image_path_escapes_root, image_missing, image_corrupt."""
    from PIL import Image, UnidentifiedImageError

    try:
        path = under_root(images_root, image_uri)
    except ConfigError:
        return None, None, None, None, "image_path_escapes_root"
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None, None, None, None, "image_missing"
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            probe.verify()  # catches truncated/garbled files that open() alone accepts
        with Image.open(io.BytesIO(raw)) as img:
            img = img.convert("RGB")
            w, h = img.size
            side = min(w, h)
            img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            img = img.resize((px, px), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, None, None, None, "image_corrupt"
    data = buf.getvalue()
    return data, px, px, hashlib.sha256(data).hexdigest(), None


def decode_jpeg(data: bytes):
    """JPEG bytes -> HxWx3 uint8 numpy array."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
