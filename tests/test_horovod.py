"""The Horovod backend: two processes give the same loss and gradients as one process on the
concatenated batch (the distributed convention of training/courier.py, through training/distributed.py).

Real Horovod (gloo controller, CPU), launched two ways:
  * ``horovodrun --gloo -np 2`` running this file as the worker script;
  * ``horovod.spark.run(fn, num_proc=2)`` on the suite's local Spark session.
Each rank runs CourierModel(ImageEncoder("tiny_cnn")) in float64 on its half of a fixed random batch with
``gather_with_grad_for("horovod")``, backpropagates ``loss * loss_scale_for_backward("horovod")`` through a
GradScaler and lets ``hvd.DistributedOptimizer`` average the gradients (``optimizer_step``); the result must
equal one process on the whole batch:
sum of the rank losses == the loss, averaged gradients == the gradients, Adam step == the step.
BatchNorm runs in eval mode (batch statistics of half a batch are not those of the whole batch; that is
what SyncBatchNorm is for, not what this test is about).

Skipped when Horovod is missing, except under scripts/test.sh (CI), which installs it
(scripts/install_horovod.sh) and sets COURIER_REQUIRE_HOROVOD=1 so that a broken install fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # worker processes (horovodrun runs this file as a script)
    sys.path.insert(0, str(ROOT))

try:
    import horovod.torch  # noqa: F401
except ImportError as exc:  # scripts/test.sh installs Horovod and sets COURIER_REQUIRE_HOROVOD=1: fail there
    if os.environ.get("COURIER_REQUIRE_HOROVOD") == "1":
        raise ImportError(f"Horovod is required here but not importable ({exc}); run scripts/install_horovod.sh") from exc
    pytest.skip(f"horovod not installed ({exc}); scripts/install_horovod.sh installs it", allow_module_level=True)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from training import distributed as D  # noqa: E402
from training.courier import CourierLossConfig, CourierModel, ImageEncoder  # noqa: E402
from training.distributed import gather_with_grad  # noqa: E402
from training.train import update  # noqa: E402

B, LP, LC, PX, DIM = 4, 5, 4, 16, 16  # global batch of 4 PVs -> 2 per rank; tiny images
NPROC = 2
LR, WD = 1e-2, 1e-2  # Adam with weight decay: a spurious optimizer step would show in the parameters
RTOL, ATOL = 1e-9, 1e-12  # float64


def make_batch(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    pv_images = torch.randn(B, LP, 3, PX, PX, generator=g, dtype=torch.float64)
    click_images = torch.randn(B, LC, 3, PX, PX, generator=g, dtype=torch.float64)
    labels = (torch.rand(B, LP, generator=g) < 0.4).long()
    pv_mask = torch.rand(B, LP, generator=g) < 0.8
    click_mask = torch.rand(B, LC, generator=g) < 0.7
    labels[:, 0], pv_mask[:, 0], click_mask[:, :2] = 1, True, True  # every PV has a target and a history
    pv_mask[1, 3:] = False  # padded PV slots on rank 0
    click_mask[3] = torch.tensor([True, False, False, False])  # rank 1: one click, so no L_ucs target
    labels[2, 4], pv_mask[2, 4] = 1, False  # a "positive" on padding is not a target
    return pv_images, labels, pv_mask, click_images, click_mask


def make_model(gather) -> CourierModel:
    torch.manual_seed(0)
    model = CourierModel(ImageEncoder("tiny_cnn", dim=DIM), CourierLossConfig(), gather=gather).double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # running statistics, identical for any split of the batch
    return model


def horovod_worker() -> dict:
    """One rank: loss share, gradients after Horovod's averaging, parameters after one Adam step."""
    D.init("horovod")
    r, n = D.rank(), D.world_size()
    model = make_model(D.gather_with_grad_for("horovod"))
    opt = D.wrap_optimizer(torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WD), model, "horovod")
    D.broadcast_parameters(model, opt)  # a fresh optimizer: must not take Horovod's state-initialising step
    per = B // n
    local = [t[r * per:(r + 1) * per] for t in make_batch()]
    # a GradScaler as in fp16 training: it must unscale the gradients only after Horovod reduced them
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    loss, comps = model(*local)
    # the trainer's own update: zero_grad (torch's signature), backward, synchronize (average over
    # ranks), unscale, Adam step
    update(loss, opt, scaler, D.loss_scale_for_backward("horovod"))
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}  # averaged, unscaled
    out = {
        "rank": r,
        "size": n,
        "loss": loss.detach(),
        "global_loss": D.all_reduce_sum(loss.detach()),
        "max_loss": D.all_reduce_max(loss.detach()),
        "n_pos_pv": D.all_reduce_sum(comps["n_pos_pv"]),
        "grads": grads,
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
    }
    D.barrier()
    del opt, model
    D.shutdown("horovod")
    return out


