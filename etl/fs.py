"""Files on local disk and on S3-compatible object stores through one small API (pyarrow.fs).

Training checkpoints, run markers and result files live under ``checkpoints_root``, which is a local
folder on one machine and an ``s3a://`` URI on a cluster; the training reader opens ``courier_train``
files that the Delta log names as ``s3a://`` or ``s3://`` URIs. Everything that touches such a path goes
through this module, so that no caller needs to know which kind it has. Only pyarrow is imported: this
runs on bare training workers (no Spark, MLflow or deltalake there).

S3 settings (``S3Options``): the endpoint of an S3-compatible store, the region and the credentials, in
this order of precedence: the options given to ``configure`` (the jobs derive them from the config's
``spark.hadoop.fs.s3a.*`` settings, the same ones Spark's own S3A client uses), then the environment
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / ``COURIER_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``). A worker
process on another machine gets the driver's options explicitly (``S3Options.as_dict()`` in its spec):
executors need not share the driver's environment.

Semantics kept on both kinds of storage:
* ``write_bytes`` is atomic: a reader sees the old content or the new, never a partial file (local: a
  temporary file renamed over the target; S3: a single PUT, which the store makes visible at once).
* Object stores have no folders: ``makedirs`` is a no-op there and a "folder" exists when an object
  lies under its prefix.
* An unreachable or misconfigured store fails within seconds with an error that names the endpoint
  (short connect timeout, few retries), never a hang.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import threading
from dataclasses import asdict, dataclass, replace
from typing import Mapping

S3_SCHEMES = ("s3a", "s3", "s3n")  # Hadoop's names (s3a) and AWS's (s3) for the same bucket/key layout
_CONNECT_TIMEOUT_S = 5.0  # a dead endpoint must fail fast: the default SDK timeouts add up to minutes
_REQUEST_TIMEOUT_S = 60.0
_MAX_ATTEMPTS = 3

# Environment variables, in precedence order per setting (the AWS SDKs' names first).
_ENV = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "COURIER_S3_ENDPOINT"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "access_key": ("AWS_ACCESS_KEY_ID",),
    "secret_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
}
# The Hadoop S3A keys Spark reads (in the config's spark.conf) for the same settings.
_SPARK_KEYS = {
    "endpoint": "spark.hadoop.fs.s3a.endpoint",
    "region": "spark.hadoop.fs.s3a.endpoint.region",
    "access_key": "spark.hadoop.fs.s3a.access.key",
    "secret_key": "spark.hadoop.fs.s3a.secret.key",
    "session_token": "spark.hadoop.fs.s3a.session.token",
    "ssl": "spark.hadoop.fs.s3a.connection.ssl.enabled",
}


class StorageError(OSError):
    """A storage operation that failed, with the URI and (for S3) the endpoint it was sent to."""


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None  # e.g. http://127.0.0.1:9000; None: AWS's own endpoints
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    ssl: str | None = None  # "false": an endpoint given without a scheme is plain HTTP (S3A's default: HTTPS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "S3Options":
        env = os.environ if environ is None else environ
        return cls(**{k: next((env[n] for n in names if env.get(n)), None) for k, names in _ENV.items()})

    @property
    def endpoint_scheme(self) -> str:
        """The scheme the endpoint is spoken to with: its own, else HTTPS as S3A does unless its
        connection.ssl.enabled setting is false (e.g. s3.eu-west-1.amazonaws.com: HTTPS)."""
        given = (self.endpoint or "").split("://", 1)
        if len(given) == 2:
            return given[0].lower()
        return "http" if str(self.ssl).strip().lower() == "false" else "https"

    @property
    def endpoint_host(self) -> str | None:
        """The endpoint as host:port, without its scheme or a trailing slash."""
        return self.endpoint.split("://", 1)[-1].rstrip("/") if self.endpoint else None

    @classmethod
    def from_spark_conf(cls, conf: Mapping, environ: Mapping[str, str] | None = None) -> "S3Options":
        """The config's ``spark.hadoop.fs.s3a.*`` settings, the environment for what they leave out."""
        base = cls.from_env(environ)
        # (a YAML false, unquoted, is a bool: str() makes it "False", which the ssl setting reads as false)
        given = {k: str(conf[key]) for k, key in _SPARK_KEYS.items() if conf.get(key) not in (None, "")}
        return replace(base, **given)

    def as_dict(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:  # never print a secret
        return f"S3Options(endpoint={self.endpoint!r}, region={self.region!r}, access_key=***)"


def delta_storage_options(options: S3Options) -> dict[str, str]:
    """The same settings as delta-rs (object_store) takes them: the config's endpoint and keys must reach
    its commits and pinned reads too, not only Spark and pyarrow (delta-rs alone reads only AWS_* env)."""
    given = {"AWS_ENDPOINT_URL": options.endpoint and f"{options.endpoint_scheme}://{options.endpoint_host}",
             "AWS_REGION": options.region, "AWS_ACCESS_KEY_ID": options.access_key,
             "AWS_SECRET_ACCESS_KEY": options.secret_key, "AWS_SESSION_TOKEN": options.session_token}
    out = {k: v for k, v in given.items() if v}
    if options.endpoint and options.endpoint_scheme == "http":
        out["AWS_ALLOW_HTTP"] = "true"
    return out


def options_for(cfg) -> S3Options:
    """The object-store settings of a config (etl.config.Config): its ``spark.hadoop.fs.s3a.*`` keys,
    what Spark's own S3A client uses, and the environment for what they leave out."""
    return S3Options.from_spark_conf(cfg.spark.conf)


_lock = threading.Lock()
_configured: S3Options | None = None
_filesystems: dict = {}


def configure(options: S3Options | Mapping | None) -> None:
    """Set this process's S3 options (None: back to the environment)."""
    global _configured
    if isinstance(options, Mapping):
        options = S3Options(**options)
    with _lock:
        _configured = options


def current_options() -> S3Options:
    return _configured if _configured is not None else S3Options.from_env()


# ---- paths -----------------------------------------------------------------------------------------
def scheme(uri: str) -> str:
    """'s3a', 's3', 'file', ... ('' for a plain local path)."""
    uri = str(uri)
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_object_store(uri: str) -> bool:
    return scheme(uri) in S3_SCHEMES


def join(base: str, *parts: str) -> str:
    """base/part/...: '/'-joined for URIs, os.path.join for local paths. A part is relative and stays
    under base: an absolute part would replace base (os.path.join's rule), a '..' would leave it."""
    for part in parts:
        if str(part).startswith(("/", os.sep)) or ".." in str(part).replace(os.sep, "/").split("/"):
            raise StorageError(f"{part!r} is not a path under {base}")
    if "://" in str(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(base, *parts)


def _local(uri: str) -> str:
    uri = str(uri)
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"unsupported storage scheme in {uri!r}: use a local path, file://, "
                           f"or one of {', '.join(s + '://' for s in S3_SCHEMES)}")
    return os.path.abspath(uri)


def _s3_filesystem(options: S3Options):
    from pyarrow import fs as pafs

    with _lock:
        cached = _filesystems.get(options)
        if cached is not None:
            return cached
        kwargs = dict(region=options.region or "us-east-1", connect_timeout=_CONNECT_TIMEOUT_S,
                      request_timeout=_REQUEST_TIMEOUT_S,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS))
        if options.access_key and options.secret_key:
            kwargs.update(access_key=options.access_key, secret_key=options.secret_key,
                          session_token=options.session_token)
        if options.endpoint:
            kwargs["scheme"] = options.endpoint_scheme
            # pyarrow wants host:port (it addresses buckets path-style when given an endpoint).
            kwargs["endpoint_override"] = options.endpoint_host
        filesystem = pafs.S3FileSystem(**kwargs)
        _filesystems[options] = filesystem
        return filesystem


