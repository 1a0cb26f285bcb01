"""Stage 1: Spark transforms that turn a raw search log into Delta sample tables, and the shared
platform pieces every stage uses (config, Spark session, table I/O, MLflow setup)."""
