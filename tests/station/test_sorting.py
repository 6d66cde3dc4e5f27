import numpy as np
import pytest

from calibration.geometry import BeltGeometry
from station.config import MANUAL_BIN, StationConfig
from station.sorting import Reason, Sorter
from vision.taxonomy import load_taxonomy
from vision.tracking import Track

TAX = load_taxonomy()
NAMES = tuple(TAX.names)
GEOM = BeltGeometry.from_scale(1.8, 0.1)


def track(votes: dict[str, float], hits: int = 10, attached: int = 0, born_x: float = 0.0) -> Track:
    v = np.zeros(len(NAMES))
    for k, s in votes.items():
        v[NAMES.index(k)] = s
    return Track(id=1, y_mm=200, width_mm=20, first_count=0, last_count=0, first_t=0.0, u_front=-100.0,
                 u_back=-160.0, hits=hits, votes=v, attached_votes=attached, born_x_mm=born_x)


@pytest.fixture
def sorter():
    return Sorter(StationConfig(), TAX, NAMES, GEOM)


@pytest.mark.parametrize("cls,bin_", [("li_ion_cell", 1), ("li_ion_pack", 1), ("alkaline", 2), ("nimh", 2),
                                      ("coin_cell", 2), ("lead_acid", 2), ("board_high", 3), ("board_low", 4)])
def test_class_rules(sorter, cls, bin_):
    d = sorter.decide(track({cls: 9.0}))
    assert d.bin == bin_ and d.reason == Reason.RULE
    div = next(x for x in StationConfig().diverters if x.bin == bin_)
    # the item's centre (u = -130 mm) reaches the diverter after position + 130 mm of travel
    assert d.center_count == pytest.approx((div.position_mm + 130.0) / 0.1)


def test_board_with_battery_goes_to_manual(sorter):
    d = sorter.decide(track({"board_high": 9.0}, attached=5))
    assert d.bin == MANUAL_BIN and d.reason == Reason.BATTERY_ON_BOARD


def test_board_that_looks_partly_like_a_battery_goes_to_manual(sorter):
    d = sorter.decide(track({"board_low": 6.0, "li_ion_pack": 2.0}))
    assert d.bin == MANUAL_BIN and d.reason == Reason.BATTERY_LIKE


def test_uncertain_item_goes_to_manual(sorter):
    d = sorter.decide(track({"board_high": 3.0, "board_low": 2.5}))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LOW_CONFIDENCE


def test_votes_split_inside_one_bin_still_sort(sorter):
    # 0.3 alkaline + 0.25 NiMH + 0.1 coin: no class is sure, but the bin ("other batteries") is
    d = sorter.decide(track({"alkaline": 3.0, "nimh": 2.5, "coin_cell": 1.0}))
    assert d.bin == 2 and d.reason == Reason.RULE and d.class_name == "alkaline"
    assert d.confidence == pytest.approx(0.65)


def test_votes_split_across_bins_go_to_manual(sorter):
    d = sorter.decide(track({"li_ion_cell": 3.5, "alkaline": 3.0}))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LOW_CONFIDENCE


def test_partly_li_ion_item_never_goes_to_another_battery_bin(sorter):
    d = sorter.decide(track({"alkaline": 6.0, "nimh": 1.0, "li_ion_cell": 3.0}))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LI_ION_LIKE


def test_too_few_views(sorter):
    assert sorter.decide(track({"alkaline": 1.8}, hits=2)).reason == Reason.FEW_VIEWS


def test_first_seen_past_the_decision_line(sorter):
    assert sorter.decide(track({"alkaline": 9.0}, born_x=600.0)).reason == Reason.LATE_DETECTION


def test_operator_override_sends_next_items_to_manual(sorter):
    sorter.manual_next = 1
    assert sorter.decide(track({"alkaline": 9.0})).reason == Reason.OPERATOR_OVERRIDE
    assert sorter.decide(track({"alkaline": 9.0})).bin == 2


def test_disabled_diverter_sends_to_manual():
    d = StationConfig().model_dump(mode="json")
    d["diverters"][3]["enabled"] = False
    d["rules"]["class_to_bin"]["board_low"] = 0
    from station.config import config_from_dict
    s = Sorter(config_from_dict(d), TAX, NAMES, GEOM)
    assert s.decide(track({"board_low": 9.0})).reason == Reason.NO_RULE


def looked_at(tr: Track, looks: int, hits: int) -> Track:
    tr.looks, tr.look_hits = looks, hits
    return tr


def test_the_inspectors_closer_look_decides_for_a_board_it_saw():
    """Its look overrules the detector's far view both ways: a capacitor the far view read as a
    coin cell does not send a clean board to manual, and a cell only the close look saw does."""
    cfg = StationConfig()
    cfg.inspector.min_hits = 2
    s = Sorter(cfg, TAX, NAMES, GEOM)
    assert s.decide(looked_at(track({"board_low": 9.0}, attached=5), looks=3, hits=0)).bin == 4
    d = s.decide(looked_at(track({"board_high": 9.0}), looks=3, hits=2))
    assert d.bin == MANUAL_BIN and d.reason == Reason.BATTERY_ON_BOARD
    assert s.decide(looked_at(track({"board_high": 9.0}), looks=3, hits=1)).bin == 3


def test_a_board_the_inspector_never_saw_whole_falls_back_to_the_detectors_view(sorter):
    d = sorter.decide(looked_at(track({"board_high": 9.0}, attached=5), looks=0, hits=0))
    assert d.reason == Reason.BATTERY_ON_BOARD


def test_a_faint_item_seen_consistently_is_sorted_a_flickering_one_is_not(sorter):
    # mean 0.33 over 30 views, all for "other batteries": a faint NiMH cell
    d = sorter.decide(track({"nimh": 9.0, "alkaline": 1.0}, hits=30))
    assert d.bin == 2 and d.reason == Reason.RULE and d.confidence == pytest.approx(10 / 30)
    # the same mean over 9 views (a plastic fragment flickering as a cell): too little evidence
    d = sorter.decide(track({"nimh": 3.0}, hits=9))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LOW_CONFIDENCE
    # many faint views, but split across bins (under the Li-ion guard's share): still manual
    d = sorter.decide(track({"nimh": 8.0, "li_ion_cell": 2.5, "board_low": 1.5}, hits=30))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LOW_CONFIDENCE
    # fainter than faint_min_confidence
    d = sorter.decide(track({"nimh": 7.0}, hits=32))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LOW_CONFIDENCE
