"""The job frame: what every job's entry point shares. `run_job` parses --conf/--set and the job's own
arguments (errors: one line, exit 2), sets up logging, opens the Spark session, runs the job's body
(which opens its MLflow run with `ctx.mlflow_run`), maps expected errors to exit codes without a
traceback, and stops the session whatever happens. A job file declares its arguments and body only."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from etl.config import Config, load_config, parse_overrides

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_warnings() -> None:
    """Petastorm and pyarrow print many FutureWarnings on this stack; keep the job output readable."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class CliError(ValueError):
    """A command-line argument that cannot be used; the message names the flag and what is allowed."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the whole usage first; one line is enough
        self.exit(2, f"{self.prog}: error: {message}\n")


def job_parser(description: str, one_line_errors: bool = False) -> argparse.ArgumentParser:
    p = (_OneLineParser if one_line_errors else argparse.ArgumentParser)(description=description)
    p.add_argument("--conf", default=os.path.join(_ROOT, "conf", "local.yaml"), help="config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set samples.neg_rate=0.3 (repeatable)")
    return p


def status_file_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--status-file: the job also writes `what` there as one JSON line (a scheduler's XCom)."""
    p.add_argument("--status-file", default=None,
                   help=f"also write {what} as one JSON line to this file, for schedulers")


def load_job_config(args: argparse.Namespace) -> Config:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "alembic", "urllib3", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Horovod's rendezvous server logs every key exchange on the root logger at INFO: keep its warnings only.
    logging.getLogger().addFilter(
        lambda record: record.levelno >= logging.WARNING or f"{os.sep}horovod{os.sep}" not in record.pathname)
    quiet_warnings()
    return load_config(args.conf, parse_overrides(args.set))


def date_arg(flag: str, value: str | None) -> str | None:
    """A YYYY-MM-DD flag value, or CliError naming the flag."""
    import datetime as dt

    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise CliError(f"{flag} {value}: not a date (YYYY-MM-DD)") from None


