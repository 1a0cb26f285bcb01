"""What every job's entry point shares: the --conf/--set arguments, logging and the warning filter."""
from __future__ import annotations

import argparse
import logging
import os
import sys
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
        raise CliError(f"--end-date {end} is before --date {start}")
    return [(d0 + dt.timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


@dataclass
class JobContext:
    args: argparse.Namespace
    cfg: Config
    spark: Any
    run: Any  # the MLflow run


def run_job(name: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
            body: Callable[[JobContext], int], check_args: Callable[[argparse.Namespace], None] | None = None,
            expected_errors: tuple = (), argv: list[str] | None = None) -> int:
    """The frame every job shares: arguments and config (errors: one line, exit 2), the Spark session,
    one MLflow run, the body, and the session stopped whatever happens. `expected_errors` (bad input,
    a refused publish...) print their message without a traceback and exit 1."""
    import yaml

    from etl.config import ConfigError

    p = job_parser(description, one_line_errors=True)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        if check_args:
            check_args(args)
        cfg = load_job_config(args)
    except (CliError, ConfigError, yaml.YAMLError) as e:
        print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from etl.spark import get_spark
    from etl.tracking import start_run

    spark = None
    try:
        spark = get_spark(cfg, app_name=name)
        with start_run(cfg, run_name=name, tags={"courier.job": name}) as run:
            return body(JobContext(args, cfg, spark, run))
    except expected_errors as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    finally:
        if spark is not None:
            spark.stop()
