"""Stage 1 input discovery and the counts taken from the input files themselves.

Every file of a raw date folder is either read or reported:
- `*.jsonl` / `*.json`, plain or compressed with a codec Spark's text source reads natively
  (`.gz`, `.bz2`), are read as JSON lines (one object per line);
- names matching `samples.input_ignore` (default `_*` and `.*`: `_SUCCESS`, `.crc` files) are skipped
  and counted;
- anything else fails the date with a message listing the files: `.zst` too, because Hadoop's
  ZStandardCodec needs the native libhadoop that pip's pyspark does not ship (measured: "native
  zStandard library not available"), and a sub-folder (no partition layout is expected below dt=).

`scan_files` reads each file's bytes once, on the executors (a local file opened and streamed by the
executor itself; any other, e.g. `s3a://`, through Spark's `binaryFile` source), and returns per file:
size, sha256 of the stored bytes and the number of lines after decompression with Python's own
gzip/bz2 (not Hadoop's codecs); a local file with Hadoop's checksum file (.<name>.crc) beside it is
checked against it on the way, as Hadoop's read will. That line count is the anchor the report's `raw_rows` is checked
against: it does not share code with the parser it checks.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field

from etl import fs
from etl.spark import file_open_cost, glob_escape, hadoop_path

READ_SUFFIXES = (".jsonl", ".json")
SPARK_CODECS = ("", ".gz", ".bz2")  # what Spark's text source decompresses without native libraries
UNSUPPORTED_CODECS = (".zst", ".zstd", ".lz4", ".snappy", ".xz", ".zip", ".deflate")


class InputError(RuntimeError):
    """The input of a date cannot be used as it is (missing, empty, or files the job cannot read)."""


@dataclass(frozen=True)
class RawFile:
    path: str  # fully qualified (file:/..., s3a://...)
    name: str
    size: int
    mtime: int  # milliseconds


@dataclass
class DateInput:
    """The files of one raw date folder, sorted into read / ignored."""
    dt: str
    read: list = field(default_factory=list)
    ignored: list = field(default_factory=list)


def _codec(name: str) -> str:
    for c in (".gz", ".bz2"):
        if name.endswith(c):
            return c
    return ""


def classify(name: str, ignore: list[str]) -> str:
    """'read', 'ignored' or 'unsupported' for a file name in a raw date folder. A name starting with
    '_' or '.' is always ignored: Spark's file sources skip such files even when named one by one, so
    reading one would count lines that no row comes from."""
    if name.startswith(("_", ".")) or any(fnmatch.fnmatchcase(name, p) for p in ignore):
        return "ignored"
    stem = name[: -len(_codec(name))] if _codec(name) else name
    return "read" if stem.endswith(READ_SUFFIXES) else "unsupported"


def qualify(spark, path: str) -> str:
    jpath, fs = hadoop_path(spark, path)
    return str(fs.makeQualified(jpath).toString())


def discover(spark, base: str, date: str, ignore: list[str]) -> DateInput | None:
    """The files of base/dt=<date>/ (None when the folder does not exist). Raises InputError listing
    every file that is neither readable nor ignored."""
    jpath, fs = hadoop_path(spark, f"{base.rstrip('/')}/dt={date}")
    if not fs.exists(jpath):
        return None
    out, bad, hints = DateInput(dt=date), [], []
    statuses = sorted(fs.listStatus(jpath), key=lambda s: str(s.getPath().getName()))
    local = _local_file_dir(str(fs.makeQualified(jpath).toString()))
    for st in statuses:
        name = str(st.getPath().getName())
        f = RawFile(str(st.getPath().toString()), name, int(st.getLen()), int(st.getModificationTime()))
        kind = "unsupported" if st.isDirectory() else classify(name, ignore)
        if kind == "read" and local and ":" in name:
            # Hadoop's local file system names the checksum file .<name>.crc, a relative path that cannot
            # hold a colon: the read would fail half-way through the job
            bad.append(name)
            hints.append(f"rename {name!r}: Hadoop cannot open a local file whose name holds ':'")
        elif kind == "read":
            out.read.append(f)
        elif kind == "ignored":
            out.ignored.append(f)
        else:
            bad.append(name + ("/" if st.isDirectory() else ""))
    if local:
        # Hadoop's local listing leaves out what it cannot stat (a link to a file that is gone) and its own
        # .<name>.crc checksum files (ignored as every '.' name is): anything else on the disk and not
        # listed would be skipped unseen.
        listed = {str(st.getPath().getName()) for st in statuses}
        unseen = sorted(n for n in os.listdir(local) if n not in listed and classify(n, ignore) != "ignored")
        bad += unseen
        hints += [f"{n!r} cannot be opened (a link to a file that is gone?)" for n in unseen]
    if bad:
        zst = [b for b in bad if b.endswith(UNSUPPORTED_CODECS)]
        hint = (" (Spark reads .gz and .bz2 natively; .zst needs Hadoop native libraries this Spark lacks:"
                " decompress them, e.g. `zstd -d --rm`, or recompress as .gz)") if zst else ""
        hint += "".join(f"; {h}" for h in hints)
        raise InputError(f"{base}/dt={date}: {len(bad)} file(s) the job cannot read: {bad}{hint}. "
                         f"Readable: *.jsonl, *.json (+ .gz, .bz2); ignored: {ignore} (samples.input_ignore)")
    return out


def _local_file_dir(qualified: str) -> str | None:
    """The local folder a qualified `file:` path names, or None (another scheme)."""
    path = qualified[len("file:"):] if qualified.startswith("file:/") else None
    return path if path and os.path.isdir(path) else None


@dataclass(frozen=True)
class FileScan:
    size: int
    sha256: str
    lines: int


def _scan_bytes(name: str, data: bytes) -> tuple[str, int]:
    """(sha256 of the stored bytes, lines after decompression) of one file's bytes."""
    return _scan_stream(name, io.BytesIO(data))


