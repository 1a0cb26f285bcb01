"""Config loading and validation: one place, clear errors."""
from __future__ import annotations

import pytest
from conftest import ROOT, write_config

from etl.config import ConfigError, load_config, parse_overrides, under_root


def test_shipped_configs_load():
    local = load_config(ROOT / "conf" / "local.yaml")
    assert local.samples.neg_rate == 0.2 and local.samples.l_pv == 5 and local.samples.l_click == 5
    assert local.tables_root == str(ROOT / "data" / "tables")
    assert local.mlflow_tracking_uri == "sqlite:///" + str(ROOT / "data" / "mlflow" / "mlflow.db")
    cluster = load_config(ROOT / "conf" / "cluster.example.yaml")
    assert cluster.tables.engine == "spark-delta" and cluster.tables_root.startswith("s3a://")


@pytest.mark.parametrize("overrides, message", [
    ({"samples": {"neg_rat": 0.3}}, "unknown key(s) ['neg_rat']"),
    ({"sampels": {}}, "unknown key(s) ['sampels']"),
    ({"samples": {"neg_rate": 1.5}}, "samples.neg_rate must be in (0, 1]"),
    ({"samples": {"l_pv": "five"}}, "samples.l_pv: expected int"),
    ({"tables": {"engine": "parquet"}}, "tables.engine must be one of"),
    ({"simulator": {"start_date": "20/11/2026"}}, "expected YYYY-MM-DD"),
    ({"spark": {"conf": {"executor.memory": "1g"}}}, "keys must start with 'spark.'"),
])
def test_bad_config_is_a_clear_error(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, overrides))
    assert message in str(err.value)


def test_overrides_and_relative_paths(tmp_path):
    cfg = load_config(write_config(tmp_path), parse_overrides(["samples.neg_rate=0.5", "samples.l_pv=3"]))
    assert (cfg.samples.neg_rate, cfg.samples.l_pv) == (0.5, 3)
    (tmp_path / "sub").mkdir()
    rel = tmp_path / "sub" / "c.yaml"
    rel.write_text("paths:\n  data_root: ../elsewhere\n")
    assert load_config(rel).data_root == str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError):
        parse_overrides(["samples.neg_rate"])


def test_paths_from_data_stay_under_their_root(tmp_path):
    assert under_root(str(tmp_path), "a/b.png") == str(tmp_path / "a" / "b.png")
    for bad in ("../x.png", "/etc/passwd", "a/../../x"):
        with pytest.raises(ConfigError):
            under_root(str(tmp_path), bad)
