"""python jobs/review_model.py --conf conf/local.yaml [--version N] [--allow-first] [--no-tsne]

Registry review of `ctr-model`: re-score the challenger (default: the latest version) and the current
@champion on the challenger's pinned evaluation snapshot (the champion with its own features), apply
the gates of the config's `review:` section and move @champion to the challenger only when every gate
passes (logic: training/ctr/review.py). A first
model (no champion yet) is promoted only with --allow-first. Writes review.html (plots inline) and
review.md with PNG plots as artifacts of an MLflow run and prints a one-screen summary.

Exit status: 0 promoted, 1 rejected by a gate (alias unchanged), 2 refused (no comparable evidence:
a champion that trained on the challenger's eval dates or whose features cannot be rebuilt, an image
encoder that trained on them, a vector-mode model on a snapshot without item_vector, no champion
without --allow-first, too few eval rows, unknown version), 3 the review failed (a crash, bad arguments
or config: never read as a rejection). The decision is final once made: it is printed (and written to
--status-file) before the report, so a report that fails after a promotion exits 3 and still says that
@champion moved.
With --status-file (schedulers): the decision is written there as one JSON line and the exit status is
0 whenever the review reached a decision and its report was logged.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import CRASHED, run_job, status_file_argument  # noqa: E402

JOB = "review_model"


def add_arguments(p) -> None:
    p.add_argument("--version", default=None, help="challenger version (default: the latest ctr-model version)")
    p.add_argument("--allow-first", action="store_true", help="promote the challenger when no @champion exists yet")
    p.add_argument("--no-tsne", action="store_true", help="leave the item-embedding t-SNE out of the report")
    status_file_argument(p, "the decision (and the exit status is 0 on any decision)")


def body(ctx) -> int:
    from etl.tracking import setup_mlflow
    from training.ctr.review import log_review, promote, validate

    setup_mlflow(ctx.cfg)
    outcome = validate(ctx.cfg, ctx.store, ctx.args.version, ctx.args.allow_first)  # gates: read-only
    try:
        promote(outcome)  # deployment: @champion moves only when every gate passed
    finally:  # said even when the move failed part-way (whether the alias moved is in the decision)
        ctx.say(f"decision: {outcome.decision} (challenger {outcome.challenger}, champion before {outcome.champion})")
        ctx.write_status(outcome.status())  # before the report: a failing report must not hide the decision
    log_review(ctx.cfg, ctx.store, outcome, with_tsne=not ctx.args.no_tsne)
    return 0 if ctx.args.status_file else outcome.exit_code


def main(argv: list[str] | None = None) -> int:
    from etl.config import ConfigError

    # 1 and 2 are decisions here (rejected, refused): bad arguments or config, before the body or in it, fail.
    return run_job(JOB, __doc__, add_arguments, body, argv=argv, usage_status=CRASHED,
                   expected_errors={ConfigError: CRASHED})


if __name__ == "__main__":
    sys.exit(main())