def filesystem(uri: str, options: S3Options | None = None):
    """(pyarrow FileSystem, path on it) for a local path, file:// URL or s3a:// / s3:// URI."""
    if is_object_store(uri):
        path = str(uri).split("://", 1)[1]
        if not path or path.startswith("/"):
            raise StorageError(f"{uri!r} names no bucket")
        return _s3_filesystem(options or current_options()), path.rstrip("/")
    from pyarrow import fs as pafs

    return pafs.LocalFileSystem(), _local(uri)


def _where(uri: str, options: S3Options | None) -> str:
    if is_object_store(uri):
        endpoint = (options or current_options()).endpoint or "AWS S3 (no endpoint override)"
        return f"{uri} (S3 endpoint {endpoint})"
    return str(uri)


def _call(what: str, uri: str, options: S3Options | None, fn):
    try:
        return fn()
    except FileNotFoundError:
        raise
    except StorageError:
        raise
    except OSError as e:  # pyarrow's S3 errors are OSErrors; name the endpoint they were sent to
        raise StorageError(f"{what} {_where(uri, options)} failed: {e}") from e


# ---- operations ------------------------------------------------------------------------------------
def exists(uri: str, options: S3Options | None = None) -> bool:
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, options)
    info = _call("stat", uri, options, lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def exist_all(uris: list[str], options: S3Options | None = None) -> list[bool]:
    """exists() of each of uris, all on one filesystem, in one batched look-up."""
    from pyarrow import fs as pafs

    if not uris:
        return []
    fs = filesystem(uris[0], options)[0]
    paths = [filesystem(u, options)[1] for u in uris]
    infos = _call("stat", uris[0], options, lambda: fs.get_file_info(paths))
    return [info.type != pafs.FileType.NotFound for info in infos]


def makedirs(uri: str, options: S3Options | None = None) -> None:
    """Create a local folder (and its parents); nothing to do on an object store."""
    if is_object_store(uri):
        return
    os.makedirs(_local(uri), exist_ok=True)


def read_bytes(uri: str, options: S3Options | None = None) -> bytes:
    fs, path = filesystem(uri, options)

    def read():
        try:
            with fs.open_input_stream(path) as fh:
                return fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {_where(uri, options)}") from None

    return _call("read", uri, options, read)


class _StoreReads:
    """A stream whose read errors (the store's: a timeout, a refused request) are StorageError, not the
    plain OSError a damaged file's decoder raises."""

    def __init__(self, fh, uri: str, options: S3Options | None):
        self.fh, self.uri, self.options = fh, uri, options

    def read(self, n=-1):
        return _call("read", self.uri, self.options, lambda: self.fh.read(n))


def scan_stream(uri: str, consume, options: S3Options | None = None):
    """consume(binary stream) over the file or object at uri, streamed (constant memory whatever its
    size); its result is returned. FileNotFoundError when it is gone; StorageError when the store fails
    (opening or reading); what consume raises otherwise (e.g. a decoder's error) as it is."""
    fs, path = filesystem(uri, options)

    def open_stream():
        try:
            return fs.open_input_stream(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {_where(uri, options)}") from None

    with _call("open", uri, options, open_stream) as fh:
        return consume(_StoreReads(fh, uri, options))


def read_text(uri: str, options: S3Options | None = None) -> str:
    return read_bytes(uri, options).decode("utf-8")


def write_bytes(uri: str, data: bytes, options: S3Options | None = None) -> None:
    """Write a whole file atomically (readers see the old or the new content, never a part) and durably
    (on disk before it replaces the old one: after a power loss a checkpoint is the old or the new one,
    not an empty file). A failed write leaves no temporary file behind."""
    if not is_object_store(uri):
        path = _local(uri)
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        _fsync_folder(folder)  # the rename itself
        return
    fs, path = filesystem(uri, options)

    def write():
        with fs.open_output_stream(path) as fh:  # one PUT (multipart above 5 MB), visible on close
            fh.write(data)

    _call("write", uri, options, write)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot sync a folder: the rename stands as it is
        pass
    finally:
        os.close(fd)


def write_text(uri: str, text: str, options: S3Options | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def append_text(uri: str, text: str, options: S3Options | None = None) -> None:
    """Append to a text file. Objects cannot be appended to: on S3 the object is rewritten whole, so
    call this for a few writes (checkpoints, the end of a run), not per line, and from one writer."""
    if not is_object_store(uri):
        path = _local(uri)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
        return
    old = read_text(uri, options) if exists(uri, options) else ""
    write_text(uri, old + text, options)


def remove(uri: str, options: S3Options | None = None, missing_ok: bool = True) -> None:
    fs, path = filesystem(uri, options)
    try:
        _call("delete", uri, options, lambda: fs.delete_file(path))
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(uri: str, options: S3Options | None = None) -> None:
    """Delete a folder, or every object under a prefix, with all it holds (nothing when there is none)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, options)
    if _call("stat", uri, options, lambda: fs.get_file_info(path)).type == pafs.FileType.NotFound:
        return
    _call("delete", uri, options, lambda: fs.delete_dir(path))


def list_names(uri: str, options: S3Options | None = None) -> list[str]:
    """Names of the entries directly under a folder/prefix (empty when there is none)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri, options)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    infos = _call("list", uri, options, lambda: fs.get_file_info(selector))
    return sorted(i.base_name for i in infos)


def copy_to_local(uri: str, local_path: str, options: S3Options | None = None) -> str:
    """Copy a file to a local path (for APIs that only take local files, e.g. MLflow's log_artifact)."""
    data = read_bytes(uri, options)
    with open(local_path, "wb") as fh:
        fh.write(data)
    return local_path


def upload_tree(local_dir: str, uri: str, options: S3Options | None = None, threads: int = 8) -> int:
    """Copy every file under a local folder to the same relative paths under ``uri`` (an object-store
    prefix or another local folder); existing files of the same name are replaced. Returns the number
    of files copied. (File by file through write_bytes: pyarrow 14's copy_files hung here against an S3
    server after starting its multipart uploads.)"""
    from concurrent.futures import ThreadPoolExecutor

    base = os.path.abspath(local_dir)
    rels = sorted(os.path.relpath(os.path.join(d, f), base) for d, _, files in os.walk(base) for f in files)

    def copy(rel: str) -> None:
        with open(os.path.join(base, rel), "rb") as fh:
            write_bytes(join(uri, *rel.split(os.sep)), fh.read(), options)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(copy, rels))  # re-raises the first error
    return len(rels)
