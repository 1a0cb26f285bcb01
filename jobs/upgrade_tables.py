"""python jobs/upgrade_tables.py --conf conf/local.yaml [--dry-run]

Once, before tables written by an earlier release with the embedded engine (delta-rs) are read with
Spark's Delta (`tables.engine: spark-delta`): those commits held the writer's job, run and partition
as loose keys in commitInfo, where Spark's Delta expects its own `job` struct, and a Spark read of
such a table failed on its log (MALFORMED_RECORD_IN_PARSING). This moves them into `userMetadata`, as
both engines write it now, in every table under `paths.tables_root`. Data files and every other
line of the log stay as they were; a second run finds nothing to do. Run it while no job writes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobs.common import run_job  # noqa: E402

JOB = "upgrade_tables"


def add_arguments(p) -> None:
    p.add_argument("--dry-run", action="store_true", help="list the commits to rewrite, rewrite nothing")


def body(ctx) -> None:
    from etl import fs

    upgraded = ctx.store.upgrade_commit_info(dry_run=ctx.args.dry_run)
    verb = "would rewrite" if ctx.args.dry_run else "rewrote"
    for name, versions in sorted(upgraded.items()):
        ctx.say(f"{name}: {verb} the commit info of {len(versions)} commit(s), versions {versions[0]}..{versions[-1]}")
    total = sum(map(len, upgraded.values()))
    if total and not ctx.args.dry_run and fs.is_object_store(ctx.cfg.tables_root):
        ctx.say("note: the object store dated the rewritten log files now, and Spark's Delta takes a commit's "
                "time from its file: history and timestampAsOf show those versions at this time "
                "(versionAsOf is unchanged)")
    ctx.say(f"{verb} {total} commit(s) in {len(upgraded)} table(s) under {ctx.cfg.tables_root}"
            + ("" if total else ": every table's log is already readable by Spark's Delta"))


def main(argv: list[str] | None = None) -> int:
    return run_job(JOB, __doc__, add_arguments, body, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
