"""Table I/O: the one module that knows how Delta tables are written and read.

Two engines behind one API (`TableStore`):
- ``delta-rs`` (embedded default, no jars): Spark writes a partition's Parquet files into a fresh folder
  ``<table>/<k>=<v>/.../<run>/``; the driver lists them as Delta ``AddAction``s (footer row counts only,
  no data) and commits them with deltalake in ONE transaction that replaces exactly that partition.
  Readers see the old or the new partition, never a mix; files of a failed run are never referenced
  (``vacuum`` removes them). Reads take a version's file list from the Delta log and scan it with Spark.
- ``spark-delta`` (clusters with the Delta jars): ``format("delta")`` with ``replaceWhere``.
Nothing outside this module knows which engine is in use.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Collection, Mapping

from etl import catalog, fs
from etl.config import Config, is_uri, under_root
from etl.spark import glob_escape, hadoop_path, uses_native_delta

log = logging.getLogger(__name__)

_TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class TableError(RuntimeError):
    pass


class CommitConflict(TableError):
    """A commit kept conflicting with concurrent writers' commits (after COMMIT_ATTEMPTS tries)."""


COMMIT_ATTEMPTS = 4  # tries of one commit that loses races to concurrent writers (see _retry_conflicts)
# Delta's commit-conflict exceptions: delta-rs raises CommitFailedError (or a "table already exists" on a
# racing create); delta-spark's come through py4j named by their Java class.
_CONFLICT_MARKERS = ("ConcurrentAppendException", "ConcurrentDeleteReadException",
                     "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
                     "ConcurrentWriteException", "MetadataChangedException", "ProtocolChangedException",
                     "DeltaConcurrentModificationException")


def _is_commit_conflict(e: BaseException) -> bool:
    from deltalake.exceptions import CommitFailedError, DeltaError

    if isinstance(e, CommitFailedError):
        return True
    if isinstance(e, DeltaError) and "already exists" in str(e):
        return True
    text = f"{type(e).__name__} {e}"
    return any(m in text for m in _CONFLICT_MARKERS)


@dataclass(frozen=True)
class TableFile:
    uri: str
    partition_values: dict
    num_records: int | None
    size_bytes: int
    modified_ms: int | None = None  # the file's modification time (Delta's add action), ms since the epoch


def _local_path(uri: str) -> str:
    """A local file's path from its ``file:`` URI (percent-decoded: delta-rs quotes file URIs), or the path."""
    if not uri.startswith("file:"):
        return uri
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(uri).path)


def _on_local_disk(uri: str) -> str | None:
    """The local path of a plain path or ``file:`` URI; None for any other scheme (an object store)."""
    return None if is_uri(uri) and not uri.startswith("file:") else _local_path(uri)


def _rewrite_keeping_time(path: str, text: str, options) -> None:
    """Replace a log file whole, keeping its modification time where the storage lets us: Spark's Delta
    takes a commit's time from it (history, timestampAsOf). An object store sets its own."""
    local = _on_local_disk(path)
    times = os.stat(local) if local else None
    fs.write_text(path, text, options)
    if times:
        os.utime(local, ns=(times.st_atime_ns, times.st_mtime_ns))


def _partition_dir(values: Mapping[str, str]) -> str:
    for k, v in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", str(v)):
            raise TableError(f"partition value {k}={v!r} has characters not allowed in a path")
    return "/".join(f"{k}={v}" for k, v in values.items())


def _replace_where(partition: Mapping[str, str]) -> str:
    """Native Delta's replaceWhere predicate for one partition. The values are checked as path parts
    first: a quote in one would change the predicate (and with it the rows a replace deletes)."""
    _partition_dir(partition)
    return " AND ".join(f"{c} = '{v}'" for c, v in partition.items())


def _partition_value(f, column: str) -> str | None:
    """A data file's partition value as a string, None where it is null (no filter value matches it)."""
    value = f.partition_values.get(column)
    return None if value is None else str(value)


def _values(column: str, values) -> Collection:
    """A partition filter's values; a bare string would be read as its characters."""
    if isinstance(values, str):
        raise TableError(f"partitions[{column!r}]: a collection of values, not the string {values!r}")
    return values


def _versions_within(history: list[dict], retention_hours: float) -> list[int]:
    """The versions a reader may still time-travel to: each committed within the retention, and the one
    that was current when the retention began. history: delta-rs DeltaTable.history() entries."""
    cutoff_ms = (time.time() - retention_hours * 3600) * 1000
    # (a commit without a time, which this project never writes, is kept)
    within = [h["version"] for h in history if h.get("timestamp", cutoff_ms) >= cutoff_ms]
    before = [h["version"] for h in history if h.get("timestamp", cutoff_ms) < cutoff_ms]
    return sorted(within + ([max(before)] if before else []))


