"""Image helpers shared by stage 1 (building item_images) and the readers (decoding).

`normalize_image` is a pure function over the bytes of one file: stage 1 reads the files through
Spark's `binaryFile` source (so `images_root` may be local or `s3a://...`) and calls it per row. It
never raises for a bad image; the reason says what was wrong.

Conversion rules to 8-bit RGB (documented in the README, "Stage 1"):
- animated images (GIF, APNG, WebP): the first frame;
- EXIF orientation is applied (a phone photo stored sideways is turned upright);
- transparency (RGBA, LA, PA, a palette with a transparent index, a key colour in RGB or 1-, 8- or 16-bit
  greyscale): composited on white, the usual
  background of a product image;
- 16-bit and 32-bit integer greyscale (I;16*, I): the high byte (value / 257, rounded), not a clip at 255;
  float greyscale (F): clipped to [0, 255];
- CMYK, YCbCr, LAB, HSV, 1-bit and 8-bit greyscale: Pillow's conversion to RGB.
Then a centre crop to a square, a bicubic resize to `px` x `px` and a JPEG encode.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np

# Reasons an image is quarantined (the contract with etl.build and the README's reason table).
IMAGE_MISSING = "image_missing"
IMAGE_ESCAPES_ROOT = "image_path_escapes_root"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_CORRUPT = "image_corrupt"


def _to_rgb(img):
    from PIL import Image, ImageOps

    if getattr(img, "is_animated", False):
        img.seek(0)
    ImageOps.exif_transpose(img, in_place=True)  # the same pixels without a copy of the full-size image
    mode = img.mode
    if mode in ("P", "L", "RGB", "1") and "transparency" in img.info:  # a key colour (PNG tRNS, GIF): see-through
        img = img.convert("RGBA")
        mode = "RGBA"
    if (mode.startswith("I;16") or mode == "I") and "transparency" in img.info:
        # A 16-bit key colour: Pillow's RGBA conversion drops it (the pixels came out opaque), so the mask
        # is taken here from the 16-bit values.
        seen = Image.fromarray(np.where(np.asarray(img) == img.info["transparency"], np.uint8(0), np.uint8(255)))
        img = Image.merge("LA", (Image.fromarray(_to_eight_bits(img, _high_byte)), seen))
        mode = "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_to_eight_bits(img, _high_byte)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_to_eight_bits(img, lambda rows: rows.astype(np.float64))).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")  # convert() to the same mode is a copy


# Rows converted at a time: the float64 temporaries of a 25-Mpixel image taken whole would be ~600 MB
# per decoding task.
_ROWS_PER_CHUNK = 256


def _high_byte(rows):
    """16-bit values on the 8-bit scale (I;16 is 0..65535; mode I from a 16-bit PNG holds the same range)."""
    return rows / 257.0


def _to_eight_bits(img, scale):
    """8-bit greyscale (uint8 HxW) of a 16/32-bit integer or float greyscale image: scale(rows) rounded
    and clipped to 0..255, `_ROWS_PER_CHUNK` rows at a time (the same values as the whole image at once).
    Image.fromarray reads the uint8 result as mode L."""
    wide = np.asarray(img)  # the image's own dtype: 2 or 4 bytes per pixel, no wider copy
    eight = np.empty(wide.shape, dtype=np.uint8)
    for r in range(0, wide.shape[0], _ROWS_PER_CHUNK):
        eight[r:r + _ROWS_PER_CHUNK] = np.clip(np.rint(scale(wide[r:r + _ROWS_PER_CHUNK])), 0, 255)
    return eight


def normalize_local_image(path: str, px: int, quality: int, max_pixels: int):
    """normalize_image of the local file at path; image_missing when it is gone (removed, or replaced
    by a folder, since the driver listed it) or cannot be read (permissions, an I/O error): one such
    file must not fail the date."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, None, None, None, IMAGE_MISSING, f"{type(e).__name__} since it was listed"
    return normalize_image(data, px, quality, max_pixels)


def normalize_image(data: bytes, px: int, quality: int, max_pixels: int):
    """(jpeg_bytes, width, height, sha256, reason, detail) for the bytes of one image file.

    reason is None on success, else image_too_large (width x height from the header is over
    max_pixels; nothing is decoded) or image_corrupt (any decoder failure; detail names the exception
    class). width/height are the output's (px)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check (a warning, or an error above 2x its limit) is replaced by ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
                if w * h > max_pixels:
                    return None, None, None, None, IMAGE_TOO_LARGE, f"{w}x{h} > {max_pixels} pixels"
                probe.verify()  # catches truncated/garbled files that open() alone accepts
                # MPO (phone and camera JPEGs with a second picture) opens through the JPEG plugin and
                # has no opener of its own: formats=["MPO"] would find none.
                known = [probe.format] if probe.format in Image.OPEN else None
            with Image.open(io.BytesIO(data), formats=known) as img:  # the format is known: no plugin search
                out = square_jpeg(_to_rgb(img), px, quality)
    except Image.DecompressionBombError as e:  # only when max_pixels is above Pillow's own hard limit
        return None, None, None, None, IMAGE_TOO_LARGE, str(e)[:200]
    except Exception as e:  # noqa: BLE001 - one bad image must never fail the date; the class is the detail
        return None, None, None, None, IMAGE_CORRUPT, type(e).__name__
    return out, px, px, hashlib.sha256(out).hexdigest(), None, None


def square_jpeg(rgb, px: int, quality: int) -> bytes:
    """An RGB PIL image centre-cropped to a square, resized to px x px (bicubic), as JPEG bytes."""
    from PIL import Image

    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # A square image is its own crop (crop() would copy it). resize(box=...) is not used: its filter
    # reads pixels outside the box, so the edges would differ from a crop's.
    square = rgb if w == h else rgb.crop((left, top, left + side, top + side))
    buf = io.BytesIO()
    square.resize((px, px), Image.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes):
    """JPEG bytes -> HxWx3 uint8 numpy array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
