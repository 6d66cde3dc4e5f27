import cv2
import pytest

from station.assembly import build_detector, detector_settings
from station.config import ConfigError, StationConfig, config_from_dict


def test_auto_spin_sleeps_beside_the_stations_threads_and_spins_inside_runs_alone():
    cfg = StationConfig()
    assert cfg.detector.spin == "auto"
    assert detector_settings(cfg)["spin"] == "never"                       # kozan run: capture, looks, link
    assert detector_settings(cfg, beside_threads=False)["spin"] == "run"   # the fast simulation: one thread
    pinned = config_from_dict({"detector": {"spin": "always"}})
    assert detector_settings(pinned)["spin"] == detector_settings(pinned, beside_threads=False)["spin"] == "always"


def test_bad_spin_value_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"detector": {"spin": "sometimes"}})
    msg = str(e.value)
    assert "detector.spin" in msg and "sometimes" in msg and "'never'" in msg


def test_the_station_sets_opencvs_thread_pool_from_its_configuration(shipped_model):
    before = cv2.getNumThreads()
    try:
        det = build_detector(config_from_dict({"detector": {"model": str(shipped_model), "opencv_threads": 1}}))
        assert cv2.getNumThreads() == 1
        assert det.spin == "never"
        build_detector(config_from_dict({"detector": {"model": str(shipped_model), "opencv_threads": 3}}))
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)
