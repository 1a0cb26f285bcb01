"""The training reader of stage 2: a pinned ``courier_train`` snapshot -> batches of uint8 image tensors.

Parquet row groups are read with pyarrow through ``etl.fs`` (local paths, ``file://`` and the object
store's ``s3a://`` / ``s3://`` URIs from the Delta log alike; the footers and columns it returns are what
Petastorm's ``make_batch_reader`` returned for one row group) and JPEGs decoded with PIL (in threads or
worker processes) or with torchvision on the GPU. Only numpy and
torch are imported at module level: no pyspark, mlflow, petastorm or deltalake, so this runs on bare
training workers.

Sharding and order (one epoch, for a given ``(urls, seed, epoch, rank, world_size)``)
------------------------------------------------------------------------------------
1. The row groups of the given files are listed from the Parquet footers (no data read), in a canonical
   order (sorted URLs, then row-group index), so the order in which the caller lists the files does not
   matter.
2. The row groups are permuted with a generator seeded by ``(seed, epoch)`` -- the same permutation on
   every rank -- and laid end to end as one global sequence of ``N`` rows.
3. Rank ``r`` takes the contiguous global range ``[r*(N//W) + min(r, N%W), ...)`` of ``N//W`` or
   ``N//W + 1`` rows. The ranges partition ``[0, N)``: every row of the files is read by exactly one
   rank, exactly once per epoch, whatever the number of files and row groups -- fewer row groups than
   ranks (a row group is then split between ranks), files with several row groups, uneven row groups.
   (Petastorm's own ``cur_shard``/``shard_count`` deals out whole row groups: it refuses fewer row groups
   than shards and gives ranks unequal row counts; it is used here only to select ONE row group.)
4. A rank's slices are grouped into windows of at least ``shuffle_rows`` rows; the rows of a window are
   permuted with a generator seeded by ``(seed, epoch, rank, window)`` (a bounded shuffle buffer whose
   content and order depend only on the footers), and batches are cut from the concatenated windows.
   With ``group_by="query"`` a window's permuted rows are split by query instead and each query's rows
   cut into batches (its last one short), in an order drawn from ``(seed, epoch, rank, window)``.
5. Each slice is read from its one row group of its one file, in the calling thread (the rows read are
   checked against the footer): nothing depends on thread timing. JPEGs are decoded (simplejpeg, or PIL
   for an image of another size or kind: the same function everywhere) either in this process by a
   thread pool (``decode_workers=0``) or by ``decode_workers`` worker processes (``training/jpeg.py``; a
   batch per job, pixels returned through shared memory, ``decode_workers + 1`` batches in flight);
   every image is written to its own slot of its batch's arrays, so the tensors do not depend on timing
   or on the number of threads or workers. ``decode_device`` decodes with torchvision on that device
   (nvjpeg on CUDA) instead. A background thread (``prefetch``) prepares the next batches while the
   caller trains; it, the decode threads and the decode workers run at a raised niceness
   (``BACKGROUND_NICE``), so that they take the step's idle core time only.

What the trainer needs
----------------------
* Step counts: every rank has ``N//W`` or ``N//W + 1`` rows, hence ``ceil(rows/B)`` batches; the ranks'
  batch counts differ by at most one (``batches_per_rank``), the last batch of a rank may be short. The
  number of lock-step steps of an epoch is ``steps_per_epoch(urls, W, B) = ceil(N / (W*B))``. A rank
  whose iterator is exhausted feeds ``CourierBatch.empty(...)`` (all masks 0: no loss, no targets) while
  an all-reduced "has batch" flag says another rank still has data; short batches are padded to ``B`` with
  masked rows so that ``all_gather`` sees equal shapes.
* Resume: checkpoint ``(epoch, batches consumed in that epoch)``; restart with the SAME urls (a pinned
  Delta version), seed, world_size, batch_size and shuffle_rows, and ``skip_batches=`` the batches
  consumed: the iterator then yields exactly the tail of the uninterrupted epoch. Windows that lie wholly
  in the skipped part are not read at all; skipped rows of a partly skipped window are not decoded.
  The row sequence of a rank does not depend on batch_size (only the cut into batches does); a different
  world size or shuffle_rows gives a different (still complete and disjoint) order, so resume with the
  world size the checkpoint was written with (or restart the epoch).
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import queue
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from training import jpeg

# Columns of courier_train the trainer needs (the table has more: ids, query, items ...).
COLUMNS = ("sample_id", "query", "pv_labels", "pv_mask", "pv_images", "click_mask", "click_images")
DEFAULT_SHUFFLE_ROWS = 1024

_warnings_quieted = False


def quiet_petastorm_warnings() -> None:
    """Silence the FutureWarnings/DeprecationWarnings petastorm 0.12 + pyarrow 14 print on every reader
    (legacy ParquetDataset API, ``np.unicode_`` ...). Process-wide, idempotent; called by this module's
    functions so that callers need not."""
    global _warnings_quieted
    if _warnings_quieted:
        return
    logging.getLogger("petastorm").setLevel(logging.WARNING)  # its INFO lines repeat for every row group
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(petastorm|pyarrow)(\..*)?$")
        warnings.filterwarnings("ignore", category=category, message=r".*(ParquetDataset|legacy|np\.unicode_).*")
    # petastorm's per-row-group reader leaves its file to the garbage collector (closed there).
    warnings.filterwarnings("ignore", category=ResourceWarning, module=r"petastorm(\..*)?$")
    _warnings_quieted = True


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------
@dataclass
class CourierBatch:
    """One batch of B rows. Image slots whose mask is 0 (padding, or an item without an image) are all
    zeros and their labels are 0. Fields follow ``CourierModel.forward``'s argument names."""

    sample_ids: list
    pv_images: torch.Tensor  # uint8 (B, l_pv, 3, H, W)
    pv_labels: torch.Tensor  # int64 (B, l_pv), 1 = clicked
    pv_mask: torch.Tensor  # bool (B, l_pv), True = a real item with an image
    click_images: torch.Tensor  # uint8 (B, l_click, 3, H, W), index 0 = most recent click
    click_mask: torch.Tensor  # bool (B, l_click)
    epoch: int = 0
    index: int = 0  # batch index within this rank's epoch (skipped batches counted)
    queries: list = field(default_factory=list)  # the PV's searched category (supervised baseline labels)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def model_inputs(self) -> tuple:
        """(pv_images, pv_labels, pv_mask, click_images, click_mask): ``CourierModel(*batch.model_inputs())``."""
        return self.pv_images, self.pv_labels, self.pv_mask, self.click_images, self.click_mask

    def as_dict(self) -> dict:
        return {"pv_images": self.pv_images, "pv_labels": self.pv_labels, "pv_mask": self.pv_mask,
                "click_images": self.click_images, "click_mask": self.click_mask}

    def to(self, device, non_blocking: bool = False) -> "CourierBatch":
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.as_dict().items()}
        return CourierBatch(self.sample_ids, epoch=self.epoch, index=self.index, queries=self.queries, **moved)

    def pin_memory(self) -> "CourierBatch":
        pinned = {k: v.pin_memory() for k, v in self.as_dict().items()}
        return CourierBatch(self.sample_ids, epoch=self.epoch, index=self.index, queries=self.queries, **pinned)

    @property
    def num_images(self) -> int:
        return int(self.pv_mask.sum()) + int(self.click_mask.sum())

    @classmethod
    def empty(cls, batch_size: int, l_pv: int, l_click: int, image_px: int, epoch: int = 0,
              index: int = 0) -> "CourierBatch":
        """An all-masked batch (no real item, no target): what a rank whose share is exhausted feeds
        while others still have data, and the padding rows of a short batch."""
        return cls(
            sample_ids=[],
            pv_images=torch.zeros((batch_size, l_pv, 3, image_px, image_px), dtype=torch.uint8),
            pv_labels=torch.zeros((batch_size, l_pv), dtype=torch.int64),
            pv_mask=torch.zeros((batch_size, l_pv), dtype=torch.bool),
            click_images=torch.zeros((batch_size, l_click, 3, image_px, image_px), dtype=torch.uint8),
            click_mask=torch.zeros((batch_size, l_click), dtype=torch.bool),
            epoch=epoch, index=index,
        )


