"""The pipeline on local[*] vs on the cluster-in-a-box: wall time per stage and the ratio.

    .venv/bin/python bench/cluster_bench.py [--preset tiny|demo] [--json out.json]

1. `scripts/cluster_up.sh` into a fresh run folder (timed: the services' start-up, jar resolution
   included when the jars are not cached yet);
2. `scripts/pipeline.sh` with COURIER_PRESET=<preset> twice, with the stage settings of
   conf/cluster.local.yaml both times: on local[*] (delta-rs, local disk, sqlite MLflow, training on the
   driver) and on the services (Spark standalone master + 2 workers, S3 object store, native Delta,
   MLflow server, training on the executors), each on fresh roots (a temporary data_root; a fresh
   prefix of the bucket);
3. `scripts/cluster_down.sh`.
The stages are pipeline.sh's own "== k/7 ... ==" sections, timed from its output as it streams.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"^== (\d)/7 (.*) ==$")


def run_pipeline(conf: Path, env: dict, preset: str, log: Path) -> dict:
    """{stage title: seconds} of one pipeline.sh run (the script's own sections), plus 'total'."""
    env = {**env, "COURIER_CONF": str(conf), "COURIER_PRESET": preset, "PYTHONUNBUFFERED": "1"}
    stages, current, t_stage = {}, "setup", time.perf_counter()
    t0 = t_stage
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", "scripts/pipeline.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            fh.write(line)
            m = STAGE.match(line.strip())
            if m:
                now = time.perf_counter()
                stages[current] = now - t_stage
                current, t_stage = f"{m.group(1)} {m.group(2).split(' (')[0]}", now
        rc = proc.wait()
    now = time.perf_counter()
    stages[current] = now - t_stage
    stages["total"] = now - t0
    if rc != 0:
        raise RuntimeError(f"pipeline.sh with {conf} failed (exit {rc}); see {log}")
    return stages


def local_conf(tmp: Path, cluster_yaml: Path) -> Path:
    """The cluster config's stage settings with a local deployment: local[*] Spark, delta-rs, local
    disk, sqlite MLflow, training processes on the driver. Only where things run differs."""
    conf = yaml.safe_load(cluster_yaml.read_text())
    conf["paths"] = {"data_root": str(tmp / "local-data")}
    conf["spark"] = {"master": "local[*]", "shuffle_partitions": conf["spark"].get("shuffle_partitions", 4),
                     "driver_memory": conf["spark"].get("driver_memory", "2g")}
    conf["tables"] = {"engine": "delta-rs"}
    conf["mlflow"] = {"experiment": conf.get("mlflow", {}).get("experiment", "courier")}
    conf["train"] = {**conf.get("train", {}), "local_mode": True}
    conf.pop("env", None)
    path = tmp / "local.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def cluster_conf(tmp: Path, env: dict) -> Path:
    conf = yaml.safe_load(Path(env["COURIER_CONF"]).read_text())
    prefix = f"s3a://{env['COURIER_BUCKET']}/bench-{uuid.uuid4().hex[:8]}"
    conf["paths"] = {**conf.get("paths", {}), "data_root": str(tmp / "cluster-data"), "raw_root": f"{prefix}/raw",
                     "images_root": f"{prefix}/raw/images", "truth_root": f"{prefix}/truth",
                     "tables_root": f"{prefix}/tables", "checkpoints_root": f"{prefix}/checkpoints"}
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def read_env(env_file: Path) -> dict:
    """The export lines of cluster.env as a dict (values as the shell would see them)."""
    out = subprocess.run(["bash", "-c", f"set -a; source '{env_file}'; env -0"], capture_output=True, check=True)
    return dict(kv.split("=", 1) for kv in out.stdout.decode().split("\0") if "=" in kv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "demo"))
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--keep-logs", default=None, help="folder for the pipeline logs (default: a temporary one)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="courier-cluster-bench-") as tmp_name:
        tmp = Path(tmp_name)
        logs = Path(args.keep_logs) if args.keep_logs else tmp
        logs.mkdir(parents=True, exist_ok=True)
        run_dir = tmp / "cluster"
        t0 = time.perf_counter()
        subprocess.run(["bash", "scripts/cluster_up.sh", str(run_dir)], cwd=ROOT, check=True)
        up_s = time.perf_counter() - t0
        try:
            env = read_env(run_dir / "cluster.env")
            cluster_yaml = cluster_conf(tmp, env)
            local = run_pipeline(local_conf(tmp, cluster_yaml), dict(os.environ), args.preset, logs / "local.log")
            cluster = run_pipeline(cluster_yaml, env, args.preset, logs / "cluster.log")
        finally:
            t1 = time.perf_counter()
            subprocess.run(["bash", "scripts/cluster_down.sh", str(run_dir)], cwd=ROOT, check=False)
            down_s = time.perf_counter() - t1

    load = os.getloadavg()[0]
    print(f"\ncluster bench, preset {args.preset}: {os.cpu_count()} cores, load {load:.1f}, "
          f"{platform.platform()}; services up {up_s:.1f} s, down {down_s:.1f} s")
    print("| stage | local[*] s | cluster-in-a-box s | cluster / local |")
    print("|---|---|---|---|")
    for stage in [s for s in local if s != "total"] + ["total"]:
        a, b = local.get(stage), cluster.get(stage)
        ratio = f"{b / a:.2f}" if a and b else "-"
        print(f"| {stage} | {a:.1f} | {b:.1f} | {ratio} |" if a is not None and b is not None
              else f"| {stage} | {a} | {b} | - |")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "services_up_s": up_s,
                                               "services_down_s": down_s, "local": local, "cluster": cluster,
                                               "cores": os.cpu_count(), "load": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