def _scan_local(path: str) -> tuple[str, int]:
    """_scan_bytes of a local file, streamed: constant memory whatever the file's size (the binaryFile
    source holds a whole file in one JVM array, at most 2 GB). Where Hadoop left a checksum file beside
    it, the bytes are checked against it as they stream by: Hadoop's read checks them too, and would
    fail the job half-way (ChecksumException) on a file replaced by a tool that left the old one."""
    with open(path, "rb") as f:
        sidecar = _checksum_file(path)
        return _scan_stream(path, _HadoopChecksummed(f, sidecar) if sidecar else f)


def _scan_object(uri: str, options) -> tuple[str, int, int]:
    """(sha256, lines, size) of an object-store file, streamed by the executor itself (etl.fs, pyarrow's
    S3): constant memory, where Spark's binaryFile source holds each file whole (and refuses one over 2 GB).
    The store's own failures are fs.StorageError (a crash of the date, retried by Spark's task retries
    first), not the damage a decoder reports."""
    def consume(fh):
        stored = _Hashing(fh)
        return (*_scan_stream(uri, fh, stored), stored.size)

    return fs.scan_stream(uri, consume, options)


def _checksum_file(path: str) -> str | None:
    """Hadoop's checksum file of a local file (.<name>.crc beside it), or None."""
    head, name = os.path.split(path)
    sidecar = os.path.join(head, f".{name}.crc")
    return sidecar if os.path.isfile(sidecar) else None


