"""Stages 3-4: item embeddings, FAISS clusters and CTR features.

Contract with the CTR model (unchanged from the issue/DESIGN.md):

- ``item_embeddings`` (partitioned by encoder_version, dt): item_id, embedding array<float>[d] (the
  encoder's raw output), encoder_version (``courier-encoder-v<N>``), dt (the item's first-seen date).
- ``item_clusters`` (partitioned by feature_version, dt): item_id, cluster_id int, distance float
  (cosine distance 1 - cos to its centroid; null for the reserved id), feature_version, dt.
- ``ctr_train`` (partitioned by dt): every ``ctr_log`` column, then item_cluster_id int,
  history_cluster_ids array<int> (aligned with ``history``), sim_scores array<float> (cosine of the
  item's embedding to each history item's, aligned with ``history``), item_vector array<float>
  (only with ``features.include_vector``: the L2-normalised embedding, zeros for the reserved id),
  feature_version (``courier-encoder-v<N>.courier-clusters-v<K>``), dt.
- ``NO_IMAGE_CLUSTER_ID`` (-1): the cluster id of an item without a usable image (no image, an image
  that failed to decode, or an embedding with NaN/inf or zero norm); its sim scores are 0.0.
"""

from etl.contracts import NO_IMAGE_CLUSTER_ID, NO_IMAGE_SIM_SCORE  # noqa: F401 - owned by etl.contracts

__all__ = ["NO_IMAGE_CLUSTER_ID", "NO_IMAGE_SIM_SCORE", "content_key"]


def content_key(name: str, data) -> str:
    """Cache key of a broadcast model/index in the executors' Python workers: its name and a digest of
    its bytes. Spark reuses Python workers across jobs, and a name alone (``courier-encoder-v1``) can
    stand for different weights in another registry or after a registry was recreated."""
    import hashlib

    return f"{name}:{hashlib.sha256(memoryview(data).cast('B')).hexdigest()[:16]}"
