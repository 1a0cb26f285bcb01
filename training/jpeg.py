"""JPEG decoding for the training reader (training/reader.py), importable without torch.

The same functions decode in the training process (``decode_workers: 0``, a thread pool) and in the
reader's decode worker processes (``decode_workers: N``, ``serve``), so both give the same pixels.
This module imports only numpy, simplejpeg and PIL: a worker process starts in ~0.2 s, where importing
torch would take seconds and hundreds of MB per worker.

An image already at the batch's size, in the colour space stage 1 writes (YCbCr), is decoded by
libjpeg-turbo through simplejpeg, straight into a scratch array: the library and the settings PIL's
decoder uses (accurate integer DCT, fancy upsampling), hence the same pixels (tests/test_reader.py
holds the two equal), for ~42 % less CPU (no Python-side header parsing, no image objects;
bench/RESULTS.md). Anything else (another size, greyscale, CMYK, not a JPEG, a decoder error) takes
PIL's path, which resizes or raises as before.

Worker protocol (``serve``): the reader starts ``python -c`` with the project root on sys.path (a
fresh interpreter: no fork of a process that runs torch threads, and, unlike multiprocessing's
'spawn', the training script's ``__main__`` is not re-imported), two pipes and a few shared-memory
slots (memfd files, mapped by both sides), each big enough for one batch's image arrays. Requests
``(slot, shapes, tasks, px, resize)`` are pickled with ``multiprocessing.connection``; the worker
decodes the batch's images straight into the slot (zeros elsewhere) and answers each request, in
order, with ``("ok",)`` or ``("error", exception, traceback text)``. The pixels never go through a
pipe: the reader copies them out of the slot once. The worker exits at the end of its input, or when
the training process is gone.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import time
import traceback
from typing import Optional, Sequence

import numpy as np

try:
    import simplejpeg
except ImportError:  # a bare torch image without the project's install: PIL decodes everything (same pixels)
    simplejpeg = None


IMAGE_COLUMNS = ("pv_images", "click_images")  # a task's k: the batch column its image fills


class ImageError(ValueError):
    """An image of a batch that cannot be decoded: where it is (column, batch row, slot), why, and, once
    the reader has added it, the id of the sample that holds it. Pickles with its fields (a worker's
    error crosses a pipe)."""

    def __init__(self, column: str, row: int, slot: int, reason: str, sample_id: Optional[str] = None):
        where = f"sample {sample_id!r}: " if sample_id is not None else ""
        super().__init__(f"{where}{column}[{row}, {slot}] cannot be decoded: {reason}")
        self.column, self.row, self.slot, self.reason, self.sample_id = column, row, slot, reason, sample_id

    def __reduce__(self):
        return type(self), (self.column, self.row, self.slot, self.reason, self.sample_id)


def _bad_data_errors() -> tuple:
    """What PIL raises on an image it cannot decode."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, Image.DecompressionBombError


def _image_error(task: tuple, e: BaseException) -> ImageError:
    k, i, j, _ = task
    return ImageError(IMAGE_COLUMNS[k], i, j, f"{type(e).__name__}: {e}")


def decode_task(task: tuple, px: Optional[int], scratch: Optional[np.ndarray] = None) -> np.ndarray:
    """decode_one for a task (k, row, slot, jpeg bytes); an image that cannot be decoded raises ImageError
    naming its slot. (A plain try, whose except clause is evaluated only on a failure: a context manager
    here cost ~5 % of a 96 px decode.)"""
    try:
        return decode_one(task[3], px, scratch)
    except _bad_data_errors() as e:
        raise _image_error(task, e) from e