def date_range(start: str, end: str | None) -> list[str]:
    """Every date from start to end (inclusive; end None = start only), in order."""
    import datetime as dt

    d0, d1 = dt.date.fromisoformat(start), dt.date.fromisoformat(end or start)
    if d1 < d0:
        raise CliError(f"--end-date {end}: before --date {start}")
    return [(d0 + dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


def date_range_arguments(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    """--date / --end-date: the first and last (inclusive) date of `what`; check_date_range reads them."""
    default = "" if required else " (default: all)"
    p.add_argument("--date", required=required, help=f"first date of {what}{default} (YYYY-MM-DD)")
    p.add_argument("--end-date", default=None, help="last date, inclusive (default: --date)")


def check_date_range(args: argparse.Namespace) -> None:
    """args.dates: every date from --date to --end-date (None when neither is given), or CliError
    naming the flag, before any session starts."""
    args.date = date_arg("--date", args.date)
    args.end_date = date_arg("--end-date", args.end_date)
    if args.end_date and not args.date:
        raise CliError(f"--end-date {args.end_date} needs --date")
    args.dates = date_range(args.date, args.end_date) if args.date else None


def dates_param(dates: list[str] | None) -> str:
    """A date range as an MLflow param: its first and last date and how many (a param holds at most
    6,000 characters: a comma-joined list of a two-year backfill would fail the job at its start)."""
    if not dates:
        return "all"
    return dates[0] if len(dates) == 1 else f"{dates[0]}..{dates[-1]} ({len(dates)} dates)"


@dataclass
class JobContext:
    """What a job's body gets: its arguments and config, the Spark session, the table store on it, and a
    way to open the job's MLflow run."""
    name: str
    args: argparse.Namespace
    cfg: Config
    spark: Any

    @property
    def store(self):
        from etl.tables import TableStore

        if getattr(self, "_store", None) is None:
            self._store = TableStore(self.spark, self.cfg)
        return self._store

    def mlflow_run(self, run_name: str | None = None, tags: dict | None = None, run_id: str | None = None,
                   params: dict | None = None):
        """The job's MLflow run (tagged courier.job; `run_id` continues an existing run), with `params`
        logged when given."""
        from etl.tracking import start_run

        @contextlib.contextmanager
        def opened():
            with start_run(self.cfg, run_name or self.name, tags={"courier.job": self.name, **(tags or {})},
                           run_id=run_id) as run:
                if params:
                    import mlflow

                    mlflow.log_params(params)
                yield run
        return opened()

    def write_status(self, status: dict) -> None:
        """The job's one-line JSON status to --status-file, when given. Written whole (a temporary file
        renamed into place), so a scheduler never reads half a line from a job killed while writing."""
        path = getattr(self.args, "status_file", None)
        if not path:
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(status, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def say(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)


# The exit status of a job that failed (a traceback): 1 is an outcome in every job (a refused publish, an
# input or a registry state to fix first, a rejected model), and a scheduler must not read a crash as one.
CRASHED = 3


def _exit_on_sigterm() -> None:
    """SIGTERM (a scheduler's timeout or "mark failed", a worker shutting down) raises SystemExit(143) in
    the job: Python's default ends the process without unwinding, which left the MLflow run RUNNING for
    ever and the session up. Unwinding ends the run FAILED and stops the session. The job's own
    process only (the main thread of a job started as a script)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _crashed(name: str, crash_status: int | None) -> int:
    """The exception being handled is a crash: re-raised (Python's exit 1), or its traceback printed and
    `crash_status` returned."""
    if crash_status is None:
        raise
    import traceback

    traceback.print_exc()
    print(f"{name}: error: the job failed (exit {crash_status})", file=sys.stderr, flush=True)
    return crash_status


def run_job(name: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
            body: Callable[[JobContext], int | None], check_args: Callable[[argparse.Namespace], None] | None = None,
            expected_errors: tuple | dict = (), argv: list[str] | None = None, crash_status: int | None = CRASHED,
            usage_status: int = 2, spark: bool = True) -> int:
    """The frame every job shares: arguments and config (any error there: one line, exit `usage_status`),
    logging, the Spark session, the body, and the session stopped whatever happens. The body opens its
    MLflow run with `ctx.mlflow_run(...)` and returns the exit status (None = 0). `expected_errors` (bad
    input, a refused publish...: a tuple of exception types -> exit 1, or a dict type -> status) print
    their message without a traceback. `crash_status` (CRASHED): the exit status of any other exception
    (its traceback printed); None re-raises it (Python's exit 1). A job whose
    status 2 is an outcome (review_model: refused) sets `usage_status` too. spark=False: a job that needs
    no session (ctx.spark is None)."""
    import yaml

    from etl.config import ConfigError

    codes = expected_errors if isinstance(expected_errors, dict) else {e: 1 for e in expected_errors}
    # A config value refused only where the body uses it (a path outside its root...) is a bad config too.
    codes = {ConfigError: usage_status, **codes}
    p = job_parser(description, one_line_errors=True)
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse printed the usage error (argparse's exit 2), or --help (exit 0)
        if e.code in (0, None):
            raise
        return usage_status
    try:
        if check_args:
            check_args(args)
        cfg = load_job_config(args)
    except (CliError, ConfigError, yaml.YAMLError, OSError, UnicodeError, TypeError, ValueError) as e:
        # what a bad argument or config file raises (unreadable, not UTF-8, a section given as a number);
        # anything else is a bug of the loader, a crash below
        what = "" if isinstance(e, (CliError, ConfigError, yaml.YAMLError)) else f"the config: {type(e).__name__}: "
        print(f"{name}: error: {what}{' '.join(str(e).split())}", file=sys.stderr)
        return usage_status
    except Exception:
        return _crashed(name, crash_status)
    from etl.spark import get_spark

    session = None
    try:
        _exit_on_sigterm()
        session = get_spark(cfg, app_name=name) if spark else None
        status = body(JobContext(name, args, cfg, session))
        return 0 if status is None else int(status)
    except tuple(codes) as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return next(code for kind, code in codes.items() if isinstance(e, kind))
    except Exception:
        return _crashed(name, crash_status)
    finally:
        if session is not None:
            try:
                session.stop()
            except Exception as e:  # noqa: BLE001 - the job's own status stands (a JVM already gone on SIGTERM)
                print(f"{name}: warning: stopping the Spark session failed: {type(e).__name__}: {e}", file=sys.stderr)