# --------------------------------------------------------------------------------------------------
# Footers and the epoch plan
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowGroup:
    url: str
    index: int  # row group index within its file
    num_rows: int
    file_row_groups: int  # number of row groups in the file


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one row group."""
    row_group: RowGroup
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    """This rank's share of an epoch: windows of slices, in reading order; rows = sum of slice rows."""
    rank: int
    world_size: int
    total_rows: int
    windows: tuple  # tuple[tuple[Slice, ...], ...]
    rows: int  # rows of this rank in the epoch


def normalize_url(url: str) -> str:
    """Absolute local paths become file:// URLs; URLs (file://, s3a://, s3://) pass through."""
    url = str(url)
    if "://" in url:
        return url
    return "file://" + os.path.abspath(url)


def _canonical(urls: Sequence[str]) -> tuple:
    norm = [normalize_url(u) for u in urls]
    if len(set(norm)) != len(norm):
        dup = sorted({u for u in norm if norm.count(u) > 1})
        raise ValueError(f"the same file is listed more than once (its rows would be read twice): {dup[:3]}")
    return tuple(sorted(norm))


def _footer(url: str) -> tuple:
    """Row counts of the row groups of one Parquet file, from its footer only."""
    import pyarrow.parquet as pq

    from etl import fs

    filesystem, path = fs.filesystem(url)
    with filesystem.open_input_file(path) as fh:
        meta = pq.ParquetFile(fh).metadata
        return tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))


@lru_cache(maxsize=16)
def _row_groups(canonical_urls: tuple) -> tuple:
    # Delta data files are immutable (a new version writes new files), so caching by URL is safe.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(canonical_urls)))) as pool:
        footers = list(pool.map(_footer, canonical_urls))  # map keeps the order
    return tuple(RowGroup(u, i, n, len(rgs)) for u, rgs in zip(canonical_urls, footers)
                 for i, n in enumerate(rgs) if n > 0)


def row_groups(urls: Sequence[str]) -> list:
    """The non-empty row groups of the files, in canonical order (footers only)."""
    return list(_row_groups(_canonical(urls)))


def count_rows(urls: Sequence[str]) -> int:
    """Number of rows in the files, from the Parquet footers (no data read)."""
    return sum(rg.num_rows for rg in _row_groups(_canonical(urls)))


