"""bench/gpu_check.sh: on a machine without a GPU it stops at once with a clear message and exit 77;
its --smoke mode runs every row's code (the real training step, DDP over 2 processes, FAISS k-means)
on CPU at toy sizes, so the GPU path is exercised where no GPU is available."""
from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import ROOT, gloo_ranks_may_abort


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would really run")
def test_without_a_gpu_it_exits_77_with_a_message():
    r = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 77, r.stdout + r.stderr
    assert "no NVIDIA GPU" in r.stdout or "no CUDA device" in r.stdout
    assert "nothing measured" in r.stdout


@gloo_ranks_may_abort
def test_smoke_runs_every_row_on_cpu():
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0][2:]: line for line in table[1:]}
    assert set(rows) == {"train step, grad checkpointing off", "train step, grad checkpointing on",
                         "DDP step over all devices", "faiss k-means + assignment", "JPEG decode 32 px (reader)",
                         "trainer end to end (train_fn)"}
    assert "2 process(es)" in rows["DDP step over all devices"]
    # the real training loop over 2 gloo ranks, 2 steps, then resumed from its checkpoint for one more
    assert "2 process(es), 2 steps" in rows["trainer end to end (train_fn)"]
    assert "checkpoint resumed to step 3" in rows["trainer end to end (train_fn)"]
    assert "FAILED" not in r.stdout
    # the same JPEGs decoded by torchvision (on CPU here) and by the decode workers' path: the same pixels
    decode_row = rows["JPEG decode 32 px (reader)"]
    max_diff = int(decode_row.split("pixel difference max ")[1].split(",")[0])
    assert max_diff <= 2, decode_row
    faiss_row = rows["faiss k-means + assignment"]
    assert "4,000 x 256 -> 16" in faiss_row or "skipped: faiss is not importable" in faiss_row
