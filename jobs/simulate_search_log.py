"""python jobs/simulate_search_log.py --conf conf/local.yaml [--preset tiny] [--seed 7]

Writes a seeded synthetic search log, item catalog and item images under the config's raw/images
roots (and the hidden truth under truth_root), in the layout build_samples reads. See docs/simulator.md.

Roots on an object store (s3a://...) are written the way other systems deliver logs there: the files
are generated in a local staging folder and uploaded, file by file, to the same relative paths.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from etl.config import SIMULATOR_PRESETS  # noqa: E402
from jobs.common import run_job  # noqa: E402

JOB = "simulate_search_log"


def add_arguments(p) -> None:
    p.add_argument("--preset", choices=SIMULATOR_PRESETS, help="overrides simulator.preset")
    p.add_argument("--seed", type=int, help="overrides simulator.seed")


def body(ctx) -> int:
    import tempfile

    from etl import fs
    from sim import simulate

    args, cfg = ctx.args, ctx.cfg
    roots = {"raw": cfg.raw_root, "images": cfg.images_root, "truth": cfg.truth_root}
    remote = {k: r for k, r in roots.items() if fs.is_object_store(r)}
    staging = tempfile.TemporaryDirectory(prefix="courier-simulate-") if remote else None
    local = {k: (os.path.join(staging.name, k) if k in remote else r) for k, r in roots.items()}
    sim = cfg.simulator
    manifest = simulate(
        local["raw"], local["images"], local["truth"],
        preset=args.preset or sim.preset, seed=args.seed if args.seed is not None else sim.seed,
        start_date=sim.start_date, days=sim.days, malformed_rate=sim.malformed_rate,
        bad_image_rate=sim.bad_image_rate, image_px=sim.image_px, style_drift_from=sim.style_drift_from,
        progress=lambda line: print(line, flush=True))
    dates = sorted(manifest["dates"])
    options = fs.options_for(cfg)
    if remote:
        if "raw" in remote:  # each date's folders replaced whole, as locally (no part file of an older run left)
            for date in dates:
                for kind in ("search_log", "catalog"):
                    fs.remove_tree(fs.join(cfg.raw_root, kind, f"dt={date}"), options)
        for k, uri in remote.items():
            n = fs.upload_tree(local[k], uri, options)
            print(f"[simulate] uploaded {n} {k} file(s) to {uri}", flush=True)
        staging.cleanup()
    # Dates of an earlier simulation (another start date or length) stay, and build_samples reads them.
    older = sorted({name[3:] for kind in ("search_log", "catalog")
                    for name in fs.list_names(fs.join(cfg.raw_root, kind), options)
                    if name.startswith("dt=") and name[3:] not in dates})
    if older:
        print(f"[simulate] WARNING: {cfg.raw_root} also holds date(s) {older} that this run did not write (an "
              "earlier simulation?): build_samples reads them as part of the log; remove them for a clean world",
              file=sys.stderr, flush=True)
    print(json.dumps({"dates": dates, "items": manifest["items"], "users": manifest["users"],
                      "raw_root": cfg.raw_root}, indent=2))
    print(f"[simulate] wrote {len(dates)} date(s) {dates[0]}..{dates[-1]} under {cfg.raw_root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(JOB, __doc__, add_arguments, body, argv=argv, spark=False)


if __name__ == "__main__":
    sys.exit(main())
