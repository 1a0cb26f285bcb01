"""The Spark session: the one place that knows how Spark is started and configured."""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import sys

from etl.config import ANSI_MODE, SESSION_TIME_ZONE, Config

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def check_java() -> None:
    """Fail early and clearly when no Java runtime is available (Spark needs Java 8/11/17)."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.path.exists(java):
        raise RuntimeError(
            "Java was not found: Spark needs a Java 17 runtime. Install one (e.g. `apt-get install "
            "openjdk-17-jre-headless`) or set JAVA_HOME."
        )


def delta_jars_present(spark_conf: dict | None = None) -> bool:
    """True when the Delta Lake jars are on Spark's class path (pyspark's jars or spark.jars*)."""
    import pyspark

    jar_dirs = [os.path.join(os.path.dirname(pyspark.__file__), "jars")]
    if os.environ.get("SPARK_HOME"):
        jar_dirs.append(os.path.join(os.environ["SPARK_HOME"], "jars"))
    if any(glob.glob(os.path.join(d, "delta-spark_*.jar")) for d in jar_dirs):
        return True
    conf = spark_conf or {}
    return any("delta" in str(conf.get(k, "")) for k in ("spark.jars", "spark.jars.packages"))


def uses_native_delta(cfg: Config) -> bool:
    if cfg.tables.engine == "spark-delta":
        return True
    return cfg.tables.engine == "auto" and delta_jars_present(cfg.spark.conf)


# Settings the driver JVM reads only at launch: given later (on the builder) they are silently ignored.
# The jars must be on the driver's class path from the start (the s3a file system and the Delta
# extension are looked up by class name when the session starts).
LAUNCH_ONLY = ("spark.driver.memory", "spark.driver.extraJavaOptions", "spark.driver.extraClassPath",
               "spark.jars", "spark.jars.packages", "spark.jars.repositories", "spark.jars.ivy",
               "spark.driver.host", "spark.driver.bindAddress")
_JVM_FLAGS = ("spark.driver.memory", "spark.driver.extraJavaOptions")  # spark-submit has flags of its own


def launch_settings(cfg: Config, with_jvm_flags: bool = False) -> dict[str, str]:
    """The config's spark.conf entries that must be given when the driver JVM is launched; without
    `with_jvm_flags`, not the heap and JVM options (what spark-submit's --conf needs)."""
    return {k: str(v) for k, v in cfg.spark.conf.items()
            if k in LAUNCH_ONLY and (with_jvm_flags or k not in _JVM_FLAGS)}


# The generated-code cache's size (a static SQL setting: given when the session starts).
CODEGEN_CACHE_ENTRIES = "spark.sql.codegen.cache.maxEntries"

_LOG4J = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "log4j2.properties")


def log4j_option(path: str) -> str:
    """The driver JVM option naming a log4j2 config file. Spark's launcher splits Java options on
    whitespace outside quotes: the path quoted, a checkout folder with a space in its name stays one
    argument."""
    return f"-Dlog4j.configurationFile='file:{path}'"


LOG4J_OPTION = log4j_option(_LOG4J)


def driver_java_options(cfg: Config) -> str:
    """The driver JVM's options at launch: the config's spark.driver.extraJavaOptions (a trust store, a
    proxy...) and the project's log4j2 config, unless those name one. One value: spark-submit's
    --driver-java-options replaces the configured options rather than adding to them."""
    own = str(cfg.spark.conf.get("spark.driver.extraJavaOptions", "")).strip()
    if "-Dlog4j.configurationFile" in own or not os.path.exists(_LOG4J):
        return own
    return f"{own} {LOG4J_OPTION}".strip()


def check_endpoints(cfg: Config) -> None:
    """Fail within seconds, naming the endpoint, when the configured S3A endpoint does not answer
    (S3A would retry its calls for minutes)."""
    from etl import fs
    from etl.services import check_tcp

    endpoint = cfg.spark.conf.get("spark.hadoop.fs.s3a.endpoint")
    if endpoint:
        # host-only (S3A's documented form, e.g. s3.eu-west-2.amazonaws.com): HTTPS's port, or HTTP's when
        # connection.ssl.enabled is false, as S3A itself connects
        options = fs.options_for(cfg)
        check_tcp("S3 endpoint (spark.hadoop.fs.s3a.endpoint)", f"{options.endpoint_scheme}://{options.endpoint_host}")