class _HadoopChecksummed:
    """A local file read through, every `bytes_per_sum` bytes checked against the CRC32 that Hadoop's
    ChecksumFileSystem stored for them: b"crc\0", the chunk size (int32), then one big-endian CRC32 per
    chunk, the last chunk short. Any difference, or a chunk more or less, raises ValueError."""

    def __init__(self, f, sidecar: str):
        import struct

        with open(sidecar, "rb") as c:
            data = c.read()
        self.f, self.name = f, os.path.basename(sidecar)
        self.size = struct.unpack(">i", data[4:8])[0] if len(data) >= 8 and data[:4] == b"crc\0" else 0
        if self.size <= 0 or (len(data) - 8) % 4:
            raise ValueError(f"its Hadoop checksum file {self.name} is not one; {self._remedy}")
        self.sums = struct.unpack(f">{(len(data) - 8) // 4}I", data[8:])
        self.chunk, self.pending = 0, b""

    @property
    def _remedy(self) -> str:
        return f"if the file's bytes are right, delete {self.name}"

    def _check(self, piece) -> None:
        if self.chunk >= len(self.sums) or zlib.crc32(piece) != self.sums[self.chunk]:
            raise ValueError(f"its bytes differ from the checksums in {self.name}, which Hadoop wrote beside it "
                             f"(byte {self.chunk * self.size} on: the file was changed by a tool that left "
                             f"{self.name} as it was, or is damaged); {self._remedy}")
        self.chunk += 1

    def read(self, n=-1):
        b = self.f.read(n)
        data = memoryview(self.pending + b) if self.pending else memoryview(b)
        whole = len(data) - len(data) % self.size
        for at in range(0, whole, self.size):
            self._check(data[at:at + self.size])
        self.pending = bytes(data[whole:])
        if not b:  # the end: the short last chunk, and no chunk left unread
            if self.pending:
                self._check(self.pending)
                self.pending = b""
            if self.chunk != len(self.sums):
                raise ValueError(f"it is shorter than the {len(self.sums)} chunks {self.name} has checksums for "
                                 f"(it was changed by a tool that left {self.name} as it was); {self._remedy}")
        return b


