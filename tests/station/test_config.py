from pathlib import Path

import pytest

from station.config import ConfigError, StationConfig, config_from_dict, dump_defaults, load_config


def test_defaults_run_the_simulated_line():
    cfg = StationConfig()
    assert cfg.camera.source == "sim" and cfg.link.port == "sim"
    assert (cfg.camera.width, cfg.camera.height, cfg.camera.fps) == (1280, 720, 30.0)
    assert cfg.line.belt_speed_mm_s == 500.0
    assert len(cfg.diverters) == 4
    r = cfg.rules.class_to_bin
    assert r["li_ion_cell"] == r["li_ion_pack"] == 1
    assert r["alkaline"] == r["nimh"] == r["coin_cell"] == r["lead_acid"] == 2
    assert r["board_high"] == 3 and r["board_low"] == 4


def test_defaults_round_trip_through_yaml(tmp_path: Path):
    p = tmp_path / "station.yaml"
    p.write_text(dump_defaults())
    assert load_config(p) == StationConfig()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"line": {"belt_sped_mm_s": 300}})
    assert "line.belt_sped_mm_s" in str(e.value) and "unknown key" in str(e.value)


def test_bad_value_names_key_value_and_limit():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"line": {"belt_speed_mm_s": -5}})
    msg = str(e.value)
    assert "line.belt_speed_mm_s" in msg and "-5" in msg and "greater than 0" in msg


def test_battery_may_never_go_to_a_board_bin():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"rules": {"class_to_bin": {"li_ion_cell": 3, "board_high": 3, "board_low": 4}}})
    assert "li_ion_cell" in str(e.value) and "board bin" in str(e.value)


def test_unknown_class_in_rules():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"rules": {"class_to_bin": {"lithium": 1}}})
    assert "'lithium'" in str(e.value) and "board_high" in str(e.value)


def test_diverter_must_be_downstream_of_decision_line():
    ds = [{"id": 1, "bin": 1, "position_mm": 100.0}]
    with pytest.raises(ConfigError) as e:
        config_from_dict({"diverters": ds, "rules": {"class_to_bin": {"li_ion_cell": 1}}})
    assert "diverters" in str(e.value) and "decision_line_mm" in str(e.value)


def test_bin_without_diverter_is_refused():
    ds = [{"id": 1, "bin": 1, "position_mm": 900.0}]
    with pytest.raises(ConfigError) as e:
        config_from_dict({"diverters": ds})
    assert "has no enabled diverter" in str(e.value)


def test_pulse_longer_than_max_on_time():
    d = StationConfig().model_dump(mode="json")
    d["diverters"][0]["pulse_ms"] = 500
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert "max_on_ms" in str(e.value)


def test_file_errors_are_specific(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("line: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_inspector_that_could_never_flag_a_board_is_refused():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"inspector": {"model": "models/inspector/insp-v1.onnx", "looks": 2, "min_hits": 3}})
    assert "inspector" in str(e.value) and "min_hits=3 exceeds looks=2" in str(e.value)
