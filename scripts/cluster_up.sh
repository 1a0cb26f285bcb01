#!/usr/bin/env bash
# Cluster-in-a-box: start the services a cluster deployment talks to, all on 127.0.0.1:
#   - an S3-compatible object store (moto's standalone server: the S3 HTTP API to real clients)
#   - a Spark standalone cluster: one master and 2 workers with 1 core each (executors are separate JVMs)
#   - an MLflow tracking server (sqlite backend store, artifacts in the object store)
# Usage: bash scripts/cluster_up.sh [RUN_DIR]      (default: data/cluster)
# Writes RUN_DIR/cluster.env (`source` it, then run jobs with --conf conf/cluster.local.yaml), logs under
# RUN_DIR/logs, pid files under RUN_DIR/pids. Free ports and throwaway credentials are chosen per start.
# Idempotent: when RUN_DIR's services are up and healthy it does nothing; a half-up RUN_DIR is stopped
# and started again. Any service not healthy within its deadline stops everything and exits non-zero
# naming the service and its endpoint. Stop with: bash scripts/cluster_down.sh [RUN_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${1:-$ROOT/data/cluster}"
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
VENV="${COURIER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
START_TIMEOUT_S="${COURIER_CLUSTER_START_TIMEOUT_S:-90}"   # per service; seconds, never a hang
[[ "$START_TIMEOUT_S" =~ ^[0-9]+$ ]] \
  || { echo "ERROR: COURIER_CLUSTER_START_TIMEOUT_S=$START_TIMEOUT_S: give a whole number of seconds" >&2; exit 2; }
WORKERS=2
WORKER_MEMORY="${COURIER_WORKER_MEMORY:-3g}"

[ -x "$PY" ] || { echo "ERROR: $PY not found: run 'bash scripts/env.sh' first (with the dev extra for moto)" >&2; exit 2; }
[ -x "$VENV/bin/moto_server" ] || { echo "ERROR: moto_server not in $VENV: install the dev extra (COURIER_EXTRAS=cpu,dev bash scripts/env.sh)" >&2; exit 2; }
command -v java >/dev/null 2>&1 || [ -n "${JAVA_HOME:-}" ] || { echo "ERROR: Java 17 is needed for Spark" >&2; exit 2; }

LOGS="$RUN_DIR/logs"; PIDS="$RUN_DIR/pids"; ENV_FILE="$RUN_DIR/cluster.env"
exec 7>"$RUN_DIR/.lock"   # one up/down at a time per run folder
flock 7

