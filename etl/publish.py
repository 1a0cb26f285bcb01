"""The publish log: the tables of one stage-1 date become visible together, or not at all.

Delta has no multi-table transaction, and stage 1 writes six tables per date. Each table's partition
replace is one Delta commit (`etl.tables`); this module makes the *set* atomic for readers:

- `<tables_root>/_publish/<seq>.json` manifests, written once each (create-if-absent, never
  rewritten; each appears whole: a local or HDFS one is written under a temporary name and renamed).
  Each holds the cumulative state after a publish: `tables` = the version of every stage-1 table
  readers must use, `dates` = {dt: fingerprint of the inputs it was built from}.
- `TableStore` reads, `version()` and `files()` of a stage-1 table pin to the latest manifest's version
  (a table not in it does not exist for readers). Versions committed after it are invisible.
- A run stages every table's files, verifies the counts, then, holding `_publish/_lock`, first undoes
  any versions committed after the latest manifest (a run killed between two commits: `restore` to
  the published version; a table the log never published is removed), commits its tables one by one
  and appends a manifest. Readers move from the old set to the new one at that last write.
- The lock: on a local tables_root a kernel lock (flock) on `_publish/_lock`, which ends with its
  process; on an object store the file itself (create-if-absent), taken over when its process is gone
  (same host). The file names its holder; a lock not released within the wait is an error naming it.

Test hook (documented, test-only): `COURIER_PAUSE_AFTER_COMMIT=<n>:<marker path>` makes the run
write the marker file and sleep after its n-th table commit, so a test can SIGKILL it there.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid

from etl import catalog
from etl.config import is_uri
from etl.fs import is_object_store

log = logging.getLogger(__name__)

PUBLISH_DIR = "_publish"
LOCK_NAME = "_lock"
PAUSE_ENV = "COURIER_PAUSE_AFTER_COMMIT"


class PublishError(RuntimeError):
    """A date cannot be published (order between dates, a held lock, a conflicting publish)."""


class PublishLog:
    """Manifests under <tables_root>/_publish (local paths; URIs through Hadoop's FileSystem)."""

    def __init__(self, tables_root: str, spark=None):
        self.dir = tables_root.rstrip("/") + "/" + PUBLISH_DIR
        self.spark = spark

    # ---- a tiny file layer: os for local paths (O_EXCL is atomic), Hadoop FS for URIs -------------
    def _hfs(self, path: str):
        if self.spark is None:
            raise PublishError(f"{path}: a Spark session is needed to reach this file system")
        jvm = self.spark.sparkContext._jvm
        jpath = jvm.org.apache.hadoop.fs.Path(path)
        return jpath, jpath.getFileSystem(self.spark.sparkContext._jsc.hadoopConfiguration())

    def _list(self) -> list[str]:
        if not is_uri(self.dir):
            return sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []
        jpath, fs = self._hfs(self.dir)
        return sorted(str(s.getPath().getName()) for s in fs.listStatus(jpath)) if fs.exists(jpath) else []

    def _read(self, name: str) -> str:
        path = f"{self.dir}/{name}"
        if not is_uri(path):
            with open(path, encoding="utf-8") as fh:
                return fh.read()
        jpath, fs = self._hfs(path)
        stream = fs.open(jpath)
        try:
            return self.spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
        finally:
            stream.close()

    def _create(self, name: str, text: str) -> bool:
        """Write a new file; False when it already exists (another run got there first)."""
        path = f"{self.dir}/{name}"
        if not is_uri(path):
            os.makedirs(self.dir, exist_ok=True)
            # Written in full under a name of its own, then linked to its name (atomic, and refused when
            # the name exists): a run killed mid-write, or a full disk, leaves no empty or half record
            # that every later reader would fail to parse.
            tmp = f"{self.dir}/.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            return True
        jpath, hfs = self._hfs(path)
        if hfs.exists(jpath):
            return False
        if is_object_store(path):  # S3A: the object appears whole when the stream closes (no rename there)
            try:
                self._write_hadoop(hfs, jpath, text)
            except Exception as e:
                if _already_exists(e):  # S3A's create checks again: another run created it in between
                    return False
                raise
            return True
        # HDFS and other Hadoop file systems show a created file while it is written, and keep it half
        # written when the run dies: written in full under a name of its own, then renamed (atomic on
        # HDFS, and refused there when the name exists).
        tmp = self.spark.sparkContext._jvm.org.apache.hadoop.fs.Path(
            f"{self.dir}/.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self._write_hadoop(hfs, tmp, text)
            return bool(hfs.rename(tmp, jpath))
        finally:
            hfs.delete(tmp, False)

    @staticmethod
    def _write_hadoop(hfs, jpath, text: str) -> None:
        out = hfs.create(jpath, False)
        try:
            out.write(bytearray(text.encode("utf-8")))
        finally:
            out.close()

    def _delete(self, name: str) -> None:
        path = f"{self.dir}/{name}"
        if not is_uri(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return
        jpath, fs = self._hfs(path)
        fs.delete(jpath, False)

    # ---- manifests ------------------------------------------------------------------------------
    def _manifests(self) -> list[str]:
        """The manifests' names, oldest first."""
        return [n for n in self._list() if n.endswith(".json")]

    def latest(self) -> dict | None:
        names = self._manifests()
        return json.loads(self._read(names[-1])) if names else None

    def ever_published(self, table: str, version: int) -> bool:
        """Whether some manifest, the latest or an earlier one, pinned `table` at `version` (newest first)."""
        for name in reversed(self._manifests()):
            if json.loads(self._read(name))["tables"].get(table) == version:
                return True
        return False

    def pins(self) -> dict | None:
        """{table: version} readers use; None when nothing was ever published (read the latest)."""
        m = self.latest()
        return None if m is None else dict(m["tables"])

    def published_dates(self) -> dict:
        m = self.latest()
        return dict(m["dates"]) if m else {}

    def append(self, entry: dict) -> dict:
        """Write the next manifest (seq = latest + 1). Raises PublishError if another run wrote it."""
        m = self.latest()
        seq = 0 if m is None else m["seq"] + 1
        entry = {**entry, "seq": seq, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not self._create(f"{seq:020d}.json", json.dumps(entry, indent=1, sort_keys=True)):
            raise PublishError(f"{self.dir}: manifest {seq} was written by another run while this one "
                               "held no lock; rerun the date")
        return entry

    # ---- the lock -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, run_id: str, wait_s: float = 300.0):
        # token: this hold's own (run ids repeat: a vacuum and a direct write use the table's name)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "token": uuid.uuid4().hex,
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        deadline = time.monotonic() + wait_s
        hold = self._lock_local if not is_uri(self.dir) else self._lock_by_create
        with hold(me, deadline):
            yield

    def _held_by(self) -> dict:
        try:
            return json.loads(self._read(LOCK_NAME))
        except (OSError, ValueError):
            return {}

    def _wait(self, deadline: float, remedy: str) -> None:
        if time.monotonic() > deadline:
            holder = self._held_by()
            raise PublishError(f"{self.dir}/{LOCK_NAME} is held by {holder or 'an unreadable lock'}; {remedy}")
        time.sleep(1.0)

    @contextlib.contextmanager
    def _lock_local(self, me: dict, deadline: float):
        """A kernel lock (flock) on the lock file: it ends with its process, however that process ends,
        so a dead run's lock needs no takeover (two runs taking over the same dead lock could both
        believe they held it). The file names its holder for the error message."""
        import fcntl

        os.makedirs(self.dir, exist_ok=True)
        path = f"{self.dir}/{LOCK_NAME}"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                # a kernel lock ends with its process: the holder is alive (removing the file would let a
                # second run in beside it)
                self._wait(deadline, "that run is still running: wait for it, or stop it")
                continue
            try:  # the last holder removes the file as it leaves: a lock on a removed file holds nothing
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode("utf-8"))
            yield
        finally:
            try:  # removed while still locked: a run that opened it meanwhile sees it gone and retries
                with contextlib.suppress(FileNotFoundError):  # (removed by hand: the publish still stands)
                    os.remove(path)
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _lock_by_create(self, me: dict, deadline: float):
        """Object stores (s3a): a create-if-absent lock file. Hadoop's S3A client checks and creates in
        two requests, so two runs starting the same second can both get it: the commit checks that no
        other run committed between its own commits before it writes the publish record."""
        while True:
            # Hadoop's create is two requests: read the file back, and hold it only if it is this hold's
            if self._create(LOCK_NAME, json.dumps(me)) and self._held_by().get("token") == me["token"]:
                break
            holder = self._held_by()
            if holder and holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                log.warning("taking over the publish lock of run %s (process %s is gone)",
                            holder.get("run_id"), holder.get("pid"))
                if self._held_by() == holder:  # not a lock another run has taken over meanwhile
                    self._delete(LOCK_NAME)
                continue
            self._wait(deadline, "if that run is dead (on another host), remove the file")
        try:
            yield
        finally:
            if self._held_by().get("token") == me["token"]:  # never another run's lock
                self._delete(LOCK_NAME)


def _already_exists(e: Exception) -> bool:
    """A Hadoop FileAlreadyExistsException, as Py4J raises it."""
    java = getattr(e, "java_exception", None)
    return java is not None and java.getClass().getName().endswith(".FileAlreadyExistsException")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pause_hook(commits_done: int) -> None:
    """Test-only: pause after the n-th commit so a test can kill the run there (see module doc)."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    n, _, marker = spec.partition(":")
    if int(n) == commits_done:
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(3600)


def recover(store, plog: PublishLog) -> list[str]:
    """Undo stage-1 commits made after the latest manifest (a run that died between two commits).
    Call with the lock held. Returns what was done, one line per table."""
    pins = plog.pins()
    done = []
    for name in catalog.STAGE1:
        latest = store.latest_version(name)
        if latest is None:
            continue
        pinned = None if pins is None else pins.get(name)
        if pins is not None and pinned is None:
            store.drop_table(name)
            done.append(f"{name}: removed (created by a run that never published)")
        elif pinned is not None and latest > pinned:
            store.restore(name, pinned)
            done.append(f"{name}: restored to published v{pinned} (v{pinned + 1}..v{latest} unpublished)")
    for line in done:
        log.warning("publish recovery: %s", line)
    return done