def _share_bounds(total: int, rank: int, world_size: int) -> tuple:
    base, extra = divmod(total, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def rows_per_rank(urls: Sequence[str], world_size: int) -> list:
    """Rows each rank reads per epoch (the same every epoch): N//W or N//W + 1, the first N%W ranks
    one more."""
    total = count_rows(urls)
    return [b - a for a, b in (_share_bounds(total, r, world_size) for r in range(world_size))]


def batches_per_rank(urls: Sequence[str], world_size: int, batch_size: int) -> list:
    """Batches each rank yields per epoch (they differ by at most one)."""
    return [math.ceil(n / batch_size) for n in rows_per_rank(urls, world_size)]


def steps_per_epoch(urls: Sequence[str], world_size: int, batch_size: int) -> int:
    """Lock-step steps of an epoch: the largest per-rank batch count = ceil(N / (W * B))."""
    return max(batches_per_rank(urls, world_size, batch_size))


def _check_args(rank: int, world_size: int, seed: int, epoch: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")


def plan_epoch(urls: Sequence[str], *, rank: int, world_size: int, seed: int, epoch: int,
               shuffle_rows: int = DEFAULT_SHUFFLE_ROWS) -> EpochPlan:
    """This rank's slices for one epoch, grouped into shuffle windows (footers only, no data read)."""
    _check_args(rank, world_size, seed, epoch)
    groups = _row_groups(_canonical(urls))
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(groups))
    total = sum(g.num_rows for g in groups)
    lo, hi = _share_bounds(total, rank, world_size)
    slices, pos = [], 0
    for i in order:
        g = groups[i]
        a, b = max(lo, pos), min(hi, pos + g.num_rows)
        if a < b:
            slices.append(Slice(g, a - pos, b - pos))
        pos += g.num_rows
        if pos >= hi:
            break
    windows, current, n = [], [], 0
    for s in slices:
        current.append(s)
        n += s.num_rows
        if n >= shuffle_rows:
            windows.append(tuple(current))
            current, n = [], 0
    if current:
        windows.append(tuple(current))
    return EpochPlan(rank, world_size, total, tuple(windows), hi - lo)


def _window_permutation(n: int, seed: int, epoch: int, rank: int, window: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1, rank, window]).permutation(n)


# --------------------------------------------------------------------------------------------------
# Reading (pyarrow, through etl.fs) and decoding (PIL)
# --------------------------------------------------------------------------------------------------
def _column_numpy(name: str, column) -> np.ndarray:
    """One Arrow column as numpy the way petastorm's batch reader gives it: a list column (fixed
    length, l_pv / l_click) is a (rows, length) matrix -- object dtype for the image bytes, so bytes are
    never truncated to a fixed width -- and a string column an object array."""
    import pyarrow as pa

    values = column.to_pandas().values
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        try:
            return np.vstack(values.tolist())
        except ValueError:
            lengths = sorted({len(v) for v in values if v is not None})
            raise RuntimeError(f"list column {name} has rows of different lengths "
                               f"{lengths[:5]}: courier_train pads to l_pv / l_click") from None
    return values


def row_widths(url: str) -> tuple[int, int] | None:
    """(l_pv, l_click) of the first row of a courier_train file, which pads every row to them; None for
    a file without rows."""
    import pyarrow.parquet as pq

    from etl import fs

    filesystem, path = fs.filesystem(url)
    with filesystem.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        group = next((g for g in range(pf.num_row_groups) if pf.metadata.row_group(g).num_rows), None)
        if group is None:
            return None
        first = pf.read_row_group(group, columns=["pv_labels", "click_mask"]).slice(0, 1).to_pylist()[0]
    return len(first["pv_labels"]), len(first["click_mask"])


def _read_slice(s: Slice, columns: Sequence[str] = COLUMNS) -> dict:
    """The ``columns`` (default: COLUMNS) of one slice as numpy arrays, read from exactly one row group of one file.

    Read with pyarrow through ``etl.fs`` (local paths, file:// and s3a:// / s3:// alike). Petastorm
    0.12.1 on pyarrow 14 reaches object stores only through fsspec's s3fs: its legacy ParquetDataset
    refuses pyarrow.fs filesystems (``validate_schema`` "not supported with the new Dataset API"), and
    this reader only ever asked it for one row group, which pyarrow reads directly."""
    import pyarrow.parquet as pq

    from etl import fs

    rg = s.row_group
    filesystem, path = fs.filesystem(rg.url)
    with filesystem.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(rg.index, columns=list(columns))
    if table.num_rows != rg.num_rows:  # a short or long read must never pass silently
        raise RuntimeError(f"read {table.num_rows} rows from row group {rg.index} of {rg.url}, "
                           f"the footer says {rg.num_rows}")
    table = table.slice(s.start, s.num_rows).combine_chunks()
    return {c: _column_numpy(c, table.column(c)) for c in columns}


def _concat(chunks: list) -> dict:
    if len(chunks) == 1:
        return chunks[0]
    return {c: np.concatenate([ch[c] for ch in chunks]) for c in COLUMNS}


def _take(cols: dict, idx) -> dict:
    return {c: v[idx] for c, v in cols.items()}


