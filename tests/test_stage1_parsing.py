"""Stage 1 strict line parsing and image normalisation: pure functions, no Spark."""
from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.images import normalize_image
from etl.samples import CATALOG_FIELDS, EVENT_FIELDS, parse_line

GOOD = {"event_id": "e1", "event_type": "pv", "ts": "2026-11-20T08:00:00Z", "user_id": "u1", "pv_id": "p1",
        "query": "dress", "items": ["i1", "i2"]}


def reason(line) -> tuple:
    data = line if isinstance(line, bytes) else line.encode()
    values, text, r, detail = parse_line(data, EVENT_FIELDS)
    return r, detail, values


@pytest.mark.parametrize("line, expected", [
    (json.dumps(GOOD), None),
    ("  " + json.dumps(GOOD) + " \r", None),  # surrounding whitespace is not content
    ("", "blank_line"),
    ("   ", "blank_line"),
    ('{"event_id": "e1"', "bad_json"),
    ("[1, 2]", "bad_json"),  # JSON, but not an object
    ('{"event_id": "e1", "event_id": "e2"}', "bad_json"),  # duplicate key: which one is meant?
    ('{"event_id": NaN}', "bad_json"),
    (json.dumps(GOOD) + json.dumps(GOOD), "trailing_content"),  # two objects on one line
    (json.dumps(GOOD) + " x", "trailing_content"),
    (json.dumps({**GOOD, "user_id": 42}), "wrong_type:user_id"),  # a number where the contract says string
    (json.dumps({**GOOD, "items": "i1"}), "wrong_type:items"),  # a string where it says list
    (json.dumps({**GOOD, "items": ["i1", 2]}), "wrong_type:items"),
    (json.dumps({**GOOD, "ts": 1795161600}), "wrong_type:ts"),
    (json.dumps({**GOOD, "extra": {"a": 1}}), None),  # fields outside the contract are ignored
])
def test_strict_line_reasons(line, expected):
    r, detail, values = reason(line)
    assert r == expected, detail
    if expected is None:
        assert values["items"] == ["i1", "i2"] and values["user_id"] == "u1"
    else:
        assert values is None


def test_undecodable_bytes_are_marked_and_recoverable():
    data = json.dumps(GOOD).encode()[:20] + b"\xff\xfe" + json.dumps(GOOD).encode()[20:]
    values, text, r, detail = parse_line(data, EVENT_FIELDS)
    assert r == "bad_encoding" and "byte 20" in detail
    assert "\ufffd\ufffd" in text and text.encode("utf-8")  # valid UTF-8 for every reader


def test_catalog_price_is_a_number_not_a_bool_or_string():
    line = {"item_id": "i1", "image_uri": "i1.png", "price": 9.5}
    assert parse_line(json.dumps(line).encode(), CATALOG_FIELDS)[2] is None
    assert parse_line(json.dumps({**line, "price": "9.5"}).encode(), CATALOG_FIELDS)[2] == "wrong_type:price"
    assert parse_line(json.dumps({**line, "price": True}).encode(), CATALOG_FIELDS)[2] == "wrong_type:price"


def test_catalog_price_outside_the_doubles_is_quarantined_not_a_crash():
    # A double column cannot hold these: an integer past 1.8e308 made float() raise in the executors
    # (failing the whole date) and 1e400 read as infinity.
    base = '{"item_id":"i1","image_uri":"i1.png","price":%s}'
    for number in ("1" + "0" * 400, "-1" + "0" * 309, "1e400", "-1e999"):
        values, text, r, detail = parse_line((base % number).encode(), CATALOG_FIELDS)
        assert (values, r, detail) == (None, "wrong_type:price", f"{'int' if 'e' not in number else 'float'} "
                                                                  "outside the finite doubles"), number
    for number, want in (("1" + "0" * 308, 1e308), ("1e-400", 0.0), ("-0.5", -0.5)):
        values, _, r, _ = parse_line((base % number).encode(), CATALOG_FIELDS)
        assert r is None and float(values["price"]) == want, number


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_to_values_or_a_reason(data):
    values, text, r, detail = parse_line(data, EVENT_FIELDS)
    assert (values is None) != (r is None)
    text.encode("utf-8")  # always writable as a string column
    if r is None:
        assert set(values) == set(EVENT_FIELDS)