COMMIT_TOKEN = "commit"  # userMetadata key: a token unique to one write, so the write finds its own version
COMMIT_SEARCH = (5, 100, None)  # how many commits are read back, in turn, looking for it (None: the whole log)


def _commit_meta(meta: Mapping[str, str]) -> dict[str, str]:
    """A write's commit metadata (job, run_id, partition, ...) with a token no other write carries."""
    if COMMIT_TOKEN in meta:
        raise TableError(f"{COMMIT_TOKEN!r} is the store's own commit metadata key")
    return {**meta, COMMIT_TOKEN: uuid.uuid4().hex}


# The keys a delta-rs commit of an earlier release held loose at the top of its commitInfo (userMetadata now).
_LOOSE_KEYS = ("job", "run_id", "partition")


def commit_metadata(entry: dict) -> dict:
    """What this store's writer put in a commit (job, run_id, partition as JSON, any extra metadata;
    empty values left out), from a ``history()`` entry: the JSON string ``userMetadata``, on either
    engine. A delta-rs commit of an earlier release kept the keys loose at the top level instead."""
    if "userMetadata" not in entry:
        return {k: entry[k] for k in _LOOSE_KEYS if isinstance(entry.get(k), str) and entry[k]}
    try:
        meta = json.loads(entry["userMetadata"] or "{}")
    except ValueError:  # a commit another writer made
        return {}
    return {k: v for k, v in meta.items() if v} if isinstance(meta, dict) else {}