class _Hashing:
    """A binary file read through: every byte read also goes into `digest`."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.digest.update(b)
        self.size += len(b)
        return b


def _decompressed(stored, codec: str, chunk: int):
    """The decompressed blocks (at most `chunk` bytes each) of a .gz or .bz2 stream: one member after
    another, and every byte of the file must belong to one. Python's gzip skips zero bytes after the last
    member (Hadoop's codec fails on them) and its bz2 reader drops whatever follows a stream it cannot
    read (data silently lost to both): here either is damage, raised as what a damaged file raises."""
    import bz2

    def new():
        return zlib.decompressobj(31) if codec == ".gz" else bz2.BZ2Decompressor()

    kind = "gzip" if codec == ".gz" else "bzip2"
    d, started, members = new(), False, 0
    while data := stored.read(chunk):
        while data:
            if started and d.eof:  # the next member: its own header, checked by a new decompressor
                d, members = new(), members + 1
            started = True
            try:
                if codec == ".gz":
                    yield d.decompress(data, chunk)
                    while d.unconsumed_tail and not d.eof:
                        yield d.decompress(d.unconsumed_tail, chunk)
                else:
                    yield d.decompress(data, max_length=chunk)
                    while not d.eof and not d.needs_input:
                        yield d.decompress(b"", max_length=chunk)
            except (zlib.error, OSError) as e:
                where = f"the bytes after {kind} stream {members} are not {kind} (zero padding, or data " \
                    "appended)" if members else f"not {kind}, or damaged"
                raise ValueError(f"{where}: {e}") from None
            data = d.unused_data if d.eof else b""
    if codec == ".gz" and started and not d.eof:
        yield d.flush()  # output zlib still holds after the last input (at most its window)
    if started and not d.eof:
        raise EOFError(f"the {codec} stream ends before its end marker (a truncated file)")


def _scan_stream(name: str, raw, stored: _Hashing | None = None) -> tuple[str, int]:
    """(sha256, lines) of a binary stream read in 8 MB chunks, decompressed (`_decompressed`) when `name`
    says so. Hadoop's LineRecordReader ends a line at \n, \r or \r\n, as bytes.splitlines() does (a last
    line without a newline counts; a final newline adds none). `stored`: the _Hashing over raw to read
    through (its size is then the bytes read)."""
    chunk = 8 << 20
    lines, after_cr, last, head = 0, False, b"", b""
    stored = stored or _Hashing(raw)
    codec = _codec(name)
    blocks = _decompressed(stored, codec, chunk) if codec else iter(lambda: stored.read(chunk), b"")
    for block in blocks:
        if not block:
            continue
        if len(head) < 4:
            head = (head + block)[:4]
            _check_format(codec, head)
        # \r\n is one line end, also when a chunk ends between the two.
        crlf = block.count(b"\r\n") + (after_cr and block[:1] == b"\n")
        lines += block.count(b"\n") + block.count(b"\r") - crlf
        after_cr, last = block[-1:] == b"\r", block[-1:]
    while stored.read(chunk):  # what follows the last compressed stream is hashed too
        pass
    if head == UTF8_BOM and lines == 0:  # Hadoop's line reader skips a leading BOM: nothing else, no line
        return stored.digest.hexdigest(), 0
    return stored.digest.hexdigest(), lines + (last not in (b"", b"\n", b"\r"))


UTF8_BOM = b"\xef\xbb\xbf"
# Leading bytes of content that is not UTF-8 text: read as lines, every one of its "lines" would be
# quarantined as bad_encoding or bad_json and the date published empty.
_NOT_TEXT = {b"\x1f\x8b": ("gzip-compressed", "name it .gz"), b"BZh": ("bzip2-compressed", "name it .bz2"),
             b"\x28\xb5\x2f\xfd": ("zstd-compressed", "not read: recompress it as .gz"),
             b"\xff\xfe": ("UTF-16 text", "the log must be UTF-8"), b"\xfe\xff": ("UTF-16 text", "the log must be UTF-8")}


def _check_format(codec: str, head: bytes) -> None:
    """A file whose (decompressed) content opens as compressed bytes or UTF-16 is refused, naming what it is."""
    for magic, (what, remedy) in _NOT_TEXT.items():
        if head.startswith(magic):
            raise ValueError(f"its decompressed content is {what} (compressed twice?)" if codec
                             else f"its content is {what} ({remedy})")


def _unreadable(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# What a damaged file raises while it is read and decompressed: a truncated .gz (EOFError), bytes that are
# not gzip or bzip2 (BadGzipFile, an OSError; ValueError), a corrupt deflate stream (zlib.error), or a
# file the job may not read (PermissionError).
_DAMAGED = (EOFError, OSError, ValueError, zlib.error)


def _local_file(path: str) -> str | None:
    """The local file a qualified `file:` path names, or None (another scheme, or not that file)."""
    return path[len("file:"):] if path.startswith("file:/") and os.path.isfile(path[len("file:"):]) else None


def scan_files(spark, files: list[RawFile], stream_local: bool = True, storage=None) -> dict[str, FileScan]:
    """{path: FileScan} for every file, computed on the executors from the stored bytes: local files
    opened by the executors themselves (one task per file, streamed; 0.3 s instead of 3 s for 207 MB), and
    s3a:// files too when `storage` (etl.fs.S3Options: the config's S3 settings, which travel to the
    executors) is given; others (or every file when not stream_local) read through Spark's `binaryFile`
    source, which holds each file whole in memory and refuses one over 2 GB."""
    # Spark's file sources skip zero-length files: those are answered here without reading.
    empty = {f.path: FileScan(0, hashlib.sha256(b"").hexdigest(), 0) for f in files if f.size == 0}
    files = [f for f in files if f.size > 0]
    if not files:
        return empty
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField("path", T.StringType()), T.StructField("sha256", T.StringType()),
                           T.StructField("lines", T.LongType()), T.StructField("size", T.LongType()),
                           T.StructField("error", T.StringType())])
    types = ("string", "string", "int64", "int64", "string")  # pyarrow's type names, in the schema's order

    def batch_of(rows):
        import pyarrow as pa

        return pa.RecordBatch.from_arrays([pa.array([r[i] for r in rows], getattr(pa, t)()) for i, t in enumerate(types)],
                                          names=schema.names)

    def scan(batches):  # Arrow record batches: the bytes reach Python without pandas
        for batch in batches:
            rows = []
            for p, c in zip(batch.column("path").to_pylist(), batch.column("content").to_pylist()):
                try:
                    rows.append((p, *_scan_bytes(p, c), len(c), None))
                except _DAMAGED as e:
                    rows.append((p, None, None, len(c), _unreadable(e)))
            yield batch_of(rows)

    def scan_streamed(batches):  # each file opened here, local or on the object store
        for batch in batches:
            rows = []
            for p, local in zip(batch.column("path").to_pylist(), batch.column("local").to_pylist()):
                try:
                    if local is not None:
                        rows.append((p, *_scan_local(local), os.path.getsize(local), None))
                    else:
                        sha, lines, size = _scan_object(p, storage)
                        rows.append((p, sha, lines, size, None))
                except FileNotFoundError:  # gone since it was listed: reported by the driver below
                    pass
                except fs.StorageError:  # the store failed, not the file: not "damaged"
                    raise
                except _DAMAGED as e:
                    rows.append((p, None, None, None, _unreadable(e)))
            yield batch_of(rows)

    local = {f.path: _local_file(f.path) for f in files}
    streamed, whole = [], []  # opened by the executors / read whole by binaryFile
    for f in files:
        opened = stream_local and (local[f.path] or (storage is not None and fs.is_object_store(f.path)))
        (streamed if opened else whole).append(f)
    parts = []
    if streamed:
        rows = spark.sparkContext.parallelize([(f.path, local[f.path]) for f in streamed], len(streamed))
        parts.append(spark.createDataFrame(rows, "path string, local string").mapInArrow(scan_streamed, schema))
    if whole:
        parts.append(spark.read.format("binaryFile").load([glob_escape(f.path) for f in whole])
                     .select("path", "content").mapInArrow(scan, schema))
    df = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
    scanned = df.collect()
    damaged = sorted(f"{r['path']} ({r['error']})" for r in scanned if r["error"] is not None)
    if damaged:
        raise InputError(f"{len(damaged)} file(s) could not be read to the end: {'; '.join(damaged)}. Replace them "
                         "with complete copies, or move them out of the date's folder, and run the date again")
    got = {r["path"]: FileScan(r["size"], r["sha256"], r["lines"]) for r in scanned}
    # binaryFile reports paths qualified like listStatus does; else the file of that name, when only one
    # has it (dates' folders hold files of the same names: another date's scan must never stand in).
    out = dict(empty)
    for f in files:
        by_name = [v for k, v in got.items() if k.endswith("/" + f.name)]
        hit = got.get(f.path) or (by_name[0] if len(by_name) == 1 else None)
        if hit is None:
            raise InputError(f"{f.path}: listed but could not be read back (removed while the job ran?)")
        out[f.path] = hit
    return out


def fingerprint(parts: dict) -> str:
    """A stable sha256 of a JSON-able description of everything a date's output depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ImagePlan:
    """Today's items sorted by what the driver learnt from listing their folders (no bytes read)."""
    to_read: list = field(default_factory=list)  # (item_id, qualified path)
    rejected: list = field(default_factory=list)  # (item_id, reason, detail)
    listing: list = field(default_factory=list)  # (image_uri, size, mtime ms, ctime ns) of every file to read
    files_under: dict = field(default_factory=dict)  # listed folder -> files Spark lists under it (recursively)
    local: dict = field(default_factory=dict)  # qualified path -> local file path (a local images_root only)

    @property
    def mean_bytes(self) -> int:
        """Mean size of the files to read (what opening one of them costs, roughly)."""
        return sum(n for _, n, *_ in self.listing) // max(1, len(self.listing))


