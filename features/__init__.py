"""Stages 3-4: item embeddings, clusters and CTR features."""
