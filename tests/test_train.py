"""Stage 2 as users run it: spark-submit jobs/train_courier.py on the tiny preset (TorchDistributor,
2 gloo processes, Petastorm reader, MLflow), kill-and-resume, and DDP == one process."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, gloo_ranks_may_abort, write_config

# keep_checkpoints 0: the kill-and-resume test waits for step 6's file, which a pruned run may already have removed
TRAIN_SETTINGS = {"batch_size": 16, "num_workers": 2, "epochs": 6, "lr": 1e-3, "checkpoint_every": 2,
                  "log_every": 4, "decode_threads": 1, "keep_checkpoints": 0}


def _env():
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1"}


def _submit(conf, job, *args, check=True, **popen):
    from etl.spark import LOG4J_OPTION

    cmd = [os.path.join(os.path.dirname(sys.executable), "spark-submit"), "--master", "local[2]",
           "--driver-java-options", LOG4J_OPTION,
           f"jobs/{job}.py", "--conf", str(conf), *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), start_new_session=True, **popen)
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, f"{job} failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    conf = write_config(tmp, {"samples": {"image_px": 32}, "train": TRAIN_SETTINGS})
    subprocess.run([sys.executable, "jobs/simulate_search_log.py", "--conf", str(conf), "--preset", "tiny"],
                   cwd=ROOT, env=_env(), check=True, capture_output=True)
    _submit(conf, "build_samples", "--date", "2026-11-20", "--end-date", "2026-11-22")
    out = _submit(conf, "train_courier", "--run-name", "full")
    return conf, out.stdout


def _checkpoints(conf, name):
    from etl.config import load_config

    return os.path.join(load_config(conf).checkpoints_root, name)


def test_training_lowers_the_loss_and_beats_the_untrained_encoder(trained):
    conf, out = trained
    rows = [json.loads(line) for line in open(os.path.join(_checkpoints(conf, "full"), "metrics.jsonl"))]
    steps_per_epoch = len(rows) // TRAIN_SETTINGS["epochs"]
    first = sum(r["loss"] for r in rows[:steps_per_epoch]) / steps_per_epoch
    last = sum(r["loss"] for r in rows[-steps_per_epoch:]) / steps_per_epoch
    assert last < first - 0.3, (first, last)
    line = next(x for x in out.splitlines() if "held-out PV ranking AUC" in x)
    trained_auc = float(line.split("trained ")[1].split()[0])
    untrained_auc = float(line.split("untrained ")[1].split()[0])
    assert trained_auc > untrained_auc + 0.02, line


def test_the_images_counted_are_every_rank_s_real_images(trained, spark):
    """The throughput counts the images of every rank's batches (they differ: a short last batch, a rank
    whose shard ran out), not rank 0's times the world size: over the run, every training row's real
    images once per epoch."""
    from pyspark.sql import functions as F

    from etl.config import load_config
    from etl.tables import TableStore

    conf, _ = trained
    cfg = load_config(conf)
    result = json.loads(open(os.path.join(_checkpoints(conf, "full"), "result.json")).read())
    assert result["world_size"] == 2 and result["skipped"] == 0
    version = json.loads(open(os.path.join(_checkpoints(conf, "full"), "run.json")).read())["identity"]["data_version"]
    rows = TableStore(spark, cfg).read("courier_train", version=version)
    last = rows.agg(F.max("dt")).first()[0]  # held out (train.holdout_last_date)
    per_row = F.aggregate(F.concat("pv_mask", "click_mask"), F.lit(0), lambda a, m: a + m)
    real = rows.where(F.col("dt") != last).agg(F.sum(per_row)).first()[0]
    assert result["images"] == TRAIN_SETTINGS["epochs"] * real, (result["images"], real)


def test_the_run_is_tracked_and_the_encoder_registered(trained):
    import mlflow

    from etl.config import load_config
    from etl.tracking import setup_mlflow

    conf, out = trained
    setup_mlflow(load_config(conf))
    client = mlflow.MlflowClient()
    latest = client.search_model_versions("name = 'courier-encoder'")[0]
    run = client.get_run(latest.run_id)
    assert run.data.params["data.table"] == "courier_train" and run.data.params["train.backbone"] == "tiny_cnn"
    assert latest.tags["data.version"] == run.data.params["data.version"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == int(run.data.metrics["steps"]) > 0
    assert run.data.metrics["holdout_pv_auc"] > run.data.metrics["holdout_pv_auc_init"]
    assert client.get_metric_history(run.info.run_id, "images_per_s")[-1].value > 0
    model = mlflow.pytorch.load_model(f"models:/courier-encoder/{latest.version}")
    assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 256)


def test_kill_and_resume_equals_an_uninterrupted_run(trained):
    conf, _ = trained
    ckpt = _checkpoints(conf, "killed")
    proc = _submit(conf, "train_courier", "--run-name", "killed", stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(ckpt, "step-00000006.pt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its 6th step"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its training processes, mid-run
    proc.wait()
    assert not os.path.exists(os.path.join(ckpt, "encoder.pt"))
    again = _submit(conf, "train_courier", "--run-name", "killed", check=False)
    assert again.returncode != 0 and "pass --resume" in again.stdout + again.stderr
    out = _submit(conf, "train_courier", "--run-name", "killed", "--resume")
    assert "resumed from" in out.stdout
    full = torch.load(os.path.join(_checkpoints(conf, "full"), "encoder.pt"), weights_only=True)
    resumed = torch.load(os.path.join(ckpt, "encoder.pt"), weights_only=True)
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=k)
    # Each step is recorded once, in MLflow and metrics.jsonl, with the uninterrupted run's loss: the steps
    # trained again after the checkpoint are not recorded twice, and none is lost at the kill.
    import mlflow

    from etl.config import load_config
    from etl.tracking import setup_mlflow

    setup_mlflow(load_config(conf))
    client = mlflow.MlflowClient()
    recorded = {}
    for name in ("full", "killed"):
        run_id = json.loads(open(os.path.join(_checkpoints(conf, name), "run.json")).read())["mlflow_run_id"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        lines = [json.loads(x) for x in open(os.path.join(_checkpoints(conf, name), "metrics.jsonl"))]
        assert [s for s, _ in history] == [r["step"] for r in lines] == list(range(1, len(lines) + 1)), name
        recorded[name] = [v for _, v in history]
    assert recorded["killed"] == pytest.approx(recorded["full"], abs=1e-5)


def test_a_resume_trains_on_its_own_data_version_and_refuses_other_settings(trained, spark):
    """run.json keeps what the run started on: a resume reads that courier_train version (not a newer
    one) and refuses settings that would change the rows' order or the model; an idempotent pipeline
    (--skip-if-done) resumes a run that started and did not finish instead of failing."""
    import dataclasses

    from etl import fs
    from etl.config import load_config
    from etl.tables import TableStore
    from training.launch import TrainError, _write_marker, plan_training, run_identity

    conf, _ = trained
    cfg = load_config(conf)
    store = TableStore(spark, cfg)
    latest = store.version("courier_train")
    folder = _checkpoints(conf, "pinned")
    fs.makedirs(folder)
    _write_marker(folder, "run-x", run_identity(cfg, latest - 1))  # started on the version before the latest
    plan = plan_training(cfg, store, "pinned", resume=True, skip_if_done=False)
    assert plan.resume and plan.data_version == latest - 1
    assert {f.uri for f in plan.files + plan.holdout} == {f.uri for f in store.files("courier_train", latest - 1)}
    assert plan_training(cfg, store, "pinned", resume=False, skip_if_done=True).resume  # the pipeline's rerun
    with pytest.raises(TrainError, match="already holds run run-x"):
        plan_training(cfg, store, "pinned", resume=False, skip_if_done=False)
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=32, seed=5))
    with pytest.raises(TrainError, match=r"train.batch_size: 16 -> 32; train.seed: 0 -> 5"):
        plan_training(other, store, "pinned", resume=True, skip_if_done=False)
    # The objective and the optimizer too (a restored optimizer state would ignore a new lr) ...
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 10, use_ucs=False))
    with pytest.raises(TrainError, match=r"train.lr: .*; train.use_ucs: True -> False"):
        plan_training(other, store, "pinned", resume=True, skip_if_done=False)
    # ... and what the run trains with: its precision, its starting weights, its decoder
    trains_otherwise = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16",
                                                                          gpu_decode=False))
    with pytest.raises(TrainError, match=r"train.precision: 'auto' -> 'bf16'; train.gpu_decode: 'auto' -> False"):
        plan_training(trains_otherwise, store, "pinned", resume=True, skip_if_done=False)
    # A config this machine cannot run (GPU processes without GPUs) is refused before the run claims its name.
    from training import launch as L

    gpu = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, use_gpu=True, local_mode=True))
    plan = plan_training(gpu, store, "no-gpu-here", resume=False, skip_if_done=False)
    if L._cuda_devices() < gpu.train.num_workers:
        with pytest.raises(TrainError, match="GPU processes in local mode"):
            L.launch(gpu, spark, plan, "run-y")
        assert not fs.exists(fs.join(plan.checkpoint_dir, "run.json"))
        assert not plan_training(cfg, store, "no-gpu-here", resume=False, skip_if_done=False).resume
    # ... unless the run.json was written before a setting was kept: it cannot say, so the resume goes on.
    identity = {k: v for k, v in run_identity(cfg, latest - 1).items() if k not in ("train.lr", "train.use_ucs")}
    _write_marker(folder, "run-x", identity)
    assert plan_training(other, store, "pinned", resume=True, skip_if_done=False).resume
    # A finished run is not resumed (it would train no step and register its encoder again); the
    # pipeline's --skip-if-done finds it done.
    fs.write_text(os.path.join(folder, "done.json"), json.dumps({"model_version": "7"}))
    with pytest.raises(TrainError, match="finished and registered courier-encoder v7; there is nothing to resume"):
        plan_training(cfg, store, "pinned", resume=True, skip_if_done=False)
    done = plan_training(cfg, store, "pinned", resume=False, skip_if_done=True)
    assert done.resume
    # ... but not one that finished with other settings: it is not the run this config asks for.
    _write_marker(folder, "run-x", run_identity(cfg, latest - 1))
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 10))
    with pytest.raises(TrainError, match=r"pinned finished with other settings \(train.lr: .*\): it is not the run"):
        plan_training(changed, store, "pinned", resume=False, skip_if_done=True)
    assert plan_training(cfg, store, "pinned", resume=False, skip_if_done=True).resume
    # Its done.json names a version this registry holds from another run ("full"): no alias is moved to it.
    from etl.tracking import setup_mlflow
    from training.launch import check_registered_by

    setup_mlflow(cfg)
    with pytest.raises(TrainError, match="v1 was registered by run .*, not by run-x"):
        check_registered_by(done, "1")
    # Rows padded to other widths than this config's: refused before any process starts (a rank that
    # runs out of rows would send empty batches of the config's widths into the all-gather).
    wide = dataclasses.replace(cfg, samples=dataclasses.replace(cfg.samples, l_pv=cfg.samples.l_pv + 1))
    with pytest.raises(TrainError, match=rf"holds rows of l_pv={cfg.samples.l_pv}, l_click={cfg.samples.l_click}, "
                                         rf"this config says l_pv={cfg.samples.l_pv + 1}"):
        plan_training(wide, store, "fresh", resume=False, skip_if_done=False)


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_step_0(trained, spark):
    """run.json is written when a run starts: one that failed before its first checkpoint used to block
    its name (a rerun refused, --resume crashed on the missing last.pt). --resume now starts it from
    step 0 in the same MLflow run."""
    from etl import fs
    from etl.config import load_config
    from etl.tables import TableStore
    from etl.tracking import setup_mlflow, start_run
    from training.launch import _write_marker, run_identity

    conf, _ = trained
    cfg = load_config(conf)
    setup_mlflow(cfg)
    with start_run(cfg, "early") as run:  # the run the died attempt had opened
        pass
    folder = _checkpoints(conf, "early")
    fs.makedirs(folder)
    _write_marker(folder, run.info.run_id, run_identity(cfg, TableStore(spark, cfg).version("courier_train")))
    out = _submit(conf, "train_courier", "--run-name", "early", "--resume", "--set", "train.max_steps=2")
    assert "has no checkpoint yet: starting from step 0 in the same run" in out.stdout
    assert json.loads(fs.read_text(os.path.join(folder, "done.json")))["mlflow_run_id"] == run.info.run_id
    assert json.loads(fs.read_text(os.path.join(folder, "result.json")))["steps"] == 2


def test_the_supervised_class_list_is_the_run_s_own_on_resume(trained, spark, tmp_path):
    """The supervised baseline's classes are written in run.json when the run starts and read back on a
    resume: stage 1 publishing a new category meanwhile must not resize (or reorder) the classifier
    its checkpoint holds."""
    from etl.config import load_config
    from etl.tables import TableStore
    from training.launch import _write_marker, run_categories, run_marker

    conf, _ = trained
    cfg = load_config(conf)
    published = sorted({r["category"] for r in TableStore(spark, cfg).read("items").collect() if r["category"]})
    assert len(published) >= 2 and run_categories(spark, cfg, None) == published
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    _write_marker(folder, "r1", {}, published[:-1])  # the run started before the last category existed
    marker = run_marker(folder)
    assert marker["categories"] == published[:-1] and run_categories(spark, cfg, marker) == published[:-1]


def _train_in_process(spec: dict) -> dict:
    import socket

    from training.train import train_fn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return train_fn(spec)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_resuming_a_run_that_reached_max_steps_trains_no_further_and_prunes_old_checkpoints(trained, spark, tmp_path):
    """A run resumed from its final checkpoint (it had reached max_steps, then e.g. its registration
    failed) keeps its weights: no step max_steps + 1. Only the newest keep_checkpoints step files stay."""
    import dataclasses

    from etl.config import load_config
    from etl.tables import TableStore
    from training.launch import make_spec

    conf, _ = trained
    cfg = load_config(conf)
    spec = dataclasses.asdict(make_spec(cfg, TableStore(spark, cfg).files("courier_train"), str(tmp_path), None, False))
    spec["train"].update(max_steps=4, checkpoint_every=1, keep_checkpoints=2, num_workers=1, decode_workers=0,
                         use_gpu=False)
    first = _train_in_process(spec)
    assert first["steps"] == 4 and len(first["losses"]) == 4
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("step-")) == ["step-00000003.pt", "step-00000004.pt"]
    weights = torch.load(tmp_path / "encoder.pt", weights_only=True)
    again = _train_in_process({**spec, "resume": True})
    assert again["steps"] == 4 and again["losses"] == []
    resumed = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    from training.train import state_digest
    assert state_digest(resumed) == state_digest(weights)  # what a retried registration finds its version by
    # The MLflow run keeps the first attempt's final loss and throughput (the resumed one trained no step).
    import mlflow

    from etl.tracking import setup_mlflow
    from training.launch import log_result

    setup_mlflow(cfg)
    with mlflow.start_run(run_name="max-steps-resumed") as run:
        log_result(first)
        log_result(again)
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["final_loss"] == pytest.approx(first["losses"][-1]) and metrics["steps"] == 4
    assert first["images_per_s"] > 0 and metrics["throughput_images_per_s"] == pytest.approx(first["images_per_s"])


def test_each_step_is_recorded_once_across_failures_and_resumes(tmp_path):
    """Records go out just before each checkpoint and on a failure. A run that recorded steps and then
    stopped (its checkpoint's save failed, it was killed, it raised) trains those steps again when
    resumed and records only the ones past its last record, even when it restarts from step 0 (no
    checkpoint yet); a last line cut short in metrics.jsonl is dropped, not a crash on every resume."""
    import mlflow

    from training.train import TrainSpec, _Tracker

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("tracker")).info.run_id
    spec = TrainSpec(urls=[], train={}, l_pv=1, l_click=1, image_px=8, checkpoint_dir=str(tmp_path / "run"),
                     result_path=str(tmp_path / "run" / "result.json"), mlflow_run_id=run_id,
                     mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")

    def attempt(steps, resume, fail=False):
        tracker = _Tracker(dataclasses.replace(spec, resume=resume), None)
        for step in steps:
            tracker.step(step, {"loss": 10.0 - step}, images=4, every=100)
            if step % 2 == 0:
                tracker.flush()  # what the loop does just before a checkpoint
        if fail:
            tracker.flush()  # what the loop does on its way out of an error
        assert tracker.images == 4 * len(steps)  # this attempt's images all count, recorded or not

    attempt([1, 2, 3], resume=False, fail=True)  # raised at step 3: records 1-3
    attempt([1, 2, 3, 4], resume=False)          # no checkpoint had been saved: step 0 again, records step 4
    attempt([3, 4, 5], resume=True)              # killed after step 5: 5 never flushed
    jsonl = tmp_path / "run" / "metrics.jsonl"
    with open(jsonl, "a") as fh:
        fh.write('{"step": 5, "lo')                 # an append cut short
    attempt([5, 6, 7], resume=True, fail=True)
    steps = [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    history = sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, "loss"))
    assert history == [(k, 10.0 - k) for k in range(1, 8)]


def test_a_tracking_server_refusing_the_points_does_not_stop_the_checkpoint_and_they_go_out_later(tmp_path):
    """The tracking server refuses the run's metrics at a checkpoint's flush (here: the run was deleted,
    then restored): the flush returns (the checkpoint after it is written), metrics.jsonl has the steps,
    and the next flush logs every pending point to MLflow once."""
    import mlflow

    from training.train import TrainSpec, _Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("blip")).info.run_id
    spec = TrainSpec(urls=[], train={}, l_pv=1, l_click=1, image_px=8, checkpoint_dir=str(tmp_path / "run"),
                     result_path=str(tmp_path / "run" / "result.json"), mlflow_run_id=run_id, mlflow_tracking_uri=uri)
    tracker = _Tracker(spec, None)
    for step in (1, 2):
        tracker.step(step, {"loss": 10.0 - step}, images=4, every=100)
    client.delete_run(run_id)  # log_batch is refused now
    tracker.flush()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and len(tracker.pending_metrics) == 2 * 2  # loss and images_per_s, kept
    client.restore_run(run_id)
    tracker.step(3, {"loss": 7.0}, images=4, every=100)
    tracker.close()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(1, 9.0), (2, 8.0), (3, 7.0)] and not tracker.pending_metrics


def test_the_progress_line_s_eta_counts_only_this_attempt_s_steps(tmp_path, monkeypatch, capsys):
    """A run resumed at step 50 of 100 that took 10 s for its first step has 49 steps of 10 s left."""
    import types

    from training import train as TR

    clock = iter([0.0, 10.0, 20.0])  # the tracker starts, step 51 ends, step 52 ends
    monkeypatch.setattr(TR, "time", types.SimpleNamespace(perf_counter=lambda: next(clock), time=time.time))
    spec = TR.TrainSpec(urls=[], train={}, l_pv=1, l_click=1, image_px=8, checkpoint_dir=str(tmp_path / "run"),
                        result_path=str(tmp_path / "run" / "result.json"), resume=True)
    tracker = TR._Tracker(spec, total_steps=100)
    tracker.step(51, {"loss": 1.0}, images=4, every=1)
    tracker.step(52, {"loss": 1.0}, images=4, every=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("step 51/100 loss 1.0000 0.4 img/s eta 490s"), lines
    assert lines[1].endswith("step 52/100 loss 1.0000 0.4 img/s eta 480s"), lines


def test_a_skipped_step_puts_batchnorm_statistics_back(trained, spark, tmp_path, monkeypatch):
    """A non-finite step is skipped, but its forward already moved BatchNorm's running statistics (an fp16
    overflow makes them NaN): the skip restores them, so the saved encoder evaluates to finite values."""
    import dataclasses

    from etl.config import load_config
    from etl.tables import TableStore
    from training import train as TR
    from training.launch import make_spec

    real_forward, calls = TR.forward, []

    def overflowing_forward(model, batch, device, amp_dtype, **extra):
        loss, parts = real_forward(model, batch, device, amp_dtype, **extra)
        calls.append(1)
        if len(calls) == 1:  # the first step overflows: NaN statistics, a NaN loss
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.running_mean.fill_(float("nan"))
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(TR, "forward", overflowing_forward)
    conf, _ = trained
    cfg = load_config(conf)
    spec = dataclasses.asdict(make_spec(cfg, TableStore(spark, cfg).files("courier_train"), str(tmp_path), None, False))
    spec["train"].update(max_steps=2, num_workers=1, decode_workers=0, use_gpu=False)
    result = _train_in_process(spec)
    assert result["skipped"] == 1 and result["steps"] == 2
    weights = torch.load(tmp_path / "encoder.pt", weights_only=True)
    means = [v for k, v in weights.items() if k.endswith("running_mean")]
    assert means and all(torch.isfinite(v).all() for v in means)


def test_a_finite_loss_with_non_finite_gradients_is_skipped_without_a_scaler(trained, spark, tmp_path, monkeypatch):
    """fp32 (and bf16) have no GradScaler to refuse inf/NaN gradients: a step whose loss is finite but whose
    gradients are not is skipped and counted, so Adam never writes NaN into the weights."""
    import dataclasses

    from etl.config import load_config
    from etl.tables import TableStore
    from training import train as TR
    from training.launch import make_spec

    real_forward, calls = TR.forward, []

    def nan_gradient_forward(model, batch, device, amp_dtype, **extra):
        loss, parts = real_forward(model, batch, device, amp_dtype, **extra)
        calls.append(1)
        if len(calls) == 1:  # the loss stays finite; every gradient through it becomes NaN
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss, parts

    monkeypatch.setattr(TR, "forward", nan_gradient_forward)
    conf, _ = trained
    cfg = load_config(conf)
    spec = dataclasses.asdict(make_spec(cfg, TableStore(spark, cfg).files("courier_train"), str(tmp_path), None, False))
    spec["train"].update(max_steps=2, num_workers=1, decode_workers=0, use_gpu=False, precision="fp32")
    result = _train_in_process(spec)
    assert result["skipped"] == 1 and result["steps"] == 2 and len(calls) == 3
    assert all(math.isfinite(x) for x in result["losses"])
    weights = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_steps_the_fp16_grad_scaler_skips_are_skipped_steps_and_too_many_stop_the_job(trained, spark, tmp_path,
                                                                                    monkeypatch):
    """Under fp16 the GradScaler skips a step whose gradients overflow and halves its scale. Such a step
    was reported as trained (global_step, losses, checkpoints): gradients that stay non-finite took the
    scale to 0, froze the model, and the run registered it as trained. A skip is now a skipped step, and
    SCALER_SKIP_LIMIT in a row stop the job. (An enabled CPU GradScaler stands in for CUDA's.)"""
    import dataclasses

    from etl.config import load_config
    from etl.tables import TableStore
    from training import train as TR
    from training.launch import make_spec

    real_forward, calls, nan_calls = TR.forward, [], {1, 2}

    def nan_gradient_forward(model, batch, device, amp_dtype, **extra):
        loss, parts = real_forward(model, batch, device, amp_dtype, **extra)
        calls.append(1)
        if len(calls) in nan_calls:  # the loss stays finite; every gradient through it becomes NaN
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss, parts

    monkeypatch.setattr(TR, "forward", nan_gradient_forward)
    monkeypatch.setattr(TR, "grad_scaler", lambda amp_dtype: torch.amp.GradScaler("cpu", enabled=True))
    conf, _ = trained
    cfg = load_config(conf)
    spec = dataclasses.asdict(make_spec(cfg, TableStore(spark, cfg).files("courier_train"), str(tmp_path), None, False))
    spec["train"].update(max_steps=2, num_workers=1, decode_workers=0, use_gpu=False, precision="fp32")
    result = _train_in_process(spec)  # two skips while the scale settles: two steps trained after them
    assert result["skipped"] == 2 and result["steps"] == 2 and len(calls) == 4 and len(result["losses"]) == 2
    monkeypatch.setattr(TR, "SCALER_SKIP_LIMIT", 3)
    calls.clear()
    nan_calls.update(range(1, 100))
    with pytest.raises(FloatingPointError, match="3 consecutive fp16 steps skipped by the GradScaler"):
        _train_in_process({**spec, "checkpoint_dir": str(tmp_path / "frozen")})


def test_a_registration_that_fails_half_way_leaves_no_version(trained, monkeypatch):
    """register_encoder creates the version, then uploads its weights and tags its lineage: when either
    fails, the version is removed, so courier-encoder/latest never names one without its weights."""
    import mlflow

    from etl import registry
    from etl.config import load_config
    from etl.tracking import setup_mlflow, start_run
    from training.launch import register_encoder

    conf, _ = trained
    cfg = load_config(conf)
    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    before = {v.version for v in client.search_model_versions("name = 'courier-encoder'")}

    def fail(*args, **kwargs):
        raise RuntimeError("tracking server went away")

    monkeypatch.setattr(registry, "tag_version", fail)
    encoder = os.path.join(_checkpoints(conf, "full"), "encoder.pt")
    with start_run(cfg, "registration fails"), pytest.raises(RuntimeError, match="went away"):
        register_encoder(cfg, encoder, "run-y", data_version=2, dates=["2026-11-20"])
    assert {v.version for v in client.search_model_versions("name = 'courier-encoder'")} == before
    # Killed in between (no clean-up ran: a SIGKILL, an OOM kill): the retry removes what it left.
    delete = registry.delete_version
    monkeypatch.setattr(registry, "delete_version", lambda *a: None)
    with start_run(cfg, "registration killed"), pytest.raises(RuntimeError, match="went away"):
        register_encoder(cfg, encoder, "run-y", data_version=2, dates=["2026-11-20"])
    left = {v.version for v in client.search_model_versions("name = 'courier-encoder'")} - before
    assert len(left) == 1
    monkeypatch.undo()
    monkeypatch.setattr(registry, "delete_version", delete)
    with start_run(cfg, "registration retried"):
        version = register_encoder(cfg, encoder, "run-y", data_version=2, dates=["2026-11-20"])
    assert {v.version for v in client.search_model_versions("name = 'courier-encoder'")} - before == {version.version}
    assert version.version not in left
    assert registry.ENCODER_STATE_SHA256 in client.get_model_version("courier-encoder", version.version).tags


def test_a_retried_registration_of_the_same_weights_reuses_the_run_s_version(trained, tmp_path):
    """A retry of a run whose registration succeeded (the job failed before marking the run done) finds
    the version that run registered from the same weights: one version, the alias on it. Other weights,
    or the same weights from another run, are a new version."""
    import mlflow

    from etl import registry
    from etl.config import load_config
    from etl.tracking import setup_mlflow, start_run
    from training.launch import register_encoder
    from training.train import load_state, save_state

    conf, _ = trained
    cfg = load_config(conf)
    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    encoder = os.path.join(_checkpoints(conf, "full"), "encoder.pt")
    before = len(client.search_model_versions("name = 'courier-encoder'"))
    with start_run(cfg, "registration retried"):
        first = register_encoder(cfg, encoder, "run-retried", data_version=2, dates=["2026-11-20"])
        # saved again by a resumed attempt: another file, the same weights
        resaved = str(tmp_path / "encoder.pt")
        save_state(load_state(encoder), resaved)
        again = register_encoder(cfg, resaved, "run-retried", data_version=2, dates=["2026-11-20"], alias="retried")
        assert again.version == first.version
        assert client.get_model_version_by_alias("courier-encoder", "retried").version == first.version
        assert len(client.search_model_versions("name = 'courier-encoder'")) == before + 1
        state = load_state(encoder)
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = state[name] + 1e-3
        changed = str(tmp_path / "changed.pt")
        save_state(state, changed)
        other_weights = register_encoder(cfg, changed, "run-retried", data_version=2, dates=["2026-11-20"])
        other_run = register_encoder(cfg, encoder, "run-other", data_version=2, dates=["2026-11-20"])
    assert len({first.version, other_weights.version, other_run.version}) == 3
    tags = client.get_model_version("courier-encoder", first.version).tags
    assert tags[registry.ENCODER_STATE_SHA256] != client.get_model_version(
        "courier-encoder", other_weights.version).tags[registry.ENCODER_STATE_SHA256]


def test_horovod_backend_follows_the_ddp_run(trained):
    """The same job with train.backend=horovod (horovod.spark.run, gloo) on the same data and seed takes the
    same first steps as the DDP run: same global loss, and (through Adam) the same averaged gradients."""
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        if os.environ.get("COURIER_REQUIRE_HOROVOD") == "1":
            raise
        pytest.skip("horovod not installed (scripts/install_horovod.sh)")
    conf, _ = trained
    steps = 3
    out = _submit(conf, "train_courier", "--run-name", "hvd", "--set", "train.backend=horovod",
                  "--set", f"train.max_steps={steps}")
    assert "horovod worker(s)" in out.stdout
    rows = {n: [json.loads(x) for x in open(os.path.join(_checkpoints(conf, n), "metrics.jsonl"))]
            for n in ("full", "hvd")}
    assert [r["step"] for r in rows["hvd"]] == list(range(1, steps + 1))
    for ddp_row, hvd_row in zip(rows["full"][:steps], rows["hvd"]):
        assert hvd_row["loss"] == pytest.approx(ddp_row["loss"], rel=1e-4), (ddp_row, hvd_row)


# ---- DDP through TorchDistributor equals one process on the concatenated batch --------------------
def _ddp_step(batch_path: str, out_dir: str) -> None:
    import torch

    from training import distributed as D
    from training.courier import CourierModel, ImageEncoder

    D.init("ddp")
    r, w = D.rank(), D.world_size()
    batch = torch.load(batch_path, weights_only=True)
    half = {k: v.chunk(w)[r] for k, v in batch.items()}
    torch.manual_seed(0)
    # eval(): BatchNorm's batch statistics differ per shard by design; the loss and gradient flow is
    # what must match.
    model = CourierModel(ImageEncoder("tiny_cnn", dim=32), gather=D.gather_with_grad_for("ddp")).double().eval()
    ddp = D.wrap_model(model, "ddp")
    loss, _ = ddp(half["pv_images"], half["pv_labels"], half["pv_mask"], half["click_images"], half["click_mask"])
    (loss * D.loss_scale_for_backward("ddp")).backward()
    total = D.all_reduce_sum(loss.detach())
    torch.save({"loss": total, "grads": {n: p.grad for n, p in model.named_parameters()}},
               os.path.join(out_dir, f"rank{r}.pt"))
    del ddp, model
    D.shutdown("ddp")


@gloo_ranks_may_abort
def test_two_process_torchdistributor_equals_one_process(spark, tmp_path):
    from pyspark.ml.torch.distributor import TorchDistributor

    from training.courier import CourierModel, ImageEncoder

    g = torch.Generator().manual_seed(1)
    B, lp, lc, px = 8, 5, 5, 16
    labels = (torch.rand(B, lp, generator=g) < 0.3).long()
    labels[:, 0] = 1
    pv_mask = (torch.rand(B, lp, generator=g) < 0.9).long()
    pv_mask[:, 0] = 1
    click_mask = (torch.rand(B, lc, generator=g) < 0.8).long()
    click_mask[:, :2] = 1
    batch = {"pv_images": torch.randint(0, 255, (B, lp, 3, px, px), dtype=torch.uint8, generator=g),
             "pv_labels": labels * pv_mask, "pv_mask": pv_mask,
             "click_images": torch.randint(0, 255, (B, lc, 3, px, px), dtype=torch.uint8, generator=g),
             "click_mask": click_mask}
    torch.save(batch, tmp_path / "batch.pt")
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship _ddp_step itself, not a module path
    TorchDistributor(num_processes=2, local_mode=True, use_gpu=False).run(
        _ddp_step, str(tmp_path / "batch.pt"), str(tmp_path))

    torch.manual_seed(0)
    model = CourierModel(ImageEncoder("tiny_cnn", dim=32)).double().eval()
    loss, _ = model(*(batch[k] for k in ("pv_images", "pv_labels", "pv_mask", "click_images", "click_mask")))
    loss.backward()
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"].squeeze(), loss.detach(), rtol=1e-9, atol=1e-9)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-7, atol=1e-9, msg=n)


# ---- device and GPU settings: what decides them runs on a CPU machine too -------------------------
def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Horovod's launchers set no LOCAL_RANK: the device follows the backend's own local rank."""
    from training import distributed as D
    from training.train import pick_device

    monkeypatch.setattr(D, "local_rank", lambda: 3)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device(True) == torch.device("cuda", 3)
    assert pick_device(False) == torch.device("cpu")


def test_resume_with_fp16_from_a_checkpoint_without_it(tmp_path):
    """A CPU (or fp32/bf16) run saves a disabled GradScaler's empty state; resuming with the scaler on
    (fp16 on a GPU) keeps the enabled scaler's defaults instead of failing on the empty state."""
    from training.train import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    off = torch.amp.GradScaler("cpu", enabled=False)
    path = save_checkpoint(str(tmp_path), model, opt, off, {"epoch": 1, "batch": 4, "global_step": 9, "skipped": 0})
    on = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 12)
    position = load_checkpoint(path, torch.nn.Linear(3, 2), torch.optim.Adam(model.parameters()), on)
    assert position["global_step"] == 9 and position["batch"] == 4
    assert on.get_scale() == 2.0 ** 12
    # and an enabled scaler's state is restored as before
    on.scale(torch.ones(()))  # the scale tensor is made on first use
    on.update(2.0 ** 5)
    path = save_checkpoint(str(tmp_path), model, opt, on, {"epoch": 1, "batch": 5, "global_step": 10, "skipped": 0})
    again = torch.amp.GradScaler("cpu", enabled=True)
    load_checkpoint(path, torch.nn.Linear(3, 2), torch.optim.Adam(model.parameters()), again)
    assert again.get_scale() == 2.0 ** 5