def plan_images(spark, items: list[tuple[str, str]], images_root: str, max_bytes: int) -> ImagePlan:
    """Resolve each (item_id, image_uri) under images_root and look up the files that hold them.

    image_path_escapes_root: the uri leaves images_root (absolute, `..`, a scheme, a symlink out);
    image_missing: no such file (or a folder); image_too_large: the file is over max_bytes (never read).
    Under a URI root (s3a://, file://) the folders that hold the images are listed by Spark in one job
    (file names, sizes and times: no bytes read), so the driver makes no per-file JVM call: a per-file
    Hadoop look-up cost ~100 s for 20,000 images. Only files that listing does not return (missing, a
    folder, an empty file) are looked up one by one to say why. Under a local root the driver stats
    each file itself (20,000 in ~0.1 s; the listing job took ~1.5 s)."""
    from etl.config import ConfigError, is_uri, under_root
    from etl.images import IMAGE_CORRUPT, IMAGE_ESCAPES_ROOT, IMAGE_MISSING, IMAGE_TOO_LARGE

    plan = ImagePlan()
    wanted: dict[str, list] = {}
    folders: dict[str, str] = {}  # parent path -> its qualified form (one JVM call per folder)
    resolved: dict[str, str] = {}  # an image_uri's folder -> that folder resolved under images_root

    def local_path(uri: str) -> str:
        # Resolving each file's whole path cost ~1.6 s of system calls for 20,000 images: the folder is
        # resolved once, and a file name that is a plain name and no symlink cannot leave its folder.
        folder, _, name = uri.rpartition("/")
        if name in ("", ".", "..") or not _PLAIN_NAME.fullmatch(name):
            return under_root(images_root, uri)
        if folder not in resolved:
            resolved[folder] = under_root(images_root, folder)
        path = f"{resolved[folder]}/{name}"
        return under_root(images_root, uri) if os.path.islink(path) else path

    for item_id, uri in items:
        try:
            if "://" in uri or uri.startswith("/"):
                raise ConfigError(uri)
            path = under_root(images_root, uri) if is_uri(images_root) else local_path(uri)
        except ConfigError:
            plan.rejected.append((item_id, IMAGE_ESCAPES_ROOT, uri[:200]))
            continue
        except (RuntimeError, OSError) as e:  # a symlink loop, a name too long, a folder it may not enter
            plan.rejected.append((item_id, IMAGE_MISSING, f"{type(e).__name__}: {uri[:200]}"))
            continue
        if is_uri(images_root) and any(part.startswith(("_", ".")) for part in uri.split("/")):
            # Hadoop's listing (binaryFile) skips such names as hidden: the file would never be read
            plan.rejected.append((item_id, IMAGE_MISSING, f"a name Spark's file listing skips: {uri[:200]}"))
            continue
        parent, name = path.rsplit("/", 1)
        if parent not in folders:
            folders[parent] = qualify(spark, parent)
        # A plain name qualifies like its folder (Hadoop would escape anything else: ask it then).
        q = f"{folders[parent]}/{name}" if _PLAIN_NAME.fullmatch(name) else qualify(spark, path)
        wanted.setdefault(q, []).append((item_id, uri))
        if not is_uri(images_root):
            plan.local[q] = path
    if is_uri(images_root):
        listed = _list_files(spark, sorted(set(folders.values())))
        listed_folders = set(folders.values())
        for q in listed:  # each file counts in every listed folder above it
            parts = q.split("/")
            for k in range(len(parts) - 1, 0, -1):
                if (above := "/".join(parts[:k])) in listed_folders:
                    plan.files_under[above] = plan.files_under.get(above, 0) + 1
    for q, entries in wanted.items():
        # (is_file, size, mtime_ms, ctime_ns) or None
        st = _local_status(plan.local[q]) if q in plan.local else (listed.get(q) or _file_status(spark, q))
        for item_id, uri in entries:
            if st is None or not st[0]:
                plan.rejected.append((item_id, IMAGE_MISSING, uri[:200]))
            elif st[1] == 0:  # Spark's binaryFile source skips empty files
                plan.rejected.append((item_id, IMAGE_CORRUPT, "empty file"))
            elif st[1] > max_bytes:
                plan.rejected.append((item_id, IMAGE_TOO_LARGE, f"{st[1]} bytes > {max_bytes}"))
            else:
                plan.to_read.append((item_id, q))
                plan.listing.append((uri, *st[1:]))
    return plan


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _list_files(spark, folders: list[str]) -> dict[str, tuple[bool, int, int, None]]:
    """{qualified path: (True, size, mtime ms, None)} of the non-empty files under the folders, listed by
    Spark (binaryFile without its content column reads no bytes; Hadoop has no change time)."""
    from pyspark.sql import functions as F

    existing = [f for f in folders if _file_status(spark, f) is not None]
    if not existing:
        return {}
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .load([glob_escape(f) for f in existing])
             .select("path", "length", F.unix_millis("modificationTime").alias("mtime")))
    with file_open_cost(spark, 1):  # no file is opened: a few tasks, not one per 32 files
        return {r["path"]: (True, int(r["length"]), int(r["mtime"]), None) for r in files.collect()}


