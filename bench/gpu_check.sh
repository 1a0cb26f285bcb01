#!/usr/bin/env bash
# One command for a machine with a GPU (< 10 minutes on one H100/H200-class GPU): prints a table of
#   swin_t 224 px fp16 + GradScaler training-step images/s and peak memory, gradient checkpointing off/on;
#   the same step under DDP/NCCL over every visible GPU;
#   faiss-gpu k-means 1e6 x 256 -> 1e4 and the assignment time (skipped, with a message, without faiss);
#   the training reader's JPEG decoding at 224 px on the GPU (nvjpeg) vs PIL per CPU core;
#   the trainer itself (train_fn: reader, NCCL, fp16, checkpoint and resume) on a synthetic file.
# Needs only Python with torch, torchvision, numpy, pillow and pyyaml (no Spark, MLflow or network).
# Exit status: 0 every row ran; 1 a row failed; 77 no CUDA device (said at once, nothing measured).
# Python: $COURIER_PYTHON, else the project's .venv when it exists, else python3.
# Extra arguments go to bench/gpu_check.py (e.g. --batch 32 --json out.json; --smoke: toy sizes on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${COURIER_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
cd "$ROOT"
no_gpu_msg="gpu_check: no NVIDIA GPU on this machine (no /dev/nvidia0, no nvidia-smi): nothing measured; run it on a machine with a GPU (exit 77)"
if [[ " $* " != *" --smoke "* ]] && [ ! -e /dev/nvidia0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "$no_gpu_msg"; exit 77   # at once, before the seconds a torch import takes
fi
exec "$PY" bench/gpu_check.py "$@"
