"""Item embeddings inside Spark: a batched pandas UDF runs the registered encoder over item images.

The driver broadcasts the encoder's state dict bytes once; each executor Python process rebuilds the
ImageEncoder from the version's tags and loads the weights with ``torch.load(weights_only=True)`` on
its first batch, then keeps it in a module-level cache keyed by the encoder version and a digest of its
weights (Spark reuses its Python workers across tasks and jobs), so the model is loaded once per
process, not per batch; the cache holds the latest encoder only.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Callable

from pyspark.sql import DataFrame
from pyspark.sql import types as T

from features import content_key
from etl.registry import EncoderSpec

EMBEDDING_SCHEMA = T.StructType([
    T.StructField("item_id", T.StringType()),
    T.StructField("embedding", T.ArrayType(T.FloatType())),  # null: the image did not decode
])

_ENCODERS: dict = {}  # content key -> ImageEncoder: the latest one only, per Python process (as _INDEXES)


def load_encoder(spec: EncoderSpec, state: bytes):
    """Rebuild the encoder from its tags and load its weights (weights only: nothing is unpickled)."""
    import torch

    from training.courier import ImageEncoder

    encoder = ImageEncoder(spec.backbone, dim=spec.dim, proj_head=spec.proj_head)
    encoder.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
    return encoder.eval()


def cached_encoder(key: str, spec: EncoderSpec, state_bc, threads: int):
    """The encoder for `key` (features.content_key of the weights), loaded once per Python process."""
    encoder = _ENCODERS.get(key)
    if encoder is None:
        import torch

        torch.set_num_threads(threads)  # Spark already runs one Python worker per core
        _ENCODERS.clear()
        encoder = _ENCODERS[key] = load_encoder(spec, bytes(state_bc.value))
    return encoder


def decode_image(data, px: int):
    """JPEG/PNG bytes -> uint8 (3, px, px), or None when the bytes are not a readable image."""
    import numpy as np
    from PIL import Image

    if data is None or len(data) == 0:
        return None
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img = img.convert("RGB")
            if img.size != (px, px):  # stage 1 already centre-cropped to a square
                img = img.resize((px, px), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except Exception:  # noqa: BLE001 - any undecodable image becomes a null embedding (reserved id)
        return None


def embed_array(encoder, images, batch_size: int):
    """uint8 (N, 3, H, W) -> float32 (N, d), in forward passes of batch_size."""
    import numpy as np
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            out.append(encoder.encode(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size]))).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.dim), np.float32)


def embed_rows(images: list, px: int, batch_size: int, encoder: Callable[[], object]) -> list:
    """The embedding of each image's bytes (None where it does not decode), decoding batch_size images at
    a time: an Arrow batch holds attach_batch_size rows (8,192 by default), whose pixels decoded at once
    would take ~1.2 GB per Python worker at 224 px. `encoder()` is called only when an image decodes."""
    import numpy as np

    result = [None] * len(images)
    for start in range(0, len(images), batch_size):
        arrays = [decode_image(b, px) for b in images[start:start + batch_size]]
        ok = [i for i, a in enumerate(arrays) if a is not None]
        if ok:
            vecs = embed_array(encoder(), np.stack([arrays[i] for i in ok]), batch_size)
            for j, i in enumerate(ok):
                result[start + i] = vecs[j]
    return result


def embed_images(images: DataFrame, spec: EncoderSpec, state_bc, batch_size: int, threads: int = 1,
                 keep: tuple[str, ...] = ()) -> DataFrame:
    """(item_id, image bytes, *keep) -> (item_id, embedding, *keep). One output row per input row; an
    image that does not decode gets a null embedding (the reserved cluster id downstream), never a crash."""
    spec_d = dataclasses.asdict(spec)
    key = content_key(spec.encoder_version, state_bc.value)  # on the driver, once

    def run(batches):
        import pandas as pd

        from features.embed import cached_encoder, embed_rows
        from etl.registry import EncoderSpec

        s = EncoderSpec(**spec_d)
        for pdf in batches:
            result = embed_rows(pdf["image"].tolist(), s.image_px, batch_size,
                                lambda: cached_encoder(key, s, state_bc, threads))
            out = pd.DataFrame({"item_id": pdf["item_id"].values, "embedding": result})
            for c in keep:
                out[c] = pdf[c].values
            yield out

    schema = T.StructType(EMBEDDING_SCHEMA.fields + [images.schema[c] for c in keep])
    return images.select("item_id", "image", *keep).mapInPandas(run, schema)