# --------------------------------------------------------------------------------------------------
# Decoding: in this process (threads), in worker processes, or with torchvision on a device (GPU)
# --------------------------------------------------------------------------------------------------
# Niceness of the reader's own background threads (the prefetch thread, which reads and decodes,
# and the decode pool's threads). On a CPU-only machine the step's intra-op threads keep every core
# busy; a decode thread at the same priority preempts one of them and the others spin-wait on it, so
# the step lost more time than the decode took (bench/RESULTS.md, tiny_cnn on 2 cores, steady state:
# 0.86-0.87 of the in-memory step at nice 0, 0.91-0.93 at 19). At 19 the reader runs in the step's idle moments,
# and whenever the step waits for its next batch the cores are idle and the reader gets them. Linux
# only (elsewhere a thread id is not a process id to setpriority); the training thread is never reniced.
BACKGROUND_NICE = 19


def raised_nice(nice: int) -> int:
    """The calling thread's niceness raised by ``nice`` (at most 19); -1 (leave it) when ``nice`` <= 0 or
    off Linux."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return -1
    try:
        return min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + nice)
    except OSError:
        return -1


def lower_this_thread(nice: int) -> None:
    """Raise the calling thread's niceness by ``nice`` (Linux; a no-op elsewhere or when refused)."""
    target = raised_nice(nice)
    if target >= 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), target)


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    ``--cpus``) when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def local_processes() -> int:
    """Training processes on this machine: torchrun's (TorchDistributor's) LOCAL_WORLD_SIZE, Horovod's
    HOROVOD_LOCAL_SIZE, else 1."""
    for key in ("LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def resolve_decode_workers(setting, *, device_type: str = "cpu", step_threads: Optional[int] = None,
                           cores: Optional[int] = None, processes: Optional[int] = None) -> int:
    """The number of decode worker processes for ``train.decode_workers``: an integer >= 0 as given;
    ``"auto"`` = this process's share of the cores (``available_cores() // local_processes()``) minus
    the cores the step keeps busy (1 on CUDA: the Python loop; torch's intra-op threads on CPU), or 0
    (decode in this process, with decode_threads threads) when no core is left: workers would then
    only compete with the step for the same cores (bench/RESULTS.md measures both on 2 cores)."""
    if setting == "auto":
        cores = available_cores() if cores is None else cores
        processes = local_processes() if processes is None else processes
        share = max(1, cores // max(1, processes))
        if device_type == "cuda":
            step = 1
        else:
            step = torch.get_num_threads() if step_threads is None else step_threads
        return max(0, share - step)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"decode_workers must be 'auto' or an integer >= 0, got {setting!r}")
    return setting


@lru_cache(maxsize=8)
def gpu_decode_supported(device: str) -> bool:
    """Whether torchvision.io.decode_jpeg decodes on ``device`` (a CUDA device): tried once on a tiny
    JPEG (a torchvision built without nvjpeg, or no CUDA, says no)."""
    try:
        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            return False
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([data], mode=ImageReadMode.RGB, device=dev)[0]
        return tuple(out.shape) == (3, 16, 16) and out.device.type == "cuda"
    except Exception:  # noqa: BLE001 - any failure means "decode on the CPU"
        return False


def resolve_gpu_decode(setting, device) -> bool:
    """``train.gpu_decode``: ``"auto"`` = True when training on CUDA and torchvision decodes JPEGs there;
    ``True`` requires both (an error otherwise); ``False`` = decode on the CPU."""
    device = torch.device(device)
    if setting == "auto":
        return device.type == "cuda" and gpu_decode_supported(str(device))
    if setting is True:
        if device.type != "cuda" or not gpu_decode_supported(str(device)):
            raise RuntimeError(f"train.gpu_decode is true but torchvision.io.decode_jpeg cannot decode on "
                               f"{device} (needs CUDA and a torchvision built with nvjpeg); use auto or false")
        return True
    if setting is False:
        return False
    raise ValueError(f"gpu_decode must be 'auto', true or false, got {setting!r}")


def _decode_jobs(cols: dict, image_px: Optional[int]) -> tuple:
    """(pv_mask, click_mask, tasks, px) of one batch: tasks = [(0 for pv / 1 for click, row, slot,
    jpeg bytes)] for every slot whose mask is 1; px = image_px, else the first image's (square) size."""
    pv_mask = np.asarray(cols["pv_mask"]) != 0
    click_mask = np.asarray(cols["click_mask"]) != 0
    tasks = []
    for k, (name, mask) in enumerate((("pv_images", pv_mask), ("click_images", click_mask))):
        images = cols[name]
        b, s = np.nonzero(mask)
        for i, j in zip(b.tolist(), s.tolist()):
            data = images[i, j]
            if not data:
                raise jpeg.ImageError(name, i, j, "mask 1 but no image bytes")
            tasks.append((k, i, j, data))
    px = image_px
    if px is None:
        if not tasks:
            raise ValueError("a batch without any image: pass image_px to size the tensors")
        w, h = jpeg.task_image_size(tasks[0])
        if w != h:
            raise ValueError(f"images must be square, got {w}x{h}: pass image_px to resize")
        px = w
    return pv_mask, click_mask, tasks, px