def _upgraded_commit(text: str) -> str | None:
    """A Delta commit file's text with the loose writer keys of its commitInfo moved into userMetadata
    (what this store writes now: Spark's Delta reads commitInfo.job as a struct and fails on a string
    there); None when the commit holds none. Every other line stays as it was, byte for byte."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        info = json.loads(line).get("commitInfo") if line.strip() else None
        if not isinstance(info, dict):
            continue
        loose = {k: info[k] for k in _LOOSE_KEYS if isinstance(info.get(k), str)}
        if not loose or "userMetadata" in info:
            return None
        info = {k: v for k, v in info.items() if k not in loose}
        info["userMetadata"] = json.dumps({k: v for k, v in loose.items() if v})
        lines[i] = json.dumps({"commitInfo": info}, separators=(",", ":"))
        return "\n".join(lines)
    return None


class TableStore:
    """Delta tables under ``cfg.tables_root``: one folder per table name."""

    def __init__(self, spark, cfg: Config):
        self.spark = spark
        self.root = cfg.tables_root
        self.native = uses_native_delta(cfg)
        # delta-rs's settings for an object store (the config's S3A endpoint and keys); None: local
        self._fs_options = fs.options_for(cfg)
        self._storage = fs.delta_storage_options(self._fs_options) if fs.is_object_store(self.root) else None
        if not is_uri(self.root):
            os.makedirs(self.root, exist_ok=True)

    def _is_delta(self, path: str) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(path, storage_options=self._storage)

    def _open(self, path: str, version: int | None = None):
        from deltalake import DeltaTable

        return DeltaTable(path, version=version, storage_options=self._storage)

    # ---- locations and metadata -----------------------------------------------------------------
    def path(self, name: str) -> str:
        if not _TABLE_NAME.match(name):
            raise TableError(f"bad table name {name!r}: use lower_snake_case")
        return under_root(self.root, name)

    def _pin(self, name: str) -> tuple[bool, int | None]:
        """(pinned, version): stage-1 tables are read at the version of the latest publish manifest
        (etl.publish); pinned with version None = not published yet. Other tables: (False, None)."""
        from etl.publish import PublishLog

        if name not in catalog.STAGE1:
            return False, None
        pins = PublishLog(self.root, self.spark).pins()
        return (False, None) if pins is None else (True, pins.get(name))

    def _delta(self, name: str, version: int | None = None):
        path = self.path(name)
        if version is None:
            pinned, version = self._pin(name)
            if pinned and version is None:
                raise TableError(f"table {name!r} has no published version yet; run the job that writes it first")
        else:
            self._check_published(name, int(version))
        if not self._is_delta(path):
            raise TableError(f"table {name!r} does not exist at {path}; run the job that writes it first")
        return self._open(path, version)

    def _check_published(self, name: str, version: int) -> None:
        """A stage-1 version asked for by number must be one readers were given: a version committed by a
        build that died before publishing (undone by the next one) holds a date half built."""
        pinned, current = self._pin(name)
        if not pinned or version == current:
            return
        from etl.publish import PublishLog

        if not PublishLog(self.root, self.spark).ever_published(name, version):
            raise TableError(f"version {version} of {name!r} was never published (a build that stopped before "
                             f"publishing committed it; it holds a date half built): the published version "
                             f"now is {current}")

    def exists(self, name: str) -> bool:
        pinned, version = self._pin(name)
        return self._is_delta(self.path(name)) and (not pinned or version is not None)

    def version(self, name: str) -> int | None:
        return self._delta(name).version() if self.exists(name) else None

    @contextlib.contextmanager
    def _published_alone(self, name: str, what: str):
        """A direct change of a stage-1 table under a publish log (a partition replace, an overwrite, a
        vacuum, which commits too), made while holding the publish lock: no build commits or recovers
        between, and the version the change ends at is published alone (a manifest moving only this
        table's pin), so readers see it and publish recovery does not take it for an orphan. Versions a
        dead build committed and never published are undone first, as the next build would do: the change
        would otherwise publish them. Any other table, or none published yet: the change as it is."""
        from etl.publish import PublishLog, recover

        plog = PublishLog(self.root, self.spark) if name in catalog.STAGE1 else None
        if plog is None or plog.latest() is None:
            yield
            return
        with plog.lock(f"{what} of {name}"):
            recover(self, plog)
            m = plog.latest()
            # after a recovery a restored table's newest version holds its published content: pinned too
            before = {t: v if (latest := self.latest_version(t)) is None else latest for t, v in m["tables"].items()}
            yield
            after = {**before, name: self.latest_version(name)}
            if after != m["tables"]:
                plog.append({"dt": None, "run_id": "", "status": f"{what} of {name}", "tables": after,
                             "dates": m["dates"]})

    def _version_of(self, name: str, meta: Mapping[str, str]) -> int:
        """The version this write's own commit became (found by its commit token): the newest version may
        already be a concurrent writer's, and a lineage tag must name the version that holds these rows."""
        table, token = self._open(self.path(name)), meta[COMMIT_TOKEN]
        for limit in COMMIT_SEARCH:  # the last few commits first: others rarely race past
            for entry in table.history(limit=limit):
                if commit_metadata(entry).get(COMMIT_TOKEN) == token:
                    return int(entry["version"])
        raise TableError(f"table {name!r}: this write's commit (token {token}) is not in the table's log")

    def latest_version(self, name: str) -> int | None:
        """The newest committed version, published or not (writers and publish recovery only)."""
        path = self.path(name)
        return self._open(path).version() if self._is_delta(path) else None

    def columns(self, name: str) -> list[str]:
        """The table's column names (its Delta schema, partition columns included)."""
        return [f.name for f in self._delta(name).schema().fields]

    def history(self, name: str) -> list[dict]:
        """delta-rs history() entries, one per commit (``commit_metadata`` reads what this store wrote)."""
        return self._delta(name).history()

    def files(self, name: str, version: int | None = None) -> list[TableFile]:
        """The data files of a table version with their partition values (for Petastorm readers)."""
        return self._files_of(name, self._delta(name, version))

    def _files_of(self, name: str, dt) -> list[TableFile]:
        import pyarrow as pa

        actions = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
        uris = dt.file_uris()
        base = self.path(name).rstrip("/")
        by_rel = {u[len(base) + 1:] if u.startswith(base) else u: u for u in uris}
        parts = [c for c in actions if c.startswith("partition.")]
        out = []
        for i, rel in enumerate(actions["path"]):
            uri = by_rel.get(rel) or by_rel.get(_unquote(rel)) or f"{base}/{rel}"
            out.append(TableFile(
                uri=uri,
                partition_values={p[len("partition."):]: actions[p][i] for p in parts},
                num_records=actions["num_records"][i],
                size_bytes=actions["size_bytes"][i],
                modified_ms=actions["modification_time"][i],
            ))
        return out

    def upgrade_commit_info(self, dry_run: bool = False) -> dict[str, list[int]]:
        """Rewrite the commits of every table under the root whose commitInfo holds this store's keys
        loose (delta-rs commits of an earlier release), so that Spark's Delta reads their logs: every
        version, time travel and history included. Only commitInfo changes (it says who committed; no
        reader takes data from it), each file replaced whole. {table: versions rewritten} (listed only
        with dry_run); a second run finds nothing to do."""
        out = {}
        opts = self._fs_options
        for name in (n for n in fs.list_names(self.root, opts) if _TABLE_NAME.match(n)):
            log_dir = f"{self.path(name).rstrip('/')}/_delta_log"
            for commit in (n for n in fs.list_names(log_dir, opts) if re.fullmatch(r"\d{20}\.json", n)):
                upgraded = _upgraded_commit(fs.read_text(f"{log_dir}/{commit}", opts))
                if upgraded is None:
                    continue
                if not dry_run:
                    _rewrite_keeping_time(f"{log_dir}/{commit}", upgraded, opts)
                out.setdefault(name, []).append(int(commit[:20]))
        return out

    # ---- reads ----------------------------------------------------------------------------------
    def read(self, name: str, version: int | None = None, partitions: Mapping[str, Collection[str]] | None = None):
        """A Spark DataFrame of the table (latest or a pinned version), partition columns included;
        with `partitions` ({column: values}), only the partitions whose values are among those."""
        from pyspark.sql import functions as F
        from pyspark.sql.types import StructType

        partitions = {c: {str(v) for v in _values(c, vs)} for c, vs in (partitions or {}).items()}
        if self.native:
            reader = self.spark.read.format("delta")
            if version is None:  # a stage-1 table at its published version (an error when there is none)
                version = self._delta(name).version()
            else:
                self._check_published(name, int(version))
            reader = reader.option("versionAsOf", version)
            df = reader.load(self.path(name))
            for col, values in partitions.items():
                df = df.where(F.col(col).cast("string").isin(*sorted(values)))
            return df

        dt = self._delta(name, version)
        version = dt.version()  # one snapshot for the schema and the file list (pins can move)
        schema = StructType.fromJson(json.loads(dt.schema().to_json()))
        partition_cols = dt.metadata().partition_columns
        # Files outside `partitions` are left out of the plan (not filtered in it): the plan, and the
        # code Spark generates for it, stay the same when other partitions come and go.
        unknown = sorted(set(partitions) - set(partition_cols))
        if unknown:
            raise TableError(f"table {name!r}: {unknown} not among its partition columns {partition_cols}")
        files = [f for f in self._files_of(name, dt)
                 if all(_partition_value(f, c) in v for c, v in partitions.items())]
        data_schema = StructType([f for f in schema.fields if f.name not in partition_cols])
        if not files:
            # The schema a read of files has (data columns nullable as a Parquet scan makes them, partition
            # columns tagged as below), or a writer's schema check would take an empty date for another one.
            empty = self.spark.createDataFrame([], _as_nullable(data_schema))
            for col in partition_cols:
                empty = empty.withColumn(col, F.lit("").cast(schema[col].dataType))
            return empty.select(*schema.fieldNames())
        frames: dict[tuple, list[str]] = {}
        for f in files:
            frames.setdefault(tuple(f.partition_values.get(c) for c in partition_cols), []).append(f.uri)
        # One scan per partition value set, each tagged with its values (partition columns are not
        # stored in Delta data files); unioned by name into the table's column order.
        out = None
        for values, uris in sorted(frames.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
            df = self.spark.read.schema(data_schema).parquet(*map(glob_escape, uris))
            for col, value in zip(partition_cols, values):
                df = df.withColumn(col, F.lit(value).cast(schema[col].dataType))
            out = df if out is None else out.unionByName(df)
        return out.select(*schema.fieldNames())

    # ---- writes ---------------------------------------------------------------------------------
    @staticmethod
    def check_contract(df, name: str) -> None:
        """A frame written to a catalogued table must have exactly its contract's columns (etl.catalog)."""
        entry = catalog.table(name)
        problems = entry.problems(df.columns) if entry is not None else []
        if problems:
            raise TableError(f"frame written to {name!r} breaks its contract (etl.catalog): {'; '.join(problems)}; "
                             f"expected {list(entry.columns)} + partitions {list(entry.partition_by)}")

    def replace_partition(self, df, name: str, partition: Mapping[str, str], job: str = "",
                          run_id: str = "") -> int:
        """Replace exactly one partition (e.g. {"dt": "2026-11-20"}) with df's rows, in one commit.

        df must not carry the partition columns' values other than `partition` (they are set here).
        Returns the new table version.
        """
        self.check_contract(df, name)
        partition = {k: str(v) for k, v in partition.items()}
        cols = list(partition)
        data = df.drop(*[c for c in cols if c in df.columns])
        meta = _commit_meta({"job": job, "run_id": run_id, "partition": json.dumps(partition)})
        with self._published_alone(name, "partition replace"):
            if self.native:
                from pyspark.sql import functions as F

                for c, v in partition.items():
                    data = data.withColumn(c, F.lit(v))
                where = _replace_where(partition)
                self._retry_conflicts(name, lambda: (
                    _writer(data, name).format("delta").mode("overwrite").option("replaceWhere", where)
                    .option("userMetadata", json.dumps(meta)).partitionBy(*cols).save(self.path(name))))
            else:
                rel_dir = f"{_partition_dir(partition)}/run-{uuid.uuid4().hex[:12]}"
                with self._removed_unless_committed(name, rel_dir):
                    adds = self._write_files(data, name, rel_dir, partition)
                    schema = self._arrow_schema(data, partition_cols=cols)
                    self._commit(name, adds, schema, cols, [(c, "=", v) for c, v in partition.items()], meta)
        # (after the lock: a look-up that fails must not keep a landed commit from being published)
        return self._version_of(name, meta)

    def replace_partitions(self, df, name: str, by: str, values, fixed: Mapping[str, str] | None = None,
                           job: str = "", run_id: str = "", extra_metadata: Mapping[str, str] | None = None) -> int:
        """Replace the partitions ``fixed + {by: v}`` for every v in ``values`` with df's rows, in ONE
        commit (several dates of a table seen whole or not at all). df carries the column ``by``; a row
        whose value is not in ``values`` is an error. A value with no rows empties that partition.
        The table is partitioned by ``[*fixed, by]``. ``extra_metadata`` joins the commit's metadata
        (``commit_metadata`` reads it back). Returns the new version (the current one when ``values`` is
        empty: nothing to write)."""
        from pyspark.sql import functions as F

        self.check_contract(df, name)
        fixed = {k: str(v) for k, v in (fixed or {}).items()}
        values = sorted({str(v) for v in values})
        if not values:
            return self.version(name)
        for v in values:
            _partition_dir({**fixed, by: v})
        cols = [*fixed, by]
        data = df.withColumn(by, F.col(by).cast("string")).drop(*[c for c in fixed if c in df.columns])
        meta = _commit_meta({**(extra_metadata or {}), "job": job, "run_id": run_id,
                             "partition": json.dumps({**fixed, by: values})})
        with self._published_alone(name, "partition replace"):
            if self.native:
                for c, v in fixed.items():
                    data = data.withColumn(c, F.lit(v))
                where = " AND ".join(([_replace_where(fixed)] if fixed else []) +  # values checked above
                                     [f"{by} IN ({', '.join(repr(v) for v in values)})"])
                self._retry_conflicts(name, lambda: (
                    _writer(data.select(*[c for c in data.columns if c not in cols], *cols), name).format("delta")
                    .mode("overwrite").option("replaceWhere", where).option("userMetadata", json.dumps(meta))
                    .partitionBy(*cols).save(self.path(name))))
            else:
                run_dir = f"{_partition_dir(fixed) + '/' if fixed else ''}run-{uuid.uuid4().hex[:12]}"
                with self._removed_unless_committed(name, run_dir):
                    adds = self._write_files(data, name, run_dir, fixed, by=by)
                    stray = sorted({a.partition_values[by] for a in adds} - set(values))
                    if stray:  # checked on the written files (no second pass over df); nothing is committed
                        raise TableError(f"table {name!r}: rows with {by} in {stray}, outside the partitions "
                                         f"{values} being replaced")
                    schema = self._arrow_schema(data.drop(by), partition_cols=cols)
                    filters = [(c, "=", v) for c, v in fixed.items()] + [(by, "in", values)]
                    self._commit(name, adds, schema, cols, filters, meta)
        return self._version_of(name, meta)

    def overwrite(self, df, name: str, job: str = "", run_id: str = "") -> int:
        """Replace a whole (unpartitioned) table in one commit. Returns the new version."""
        self.check_contract(df, name)
        meta = _commit_meta({"job": job, "run_id": run_id})
        with self._published_alone(name, "overwrite"):
            if self.native:
                self._retry_conflicts(name, lambda: (
                    _writer(df, name).format("delta").mode("overwrite").option("overwriteSchema", "true")
                    .option("userMetadata", json.dumps(meta)).save(self.path(name))))
            else:
                run_dir = f"run-{uuid.uuid4().hex[:12]}"
                with self._removed_unless_committed(name, run_dir):
                    adds = self._write_files(df, name, run_dir, {})
                    self._commit(name, adds, self._arrow_schema(df, []), [], None, meta)
        return self._version_of(name, meta)

    @contextlib.contextmanager
    def _removed_unless_committed(self, name: str, rel_dir: str):
        """A direct write's own run folder (delta-rs engine), removed when the write fails and no commit
        came meanwhile (a schema refused, rows outside the partitions, conflicts to the last try), so
        a failure that a scheduler retries daily does not leave a copy of the data each time. When the
        table moved on (this write's commit landed before a later step failed, or another writer's),
        its files may be referenced: they stay, for vacuum."""
        before = self.latest_version(name)
        try:
            yield
        except BaseException:
            local = _on_local_disk(self.path(name))  # (delta-rs writes no other)
            if local and self.latest_version(name) == before:
                import shutil

                shutil.rmtree(os.path.join(local, rel_dir), ignore_errors=True)
            raise

    # ---- staged writes: files first, commit later (stage 1 verifies between the two) -------------
    def stage_partition(self, df, name: str, partition: Mapping[str, str]) -> "Staged":
        """Write df's rows for one partition as files no version refers to yet; commit_staged()
        publishes them as one partition replace, discard_staged() removes them."""
        self.check_contract(df, name)
        partition = {k: str(v) for k, v in partition.items()}
        data = df.drop(*[c for c in partition if c in df.columns])
        run = f"run-{uuid.uuid4().hex[:12]}"
        if self.native:
            folder = f"{self.path(name).rstrip('/')}/_staging/{run}"
            _writer(data, name).mode("errorifexists").parquet(folder)
            staged_df = self.spark.read.parquet(glob_escape(folder))
            # Spark answers count() from the Parquet footers: no data pass.
            return Staged(name, partition, folder, [], None, data.schema, staged_df.count(), None)
        rel_dir = f"{_partition_dir(partition)}/{run}"
        adds = self._write_files(data, name, rel_dir, partition)
        schema = self._arrow_schema(data, partition_cols=list(partition))
        return Staged(name, partition, f"{self.path(name).rstrip('/')}/{rel_dir}", adds, schema, data.schema,
                      sum(json.loads(a.stats)["numRecords"] for a in adds), sum(a.size for a in adds))

    def read_staged(self, staged: "Staged"):
        """The staged rows as a DataFrame, partition columns included (as the committed table will read)."""
        from pyspark.sql import functions as F

        if staged.adds or self.native:
            uris = ([f"{self.path(staged.name).rstrip('/')}/{a.path}" for a in staged.adds]
                    if not self.native else [staged.folder])
            df = self.spark.read.schema(staged.spark_schema).parquet(*map(glob_escape, uris))
        else:
            df = self.spark.createDataFrame([], staged.spark_schema)
        for c, v in staged.partition.items():
            df = df.withColumn(c, F.lit(v))
        return df

    def commit_staged(self, staged: "Staged", job: str = "", run_id: str = "") -> int:
        """Commit staged files as one replace of their partition. Returns the new (latest) version."""
        name, partition = staged.name, staged.partition
        meta = _commit_meta({"job": job, "run_id": run_id, "partition": json.dumps(partition)})
        if self.native:
            from pyspark.sql import functions as F

            data = self.spark.read.parquet(glob_escape(staged.folder))
            for c, v in partition.items():
                data = data.withColumn(c, F.lit(v))
            where = _replace_where(partition)
            (_writer(data, name).format("delta").mode("overwrite").option("replaceWhere", where)
             .option("userMetadata", json.dumps(meta)).partitionBy(*partition).save(self.path(name)))
            self._delete_folder(staged.folder)
            return self._version_of(name, meta)
        self._commit(name, staged.adds, staged.arrow_schema, list(partition),
                     [(c, "=", v) for c, v in partition.items()], meta)
        return self._version_of(name, meta)

    def discard_staged(self, staged: "Staged") -> None:
        self._delete_folder(staged.folder)

    def restore(self, name: str, version: int) -> int:
        """Make `version`'s content the table's newest version (one commit). Returns the new version."""
        if self.native:
            self.spark.sql(f"RESTORE TABLE delta.`{self.path(name)}` TO VERSION AS OF {int(version)}")
        else:
            self._open(self.path(name)).restore(int(version))
        return self.latest_version(name)

    def drop_table(self, name: str) -> None:
        """Remove a table no published version refers to (publish recovery): the data files its
        versions added, then its log. Nothing else under its folder goes: the run that recovers has
        its own staged files there (delta-rs stages in dt=<d>/run-<id>/, native Delta in _staging/)."""
        latest = self.latest_version(name)
        if latest is None:
            return
        added = {f.uri for v in range(latest + 1) for f in self._files_of(name, self._open(self.path(name), v))}
        for uri in sorted(added):
            self._delete_file(uri)
        self._delete_folder(f"{self.path(name).rstrip('/')}/_delta_log")

    def _delete_file(self, path: str) -> None:
        local = _on_local_disk(path)
        if local is None:
            self._delete_folder(path)  # a Hadoop delete removes a file as well
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)

    def _delete_folder(self, path: str) -> None:
        if is_uri(path):
            jpath, hfs = hadoop_path(self.spark, path)
            hfs.delete(jpath, True)
        else:
            import shutil

            shutil.rmtree(_local_path(path), ignore_errors=True)

    def vacuum(self, name: str, retention_hours: int = 168, dry_run: bool = True) -> list[str]:
        """Files no version within the retention refers to (e.g. those of failed runs); deleted unless dry_run.
        A stage-1 table is vacuumed holding the publish lock, at its latest (= published) version: a build
        publishing meanwhile would have its new files taken for unreferenced ones. Files a running build
        has staged and not committed yet are referenced by no version either: keep the retention above
        the longest build (the default, 168 h, is enforced; a shorter one is the caller's choice)."""
        with self._published_alone(name, "vacuum") if not dry_run else contextlib.nullcontext():
            self._delta(name)  # a clear error for a table that does not exist, or was never published
            # The newest version: under the lock it holds the published content (a restore, after a recovery).
            # full: also the files no version ever referred to (a failed or discarded run's); the default
            # (lite) mode only removes files that a version removed. keep_versions: delta-rs 1.5.0's full
            # mode also takes a file that a recent version removed for an orphan when the file itself is
            # older than the retention (delta-rs #4290, fixed after 1.5.0): a partition rebuilt today
            # would lose the files its previous version still reads.
            table = self._open(self.path(name))
            keep = _versions_within(table.history(), retention_hours)

            def vacuum(dry: bool) -> list[str]:
                return table.vacuum(retention_hours=retention_hours, dry_run=dry, full=True, keep_versions=keep,
                                    enforce_retention_duration=retention_hours >= 168)

            # delta-rs also lists what an earlier vacuum removed (the tombstones it keeps): the files still
            # there are listed first, the same whether this is a dry run or not
            listed = self._still_there(name, vacuum(True))
            if not dry_run:
                vacuum(False)
                if not self.native and _on_local_disk(self.path(name)):  # (native Delta makes no run folders)
                    self._remove_emptied_folders(name, listed)
            return listed + (self._stale_staging(name, retention_hours, dry_run) if self.native else [])

    def _still_there(self, name: str, paths: list[str]) -> list[str]:
        """The table-relative paths that exist (one batched look-up on an object store)."""
        base = self.path(name)
        root = _on_local_disk(base)
        if root is not None:
            return [p for p in paths if os.path.lexists(os.path.join(root, p))]
        return [p for p, there in zip(paths, fs.exist_all([fs.join(base, p) for p in paths], self._fs_options))
                if there]

    def _remove_emptied_folders(self, name: str, removed: list[str]) -> None:
        """delta-rs's vacuum removes files, not the run-<id>/ folders that held them: each folder it
        emptied goes too. A folder that still holds anything stays (rmdir refuses it), a folder this vacuum
        took nothing from is never touched (a run that has just made its own is not taken for a dead one),
        and partition folders stay (a writer may be about to make its run folder in one)."""
        root = _local_path(self.path(name))
        for rel in sorted({os.path.dirname(p) for p in removed} - {""}):
            with contextlib.suppress(OSError):  # not empty (another run's files), or gone already
                os.rmdir(os.path.join(root, rel))

    def _stale_staging(self, name: str, retention_hours: float, dry_run: bool) -> list[str]:
        """Native Delta stages a run's files in <table>/_staging/run-<id>/, a folder Delta's vacuum skips
        (its name starts with _): the folders of runs that died before their commit, whose newest file
        is older than the retention, are listed (and removed unless dry_run) here."""
        base, hfs = hadoop_path(self.spark, f"{self.path(name).rstrip('/')}/_staging")
        if not hfs.exists(base):
            return []
        cutoff_ms = (time.time() - retention_hours * 3600) * 1000
        out = []
        for run in hfs.listStatus(base):
            files, newest, it = [], 0, hfs.listFiles(run.getPath(), True)
            while it.hasNext():
                f = it.next()
                files.append(f.getPath().toString())
                newest = max(newest, f.getModificationTime())
            # A folder without files yet may be a run that is writing its first ones: nothing to reclaim.
            if files and newest <= cutoff_ms:
                out += files
                if not dry_run:
                    hfs.delete(run.getPath(), True)
        return out

    # ---- delta-rs internals ---------------------------------------------------------------------
    def _write_files(self, data, name: str, rel_dir: str, partition: Mapping[str, str], by: str | None = None):
        import pyarrow.parquet as pq
        from deltalake.transaction import AddAction

        table_path = self.path(name)
        folder = f"{table_path.rstrip('/')}/{rel_dir}"
        if is_uri(folder):
            raise TableError("delta-rs engine writes local tables only; use tables.engine: spark-delta on a cluster")
        writer = _writer(data, name).mode("errorifexists")
        (writer.partitionBy(by) if by else writer).parquet(folder)
        # With `by`, Spark writes <folder>/<by>=<value>/part-*.parquet: one more level, its value from the name.
        subdirs = ([(d, {by: _unquote(d.split("=", 1)[1])}) for d in sorted(os.listdir(folder)) if d.startswith(f"{by}=")]
                   if by else [("", {})])
        adds = []
        for sub, extra in subdirs:
            for fname in sorted(os.listdir(os.path.join(folder, sub))):
                if not fname.endswith(".parquet") or fname.startswith((".", "_")):
                    continue
                fpath = os.path.join(folder, sub, fname)
                st = os.stat(fpath)
                rows = pq.ParquetFile(fpath).metadata.num_rows
                if rows == 0:
                    continue  # Spark writes a schema-only file for an empty frame; the log needs none
                rel = f"{rel_dir}/{sub}/{fname}" if sub else f"{rel_dir}/{fname}"
                adds.append(AddAction(rel, st.st_size, {**partition, **extra}, int(st.st_mtime * 1000),
                                      True, json.dumps({"numRecords": rows})))
        return adds

    @staticmethod
    def _arrow_schema(data, partition_cols):
        import pyarrow as pa
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(data.schema)
        # Spark's parquet files hold UTC microseconds; Delta's `timestamp` is exactly that.
        fields = [pa.field(f.name, f.type, f.nullable) for f in schema]
        fields += [pa.field(c, pa.string(), True) for c in partition_cols]
        return pa.schema(fields)

    def _retry_conflicts(self, name: str, commit):
        """Run `commit` (a write that ends in one Delta commit); when it loses a race with another
        writer's commit to the same table, run it again, at most COMMIT_ATTEMPTS times in all.
        Both engines already fold in concurrent commits that do not conflict (e.g. replaces of other
        partitions); what reaches here is a real conflict (same partition, a concurrent create), and
        running the whole write again on the new table state is correct for a replace."""
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                return commit()
            except Exception as e:  # noqa: BLE001 - only commit conflicts are retried; the rest re-raise
                if not _is_commit_conflict(e):
                    raise
                first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                if attempt == COMMIT_ATTEMPTS:
                    raise CommitConflict(f"table {name!r}: the commit conflicted with concurrent writers "
                                         f"{attempt} times; giving up: {first_line}") from e
                log.warning("table %r: commit conflicted with a concurrent writer (attempt %d of %d), "
                            "retrying: %s", name, attempt, COMMIT_ATTEMPTS, first_line)
                time.sleep(0.2 * attempt + random.random() * 0.3)  # de-synchronise the racing writers

    def _commit(self, name, adds, schema, partition_cols, partition_filters, meta):
        self._retry_conflicts(name, lambda: self._commit_once(name, adds, schema, partition_cols,
                                                             partition_filters, meta))

    def _commit_once(self, name, adds, schema, partition_cols, partition_filters, meta):
        from deltalake import Schema
        from deltalake.transaction import CommitProperties, create_table_with_add_actions

        path = self.path(name)
        # As Spark's Delta writes it (the writer option userMetadata): one JSON string. Loose keys at the
        # top of commitInfo collide with Delta's own fields ("job" is a struct there), and a Spark reader
        # of the table then fails on the log.
        props = CommitProperties(custom_metadata={"userMetadata": json.dumps({k: v for k, v in meta.items() if v})})
        if not self._is_delta(path):
            create_table_with_add_actions(path, Schema.from_arrow(schema), adds, mode="error",
                                          partition_by=partition_cols or None, commit_properties=props,
                                          storage_options=self._storage)
            return
        dt = self._open(path)
        current = dt.schema().to_json()
        if Schema.from_arrow(schema).to_json() != current:
            have = [f.name for f in dt.schema().fields]
            new = [f.name for f in Schema.from_arrow(schema).fields]
            raise TableError(
                f"table {name!r}: the new data's schema differs from the table's; refusing to mix them "
                f"(columns only in the new data: {[c for c in new if c not in have]}, only in the table: "
                f"{[c for c in have if c not in new]}). A setting that changes the columns (features.levels, "
                "features.include_vector) needs the table rebuilt with every date: write it under a new "
                "tables root, or drop it and attach every date again.\n"
                f"table: {current}\nnew:   {Schema.from_arrow(schema).to_json()}")
        dt.create_write_transaction(adds, mode="overwrite", schema=schema,
                                    partition_by=partition_cols or None,
                                    partition_filters=partition_filters, commit_properties=props)
        log.debug("committed %s (%d files)", name, len(adds))


@dataclass(frozen=True)
class Staged:
    """Files of one partition written but not committed (see TableStore.stage_partition)."""
    name: str
    partition: dict
    folder: str
    adds: list
    arrow_schema: object
    spark_schema: object
    rows: int
    size_bytes: int | None


def _as_nullable(dtype):
    """dtype with every field, array element and map value nullable (Spark's `asNullable`, which a file
    scan applies to the schema it is given)."""
    from pyspark.sql import types as ST

    if isinstance(dtype, ST.StructType):
        return ST.StructType([ST.StructField(f.name, _as_nullable(f.dataType), True, f.metadata) for f in dtype])
    if isinstance(dtype, ST.ArrayType):
        return ST.ArrayType(_as_nullable(dtype.elementType), True)
    if isinstance(dtype, ST.MapType):
        return ST.MapType(_as_nullable(dtype.keyType), _as_nullable(dtype.valueType), True)
    return dtype


def _writer(df, name: str):
    """df.write with the table's Parquet codec (etl.catalog): every file of a table gets its codec here."""
    entry = catalog.table(name)
    writer = df.write
    return writer.option("compression", entry.compression) if entry is not None and entry.compression else writer


def _unquote(path: str) -> str:
    from urllib.parse import unquote

    return unquote(path)