def on_this_machine(master: str) -> bool:
    """Whether the master runs on this machine only: local[...], or a standalone master (each one of an HA
    list) on a loopback address (the cluster-in-a-box). Its driver then keeps its ports on 127.0.0.1 too:
    nothing off this machine has to reach them."""
    if master.startswith("local"):
        return True
    if not master.startswith("spark://"):
        return False
    hosts = [hp.rsplit(":", 1)[0].strip("[]") for hp in master[len("spark://"):].split(",")]
    return all(h == "localhost" or h == "::1" or h.startswith("127.") for h in hosts)


def get_spark(cfg: Config, app_name: str | None = None):
    """Start (or join, under spark-submit) the session with the project's settings."""
    check_java()
    check_endpoints(cfg)
    # Executors must run this very interpreter (the project's virtualenv), not whatever is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark import SparkConf as JSparkConf, SparkContext
    from pyspark.sql import SparkSession

    from etl.services import check_spark_master

    launch = {}
    launches_jvm = SparkContext._gateway is None and "PYSPARK_GATEWAY_PORT" not in os.environ
    if launches_jvm:
        # This process starts the JVM (plain `python`, not spark-submit): the heap size and JVM options
        # are only read at launch, so they must be given now. Set on the builder afterwards they were
        # silently ignored and the driver ran with Spark's default 1g heap whatever driver_memory said.
        # The master too: the launcher otherwise records its own default (local[*]) as if submitted.
        launch["spark.master"] = cfg.spark.master
        if on_this_machine(cfg.spark.master):
            # The JVM reads it from its environment at launch only: the Spark UI (and any port not named
            # by spark.driver.bindAddress) binds to it, else to every interface.
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # A dead standalone master: Spark would retry registering for minutes before giving up.
        check_spark_master(cfg.spark.master)
        launch["spark.driver.memory"] = cfg.spark.driver_memory
        launch.update(launch_settings(cfg, with_jvm_flags=True))
        java_options = driver_java_options(cfg)
        if java_options:
            launch["spark.driver.extraJavaOptions"] = java_options
    # Joins spark-submit's JVM (whose conf carries its master), or starts one with the launch settings.
    SparkContext._ensure_initialized(conf=JSparkConf(loadDefaults=False).setAll(launch.items()) if launch else None)
    submitted = JSparkConf()
    builder = SparkSession.builder.appName(app_name or cfg.spark.app_name)
    submitted_master = None if launches_jvm else submitted.get("spark.master", None)
    master = submitted_master or cfg.spark.master
    if not submitted_master:
        builder = builder.master(master)
    elif submitted_master != cfg.spark.master:
        # spark-submit records local[*] when it is given no --master: a config's cluster would be ignored
        # without a word (and so would its driver_memory and launch jars, read by the launcher only).
        log.warning("running on spark-submit's master %s, not the config's spark.master %s (spark-submit takes "
                    "local[*] without --master; a job started with plain python launches with the config's)",
                    submitted_master, cfg.spark.master)
    if on_this_machine(master) and not launches_jvm and "SPARK_LOCAL_IP" not in os.environ \
            and "spark.ui.enabled" not in cfg.spark.conf:
        # spark-submit started the JVM without it: the UI, started with the session below, would
        # listen on every interface (it reads only the JVM's environment). No UI unless asked for.
        log.warning("the Spark UI is off for this spark-submit: export SPARK_LOCAL_IP=127.0.0.1 before "
                    "spark-submit to have it on this machine only (or set spark.conf spark.ui.enabled)")
        builder = builder.config("spark.ui.enabled", "false")
    if master.startswith("local"):
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    settings = {
        "spark.pyspark.python": sys.executable,
        "spark.driver.memory": cfg.spark.driver_memory,
        SESSION_TIME_ZONE: "UTC",
        ANSI_MODE: "false",  # also over a cluster's spark-defaults.conf (config.ANSI_MODE says why)
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        # delta-rs and Petastorm read microsecond timestamps; Spark's default INT96 they do not.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # dt=2026-11-20 stays a string (the table contract), not an inferred date.
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
        # The plans of the job's cached frames nest each other's full lineage (courier_train's is ~10.7M
        # characters), and AQE re-renders the plan text at every re-optimisation: unbounded, that alone
        # ran the driver out of heap at 0.05x the bench preset. Truncates only the text (UI, logs).
        "spark.sql.maxPlanStringLength": "100000",
        # Generated classes are cached by their code, 100 by default; one stage-1 date generates ~130
        # distinct ones, so each date evicted the last's before reuse and recompiled all (~185), then ran
        # the new classes cold until the JIT caught up: 25-27 s against 17-19 s per date at 0.25x the
        # bench preset after the first. Read once, when the session starts.
        CODEGEN_CACHE_ENTRIES: "1000",
    }
    if os.path.exists(_LOG4J) and "spark.driver.extraJavaOptions" not in cfg.spark.conf:
        # Only takes effect when this process starts the JVM; spark-submit passes its own options.
        settings["spark.driver.extraJavaOptions"] = LOG4J_OPTION
    if uses_native_delta(cfg):
        settings["spark.sql.extensions"] = DELTA_EXTENSION
        settings["spark.sql.catalog.spark_catalog"] = DELTA_CATALOG
        # Delta rebuilds a table's state from its log in this many tasks (default 50, sized for long
        # logs); our logs are a few commits per date, where 50 tasks per snapshot cost seconds each.
        settings["spark.databricks.delta.snapshotPartitions"] = str(cfg.spark.shuffle_partitions)
    settings.update({k: str(v) for k, v in cfg.spark.conf.items()})
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("spark %s master=%s", spark.version, spark.sparkContext.master)
    return spark