class _Decoder:
    """Decodes in this process with a thread pool; each thread writes disjoint slots of preallocated
    arrays, so the output does not depend on thread timing. Decoders share one interface:
    ``submit(cols)`` returns a function that gives (pv_images, click_images, pv_mask, click_mask);
    ``ahead`` = batches worth submitting before the first result is needed; ``close()``."""

    ahead = 0  # decoding happens inside submit: nothing to gain from submitting ahead

    def __init__(self, threads: int, image_px: Optional[int], nice: int = 0):
        self.threads = max(1, int(threads))
        self.px = image_px
        self.pool = (ThreadPoolExecutor(self.threads, thread_name_prefix="jpeg", initializer=lower_this_thread,
                                        initargs=(nice,)) if self.threads > 1 else None)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def submit(self, cols: dict):
        pv_mask, click_mask, tasks, px = _decode_jobs(cols, self.px)
        outputs = [np.zeros((*m.shape, 3, px, px), dtype=np.uint8) for m in (pv_mask, click_mask)]
        if self.pool is None or len(tasks) < 2 * self.threads:
            jpeg.decode_into(outputs, tasks, px, self.px)
        else:
            step = math.ceil(len(tasks) / self.threads)
            for f in [self.pool.submit(jpeg.decode_into, outputs, tasks[k:k + step], px, self.px)
                      for k in range(0, len(tasks), step)]:
                f.result()
        pv, click = (torch.from_numpy(o) for o in outputs)
        return lambda: (pv, click, pv_mask, click_mask)