# probe NAME: health check of one service from cluster.env's values; exit 0 when healthy.
probe() {
  "$PY" - "$1" <<'PY'
import json, os, sys, urllib.request
name = sys.argv[1]
def get(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()
try:
    if name == "s3":
        import boto3
        from botocore.config import Config
        s3 = boto3.client("s3", endpoint_url=os.environ["COURIER_S3_ENDPOINT"],
                          config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
        s3.list_buckets()  # the service answers (the bucket is made once it does)
        if os.environ.get("COURIER_PROBE_BUCKET"):
            s3.head_bucket(Bucket=os.environ["COURIER_BUCKET"])
    elif name == "spark":
        state = json.loads(get(os.environ["COURIER_SPARK_UI"] + "/json/"))
        alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
        want = int(os.environ.get("COURIER_SPARK_WORKERS", "2"))
        if state.get("status") != "ALIVE" or len(alive) < want:
            sys.exit(f"master {state.get('status')}, {len(alive)}/{want} workers alive")
    elif name == "mlflow":
        if get(os.environ["MLFLOW_TRACKING_URI"] + "/health").strip() != "OK":
            sys.exit("health is not OK")
except SystemExit:
    raise
except Exception as e:  # noqa: BLE001 - any failure means "not healthy yet"; the reason is printed
    sys.exit(f"{type(e).__name__}: {e}")
PY
}

all_healthy() {
  [ -f "$ENV_FILE" ] || return 1
  for f in "$PIDS"/*.pid; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null || return 1; done
  ( set +u; source "$ENV_FILE"; export COURIER_PROBE_BUCKET=1
    for s in s3 spark mlflow; do probe "$s" >/dev/null 2>&1 || exit 1; done )
}

if all_healthy; then
  echo "[cluster] already up: $ENV_FILE"
  exit 0
fi
if compgen -G "$PIDS/*.pid" >/dev/null; then
  echo "[cluster] $RUN_DIR is half up: stopping what is left before starting again"
  COURIER_CLUSTER_LOCKED=1 bash "$ROOT/scripts/cluster_down.sh" "$RUN_DIR"
fi
# Every start is a fresh store (moto keeps its objects in memory, and the bucket is new): the tracking
# database, whose runs and registered models name artifacts in the old bucket, starts fresh with it.
rm -rf "$LOGS" "$PIDS" "$ENV_FILE" "$RUN_DIR/spark-work" "$RUN_DIR/mlflow.db"
mkdir -p "$LOGS" "$PIDS"

t_start=$(date +%s)
JARS="$(bash "$ROOT/scripts/cluster_jars.sh")"
t_jars=$(date +%s)

# Free ports, all on 127.0.0.1, found free here and bound by the services a moment (MLflow: many seconds)
# later. They are drawn below the kernel's ephemeral range, which it never hands out by itself: a port
# that the kernel chose (bind to port 0) could be given to an outgoing connection meanwhile.
PORTS="$("$PY" - <<'PY'
import random, socket
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
except (OSError, ValueError, IndexError):
    ephemeral = 32768  # Linux's default
pool = list(range(20000, ephemeral))
random.shuffle(pool)
chosen = []
for port in pool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        chosen.append(port)
    except OSError:
        continue
    finally:
        s.close()
    if len(chosen) == 6:
        break
while len(chosen) < 6:  # no room below the ephemeral range: ports the kernel picks
    s = socket.socket(); s.bind(("127.0.0.1", 0))
    if s.getsockname()[1] not in chosen:
        chosen.append(s.getsockname()[1])
    s.close()
print(*chosen)
PY
)"
read -r S3_PORT MASTER_PORT MASTER_UI_PORT MLFLOW_PORT W1_UI W2_UI <<< "$PORTS"
SUFFIX="$("$PY" -c 'import secrets; print(secrets.token_hex(4))')"
SPARK_HOME="$("$PY" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"

# Throwaway credentials (never committed; this file is the only copy, readable by its owner only).
umask 077
cat > "$ENV_FILE" <<EOF
# cluster-in-a-box services of $RUN_DIR, started $(date -u +%FT%TZ); source this file
export COURIER_CLUSTER_RUN_DIR='$RUN_DIR'
export COURIER_CONF='$ROOT/conf/cluster.local.yaml'
export SPARK_MASTER_URL='spark://127.0.0.1:$MASTER_PORT'
export COURIER_SPARK_UI='http://127.0.0.1:$MASTER_UI_PORT'
export COURIER_SPARK_WORKERS='$WORKERS'
export COURIER_SPARK_JARS='$JARS'
export COURIER_SPARK_CLASSPATH='$(dirname "${JARS%%,*}")/*'
export COURIER_S3_ENDPOINT='http://127.0.0.1:$S3_PORT'
export COURIER_BUCKET='courier-$SUFFIX'
export AWS_ACCESS_KEY_ID='AK$("$PY" -c 'import secrets; print(secrets.token_hex(9).upper())')'
export AWS_SECRET_ACCESS_KEY='$("$PY" -c 'import secrets; print(secrets.token_urlsafe(30))')'
export AWS_DEFAULT_REGION='us-east-1'
export AWS_REGION='us-east-1'
# boto3 (MLflow's S3 artifact store) and delta-rs read these; Spark's s3a reads the config file's conf.
export AWS_ENDPOINT_URL='http://127.0.0.1:$S3_PORT'
export MLFLOW_S3_ENDPOINT_URL='http://127.0.0.1:$S3_PORT'
export AWS_ALLOW_HTTP='true'
export MLFLOW_TRACKING_URI='http://127.0.0.1:$MLFLOW_PORT'
export SPARK_HOME='$SPARK_HOME'
export SPARK_LOCAL_IP='127.0.0.1'
export PYSPARK_PYTHON='$PY'
EOF
umask 022
set -a; source "$ENV_FILE"; set +a

# start NAME CMD...: a service in its own process group (cluster_down stops the whole group: the
# Spark workers' executors and MLflow's server workers included).
start() {
  local name="$1"; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null 7>&- &   # (not holding the run folder's lock)
  echo $! > "$PIDS/$name.pid"
}

fail() {  # fail SERVICE ENDPOINT REASON: say what did not come up, show its log, stop everything
  echo "ERROR: $1 did not come up at $2 within ${START_TIMEOUT_S}s: $3" >&2
  for f in "$LOGS"/*"$1"*.log; do [ -f "$f" ] && { echo "---- tail of $f" >&2; tail -n 20 "$f" >&2; }; done
  COURIER_CLUSTER_LOCKED=1 bash "$ROOT/scripts/cluster_down.sh" "$RUN_DIR" >&2 || true
  exit 1
}

# wait_healthy SERVICE ENDPOINT PIDFILE...: poll until the probe passes; a dead process fails at once.
wait_healthy() {
  local name="$1" endpoint="$2"; shift 2
  local deadline=$(( $(date +%s) + START_TIMEOUT_S )) why=""
  while :; do
    for pf in "$@"; do kill -0 "$(cat "$pf")" 2>/dev/null || fail "$name" "$endpoint" "process $(basename "$pf" .pid) exited"; done
    why="$(probe "$name" 2>&1)" && return 0
    [ "$(date +%s)" -lt "$deadline" ] || fail "$name" "$endpoint" "${why:-no answer}"
    sleep 0.5
  done
}

# Interrupted while starting (Ctrl-C, a runner's SIGTERM): the services run in process groups of their
# own, which the signal does not reach; stop them as a failed start does. Cleared once all are up.
interrupted() {
  echo "[cluster] interrupted: stopping what was started" >&2
  COURIER_CLUSTER_LOCKED=1 bash "$ROOT/scripts/cluster_down.sh" "$RUN_DIR" >&2 || true
  exit 130
}
trap interrupted INT TERM HUP

# ---- object store ------------------------------------------------------------------------------
start s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
# ---- Spark standalone: master + workers (started together with the store; they are independent) --
export SPARK_DAEMON_MEMORY="${SPARK_DAEMON_MEMORY:-512m}"   # master/worker daemons, not executors
export SPARK_NO_DAEMONIZE=1
start spark-master "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master \
  --host 127.0.0.1 --port "$MASTER_PORT" --webui-port "$MASTER_UI_PORT"
for i in $(seq 1 "$WORKERS"); do
  ui_var="W${i}_UI"
  mkdir -p "$RUN_DIR/spark-work/worker-$i"
  # Executors inherit the worker's environment: the AWS_* variables above act as the node's credentials.
  start "spark-worker-$i" "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker \
    "$SPARK_MASTER_URL" --cores 1 --memory "$WORKER_MEMORY" --host 127.0.0.1 \
    --webui-port "${!ui_var}" --work-dir "$RUN_DIR/spark-work/worker-$i"
done

wait_healthy s3 "$COURIER_S3_ENDPOINT" "$PIDS/s3.pid"
"$PY" - <<'PY' || fail s3 "$COURIER_S3_ENDPOINT" "could not create bucket $COURIER_BUCKET"
import os, boto3
boto3.client("s3", endpoint_url=os.environ["COURIER_S3_ENDPOINT"]).create_bucket(Bucket=os.environ["COURIER_BUCKET"])
PY
t_s3=$(date +%s)

# ---- MLflow tracking server: artifacts go straight to the object store (clients use S3 themselves).
# Its job runner (7 huey consumers, for GenAI evaluation jobs the project never submits) doubled the
# start time on 2 cores; switched off.
start mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$RUN_DIR/mlflow.db" \
  --default-artifact-root "s3://$COURIER_BUCKET/mlflow/artifacts" --no-serve-artifacts

wait_healthy spark "$COURIER_SPARK_UI (master $SPARK_MASTER_URL)" "$PIDS"/spark-*.pid
t_spark=$(date +%s)
wait_healthy mlflow "$MLFLOW_TRACKING_URI" "$PIDS/mlflow.pid"
trap - INT TERM HUP
t_end=$(date +%s)

echo "[cluster] up in $(( t_end - t_start ))s (jars $(( t_jars - t_start ))s, s3 ready +$(( t_s3 - t_jars ))s, spark +$(( t_spark - t_jars ))s, mlflow +$(( t_end - t_jars ))s)"
echo "[cluster]   spark   $SPARK_MASTER_URL  (UI $COURIER_SPARK_UI, $WORKERS workers x 1 core)"
echo "[cluster]   s3      $COURIER_S3_ENDPOINT  bucket $COURIER_BUCKET"
echo "[cluster]   mlflow  $MLFLOW_TRACKING_URI"
echo "[cluster]   env     source $ENV_FILE   (then: --conf conf/cluster.local.yaml)"
