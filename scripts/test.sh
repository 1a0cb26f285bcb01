#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite: real Spark, Delta, MLflow, torch.
# Extra arguments go to pytest, e.g. scripts/test.sh -k samples
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/env.sh
bash scripts/install_horovod.sh   # the second training backend; its test must run, not skip
bash scripts/install_airflow.sh   # Airflow 3 in its own venv: the scheduled-refresh DAG tests run it
bash scripts/install_browser.sh   # headless Chromium: the review report is checked in the MLflow UI
export COURIER_REQUIRE_HOROVOD="${COURIER_REQUIRE_HOROVOD:-1}" COURIER_REQUIRE_AIRFLOW="${COURIER_REQUIRE_AIRFLOW:-1}"
export COURIER_REQUIRE_BROWSER="${COURIER_REQUIRE_BROWSER:-1}"
VENV="${COURIER_VENV:-$ROOT/.venv}"
export PYSPARK_PYTHON="$VENV/bin/python" PYSPARK_DRIVER_PYTHON="$VENV/bin/python" SPARK_LOCAL_IP=127.0.0.1
# The slowest tests are listed at the end of every run: the CI budget is watched from there.
exec "$VENV/bin/python" -m pytest -q --durations=25 "$@"