# ---- images ------------------------------------------------------------------------------------------
def _save(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (wrong) body: what a decompression bomb
    looks like to a reader that checks the header first."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _decoded(data: bytes, px: int = 8):
    from etl.images import decode_jpeg

    jpeg, w, h, sha, r, detail = normalize_image(data, px, 95, 1_000_000)
    assert r is None, (r, detail)
    assert (w, h) == (px, px) and len(sha) == 64
    return decode_jpeg(jpeg)


def test_header_pixel_limit_before_decoding():
    jpeg, *_, r, detail = normalize_image(_png_header_only(20000, 20000), 8, 90, 25_000_000)
    assert jpeg is None and r == "image_too_large" and "400000000 pixels" in detail
    *_, r, detail = normalize_image(_png_header_only(6000, 5000), 8, 90, 25_000_000)  # under Pillow's own limit
    assert r == "image_too_large" and detail == "6000x5000 > 25000000 pixels"


def test_every_decoder_failure_is_image_corrupt_with_the_class():
    from PIL import Image

    good = _save(Image.new("RGB", (16, 16), (10, 200, 30)), "PNG")
    for data in (b"", b"not an image", good[:40], b"\x89PNG\r\n\x1a\n" + b"\0" * 64):
        *_, r, detail = normalize_image(data, 8, 90, 1_000_000)
        assert r == "image_corrupt" and detail and detail[0].isupper(), (data[:10], detail)


def test_mode_conversion_rules():
    import numpy as np
    from PIL import Image

    # CMYK: Pillow's conversion (pure cyan -> (0, 255, 255)).
    cmyk = _decoded(_save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=100))
    assert cmyk.shape == (8, 8, 3) and cmyk[..., 0].mean() < 20 and cmyk[..., 1:].mean() > 235
    # 16-bit greyscale: the high byte (40000 / 257 = 156), not a clip at 255.
    grey16 = Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16))
    g = _decoded(_save(grey16, "PNG"))
    assert abs(float(g.mean()) - 156) < 3
    # Palette with a transparent index: composited on white.
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.paste(1, (0, 0, 16, 8))  # top half index 1 (blue, opaque), bottom half index 0 (red, transparent)
    p = _decoded(_save(pal, "PNG", transparency=0), px=16)
    assert p[:6, :, 2].mean() > 200 and p[:6, :, 0].mean() < 40  # blue stays blue
    assert p[10:, :].mean() > 235  # transparent red -> white
    # RGBA with alpha 0 -> white.
    assert _decoded(_save(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "PNG")).mean() > 250
    # Animated GIF: the first frame.
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = _decoded(gif)
    assert first[..., 0].mean() > 200 and first[..., 1].mean() < 60
    # RGB and greyscale PNGs with a key colour (tRNS): that colour is see-through -> white, others stay.
    rgb = Image.new("RGB", (16, 16), (0, 0, 0))
    rgb.paste((0, 0, 255), (0, 0, 16, 8))  # top half blue, bottom half black (the key colour)
    k = _decoded(_save(rgb, "PNG", transparency=(0, 0, 0)), px=16)
    assert k[:6, :, 2].mean() > 200 and k[:6, :, 0].mean() < 40 and k[10:, :].mean() > 235
    grey = Image.new("L", (16, 16), 0)
    grey.paste(90, (0, 0, 16, 8))
    k = _decoded(_save(grey, "PNG", transparency=0), px=16)
    assert abs(float(k[:6].mean()) - 90) < 8 and k[10:].mean() > 235
    # ... and 1-bit and 16-bit greyscale ones (logos, line art), which came out black
    bits = Image.new("1", (16, 16), 0)
    bits.paste(1, (0, 0, 16, 8))  # top half white, bottom half black (the key colour)
    k = _decoded(_save(bits, "PNG", transparency=0), px=16)
    assert k[:6].mean() > 235 and k[10:].mean() > 235
    k = _decoded(_save(Image.new("1", (16, 16), 1), "PNG", transparency=0), px=16)  # nothing see-through
    assert k.mean() > 235
    deep = np.full((16, 16), 1000, dtype=np.uint16)  # the key colour
    deep[:8] = 40000  # top half: 40000 / 257 = 156
    k = _decoded(_save(Image.fromarray(deep), "PNG", transparency=1000), px=16)
    assert abs(float(k[:6].mean()) - 156) < 8 and k[10:].mean() > 235


