#!/usr/bin/env bash
# Create or refresh the project's virtualenv (.venv) from pyproject.toml. Idempotent: a second run
# with an unchanged pyproject.toml does nothing. Run (with bash) by scripts/pipeline.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COURIER_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${COURIER_EXTRAS:-cpu,dev}"   # use gpu,dev on machines with CUDA (faiss-gpu instead of faiss-cpu)

if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
  echo "ERROR: Java was not found. Spark needs a Java 17 runtime: install one (e.g. 'apt-get install -y openjdk-17-jre-headless') or set JAVA_HOME." >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)'; then
  echo "ERROR: Python 3.11 or 3.12 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

# One install at a time: two scripts (or a test run and a pipeline) started together share the venv.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

stamp="$VENV/.courier-installed"
extras_file="$VENV/.courier-extras"   # the extras of the last install
want="$( (cat "$ROOT/pyproject.toml"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  [ -f "$extras_file" ] || echo "$EXTRAS" > "$extras_file"   # a venv installed before the file was kept
  exit 0
fi
echo "[env] installing the project into $VENV (first run takes a few minutes) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# faiss-cpu and faiss-gpu write the same `faiss` package: when the extras change, the one installed
# before goes first (pip never removes it, and the two would overwrite each other's files).
if [ -f "$extras_file" ] && [ "$(cat "$extras_file")" != "$EXTRAS" ]; then
  echo "[env] extras changed ($(cat "$extras_file") -> $EXTRAS): removing the installed faiss first"
  "$VENV/bin/python" -m pip uninstall -q -y faiss-cpu faiss-gpu 2> >(grep -v "is ignored\|not installed" >&2)
fi
# pip's own warnings about unreachable local mirrors are noise; real errors still fail the script.
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" 2> >(grep -v "is ignored" >&2)
"$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" 2> >(grep -v "is ignored" >&2)
"$VENV/bin/python" -m pip check
echo "$want" > "$stamp"
echo "$EXTRAS" > "$extras_file"
echo "[env] ready: $VENV"
