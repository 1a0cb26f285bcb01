"""The contracts every stage shares: registered model names, registry aliases and reserved feature
values. Stages import them from here (stage 1 included), so no stage imports another to learn a
name, and each value is written once."""
from __future__ import annotations

# ---- MLflow registry: model names -------------------------------------------------------------
ENCODER_MODEL = "courier-encoder"  # stage 2: the COURIER image encoder
CLUSTERS_MODEL = "courier-clusters"  # stage 3: the FAISS k-means of the item embeddings
CTR_MODEL = "ctr-model"  # stage 4: the downstream CTR model

# ---- MLflow registry: aliases -------------------------------------------------------------------
CHAMPION = "champion"  # the encoder / CTR model in use; only a review (or --alias) moves it

# ---- reserved feature values ----------------------------------------------------------------------
NO_IMAGE_CLUSTER_ID = -1  # cluster id of an item without a usable image (missing, undecodable, bad embedding)
NO_IMAGE_SIM_SCORE = 0.0  # its similarity scores
