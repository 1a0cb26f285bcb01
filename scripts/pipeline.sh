#!/usr/bin/env bash
# The whole pipeline, end to end, on the embedded default (conf/local.yaml unless COURIER_CONF is set):
#   1. simulate a search log (preset from the config; COURIER_PRESET overrides)
#   2. spark-submit jobs/build_samples.py over every simulated date
#   3. spark-submit jobs/train_courier.py on the latest courier_train version
# Idempotent: a rerun regenerates the same log and replaces the same table partitions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/env.sh
VENV="${COURIER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
CONF="${COURIER_CONF:-$ROOT/conf/local.yaml}"
export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY" SPARK_LOCAL_IP="${SPARK_LOCAL_IP:-127.0.0.1}"

sim_args=()
[ -n "${COURIER_PRESET:-}" ] && sim_args+=(--preset "$COURIER_PRESET")
echo "== 1/3 simulate search log =="
"$PY" jobs/simulate_search_log.py --conf "$CONF" "${sim_args[@]}"

raw_root="$("$PY" -c 'import sys; from etl.config import load_config; print(load_config(sys.argv[1]).raw_root)' "$CONF")"
read -r first last < <("$PY" -c 'import json,sys; d=sorted(json.load(open(sys.argv[1]))["dates"]); print(d[0], d[-1])' "$raw_root/manifest.json")

echo "== 2/3 build samples $first..$last =="
"$VENV/bin/spark-submit" --master "local[*]" --driver-memory 4g \
  --driver-java-options "-Dlog4j.configurationFile=file:$ROOT/conf/log4j2.properties" \
  jobs/build_samples.py --conf "$CONF" --date "$first" --end-date "$last"

echo "== 3/3 pre-train the COURIER encoder =="
"$VENV/bin/spark-submit" --master "local[*]" --driver-memory 4g \
  --driver-java-options "-Dlog4j.configurationFile=file:$ROOT/conf/log4j2.properties" \
  jobs/train_courier.py --conf "$CONF" --skip-if-done

tables_root="$("$PY" -c 'import sys; from etl.config import load_config; print(load_config(sys.argv[1]).tables_root)' "$CONF")"
uri="$("$PY" -c 'import sys; from etl.config import load_config; print(load_config(sys.argv[1]).mlflow_tracking_uri)' "$CONF")"
cat <<MSG

Done. Tables (Delta): $tables_root
MLflow UI:  $VENV/bin/mlflow ui --backend-store-uri $uri --host 127.0.0.1 --port 5000
MSG
