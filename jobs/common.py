"""What every job's entry point shares: the --conf/--set arguments, logging and the warning filter."""
from __future__ import annotations

import argparse
import logging
import os
import warnings

from etl.config import Config, load_config, parse_overrides

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_warnings() -> None:
    """Petastorm and pyarrow print many FutureWarnings on this stack; keep the job output readable."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def job_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
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