def _local_status(path: str) -> tuple[bool, int, int, int] | None:
    """(is_file, size, mtime ms, ctime ns) of a local path, or None. Size and mtime are what Hadoop's
    local file system reports; the change time is the kernel's own and cannot be set back, so a file
    rewritten in place with its size and mtime kept (`cp -p`, a restore from backup) still reads as changed."""
    import stat

    try:
        st = os.stat(path)
    except OSError:  # gone, a name too long, a folder it may not enter: nothing it can read
        return None
    return (stat.S_ISREG(st.st_mode), st.st_size, st.st_mtime_ns // 1_000_000, st.st_ctime_ns)


def _file_status(spark, path: str) -> tuple[bool, int, int, None] | None:
    """(is_file, size, mtime ms, None) of one path through Hadoop's FileSystem, or None when it does not exist."""
    jpath, fs = hadoop_path(spark, path)
    if not fs.exists(jpath):
        return None
    st = fs.getFileStatus(jpath)
    return (not st.isDirectory(), int(st.getLen()), int(st.getModificationTime()), None)


def image_files(spark, plan: ImagePlan):
    """The planned files as `S.decode_images` reads them: (item_id, path) when every file is local, which
    the executors open themselves (one task per core, the bytes never pass through the JVM: 1.4 s less
    for 20,000 images, ~30 % of their decoding); else (item_id, content) by `read_image_files`."""
    if plan.to_read and all(q in plan.local for _, q in plan.to_read):
        return spark.createDataFrame([(i, plan.local[q]) for i, q in plan.to_read], "item_id string, path string")
    return read_image_files(spark, plan)


def read_image_files(spark, plan: ImagePlan):
    """(item_id, content) of the planned files, read by the executors (binaryFile source), in the
    read's own partitions (the planned (item_id, path) pairs are broadcast). Plan the action under
    `file_open_cost(spark, plan.mean_bytes)` so that the files pack into about one task per core.

    Each folder is loaded once (a folder inside another planned folder through the outer one: Spark
    lists recursively, so it would read those files twice): whole when the planned files are at least
    half of what it holds, else with a file-name filter (`pathGlobFilter` = the planned names; Hadoop
    matches each name against every alternative, ~0.9 s for 20,000 names). Handing Spark 20,000
    explicit paths instead costs ~100 s of driver-side path checks before any byte is read. Folders
    beyond a few dozen, and names a glob could misread, are loaded by explicit path."""
    from functools import reduce

    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    pairs = spark.createDataFrame(plan.to_read or [], T.StructType([
        T.StructField("item_id", T.StringType()), T.StructField("path", T.StringType())]))
    if not plan.to_read:
        return pairs.select("item_id", pairs["path"].cast("binary").alias("content"))
    by_folder: dict[str, list[str]] = {}
    explicit = []
    for p in sorted({p for _, p in plan.to_read}):
        folder, name = p.rsplit("/", 1)
        if _PLAIN_NAME.fullmatch(name):
            by_folder.setdefault(folder, []).append(name)
        else:
            explicit.append(p)
    if len(by_folder) > _MAX_FOLDER_LOADS:
        explicit += [f"{folder}/{name}" for folder, names in by_folder.items() for name in names]
        by_folder = {}
    outer: dict[str, list[str]] = {}  # outermost planned folder -> the planned names under it
    for folder in sorted(by_folder):  # an outer folder sorts before the folders inside it
        top = next((o for o in outer if folder.startswith(o + "/")), folder)
        outer.setdefault(top, []).extend(by_folder[folder])
    frames, whole = [], []
    # A whole folder also lists files that were not planned (rejected as too large, or not images): the
    # source skips the bytes of those over the largest planned size (its length filter is pushed down).
    largest = max(n for _, n, *_ in plan.listing)
    for folder, names in sorted(outer.items()):
        reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
        if 2 * len(names) < plan.files_under.get(folder, 2 * len(names) + 1):
            reader = reader.option("pathGlobFilter", "{" + ",".join(sorted(set(names))) + "}")
        else:
            whole.append(folder + "/")
        frames.append(reader.load(glob_escape(folder)).where(F.col("length") <= largest))
    explicit = [p for p in explicit if not p.startswith(tuple(whole))]  # a whole folder reads them already
    if explicit:
        frames.append(spark.read.format("binaryFile").load([glob_escape(p) for p in sorted(explicit)]))
    files = reduce(lambda x, y: x.unionByName(y), [f.select("path", "content") for f in frames])
    # A whole folder, or a name filter matching same-named files in sub-folders, reads files that were
    # not planned: the join keeps the planned paths only.
    return files.join(F.broadcast(pairs), on="path", how="inner").select("item_id", "content")


_MAX_FOLDER_LOADS = 32  # above this many image folders, one load of explicit paths is cheaper
