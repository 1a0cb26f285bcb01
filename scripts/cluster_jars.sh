#!/usr/bin/env bash
# The JVM jars the cluster-in-a-box (and any Spark that writes native Delta on S3) needs, resolved from
# Maven Central once into a cached folder; prints the comma-separated jar list for `spark.jars`.
#   delta-spark 3.3.x        native Delta for Spark 3.5 (its 3.3 line targets Spark 3.5)
#   hadoop-aws 3.3.4         the s3a:// file system; must match the Hadoop 3.3.4 inside pyspark 3.5
#                            (it brings the aws-java-sdk-bundle 1.12.262 it was built against)
# Resolution is transitive (`mvn dependency:copy-dependencies`, runtime scope; Scala and Spark's own provided
# jars are not copied). Idempotent: a complete folder (stamp file) is reused without touching the network.
set -euo pipefail
DELTA_VERSION="${COURIER_DELTA_VERSION:-3.3.2}"
HADOOP_AWS_VERSION="${COURIER_HADOOP_AWS_VERSION:-3.3.4}"
CACHE="${COURIER_JARS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/courier/jars}"
DEST="$CACHE/delta-${DELTA_VERSION}_hadoop-aws-${HADOOP_AWS_VERSION}"
stamp="$DEST/.complete"

list_jars() { find "$DEST" -maxdepth 1 -name '*.jar' | sort | paste -sd, -; }

if [ -f "$stamp" ]; then list_jars; exit 0; fi
command -v mvn >/dev/null || { echo "ERROR: mvn not found: install Maven (apt-get install -y maven) to resolve the Delta/S3 jars" >&2; exit 2; }
mkdir -p "$CACHE"
exec 8>"$CACHE/.lock"   # one resolution at a time (two clusters started together share the cache)
flock 8
if [ -f "$stamp" ]; then list_jars; exit 0; fi
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>courier</groupId><artifactId>courier-cluster-jars</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>io.delta</groupId><artifactId>delta-spark_2.12</artifactId><version>${DELTA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.hadoop</groupId><artifactId>hadoop-aws</artifactId><version>${HADOOP_AWS_VERSION}</version></dependency>
  </dependencies>
</project>
POM
t0=$(date +%s)
echo "[jars] resolving delta-spark ${DELTA_VERSION}, hadoop-aws ${HADOOP_AWS_VERSION} from Maven Central into $DEST ..." >&2
rm -rf "$DEST.tmp"
mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DexcludeGroupIds=org.scala-lang -DoutputDirectory="$DEST.tmp" >&2
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
touch "$stamp"
echo "[jars] resolved in $(( $(date +%s) - t0 )) s" >&2
list_jars