def task_image_size(task: tuple) -> tuple:
    """(width, height) of a task's image, from the header only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(task[3])) as img:
            return img.size
    except _bad_data_errors() as e:
        raise _image_error(task, e) from e


def decode_one(data: bytes, px: Optional[int], scratch: Optional[np.ndarray] = None) -> np.ndarray:
    """JPEG bytes -> (3, H, W) uint8; resized to px x px (bilinear) if px is given and differs.
    ``scratch``: a C-contiguous (S, S, 3) uint8 array; a YCbCr JPEG of exactly S x S is then decoded
    into it by simplejpeg (the result is a view of it, valid until its next use)."""
    if scratch is not None and simplejpeg is not None:
        fast = _decode_into_scratch(data, scratch)
        if fast is not None:
            return fast.transpose(2, 0, 1)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if px is not None and img.size != (px, px):
            img.draft("RGB", (px, px))  # JPEG DCT scaling: decode at >= px, cheaper than full size
        img = img.convert("RGB")
        if px is not None and img.size != (px, px):
            img = img.resize((px, px), Image.BILINEAR)
        arr = np.asarray(img)
    return arr.transpose(2, 0, 1)


def _decode_into_scratch(data: bytes, scratch: np.ndarray) -> Optional[np.ndarray]:
    """The pixels of a YCbCr JPEG of scratch's size, decoded into scratch; None for any other image."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (height, width, 3) != scratch.shape or colorspace != "YCbCr":
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=scratch)
    except ValueError:  # not a JPEG, truncated, ...: PIL's path decides (and names the error)
        return None


def decode_into(outputs: Sequence[np.ndarray], tasks: Sequence[tuple], px: int, resize: Optional[int]) -> None:
    """Decode ``tasks`` = [(k, i, j, jpeg bytes), ...] into ``outputs[k][i, j]`` (each a
    (B, L, 3, px, px) uint8 array). ``resize`` None: every image must already be px x px."""
    scratch = np.empty((px, px, 3), dtype=np.uint8)
    for task in tasks:
        k, i, j, _ = task
        arr = decode_task(task, resize, scratch)
        if arr.shape != (3, px, px):
            raise ValueError(f"image of shape {arr.shape[1:]} in a batch of {px}x{px} images: "
                             "pass image_px to resize")
        outputs[k][i, j] = arr


def batch_views(buffer, shapes: Sequence[tuple], px: int) -> list:
    """uint8 arrays (*shape, 3, px, px) laid end to end from the start of ``buffer`` (a shared slot)."""
    views, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape)) * 3 * px * px
        views.append(np.frombuffer(buffer, dtype=np.uint8, count=n, offset=offset).reshape(*shape, 3, px, px))
        offset += n
    return views


def batch_bytes(shapes: Sequence[tuple], px: int) -> int:
    return sum(int(np.prod(shape)) for shape in shapes) * 3 * px * px


def init_worker(parent_pid: int, nice: int = -1) -> None:
    """Initializer of a decode worker process: Ctrl-C is the training process's to handle (it shuts the
    pool down), and the worker exits by itself if the training process dies without shutting it down
    (killed, or a crash in native code): a watchdog thread checks the parent every half second.
    ``nice`` >= 0: the worker's niceness (raised to it, never lowered; before any thread starts, so its
    threads share it); -1 leaves what it inherited."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice >= 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="courier-jpeg-watchdog", daemon=True).start()


def serve(read_fd: int, write_fd: int, parent_pid: int, slot_fds: Sequence[int], slot_bytes: int,
          nice: int = -1) -> None:
    """A decode worker's loop (see the module docstring)."""
    import mmap
    from multiprocessing.connection import Connection

    init_worker(parent_pid, nice)
    slots = [mmap.mmap(fd, slot_bytes) for fd in slot_fds]
    requests, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    while True:
        try:
            slot, shapes, tasks, px, resize = requests.recv()
        except (EOFError, OSError):
            return  # the reader closed its end: the pool is shutting down
        try:
            if batch_bytes(shapes, px) > slot_bytes:
                raise ValueError(f"a batch of {batch_bytes(shapes, px)} bytes does not fit a {slot_bytes}-byte slot")
            outputs = batch_views(slots[slot], shapes, px)
            for out in outputs:
                out.fill(0)  # padding slots are zeros
            decode_into(outputs, tasks, px, resize)
            del outputs
            reply = ("ok",)
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            reply = ("error", e, traceback.format_exc())
        try:
            replies.send(reply)
        except (BrokenPipeError, EOFError):
            return
        except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
            replies.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}"), reply[2]))


def main(argv: Sequence[str]) -> None:
    """``read_fd write_fd parent_pid slot_bytes nice slot_fd...`` (what the reader passes)."""
    read_fd, write_fd, parent_pid, slot_bytes, nice, *slot_fds = (int(a) for a in argv)
    serve(read_fd, write_fd, parent_pid, slot_fds, slot_bytes, nice)


if __name__ == "__main__":
    main(sys.argv[1:])
