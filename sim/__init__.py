"""Seeded search-log simulator: the data COURIER runs on when nobody's data is at hand.

Pure Python + numpy + pillow (no Spark). ``simulate()`` writes a raw search log and an item catalog
partitioned by date, one procedural image per item, and a hidden-truth side table; it returns (and
writes as ``manifest.json``) the exact count of every row kind it produced, so that the pipeline's
``input = kept + dropped + quarantined`` bookkeeping can be checked against ground truth.

Generative model
================
Everything below is drawn from ``numpy.random.default_rng([seed, stream, ...])`` streams, so one
(preset, seed, start_date, rates, image_px) gives the same bytes on every run.

Items
-----
* ``category``: one of 8 (dress, shoe, bag, shirt, skirt, hat, scarf, coat), balanced (a shuffled
  round-robin), so every category has at least a page of items.
* Latent visual style, drawn independently and uniformly: ``hue`` family (red, orange, yellow,
  green, blue, purple), ``pattern`` (plain, stripes, dots, checks), silhouette ``shape`` (circle,
  square, triangle) and texture ``scale`` (fine, coarse; ``none`` for plain items, which have no
  texture).
* ``popularity`` ~ LogNormal(0, 1); ``price`` = round(LogNormal(3.2, 0.6), 2); ``title`` = two
  neutral words + the category name + a model code (e.g. "Urban Essential dress K-482"). Price, title
  and popularity are independent of the style: **only the pixels carry the style**.
* Image (``image_px`` square PNG): a neutral grey background (level U(0.80, 0.95)) with a faint
  linear gradient whose direction is set by the category (the only category cue in the pixels; it
  does not move clicks), one silhouette of the item's shape, filled with its hue family (hue jitter
  +-10 degrees, saturation U(0.55, 0.9), value U(0.7, 0.95)) and patterned in a darker or lighter tone of
  the same hue: stripes (period 1/f), dots (radius 0.3/f on a 1/f grid) or checks (cells 1/f), with
  f ~ 2.8 (fine) or 1.2 (coarse) cycles per silhouette radius, +-10%. Jitter: centre +-0.15,
  radius U(0.52, 0.72) of the half-width, rotation +-25 degrees, pattern angle +-20 degrees and
  phase, and grey-level Gaussian pixel noise (sd 0.03) everywhere, so no two images are identical.
* Cold start: the first date holds the initial catalog (``items`` of the preset); each later date
  adds ``round(new_item_share * items)`` new items (10%), which appear in that date's pages and later.

Users
-----
Each user has a taste: 1 liked hue (70%) or 2 (30%), one liked pattern, shape and scale; 1-3
favourite categories with Dirichlet(1) weights; an activity level ~ LogNormal(0, 0.6) (divided by
its mean) and a click bias ~ N(0, 0.3).

Requests
--------
Per date, a user has ``min(Poisson(1.5 * activity), 6)`` sessions (zero: inactive that day). The
day is cut into as many equal slots as the user has sessions; session k starts uniformly in slot k
early enough that it ends (last PV + 60 s) at least 31 minutes before the slot ends, so sessions are
separated by more than 30 minutes of inactivity and never cross midnight. A session has
``min(1 + Poisson(m - 1), 20)`` PVs (m = preset ``pvs_per_user_day / 1.5``), 20 s - 5 min apart.
The session picks a category from the user's favourites (by weight); each PV queries it (80%) or
another draw from the favourites (20%). A PV shows ``page_size`` = 10 distinct items of that category
available on that date, drawn without replacement with probability proportional to
``popularity ** 0.8`` (Plackett-Luce), in draw order (position 0 = first draw). The "ranker" does
not know the user's taste.

Clicks
------
For user u and the item i shown at position p (0-based)::

    affinity(u, i) = 1.0 [hue(i) in liked_hues(u)] + 0.7 [pattern(i) = liked_pattern(u)]
                   + 0.5 [shape(i) = liked_shape(u)] + 0.4 [scale(i) = liked_scale(u), i not plain]
    logit = -3.7 - 0.6 ln(1 + p) + 0.25 ln(popularity(i)) + click_bias(u) + 1.6 affinity(u, i) + e,
    e ~ N(0, 0.5);  click ~ Bernoulli(sigmoid(logit))

At most one click per (PV, item); its timestamp is the PV's + U(2, 60) s. An impression is
*taste-matching* when affinity >= 1.5 (the hue plus at least one of pattern/shape); with these
constants the overall CTR is about 7% and taste-matching impressions are clicked several times as
often as the others (see docs/simulator.md for measured numbers). ``taste_affinity()`` computes the
affinity from the truth tables, for evaluation only.

Malformed rows
--------------
Per date, ``round(rate * valid / (1 - rate))`` extra lines (rate = ``malformed_rate``) are added, split
evenly over five kinds (the tiny preset forces at least 2 of each). Each has exactly one fault and is
an extra line: valid events, and the clicks of valid PVs, are never altered.

* ``bad_json``: a copy of a valid event (fresh event_id) truncated mid-line, sometimes followed by
  junk characters; never parses as JSON.
* ``null_id``: a copy of a PV or click (fresh event_id; a PV copy also gets a fresh pv_id) whose
  user_id or pv_id is null.
* ``bad_timestamp``: a copy (fresh ids as above) whose ts is unparseable ("yesterday",
  "2026-13-45T99:00:00Z", ...).
* ``unknown_item``: a PV copy (fresh ids) with one item replaced by an id in no catalog, or a new
  click (fresh event_id) on a real PV, by that PV's user, on an unknown item.
* ``duplicate``: an exact copy of a valid line of the same date (same event_id), placed after it.

Bad images
----------
Per date, ``round(bad_image_rate * new_items)`` of that date's new items (tiny: at least 1 of each
kind) get a bad image, split evenly: ``image_missing`` (no file is written) and ``image_corrupt`` (a
file that fails to open/verify: the real PNG truncated inside its header, or a PNG signature followed
by garbage). These items are still in the catalog and in pages.

Layout
======
::

    out_root/search_log/dt=YYYY-MM-DD/part-NNNNN.jsonl   PV and click events (<= 500k lines a part)
    out_root/catalog/dt=YYYY-MM-DD/items.jsonl           items first seen that date
    out_root/manifest.json                               exact counts (the return value)
    images_root/<item_id>.png                             image_uri in the catalog is relative to it
    truth_root/item_styles.parquet, user_tastes.parquet   hidden truth: evaluation only

Within a date the valid events are sorted by (ts, pv before click); each malformed line is inserted
after the event it was copied from, within about 2,000 lines. Re-running replaces the date folders it generates,
the images of the items it generates (and removes the file of a missing-image item), the truth
tables and the manifest.

Run ``python -m sim --help`` for the command line; ``sim.world`` holds the model (vocabulary, presets,
items, users, one day of traffic), ``sim.images`` the images, ``sim.searchlog`` the log writer and
``simulate()``.
"""
from sim.searchlog import main, simulate
from sim.world import (BAD_IMAGE_KINDS, CATEGORIES, CLICK_MODEL, DRIFT_HUE, HUES, MALFORMED_KINDS, PATTERNS,
                       PRESETS, SCALES, SHAPES, TASTE_MATCH_THRESHOLD, taste_affinity)

__all__ = ["BAD_IMAGE_KINDS", "CATEGORIES", "CLICK_MODEL", "DRIFT_HUE", "HUES", "MALFORMED_KINDS", "PATTERNS",
           "PRESETS", "SCALES", "SHAPES", "TASTE_MATCH_THRESHOLD", "main", "simulate", "taste_affinity"]
