#!/usr/bin/env bash
# The whole pipeline, end to end, on the embedded default (conf/local.yaml unless COURIER_CONF is set;
# the config's spark.master and driver_memory are what spark-submit is given, so the same script runs on
# local[*] and on a cluster, e.g. COURIER_CONF=conf/cluster.local.yaml after scripts/cluster_up.sh):
#   1. simulate a search log (preset from the config; COURIER_PRESET overrides)
#   2. spark-submit jobs/build_samples.py over every simulated date
#   3. spark-submit jobs/train_courier.py on the latest courier_train version (-> courier-encoder@champion)
#   4. item embeddings + FAISS k-means (jobs/embed_items.py, jobs/build_clusters.py)
#   5. cluster-ID features on ctr_train (jobs/attach_features.py; jobs/refresh_features.py, the daily job)
#   6. CTR models without and with the image feature (jobs/train_ctr.py)
#   7. registry review of the image-feature model against @champion (jobs/review_model.py)
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
echo "== 1/7 simulate search log =="
"$PY" jobs/simulate_search_log.py --conf "$CONF" "${sim_args[@]}"

conf_value() {  # one value of the loaded config (paths resolved, validated): conf_value spark.master
  "$PY" -c 'import sys; from etl.config import load_config
c = load_config(sys.argv[1])
print({"spark.master": c.spark.master, "spark.driver_memory": c.spark.driver_memory, "raw_root": c.raw_root,
       "tables_root": c.tables_root, "mlflow_tracking_uri": c.mlflow_tracking_uri,
       "ctr.feature_mode": c.ctr.feature_mode}[sys.argv[2]])' "$CONF" "$1"
}
raw_root="$(conf_value raw_root)"
# The manifest may lie on an object store (s3a://): read it through the project's storage layer.
read -r first last < <("$PY" -c 'import json, sys
from etl import fs
from etl.config import load_config
fs.configure(fs.options_for(load_config(sys.argv[1])))
d = sorted(json.loads(fs.read_text(sys.argv[2]))["dates"]); print(d[0], d[-1])' "$CONF" "$raw_root/manifest.json")
MASTER="$(conf_value spark.master)"; DRIVER_MEMORY="$(conf_value spark.driver_memory)"
# The config's settings the driver JVM reads only at launch (jars, class path, driver host ...): given on
# the command line, because set later, in the session, the Delta and S3A classes would not be on the
# driver's class path (etl/spark.py lists them; it gives them itself when it launches the JVM).
# Read whole first: a failing read stops the script here (set -e), where a process substitution's status
# would be lost and spark-submit would run without them.
settings="$("$PY" -c 'import sys
from etl.config import load_config
from etl.spark import driver_java_options, launch_settings
cfg = load_config(sys.argv[1])
print(driver_java_options(cfg))
for k, v in launch_settings(cfg).items():
    print(f"{k}={v}")' "$CONF")"
JAVA_OPTIONS="$(head -n 1 <<< "$settings")"   # the config's driver JVM options and the log4j config
launch_conf=()
while IFS= read -r kv; do [ -n "$kv" ] && launch_conf+=(--conf "$kv"); done < <(tail -n +2 <<< "$settings")
echo "Spark master: $MASTER (spark.master in $CONF)"

submit() {  # spark-submit a job with the config's master, driver memory and launch settings, and the
  # project's logging config
  "$VENV/bin/spark-submit" --master "$MASTER" --driver-memory "$DRIVER_MEMORY" ${launch_conf[@]+"${launch_conf[@]}"} \
    --driver-java-options "$JAVA_OPTIONS" "$@"
}

echo "== 2/7 build samples $first..$last =="
submit jobs/build_samples.py --conf "$CONF" --date "$first" --end-date "$last"

echo "== 3/7 pre-train the COURIER encoder (registered as courier-encoder, alias @champion) =="
submit jobs/train_courier.py --conf "$CONF" --skip-if-done --alias champion

echo "== 4/7 item embeddings and FAISS clusters =="
submit jobs/embed_items.py --conf "$CONF"
submit jobs/build_clusters.py --conf "$CONF" --skip-if-current

echo "== 5/7 attach cluster-ID features to ctr_train =="
submit jobs/attach_features.py --conf "$CONF" --date "$first" --end-date "$last"
submit jobs/refresh_features.py --conf "$CONF" --date "$last"   # the scheduled daily job; nothing new here

echo "== 6/7 CTR models: no image feature (baseline) and the config's COURIER feature (ctr.feature_mode) =="
ctr_version() {  # the ctr-model version a train_ctr run registered (or found already trained)
  sed -n 's/.*ctr-model v\([0-9][0-9]*\).*/\1/p' "$1" | tail -n1
}
log_dir="$(mktemp -d)"; trap 'rm -rf "$log_dir"' EXIT
"$PY" jobs/train_ctr.py --conf "$CONF" --set ctr.feature_mode=none --skip-if-done | tee "$log_dir/none.log"
"$PY" jobs/train_ctr.py --conf "$CONF" --skip-if-done | tee "$log_dir/cluster.log"   # the config's ctr.feature_mode
baseline="$(ctr_version "$log_dir/none.log")"; challenger="$(ctr_version "$log_dir/cluster.log")"
[ -n "$baseline" ] && [ -n "$challenger" ] || { echo "ERROR: could not read the ctr-model versions from train_ctr's output" >&2; exit 1; }

echo "== 7/7 registry review: ctr-model v$challenger ($(conf_value ctr.feature_mode)) vs @champion =="
review() {  # exit 0 promoted, 1 rejected by a gate, 2 refused (e.g. already champion): all are outcomes
  local rc=0
  "$PY" jobs/review_model.py --conf "$CONF" "$@" || rc=$?
  [ "$rc" -le 2 ] || { echo "ERROR: review_model failed (exit $rc)" >&2; exit "$rc"; }
}
# The champion's version, empty when there is none; any other failure (the tracking server gone) stops
# the script with its message.
champion="$("$PY" -c 'import sys
from etl.config import load_config
from etl.contracts import CHAMPION, CTR_MODEL
from etl.registry import alias_version
from etl.tracking import setup_mlflow
setup_mlflow(load_config(sys.argv[1]))
champion = alias_version(CTR_MODEL, CHAMPION)
print("" if champion is None else champion.version)' "$CONF")"
if [ -z "$champion" ]; then  # a fresh registry: the baseline becomes the first champion, explicitly
  review --version "$baseline" --allow-first --no-tsne
fi
review --version "$challenger"

tables_root="$(conf_value tables_root)"
uri="$(conf_value mlflow_tracking_uri)"
case "$uri" in
  http://*|https://*) ui="$uri (the tracking server's own UI)" ;;
  *) ui="$VENV/bin/mlflow ui --backend-store-uri $uri --host 127.0.0.1 --port 5000" ;;
esac
cat <<MSG

Done. Tables (Delta): $tables_root
MLflow UI:  $ui
            (experiment "courier": runs of every stage; Models: courier-encoder, courier-clusters, ctr-model;
             the review report is the review/review.html artifact of the latest review run)
MSG
