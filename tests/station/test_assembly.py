import cv2
import pytest

from station.assembly import build_detector, detector_settings, detector_threads
from station.config import ConfigError, StationConfig, config_from_dict


def test_auto_spin_sleeps_beside_the_stations_threads_and_spins_inside_runs_alone():
    cfg = StationConfig()
    assert cfg.detector.spin == "auto"
    assert detector_settings(cfg)["spin"] == "never"                       # kozan run: capture, looks, link
    assert detector_settings(cfg, beside_threads=False)["spin"] == "run"   # the fast simulation: one thread
    pinned = config_from_dict({"detector": {"spin": "always"}})
    assert detector_settings(pinned)["spin"] == detector_settings(pinned, beside_threads=False)["spin"] == "always"


def test_auto_threads_leave_a_small_pcs_second_core_to_capture_and_looks():
    assert StationConfig().detector.intra_op_threads == "auto"
    assert detector_threads("auto", beside_threads=True, cpus=2) == 1     # kozan run on this 2-core PC
    assert detector_threads("auto", beside_threads=True, cpus=1) == 1
    assert detector_threads("auto", beside_threads=True, cpus=8) == 2     # a larger PC keeps the old 2
    assert detector_threads("auto", beside_threads=False, cpus=2) == 2    # the fast simulation: one thread
    assert detector_threads(3, beside_threads=True, cpus=2) == 3          # a set value is kept as it is
    pinned = config_from_dict({"detector": {"intra_op_threads": 2}})
    assert detector_settings(pinned)["threads"] == detector_settings(pinned, beside_threads=False)["threads"] == 2


@pytest.mark.parametrize("bad", [0, 65, "many"])
def test_bad_thread_count_names_the_key(bad):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"detector": {"intra_op_threads": bad}})
    assert "detector.intra_op_threads" in str(e.value)


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
