#!/usr/bin/env bash
# Airflow in its own virtualenv (.venv-airflow), apart from the project's pinned stack: the scheduler's
# interpreter never imports the project; every DAG task runs a project job in the project's .venv.
# Idempotent: a second run with the same pins does nothing. Used by scripts/test.sh (the DAG tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AF_VENV="${COURIER_AIRFLOW_VENV:-$ROOT/.venv-airflow}"
PYTHON="${PYTHON:-python3}"
# Airflow's own constraints files live outside the package index; pin the two top-level packages
# (the Airflow 3 line and the standard provider with BashOperator / branch decorators) instead.
PINS=("apache-airflow==3.3.2" "apache-airflow-providers-standard==1.21.0")

mkdir -p "$(dirname "$AF_VENV")"
exec 9>"$AF_VENV.lock"
flock 9
stamp="$AF_VENV/.courier-installed"
want="$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$AF_VENV/bin/airflow" ]; then
  exit 0
fi
echo "[airflow] installing ${PINS[*]} into $AF_VENV (first run: ~2 minutes) ..."
[ -x "$AF_VENV/bin/python" ] || "$PYTHON" -m venv "$AF_VENV"
"$AF_VENV/bin/python" -m pip install -q --upgrade "pip>=24" 2> >(grep -v "is ignored" >&2)
"$AF_VENV/bin/python" -m pip install -q "${PINS[@]}" 2> >(grep -v "is ignored" >&2)
echo "$want" > "$stamp"
echo "[airflow] ready: $AF_VENV/bin/airflow"
