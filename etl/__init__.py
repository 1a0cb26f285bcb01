"""Stage 1: Spark transforms that turn a raw search log into Delta sample tables, and the shared
platform pieces every stage uses (config, Spark session, table I/O, MLflow setup)."""

from etl.pyworker import skip_unchanged_archive_rereads as _skip_unchanged_archive_rereads

# Every Spark Python worker that runs this project's code imports this package first: see etl/pyworker.py.
_skip_unchanged_archive_rereads()