def test_use_gpu_follows_where_the_training_processes_run(spark, monkeypatch):
    """auto: in local mode this machine's CUDA; on a cluster, whether Spark gives each task a GPU (not
    the driver's CUDA). GPU processes in local mode need one GPU each; TorchDistributor is asked for
    GPUs only where Spark schedules them (it refuses otherwise)."""
    from training import launch as L

    monkeypatch.setattr(L, "_cuda_devices", lambda: 0)
    assert L.resolve_use_gpu(None, True, spark, 2) is False
    assert L.resolve_use_gpu(False, True, spark, 2) is False
    with pytest.raises(L.TrainError, match="num_workers=2 GPU processes in local mode, but this machine has 0"):
        L.resolve_use_gpu(True, True, spark, 2)
    monkeypatch.setattr(L, "_cuda_devices", lambda: 2)  # a driver with GPUs
    assert L.resolve_use_gpu(None, True, spark, 2) is True
    assert not L.spark_schedules_gpus(spark, True)  # this session was started without GPU resources
    with pytest.raises(L.TrainError, match="num_workers=3"):
        L.resolve_use_gpu(None, True, spark, 3)
    assert L.resolve_use_gpu(None, False, spark, 4) is False  # cluster: no task GPUs, whatever the driver has
    monkeypatch.setattr(L, "_cuda_devices", lambda: 0)
    spark.conf.set(L.TASK_GPUS, "1")
    try:
        assert L.spark_schedules_gpus(spark, False)
        assert L.resolve_use_gpu(None, False, spark, 4) is True  # a driver without CUDA, executors with GPUs
    finally:
        spark.conf.unset(L.TASK_GPUS)
