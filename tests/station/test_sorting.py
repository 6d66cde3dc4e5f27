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


def read_close(tr: Track, reads: list[tuple[str | None, float]]) -> Track:
    """The battery inspector's answers for this track: (class read, score), None: no battery seen."""
    tr.battery_look_votes = np.zeros(len(NAMES))
    for name, score in reads:
        tr.battery_looks += 1
        if name is not None:
            tr.battery_look_votes[NAMES.index(name)] += score
    return tr


def test_close_looks_settle_a_cell_the_far_view_split_between_li_ion_and_other():
    """Far view: 32 views, 0.32 Li-ion and 0.29 NiMH per view (manual: Li-ion-like). Three close
    looks read NiMH at 0.9: at the shipped weight the blend sorts it into bin 2."""
    s = Sorter(StationConfig(), TAX, NAMES, GEOM)
    far = {"li_ion_cell": 10.1, "nimh": 9.2}
    assert s.decide(track(far, hits=32)).reason in (Reason.LOW_CONFIDENCE, Reason.LI_ION_LIKE)
    d = s.decide(read_close(track(far, hits=32), [("nimh", 0.9)] * 3))
    assert d.bin == 2 and d.reason == Reason.RULE and d.class_name == "nimh"
    # the blend, per view: half the far view's mean (0.29 NiMH) and half the looks' mean (0.9)
    assert d.confidence == pytest.approx(0.5 * 9.2 / 32 + 0.5 * 0.9)


def test_close_looks_that_disagree_keep_the_item_on_the_manual_path():
    """A far view sure of Li-ion and looks reading alkaline: the Li-ion share keeps it out of bin 2."""
    s = Sorter(StationConfig(), TAX, NAMES, GEOM)
    d = s.decide(read_close(track({"li_ion_cell": 20.0}, hits=30), [("alkaline", 0.8)] * 3))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LI_ION_LIKE


def test_looks_that_find_no_battery_lower_the_score_towards_manual():
    """A plastic fragment the far view took for a faint cell: close up, nothing is there."""
    s = Sorter(StationConfig(), TAX, NAMES, GEOM)
    tr = track({"alkaline": 4.5}, hits=10)
    assert s.decide(tr).bin == 2
    d = s.decide(read_close(tr, [(None, 0.0)] * 3))
    assert d.bin == MANUAL_BIN and d.reason == Reason.LOW_CONFIDENCE


def test_battery_weight_zero_ignores_the_looks():
    cfg = StationConfig()
    cfg.inspector.battery_weight = 0.0
    s = Sorter(cfg, TAX, NAMES, GEOM)
    d = s.decide(read_close(track({"alkaline": 4.5}, hits=10), [(None, 0.0)] * 3))
    assert d.bin == 2 and d.confidence == pytest.approx(0.45)