def codegen_compilations(spark) -> int:
    """Classes this JVM has compiled from generated code so far: each is a miss of the code cache."""
    return int(spark._jvm.org.apache.spark.metrics.source.CodegenMetrics.METRIC_COMPILATION_TIME().getCount())


def glob_escape(path: str) -> str:
    """Spark treats [, ], {, }, *, ? in a load path as a glob; a literal file name must be escaped."""
    out = []
    for ch in path:
        out.append("\\" + ch if ch in "[]{}*?\\" else ch)
    return "".join(out)


def hadoop_path(spark, path: str):
    """(Hadoop Path, its FileSystem) for a path on any file system Spark can read."""
    jvm = spark.sparkContext._jvm
    jpath = jvm.org.apache.hadoop.fs.Path(path)
    return jpath, jpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def path_exists(spark, path: str) -> bool:
    """Whether a file or folder exists, on any file system Spark can read (local, HDFS, S3...)."""
    jpath, fs = hadoop_path(spark, path)
    return bool(fs.exists(jpath))


def list_dir(spark, path: str) -> list[str]:
    """Names of the entries of a folder (empty when it does not exist), on any Spark file system."""
    jpath, fs = hadoop_path(spark, path)
    if not fs.exists(jpath):
        return []
    return sorted(str(s.getPath().getName()) for s in fs.listStatus(jpath))


# Spark packs files into read tasks as if opening one cost this many bytes (default 4 MB): right for
# log and Parquet files, but 20,000 images of a few KB each then make ~600 tasks of 32 files.
OPEN_COST_CONF = "spark.sql.files.openCostInBytes"


@contextlib.contextmanager
def session_conf(spark, key: str, value: str):
    """Within the block the session's `key` is `value`; its setting (or its absence) is restored after."""
    before = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


def file_open_cost(spark, nbytes: int):
    """Within the block, Spark plans file reads with an open cost of `nbytes` per file (at least 1):
    many small files then pack into about one read task per core. Actions inside the block plan
    with it; the session's setting is restored after."""
    return session_conf(spark, OPEN_COST_CONF, str(max(1, int(nbytes))))


def static_partitioning(spark):
    """Within the block, queries run without adaptive execution, so a frame materialized there
    (`localCheckpoint`) records the partitioning of its last shuffle: with adaptive execution on it
    records none (Spark 3.5), and a later step that needs the same partitioning shuffles the rows
    again. The shuffles inside use spark.sql.shuffle.partitions as configured (no coalescing)."""
    return session_conf(spark, "spark.sql.adaptive.enabled", "false")
