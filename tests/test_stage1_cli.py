"""jobs/build_samples.py argument and config errors: one line naming the flag or key, exit 2, no
traceback (no Spark session is started for them)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, write_config


@pytest.mark.parametrize("args, message", [
    (["--date", "2026-13-45"], "build_samples: error: --date 2026-13-45: not a date (YYYY-MM-DD)"),
    (["--date", "2026-11-20", "--end-date", "2026-11-19"],
     "build_samples: error: --end-date 2026-11-19: before --date 2026-11-20"),
    (["--date", "2026-11-20", "--set", "samples.nope=1"], "build_samples: error: samples: unknown key(s) ['nope']"),
    (["--date", "2026-11-20", "--set", "samples.neg_rate=lots"],
     "build_samples: error: samples.neg_rate: expected float, got str 'lots'"),
    (["--date", "2026-11-20", "--set", "samples.neg_rate=7"], "build_samples: error: samples.neg_rate must be in (0, 1]"),
    (["--date", "2026-11-20", "--set", "nokey"], "build_samples: error: --set 'nokey': expected key.path=value"),
    (["--dates", "2026-11-20"], "build_samples.py: error: the following arguments are required: --date"),
    # the other jobs that take a date range check it the same way, before any session starts
    (["--date", "2026-11-31"], "attach_features: error: --date 2026-11-31: not a date (YYYY-MM-DD)"),
    (["--date", "2026-11-20", "--end-date", "2026-11-02"],
     "attach_features: error: --end-date 2026-11-02: before --date 2026-11-20"),
    (["--end-date", "2026-11-20"], "embed_items: error: --end-date 2026-11-20 needs --date"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path, args, message):
    conf = write_config(tmp_path)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    job = message.split(":")[0].removesuffix(".py")
    out = subprocess.run([sys.executable, f"jobs/{job}.py", "--conf", str(conf), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
