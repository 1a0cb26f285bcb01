"""The search-log simulator: a seeded data generator, the data COURIER runs on when nobody's data is at hand.

``simulate()`` (``sim.searchlog``) writes the raw search log, catalog, images and hidden truth that
stage 1 reads; see docs/simulator.md. It imports nothing from the pipeline (etl/, training/, features/).
"""
from sim.searchlog import (BAD_IMAGE_KINDS, CATEGORIES, CLICK_MODEL, DRIFT_HUE, HUES, MALFORMED_KINDS, PATTERNS,
                           PRESETS, SCALES, SHAPES, TASTE_MATCH_THRESHOLD, main, simulate, taste_affinity)

__all__ = ["BAD_IMAGE_KINDS", "CATEGORIES", "CLICK_MODEL", "DRIFT_HUE", "HUES", "MALFORMED_KINDS", "PATTERNS",
           "PRESETS", "SCALES", "SHAPES", "TASTE_MATCH_THRESHOLD", "main", "simulate", "taste_affinity"]
