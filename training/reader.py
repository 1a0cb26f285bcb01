"""The training reader of stage 2: a pinned ``courier_train`` snapshot -> batches of uint8 image tensors.

Parquet row groups are read with pyarrow through ``etl.fs`` (local paths, ``file://`` and the object
store's ``s3a://`` / ``s3://`` URIs from the Delta log alike; the footers and columns it returns are what
Petastorm's ``make_batch_reader`` returned for one row group) and JPEGs decoded with PIL. Only numpy and
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
5. Each slice is read from its one row group of its one file, in the calling thread (the rows read
   are checked against the footer): nothing depends on thread timing. JPEG decoding runs in a thread pool whose workers write into disjoint slots of
   preallocated arrays (PIL releases the GIL while decoding), so the result does not depend on timing
   either. A background thread (``prefetch``) prepares the next batches while the caller trains.

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

import io
import logging
import math
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

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


def _decode_one(data: bytes, px: Optional[int]) -> np.ndarray:
    """JPEG bytes -> (3, H, W) uint8; resized to px x px (bilinear) if px is given and differs."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if px is not None and img.size != (px, px):
            img.draft("RGB", (px, px))  # JPEG DCT scaling: decode at >= px, cheaper than full size
        img = img.convert("RGB")
        if px is not None and img.size != (px, px):
            img = img.resize((px, px), Image.BILINEAR)
        arr = np.asarray(img)
    return arr.transpose(2, 0, 1)


def _image_size(data: bytes) -> tuple:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:  # header only
        return img.size


class _Decoder:
    """Decodes the image columns of a batch into preallocated uint8 arrays with a thread pool; each
    worker writes disjoint slots, so the output does not depend on thread timing."""

    def __init__(self, threads: int, image_px: Optional[int]):
        self.threads = max(1, int(threads))
        self.px = image_px
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jpeg") if self.threads > 1 else None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _jobs(self, images: np.ndarray, mask: np.ndarray, name: str) -> list:
        b, s = np.nonzero(mask)
        jobs = []
        for i, j in zip(b.tolist(), s.tolist()):
            data = images[i, j]
            if not data:
                raise ValueError(f"{name}[{i}, {j}] has mask 1 but no image bytes")
            jobs.append((i, j, data))
        return jobs

    def decode(self, cols: dict) -> tuple:
        pv_mask = np.asarray(cols["pv_mask"]) != 0
        click_mask = np.asarray(cols["click_mask"]) != 0
        pv_jobs = self._jobs(cols["pv_images"], pv_mask, "pv_images")
        click_jobs = self._jobs(cols["click_images"], click_mask, "click_images")
        px = self.px
        if px is None:
            first = (pv_jobs or click_jobs)
            if not first:
                raise ValueError("a batch without any image: pass image_px to size the tensors")
            w, h = _image_size(first[0][2])
            if w != h:
                raise ValueError(f"images must be square, got {w}x{h}: pass image_px to resize")
            px = w
        B = len(pv_mask)
        pv = np.zeros((B, pv_mask.shape[1], 3, px, px), dtype=np.uint8)
        click = np.zeros((B, click_mask.shape[1], 3, px, px), dtype=np.uint8)
        tasks = [(pv, i, j, d) for i, j, d in pv_jobs] + [(click, i, j, d) for i, j, d in click_jobs]
        resize = self.px  # None: every image must already be px x px (checked below)

        def run(chunk):
            for out, i, j, d in chunk:
                arr = _decode_one(d, resize)
                if arr.shape != (3, px, px):
                    raise ValueError(f"image of shape {arr.shape[1:]} in a batch of {px}x{px} images: "
                                     "pass image_px to resize")
                out[i, j] = arr

        if self.pool is None or len(tasks) < 2 * self.threads:
            run(tasks)
        else:
            step = math.ceil(len(tasks) / self.threads)
            for f in [self.pool.submit(run, tasks[k:k + step]) for k in range(0, len(tasks), step)]:
                f.result()
        return pv, click, pv_mask, click_mask


def _to_batch(cols: dict, decoder: _Decoder, epoch: int, index: int) -> CourierBatch:
    pv, click, pv_mask, click_mask = decoder.decode(cols)
    labels = np.asarray(cols["pv_labels"]).astype(np.int64) * pv_mask
    return CourierBatch(
        sample_ids=[str(x) for x in cols["sample_id"]],
        queries=[None if x is None else str(x) for x in cols["query"]],
        pv_images=torch.from_numpy(pv),
        pv_labels=torch.from_numpy(labels),
        pv_mask=torch.from_numpy(pv_mask),
        click_images=torch.from_numpy(click),
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


def _prefetched(gen: Iterator, depth: int) -> Iterator:
    """Runs ``gen`` in one background thread, ``depth`` items ahead; order preserved, errors re-raised."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
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
                    shuffle_rows: int = DEFAULT_SHUFFLE_ROWS, prefetch: int = 2,
                    group_by: Optional[str] = None) -> Iterator[CourierBatch]:
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
    """
    if batch_size < 1 or skip_batches < 0:
        raise ValueError(f"need batch_size >= 1 and skip_batches >= 0, got {batch_size}, {skip_batches}")
    if group_by is not None and group_by not in COLUMNS:
        raise ValueError(f"group_by must be one of the columns read {COLUMNS}, got {group_by!r}")
    quiet_petastorm_warnings()
    plan = plan_epoch(urls, rank=rank, world_size=world_size, seed=seed, epoch=epoch, shuffle_rows=shuffle_rows)
    raw = (_raw_batches(plan, batch_size, seed, epoch, skip_batches * batch_size) if group_by is None
           else _grouped_batches(plan, batch_size, seed, epoch, skip_batches, group_by))

    def decoded():
        decoder = _Decoder(decode_threads, image_px)
        try:
            for k, cols in enumerate(raw):
                yield _to_batch(cols, decoder, epoch, skip_batches + k)
        finally:
            decoder.close()

    if prefetch > 0:
        yield from _prefetched(decoded(), prefetch)
    else:
        yield from decoded()