def test_wide_greyscale_is_rounded_to_eight_bits_in_row_chunks_without_a_wide_copy():
    """16/32-bit integer and float greyscale: each value rounded (value / 257 for integers) and clipped
    to 0..255, the same as the whole image at once, converted a few rows at a time: a 25-Mpixel 16-bit
    image must not need ~16 bytes per pixel of temporaries in a decoding task."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from etl import images as I

    rng = np.random.default_rng(3)
    rows = 2 * I._ROWS_PER_CHUNK + 37  # chunks, the last one partial
    cases = {
        "I;16": (rng.integers(0, 65536, (rows, 33), dtype=np.uint16), lambda a: a / 257.0),
        "I": (rng.integers(-70000, 20_000_000, (rows, 33), dtype=np.int32), lambda a: a / 257.0),
        "F": (rng.uniform(-40, 300, (rows, 33)).astype(np.float32), lambda a: a.astype(np.float64)),
    }
    for mode, (arr, scale) in cases.items():
        img = Image.fromarray(arr)
        assert img.mode == mode
        whole = np.clip(np.rint(scale(arr)), 0, 255).astype(np.uint8)
        rgb = np.asarray(I._to_rgb(img))
        assert rgb.shape == (rows, 33, 3) and np.array_equal(rgb[..., 0], whole) and np.array_equal(rgb[..., 2], whole)
    big = Image.fromarray(rng.integers(0, 65536, (3000, 1000), dtype=np.uint16))
    tracemalloc.start()
    try:
        I._to_rgb(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 * 3000 * 1000, peak / 3e6  # the 2-byte copy, the 1-byte result and one chunk's temporaries


def test_mpo_photos_decode_as_their_first_picture():
    """Phone and camera JPEGs with a second picture (MPO: Ultra HDR, depth, previews) are images, not
    corrupt files: their first picture, as a plain JPEG of it gives."""
    from PIL import Image

    frames = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (16, 16), (30, 30, 200))]
    mpo = _save(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    with Image.open(io.BytesIO(mpo)) as probe:
        assert probe.format == "MPO" and probe.n_frames == 2
    got = _decoded(mpo)
    assert got[..., 0].mean() > 170 and got[..., 2].mean() < 60
    assert (got == _decoded(_save(frames[0], "JPEG", quality=95))).all()


def test_exif_orientation_is_applied_and_the_output_equals_plain_pil():
    """normalize_image skips PIL's copies (exif_transpose in place, no convert or crop of an image that
    is already RGB or square); its bytes must equal the plain chain's: exif_transpose (copy) ->
    convert("RGB") -> centre crop -> bicubic resize -> JPEG."""
    import numpy as np
    from PIL import Image, ImageOps

    def plain(data: bytes, px: int) -> bytes:
        with Image.open(io.BytesIO(data)) as img:
            if getattr(img, "is_animated", False):
                img.seek(0)
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            w, h = rgb.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            return _save(rgb.crop((left, top, left + side, top + side)).resize((px, px), Image.BICUBIC), "JPEG",
                         quality=90)

    rng = np.random.default_rng(5)
    wide = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # 40 wide, 24 high
    wide.paste((255, 0, 0), (0, 0, 40, 12))  # top half red, bottom half random
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored sideways, turned 90 degrees clockwise to view
    rotated = _save(wide, "JPEG", quality=95, exif=exif.tobytes())
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    cases = {
        "jpeg, exif orientation 6": rotated,
        "png, wide": _save(wide, "PNG"),
        "png, tall": _save(wide.transpose(Image.Transpose.ROTATE_90), "PNG"),
        "png, square": _save(wide.crop((0, 0, 24, 24)), "PNG"),
        "png, rgba": _save(Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)), "PNG"),
        "gif, animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
    }
    for name, data in cases.items():
        for px in (8, 16):
            jpeg, *_, r, detail = normalize_image(data, px, 90, 1_000_000)
            assert r is None, (name, r, detail)
            if name != "png, rgba":  # plain PIL drops alpha; normalize composites on white (rule above)
                assert jpeg == plain(data, px), name
    # Orientation 6: the stored 40 x 24 image is viewed 24 wide x 40 high with its red half on the right.
    upright = _decoded(rotated, px=16)
    assert upright[:, 12:, 0].mean() > 200 and upright[:, 12:, 1:].mean() < 60
    assert upright[:, :4, 1:].mean() > 60  # the random half: green and blue too