def single_process() -> dict:
    model = make_model(gather_with_grad)  # identity gather: no process group in the test process
    loss, comps = model(*make_batch())
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WD).step()
    return {"loss": loss.detach(), "n_pos_pv": comps["n_pos_pv"], "grads": grads,
            "params": {k: p.detach().clone() for k, p in model.named_parameters()}}


def check_against_single_process(results: list[dict]) -> None:
    ref = single_process()
    assert sorted(res["rank"] for res in results) == list(range(NPROC))
    assert all(res["size"] == NPROC for res in results)
    total = sum(res["loss"] for res in results)
    torch.testing.assert_close(total, ref["loss"], rtol=RTOL, atol=ATOL)
    max_share = max(res["loss"] for res in results)
    for res in results:
        torch.testing.assert_close(res["global_loss"], ref["loss"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(res["max_loss"], max_share, rtol=0, atol=0)
        assert int(res["n_pos_pv"]) == int(ref["n_pos_pv"])
        assert res["grads"].keys() == ref["grads"].keys()
        for k, g in ref["grads"].items():
            assert g.abs().max() > 0, f"{k}: reference gradient is zero, the comparison would be vacuous"
            torch.testing.assert_close(res["grads"][k], g, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"grad {k}: {m}")
        for k, p in ref["params"].items():
            torch.testing.assert_close(res["params"][k], p, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"param {k}: {m}")
    # the two ranks really computed different shares (the split is not degenerate)
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HOROVOD_GLOO_IFACE", "lo")  # single-host runs: talk over loopback
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 ranks on a 2-core machine
    return env


# --------------------------------------------------------------------------------------------------
def test_distributed_helpers_single_process():
    assert D.current_backend() is None
    assert (D.rank(), D.world_size(), D.loss_scale_for_backward("horovod")) == (0, 1, 1)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_sum(t), t) and torch.equal(D.all_reduce_max(t), t)
    assert D.gather_with_grad_for("ddp") is gather_with_grad
    assert D.gather_with_grad_for("horovod") is D.horovod_gather_with_grad
    with pytest.raises(ValueError, match="unknown distributed backend"):
        D.gather_with_grad_for("mpi")


def test_horovodrun_gloo_two_processes_match_one_process(tmp_path):
    horovodrun = Path(sys.executable).parent / "horovodrun"
    assert horovodrun.exists(), f"{horovodrun} missing: Horovod is importable but its launcher is not installed"
    cmd = [str(horovodrun), "--gloo", "-np", str(NPROC), "-H", f"localhost:{NPROC}",
           sys.executable, str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"horovodrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(NPROC)]
    check_against_single_process(results)


def test_horovod_spark_run_two_processes_match_one_process(spark):
    import cloudpickle
    import horovod.spark

    # Spark's Python workers cannot import this test module: ship its functions by value.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        results = horovod.spark.run(horovod_worker, num_proc=NPROC, use_gloo=True, env=worker_env(),
                                    start_timeout=120, verbose=0)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    check_against_single_process(results)


if __name__ == "__main__":  # a horovodrun worker: python tests/test_horovod.py OUT_DIR
    result = horovod_worker()
    torch.save(result, Path(sys.argv[1]) / f"rank{result['rank']}.pt")