class _Worker:
    """One decode worker process (``training.jpeg.serve``) and the two threads of the training process
    that talk to it: the sender takes the next job from the pool's shared queue and writes it to the
    worker's pipe (blocking while the worker is busy, so a worker holds at most one job beyond the one it
    decodes), the receiver reads the replies, in order, into the jobs' futures. Separate threads for the
    two directions, so a reply and the next request never wait on each other."""

    _CODE = ("import sys; sys.path.insert(0, sys.argv[1]); from training.jpeg import main; "
             "main(sys.argv[2:])")

    def __init__(self, jobs: queue.Queue, slot_fds: Sequence[int], slot_bytes: int, nice: int = -1):
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        self.jobs = jobs
        self.pending: collections.deque = collections.deque()  # futures sent to the worker, in order
        self.lock = threading.Lock()
        self.decoded = 0  # batches decoded by this worker
        self.dead = False  # the worker's replies ended: it exited (or closed its pipe)
        root = os.path.dirname(os.path.dirname(os.path.abspath(jpeg.__file__)))
        # numpy in the worker needs no BLAS/OpenMP threads of its own
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            args = [req_r, rep_w, os.getpid(), slot_bytes, nice, *slot_fds]
            self.proc = subprocess.Popen([sys.executable, "-c", self._CODE, root, *map(str, args)],
                                         pass_fds=(req_r, rep_w, *slot_fds), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            os.close(req_w)
            os.close(rep_r)
            raise
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.pid = self.proc.pid
        self.requests = Connection(req_w, readable=False)
        self.replies = Connection(rep_r, writable=False)
        self.sender = threading.Thread(target=self._send, name=f"jpeg-send-{self.pid}", daemon=True)
        self.receiver = threading.Thread(target=self._receive, name=f"jpeg-recv-{self.pid}", daemon=True)
        self.sender.start()
        self.receiver.start()

    def _send(self):
        while True:
            item = self.jobs.get()
            if item is None:
                break
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue
            with self.lock:
                dead = self.dead
                if not dead:
                    self.pending.append(future)
            if dead:  # the worker is gone: fail the jobs this thread takes, never leave one pending
                future.set_exception(self._gone())
                continue
            try:
                self.requests.send(job)
            except (OSError, ValueError):
                pass  # the worker just died: the receiver fails what is pending
        self.requests.close()  # end of input: the worker exits after its last reply

    def _receive(self):
        try:
            while True:
                reply = self.replies.recv()
                with self.lock:
                    future = self.pending.popleft()
                if reply[0] == "ok":
                    self.decoded += 1
                    future.set_result(self.pid)
                else:
                    err = reply[1]
                    err.add_note(f"(in JPEG decode worker pid {self.pid})\n{reply[2]}")
                    future.set_exception(err)
        except (EOFError, OSError):
            pass
        finally:
            self.replies.close()
            with self.lock:
                self.dead = True
                left, self.pending = list(self.pending), collections.deque()
            for future in left:
                if not future.done():
                    future.set_exception(self._gone())

    def _gone(self) -> RuntimeError:
        try:
            code = self.proc.wait(timeout=1.0)
        except Exception:  # noqa: BLE001 - still running (its pipe closed): say so
            code = None
        return RuntimeError(f"JPEG decode worker pid {self.pid} exited (exit status {code}) before decoding "
                            "a batch")

    def stop(self, timeout: float = 10.0):
        """After the pool's sentinel reached the sender: wait for the worker to end, kill it if it does not."""
        import subprocess

        self.sender.join(timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.receiver.join(timeout)


class _WorkerPool:
    """``workers`` decode worker processes fed from one queue of jobs, sharing ``slots`` shared-memory
    slots of ``slot_bytes`` each (memfd files: RAM, not bound by the size of /dev/shm). ``submit(job)``
    returns a concurrent.futures.Future (its result: the pid that decoded the job). ``close()`` cancels
    the jobs not yet sent, lets every worker finish the one it holds, and waits for the processes to
    exit (killing one that does not)."""

    def __init__(self, workers: int, slots: int, slot_bytes: int, nice: int = -1):
        import mmap
        import tempfile

        self.jobs: queue.Queue = queue.Queue()
        self.workers: list = []
        self.slot_bytes = slot_bytes
        self.files, self.buffers = [], []
        try:
            for k in range(slots):
                if hasattr(os, "memfd_create"):
                    fd = os.memfd_create(f"courier-jpeg-{k}")
                    self.files.append(fd)
                else:  # not Linux: an unlinked temporary file (page cache) does the same
                    fh = tempfile.TemporaryFile()
                    self.files.append(fh)
                    fd = fh.fileno()
                os.ftruncate(fd, slot_bytes)
                self.buffers.append(mmap.mmap(fd, slot_bytes))
            fds = [f if isinstance(f, int) else f.fileno() for f in self.files]
            for _ in range(workers):
                self.workers.append(_Worker(self.jobs, fds, slot_bytes, nice))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list:
        return [w.pid for w in self.workers]

    def submit(self, job: tuple) -> Future:
        future: Future = Future()
        self.jobs.put((future, job))
        return future

    def close(self):
        while True:
            try:
                item = self.jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self.workers:
            self.jobs.put(None)
        for w in self.workers:
            w.stop()
        for b in self.buffers:
            try:
                b.close()
            except BufferError:
                pass  # a view of it is still alive somewhere: the mapping goes with it
        for f in self.files:
            os.close(f) if isinstance(f, int) else f.close()
        self.buffers, self.files = [], []


class _ProcessDecoder:
    """Decodes in ``workers`` worker processes (``_WorkerPool``; each imports only numpy, PIL and
    training.jpeg). A batch is one job: the training process sends the JPEG bytes of its real slots;
    the worker decodes them into a shared-memory slot, from which the training process copies the two
    uint8 arrays once (its own work per image: ~one memcpy). ``ahead`` = workers + 1 batches are in
    flight, so every worker has its next batch queued while the training step runs. The same
    ``jpeg.decode_into`` as in process: the same pixels. The pool starts with the first batch; its slots
    hold ``max_rows`` PVs (the batch size: a batch grouped by query may be shorter than a later one) and
    it is shut down by ``close()`` (end of the epoch, an error, or the iterator closed or dropped); a
    worker also exits by itself if the training process dies."""

    def __init__(self, workers: int, image_px: Optional[int], max_rows: int = 0, nice: int = -1):
        self.workers = workers
        self.nice = nice
        self.px = image_px
        self.max_rows = max_rows
        self.ahead = workers + 1
        self.pool: Optional[_WorkerPool] = None
        self.free: queue.Queue = queue.Queue()

    def close(self):
        if self.pool is not None:
            self.pool.close()

    def submit(self, cols: dict):
        pv_mask, click_mask, tasks, px = _decode_jobs(cols, self.px)
        shapes = (pv_mask.shape, click_mask.shape)
        if self.pool is None:
            slots = self.ahead + 1  # at most ahead + 1 batches are submitted and not yet copied out
            rows = max(self.max_rows, pv_mask.shape[0])
            largest = ((rows, *pv_mask.shape[1:]), (rows, *click_mask.shape[1:]))
            self.pool = _WorkerPool(self.workers, slots, jpeg.batch_bytes(largest, px), self.nice)
            for k in range(slots):
                self.free.put(k)
        if jpeg.batch_bytes(shapes, px) > self.pool.slot_bytes:
            raise ValueError(f"a batch of {pv_mask.shape[0]} PVs at {px} px is larger than the decode slots "
                             f"({self.pool.slot_bytes} bytes, sized for {max(self.max_rows, 1)} PVs)")
        slot = self.free.get()
        future = self.pool.submit((slot, shapes, tasks, px, self.px))

        def result():
            try:
                future.result()
                pv, click = (v.copy() for v in jpeg.batch_views(self.pool.buffers[slot], shapes, px))
            finally:
                self.free.put(slot)
            return torch.from_numpy(pv), torch.from_numpy(click), pv_mask, click_mask

        return result


class _TensorDecoder:
    """Decodes with ``torchvision.io.decode_jpeg`` on ``device`` (on CUDA: nvjpeg, batched, the images
    land in GPU memory); the image tensors of the batch are on ``device``. An image whose size differs
    from image_px is decoded and resized by PIL on the CPU, as the CPU paths do. nvjpeg's pixels are
    libjpeg-turbo's with fast chroma upsampling (0.37 of a level from PIL's on average, up to ~100 at
    sharp colour edges: bench/RESULTS.md); on the CPU, torchvision's libjpeg-turbo gives PIL's pixels.

    On CUDA the decoding runs with a CUDA stream of the reader's own as the current stream. torchvision
    decodes on a stream of its own and then makes the caller's current stream wait for it (an event).
    On the default stream, that wait would land on the stream the training step runs on: every step
    queued after a decode would wait for it, and the GPU would take decode and step in turns."""

    ahead = 0

    def __init__(self, device, image_px: Optional[int]):
        self.device = torch.device(device)
        self.px = image_px
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def close(self):
        pass

    def submit(self, cols: dict):
        if self.stream is None:
            return self._decode(cols)
        # The prefetch thread starts on GPU 0: without the device made current here, leaving the
        # stream block would switch this thread to GPU 0 and open a context there for every rank.
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            decoded = self._decode(cols)
        self.stream.synchronize()  # decoded before another thread uses the tensors
        pv, click, _, _ = decoded()
        consumer = torch.cuda.default_stream(self.device)  # the training step's stream
        for t in (pv, click):
            # allocated on the reader's stream: their memory is not reused before the step's use is done
            t.record_stream(consumer)
        return decoded

    def _decode(self, cols: dict):
        from torchvision.io import ImageReadMode, decode_jpeg

        pv_mask, click_mask, tasks, px = _decode_jobs(cols, self.px)
        outputs = [torch.zeros((*m.shape, 3, px, px), dtype=torch.uint8, device=self.device)
                   for m in (pv_mask, click_mask)]
        if tasks:
            data = [torch.frombuffer(bytearray(t[3]), dtype=torch.uint8) for t in tasks]
            try:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                for task in tasks:  # the batched decoder names no image: find it as the CPU path does
                    jpeg.decode_task(task, None)
                raise
            for k, out in enumerate(outputs):
                sel = [n for n, t in enumerate(tasks) if t[0] == k]
                if not sel:
                    continue
                imgs = []
                for n in sel:
                    img = images[n]
                    if tuple(img.shape) != (3, px, px):
                        if self.px is None:
                            raise ValueError(f"image of shape {tuple(img.shape[1:])} in a batch of {px}x{px} "
                                             "images: pass image_px to resize")
                        img = torch.from_numpy(jpeg.decode_one(tasks[n][3], self.px)).to(self.device)
                    imgs.append(img)
                rows = torch.tensor([tasks[n][1] for n in sel], device=self.device)
                slots = torch.tensor([tasks[n][2] for n in sel], device=self.device)
                out[rows, slots] = torch.stack(imgs)
        pv, click = outputs
        return lambda: (pv, click, pv_mask, click_mask)


def _make_decoder(decode_workers: int, decode_threads: int, decode_device, image_px: Optional[int],
                  max_rows: int = 0, nice: int = 0, worker_nice: int = -1):
    if decode_device is not None:
        return _TensorDecoder(decode_device, image_px)
    if decode_workers > 0:
        return _ProcessDecoder(decode_workers, image_px, max_rows, worker_nice)
    return _Decoder(decode_threads, image_px, nice)


@contextlib.contextmanager
def _naming_the_sample(cols: dict):
    """An image of the batch `cols` that cannot be decoded: its error names the sample that holds it
    (courier_train's sample_id), not only its row of the batch."""
    try:
        yield
    except jpeg.ImageError as e:
        if e.sample_id is not None:
            raise
        raise jpeg.ImageError(e.column, e.row, e.slot, e.reason, str(cols["sample_id"][e.row])) from e


def _to_batch(cols: dict, decoded: tuple, epoch: int, index: int) -> CourierBatch:
    pv, click, pv_mask, click_mask = decoded
    labels = np.asarray(cols["pv_labels"]).astype(np.int64) * pv_mask
    return CourierBatch(
        sample_ids=[str(x) for x in cols["sample_id"]],
        queries=[None if x is None else str(x) for x in cols["query"]],
        pv_images=pv,
        pv_labels=torch.from_numpy(labels),
        pv_mask=torch.from_numpy(pv_mask),
        click_images=click,
        click_mask=torch.from_numpy(click_mask),
        epoch=epoch, index=index,
    )


# --------------------------------------------------------------------------------------------------
# The epoch iterator
# --------------------------------------------------------------------------------------------------
def _raw_batches(plan: EpochPlan, batch_size: int, seed: int, epoch: int, skip_rows: int):
    """(undecoded columns of one batch) in order, starting after skip_rows rows of the rank's sequence."""
    pending, pending_n, pos = [], 0, 0
    for w, window in enumerate(plan.windows):
        n = sum(s.num_rows for s in window)
        if pos + n <= skip_rows:  # wholly skipped: not even read
            pos += n
            continue
        cols = _concat([_read_slice(s) for s in window])
        perm = _window_permutation(n, seed, epoch, plan.rank, w)
        start = max(0, skip_rows - pos)
        pos += n
        cols = _take(cols, perm[start:])  # skipped rows are dropped before decoding
        k = 0
        while k < n - start:
            take = min(batch_size - pending_n, n - start - k)
            pending.append(_take(cols, slice(k, k + take)))
            pending_n += take
            k += take
            if pending_n == batch_size:
                yield _concat(pending)
                pending, pending_n = [], 0
    if pending_n:
        yield _concat(pending)


def group_cuts(groups: np.ndarray, perm: np.ndarray, batch_size: int, order_rng) -> list:
    """One window's batches when every batch holds a single group (e.g. one query): the window's rows
    in their shuffled order ``perm``, split by group, each group cut into batches of at most batch_size
    (a group's last batch is short), the batches in an order drawn from ``order_rng``. Every row of the
    window is in exactly one batch. Returns a list of row-index arrays into the window."""
    keys = np.asarray(["\0" if g is None else str(g) for g in groups], dtype=object)[perm]
    _, code = np.unique(keys, return_inverse=True)
    by_group = np.argsort(code, kind="stable")  # group after group, the shuffled order kept inside
    bounds = np.flatnonzero(np.diff(code[by_group])) + 1
    cuts = [perm[rows[k:k + batch_size]] for rows in np.split(by_group, bounds) for k in range(0, len(rows), batch_size)]
    return [cuts[i] for i in order_rng.permutation(len(cuts))]


def _grouped_batches(plan: EpochPlan, batch_size: int, seed: int, epoch: int, skip_batches: int, group_by: str):
    """(undecoded columns of one batch) in order when every batch holds one ``group_by`` value (see
    ``group_cuts``); batches never span windows. Skipping counts batches: a wholly skipped window reads
    only its group column, to know how many batches it holds."""
    done = 0
    for w, window in enumerate(plan.windows):
        n = sum(s.num_rows for s in window)
        perm = _window_permutation(n, seed, epoch, plan.rank, w)
        order_rng = np.random.default_rng([seed, epoch, 2, plan.rank, w])
        if done < skip_batches:
            groups = np.concatenate([_read_slice(s, (group_by,))[group_by] for s in window])
            cuts = group_cuts(groups, perm, batch_size, order_rng)
            if done + len(cuts) <= skip_batches:
                done += len(cuts)
                continue
            cols = _concat([_read_slice(s) for s in window])
        else:
            cols = _concat([_read_slice(s) for s in window])
            cuts = group_cuts(cols[group_by], perm, batch_size, order_rng)
        for idx in cuts[max(0, skip_batches - done):]:
            yield _take(cols, idx)
        done += len(cuts)


def _closing(gen):
    try:
        yield from gen
    finally:
        gen.close()  # runs the generator's cleanup (thread pools) in this thread, also on early stop


def _prefetched(gen: Iterator, depth: int, nice: int = 0) -> Iterator:
    """Runs ``gen`` in one background thread (niceness raised by ``nice``), ``depth`` items ahead; order
    preserved, errors re-raised."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        lower_this_thread(nice)
        try:
            for item in _closing(gen):
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((done, e))

    t = threading.Thread(target=produce, name="courier-reader", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.1)


def iterate_batches(urls: Sequence[str], *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                    skip_batches: int = 0, decode_threads: int = 2, image_px: Optional[int] = None,
                    shuffle_rows: int = DEFAULT_SHUFFLE_ROWS, prefetch: int = 2, decode_workers=0,
                    decode_device=None, group_by: Optional[str] = None,
                    background_nice: int = BACKGROUND_NICE) -> Iterator[CourierBatch]:
    """One epoch of this rank's disjoint share of the rows of ``urls`` as CourierBatches (see the module
    docstring for the sharding and order). Deterministic for (urls as a set, seed, epoch, rank,
    world_size, batch_size, shuffle_rows, group_by); ``skip_batches=k`` yields exactly batches k, k+1, ... of that
    sequence without reading wholly skipped windows or decoding skipped rows (skipping past the end
    yields nothing). The last batch may have fewer than batch_size rows; a rank may have no rows at all
    when there are fewer rows than ranks. ``image_px``: resize every image to image_px x image_px (else all images
    must share one square size). ``prefetch``: batches prepared ahead in a background thread (0: none).
    ``group_by``: a column (``query``) whose value every row of a batch shares -- in-batch negatives from
    one query (the simulated log's query is the category) -- at the price of one short batch per group
    and shuffle window; the rows and their sharding are unchanged.

    Decoding: ``decode_workers=0`` decodes in this process with ``decode_threads`` threads;
    ``decode_workers=N`` (or ``"auto"``, see ``resolve_decode_workers``) in N worker processes, N + 1
    batches ahead, started with the iterator and shut down when it ends, fails or is closed (close
    it, or let it go out of scope, when stopping early); the batches are the same tensors either way.
    ``decode_device`` (e.g. ``"cuda:0"``): decode with torchvision on that device instead (the image
    tensors are then on it; workers and threads unused). ``background_nice``: the niceness added to the
    prefetch and decode threads and the decode workers (``BACKGROUND_NICE``; 0 = the training thread's
    priority).
    """
    if batch_size < 1 or skip_batches < 0:
        raise ValueError(f"need batch_size >= 1 and skip_batches >= 0, got {batch_size}, {skip_batches}")
    if group_by is not None and group_by not in COLUMNS:
        raise ValueError(f"group_by must be one of the columns read {COLUMNS}, got {group_by!r}")
    workers = resolve_decode_workers(decode_workers)
    quiet_petastorm_warnings()
    plan = plan_epoch(urls, rank=rank, world_size=world_size, seed=seed, epoch=epoch, shuffle_rows=shuffle_rows)
    raw = (_raw_batches(plan, batch_size, seed, epoch, skip_batches * batch_size) if group_by is None
           else _grouped_batches(plan, batch_size, seed, epoch, skip_batches, group_by))

    # The workers are the reader too: they run at the niceness of its threads, the training thread's plus
    # background_nice, whichever thread starts them (a child inherits its starting thread's niceness).
    worker_nice = raised_nice(background_nice)

    def decoded():
        decoder = _make_decoder(workers, decode_threads, decode_device, image_px, batch_size, background_nice,
                                worker_nice)
        pending: collections.deque = collections.deque()
        try:
            for k, cols in enumerate(raw):
                with _naming_the_sample(cols):
                    pending.append((cols, decoder.submit(cols), skip_batches + k))
                if len(pending) > decoder.ahead:
                    cols, result, index = pending.popleft()
                    with _naming_the_sample(cols):
                        images = result()
                    yield _to_batch(cols, images, epoch, index)
            while pending:
                cols, result, index = pending.popleft()
                with _naming_the_sample(cols):
                    images = result()
                yield _to_batch(cols, images, epoch, index)
        finally:
            pending.clear()
            decoder.close()

    if prefetch > 0:
        yield from _prefetched(decoded(), prefetch, background_nice)
    else:
        yield from decoded()
