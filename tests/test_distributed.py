"""training.distributed is the one place a process learns who it is: rank(), world_size() and the gathers
must answer alike in a single process, under torch DDP (gloo, ranks started the way TorchDistributor and
torchrun start them: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) and under Horovod
(horovodrun --gloo). Under each: rank r's block of a gather sits at position rank(), the gradient that
flows back into a rank's input is the sum over ranks, and the losses' default gather and rank (no
arguments) give the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # worker processes (horovodrun runs this file as a script)
    sys.path.insert(0, str(ROOT))

from conftest import gloo_ranks_may_abort  # noqa: E402
from training import distributed as D  # noqa: E402
from training.baselines import nt_xent_loss  # noqa: E402

NPROC, ROWS = 2, 3


def views(rank: int = 0, world: int = 1):
    """Rank's share of two views of a fixed batch of 2 * ROWS images, float64."""
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(2 * ROWS, 4, generator=g, dtype=torch.float64).chunk(world)[rank] for _ in range(2))


def report(backend: str | None) -> dict:
    """What this process says about itself; every backend must give the same answers."""
    r, n = D.rank(), D.world_size()
    x = torch.full((ROWS, 2), float(r), dtype=torch.float64, requires_grad=True)
    y = D.gather_with_grad(x)
    w = torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape)
    (y * w).sum().backward()
    named = D.gather_with_grad_for(backend)(x.detach()) if backend else y.detach()
    z1, z2 = views(r, n)
    return {"backend": D.current_backend(), "rank": r, "world_size": n, "local_rank": D.local_rank(),
            "is_main": D.is_main(), "blocks": y.detach()[:, 0].tolist(), "named_blocks": named[:, 0].tolist(),
            "grad": x.grad, "w": w, "rank_sum": D.all_reduce_sum(torch.tensor([float(r)])).item(),
            "loss": D.all_reduce_sum(nt_xent_loss(z1, z2).detach())}


def check(results: list[dict], backend: str | None) -> None:
    n = len(results)
    assert sorted(res["rank"] for res in results) == list(range(n))
    want_loss = nt_xent_loss(*views())
    for res in results:
        r = res["rank"]
        assert (res["backend"], res["world_size"], res["local_rank"], res["is_main"]) == (backend, n, r, r == 0)
        assert res["blocks"] == res["named_blocks"] == [float(k) for k in range(n) for _ in range(ROWS)]
        torch.testing.assert_close(res["grad"], n * res["w"][r * ROWS:(r + 1) * ROWS])  # sum over ranks
        assert res["rank_sum"] == n * (n - 1) / 2
        torch.testing.assert_close(res["loss"], want_loss, rtol=1e-12, atol=1e-12)


def test_single_process():
    check([report(None)], None)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(NPROC))
    torch.set_num_threads(1)
    with D.joined("ddp", process_group_backend="gloo", timeout_s=4321):
        torch.save(report("ddp"), Path(out_dir) / f"rank{rank}.pt")
        # the job's collective timeout reached the group (torch's gloo default is 30 min)
        timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
        (Path(out_dir) / f"timeout{rank}.txt").write_text(str(timeout.total_seconds()))


@gloo_ranks_may_abort
def test_ddp_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=NPROC, join=True)
    check([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(NPROC)], "ddp")
    assert [float((tmp_path / f"timeout{r}.txt").read_text()) for r in range(NPROC)] == [4321.0] * NPROC


def test_horovodrun_gloo_two_processes(tmp_path):
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        if os.environ.get("COURIER_REQUIRE_HOROVOD") == "1":
            raise
        pytest.skip("horovod not installed (scripts/install_horovod.sh)")
    env = dict(os.environ, HOROVOD_GLOO_IFACE=os.environ.get("HOROVOD_GLOO_IFACE", "lo"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [str(Path(sys.executable).parent / "horovodrun"), "--gloo", "-np", str(NPROC), "-H", f"localhost:{NPROC}",
           sys.executable, str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"horovodrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    check([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(NPROC)], "horovod")


if __name__ == "__main__":  # a horovodrun worker: python tests/test_distributed.py OUT_DIR
    D.init("horovod")
    result = report("horovod")
    D.shutdown("horovod")
    torch.save(result, Path(sys.argv[1]) / f"rank{result['rank']}.pt")
