"""The registry: versions and cards, the active pointer (legacy active.onnx included), the gate, rollback,
and what a running station refuses to switch to."""
from __future__ import annotations

import json

import pytest

from tests.loop.conftest import tiny_onnx
from vision.detector import ModelError
from vision.registry import Registry, RegistryError, check_promotion, load_for_station, resolve_model_path
from vision.taxonomy import load_taxonomy

NAMES = tuple(load_taxonomy().names)
RULES = ["board_high", "board_low", "li_ion_cell", "li_ion_pack", "alkaline", "nimh", "coin_cell", "lead_acid"]


def _metrics(ap: float, **over: float) -> dict:
    per = {n: ap for n in NAMES}
    per.update(over)
    return {"per_class_ap50": per, "map50": sum(per.values()) / len(per)}


@pytest.fixture()
def reg(tmp_path):
    models = tmp_path / "models"
    tiny_onnx(models / "active.onnx", version="det-v1")        # the legacy single-model layout
    (models / "active.pt").write_bytes(b"weights of det-v1")
    return Registry(models)


def test_legacy_active_onnx_is_the_active_version_until_a_promotion(reg):
    assert reg.active_version() == "det-v1"
    assert resolve_model_path(reg.root / "active.onnx") == reg.root / "active.onnx"
    assert [e.version for e in reg.entries()] == ["det-v1"]


def test_promote_adopts_the_legacy_model_then_active_onnx_points_at_the_new_version(reg, tmp_path):
    tiny_onnx(tmp_path / "out" / "det-v2.onnx", version="det-v2")
    (tmp_path / "out" / "det-v2.pt").write_bytes(b"w2")
    e = reg.register(tmp_path / "out" / "det-v2.onnx", parent="det-v1", data_fingerprint="abc")
    assert e.onnx == reg.root / "det-v2.onnx" and e.pt.read_bytes() == b"w2"
    assert reg.card("det-v2")["parent"] == "det-v1" and reg.card("det-v2")["data_fingerprint"] == "abc"
    reg.set_active("det-v2", "test")
    # the legacy file became a version of its own (weights too), so a rollback can always return to it
    assert (reg.root / "det-v1.onnx").exists() and (reg.root / "det-v1.pt").read_bytes() == b"weights of det-v1"
    assert reg.active_version() == "det-v2" and reg.history() == ["det-v1"]
    # detector.model: models/active.onnx keeps working: it now means the registry's active version
    assert resolve_model_path(reg.root / "active.onnx") == reg.root / "det-v2.onnx"
    assert resolve_model_path(reg.root / "det-v1.onnx") == reg.root / "det-v1.onnx"
    assert reg.rollback() == ("det-v2", "det-v1")
    assert resolve_model_path(reg.root / "active.onnx") == reg.root / "det-v1.onnx"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()


def test_versions_are_immutable(reg, tmp_path):
    tiny_onnx(tmp_path / "a.onnx", version="det-v2")
    reg.register(tmp_path / "a.onnx")
    with pytest.raises(RegistryError, match="immutable"):
        reg.register(tmp_path / "a.onnx")


def test_a_name_that_contradicts_the_files_own_is_refused_and_nothing_is_copied(reg, tmp_path):
    """The station names its model from the file; a card under another name would split one model's
    records between two names."""
    tiny_onnx(tmp_path / "a.onnx", version="det-v2")
    with pytest.raises(RegistryError, match="names itself 'det-v2'.*not 'det-v3'.*--version"):
        reg.register(tmp_path / "a.onnx", "det-v3")
    assert not (reg.root / "det-v3.onnx").exists() and not reg.card("det-v3")
    assert reg.register(tmp_path / "a.onnx", "det-v2").version == "det-v2"


def _gate(reg, version, tol=0.02, budget=1e9, **kw):
    return check_promotion(reg, version, RULES, NAMES, "gold1", tol, budget, latency=lambda p: 5.0, **kw)


def test_gate_passes_a_model_no_worse_on_any_class(reg, tmp_path):
    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.set_active("det-v1", "baseline")   # adopt det-v1 so it has a card
    reg.record_metrics("det-v1", "gold1", _metrics(0.80))
    reg.record_metrics("det-v2", "gold1", _metrics(0.85, coin_cell=0.79))   # within the 0.02 tolerance
    res = _gate(reg, "det-v2")
    assert res.ok, res.explain()
    assert res.details["per_class_ap50"]["coin_cell"] == {"candidate": 0.79, "active": 0.80}


def test_gate_says_exactly_why_it_refuses(reg, tmp_path):
    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.set_active("det-v1", "baseline")
    reg.record_metrics("det-v1", "gold1", _metrics(0.80))
    reg.record_metrics("det-v2", "gold1", _metrics(0.90, li_ion_cell=0.70))
    res = check_promotion(reg, "det-v2", RULES, NAMES, "gold1", 0.02, 30.0, latency=lambda p: 45.0)
    assert not res.ok
    text = res.explain()
    assert "li_ion_cell AP50 0.700 < active 0.800 - tolerance 0.020" in text
    assert "45.0 ms (median), over the budget of 30.0 ms" in text
    assert "board_high" not in text          # only the classes that regressed are named


def test_gate_refuses_unknown_or_missing_classes_and_missing_metrics(reg, tmp_path):
    odd = list(NAMES[:-1]) + ["toaster"]
    reg.register(tiny_onnx(tmp_path / "det-odd.onnx", names=odd, version="det-odd"))
    res = _gate(reg, "det-odd")
    text = res.explain()
    assert "['toaster'] are unknown to the sorting rules" in text
    assert "does not detect ['lead_acid']" in text
    assert "has no metrics on golden set gold1" in text


def test_gate_refuses_a_file_that_does_not_load(reg, tmp_path):
    (reg.root / "det-bad.onnx").write_bytes(b"\x08\x01garbage, not a protobuf")
    res = _gate(reg, "det-bad")
    assert not res.ok and "does not load" in res.explain() and "corrupt" in res.explain()


def test_gate_evaluates_when_metrics_are_missing_and_records_them(reg, tmp_path):
    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.set_active("det-v1", "baseline")
    seen = []

    def evaluate(p):
        seen.append(p.name)
        return _metrics(0.9 if "v2" in p.name else 0.5)

    assert _gate(reg, "det-v2", evaluate=evaluate).ok
    assert sorted(seen) == ["det-v1.onnx", "det-v2.onnx"]
    assert reg.card("det-v2")["golden"]["gold1"]["map50"] == pytest.approx(0.9)


def _at(conf: float, recall: dict, ap: float = 0.8) -> dict:
    m = _metrics(ap)
    m.update(operating_conf=conf, per_class_recall={n: recall.get(n, 0.9) for n in NAMES})
    return m


def test_gate_sees_scores_sinking_below_the_sorting_threshold_that_ap50_misses(reg, tmp_path):
    """Same AP50 everywhere, but li_ion_pack found at conf >= 0.4 far less often: sorting would send
    those packs to manual. The gate names the class and both figures; a gain passes."""
    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.register(tiny_onnx(tmp_path / "det-v3.onnx", version="det-v3"))
    reg.set_active("det-v1", "baseline")
    reg.record_metrics("det-v1", "gold1", _at(0.4, {"li_ion_pack": 0.8}))
    reg.record_metrics("det-v2", "gold1", _at(0.4, {"li_ion_pack": 0.3}))
    res = _gate(reg, "det-v2", operating_conf=0.4)
    assert _gate(reg, "det-v2").ok                 # what AP50 alone says
    assert not res.ok and len(res.refusals) == 1, res.explain()
    assert ("per-class recall at the sorting threshold 0.4 fell on the golden set: "
            "li_ion_pack recall 0.300 < active 0.800 - tolerance 0.050") in res.explain()
    assert res.details["per_class_recall@0.4"]["li_ion_pack"] == {"candidate": 0.3, "active": 0.8}
    reg.record_metrics("det-v3", "gold1", _at(0.4, {"li_ion_pack": 0.95}))
    assert _gate(reg, "det-v3", operating_conf=0.4).ok


def test_gate_counts_items_not_only_rates_on_a_small_golden_set(reg, tmp_path):
    """Five nimh cells in the golden set: one fewer found at the threshold is recall 1.0 -> 0.8, which is
    noise at that size; three fewer is a regression, named with its count."""
    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.register(tiny_onnx(tmp_path / "det-v3.onnx", version="det-v3"))
    reg.set_active("det-v1", "baseline")
    active = _at(0.4, {"nimh": 1.0})
    active["per_class_tp"] = {"nimh": 5}
    one_fewer = _at(0.4, {"nimh": 0.8})
    one_fewer["per_class_tp"] = {"nimh": 4}
    three_fewer = _at(0.4, {"nimh": 0.4})
    three_fewer["per_class_tp"] = {"nimh": 2}
    reg.record_metrics("det-v1", "gold1", active)
    reg.record_metrics("det-v2", "gold1", one_fewer)
    reg.record_metrics("det-v3", "gold1", three_fewer)
    assert _gate(reg, "det-v2", operating_conf=0.4).ok
    assert not _gate(reg, "det-v2", operating_conf=0.4, min_items=1).ok
    res = _gate(reg, "det-v3", operating_conf=0.4)
    assert not res.ok and "nimh recall 0.400 < active 1.000 - tolerance 0.050 (3 items fewer)" in res.explain()


def test_gate_evaluates_again_when_cached_metrics_were_taken_at_another_threshold(reg, tmp_path):
    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.set_active("det-v1", "baseline")
    reg.record_metrics("det-v1", "gold1", _metrics(0.8))            # AP50 only, from before the check
    reg.record_metrics("det-v2", "gold1", _at(0.25, {}))             # another threshold
    seen = []

    def evaluate(p):
        seen.append(p.name)
        return _at(0.4, {})

    assert _gate(reg, "det-v2", operating_conf=0.4, evaluate=evaluate).ok
    assert sorted(seen) == ["det-v1.onnx", "det-v2.onnx"]
    assert reg.card("det-v1")["golden"]["gold1"]["operating_conf"] == 0.4
    # without an evaluator, metrics lacking the threshold are a refusal, not a silent pass
    reg.record_metrics("det-v1", "gold1", _metrics(0.8))
    res = _gate(reg, "det-v2", operating_conf=0.4)
    assert not res.ok and "no per-class recall at the sorting threshold 0.4" in res.explain()


# ---- what a running station accepts (the hot-swap validation) --------------------------------------
def test_station_loader_refuses_corrupt_dynamic_and_foreign_models(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="corrupt"):
        load_for_station(bad, NAMES, NAMES, (720, 1280))
    dyn = tiny_onnx(tmp_path / "dyn.onnx", dynamic=True)
    with pytest.raises(ModelError, match="fixed NCHW input"):
        load_for_station(dyn, NAMES, NAMES, (720, 1280))
    odd = tiny_onnx(tmp_path / "odd.onnx", names=list(NAMES[:-1]) + ["toaster"])
    with pytest.raises(ModelError, match=r"\['toaster'\] are not in the taxonomy"):
        load_for_station(odd, NAMES, NAMES, (720, 1280))
    shuffled = tiny_onnx(tmp_path / "shuffled.onnx", names=list(reversed(NAMES)))
    with pytest.raises(ModelError, match="differ from the running model"):
        load_for_station(shuffled, NAMES, NAMES, (720, 1280))
    ok = tiny_onnx(tmp_path / "ok.onnx", boxes=[(32, 32, 10, 10, 2, 0.9)])
    det = load_for_station(ok, NAMES, NAMES, (720, 1280))
    assert det.names == NAMES


def test_cli_list_promote_refusal_and_rollback(reg, tmp_path, capsys):
    from station.cli import main

    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.set_active("det-v1", "baseline")
    reg.record_metrics("det-v1", "gold1", _metrics(0.8))
    assert main(["model", "list", "--models", str(reg.root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["active"] == "det-v1" and {v["version"] for v in listed["versions"]} == {"det-v1", "det-v2"}
    # no golden set: refused, exit code 3, the reason on stderr
    assert main(["model", "promote", "det-v2", "--models", str(reg.root), "--latency-budget-ms", "1e6"]) == 3
    assert "no golden set given" in capsys.readouterr().err
    assert main(["model", "promote", "det-v2", "--models", str(reg.root), "--force", "test"]) == 0
    assert reg.active_version() == "det-v2"
    assert main(["model", "rollback", "--models", str(reg.root)]) == 0
    assert reg.active_version() == "det-v1"


def test_train_from_a_version_starts_from_its_weights(reg, tmp_path, monkeypatch):
    import station.cli_model as cm
    from station.cli import main

    got = {}
    monkeypatch.setattr(cm, "cmd_model_train", lambda a: got.update(vars(a)) or 0)
    # main() builds its parser afresh: the train handler it wraps is the patched one
    assert main(["model", "train", "--data", "d.yaml", "--from", "det-v1", "--models", str(reg.root)]) == 0
    assert got["model"] == str(reg.root / "active.pt") and got["warmup_epochs"] == 0.0
    assert main(["model", "train", "--data", "d.yaml", "--from", "det-nope", "--models", str(reg.root)]) == 2


def _verdict(misrouted: int = 0, purity: float = 0.99, recovery: float = 0.99) -> dict:
    return {"items": 200, "seed": 11, "purity": purity, "recovery": recovery, "li_ion_items": 40,
            "li_ion_misrouted": misrouted, "li_ion_misrouted_to": {"bin 2": misrouted} if misrouted else {}}


def _line_gate(reg, tmp_path, cand: dict, active: dict, **metrics):
    reg.register(tiny_onnx(tmp_path / "det-v2.onnx", version="det-v2"))
    reg.set_active("det-v1", "baseline")
    reg.record_metrics("det-v1", "gold1", _metrics(0.80))
    reg.record_metrics("det-v2", "gold1", _metrics(0.85, **metrics))
    runs: list[str] = []

    def line_check(p):
        runs.append(p.name)
        return cand if p.name == "det-v2.onnx" else active

    return _gate(reg, "det-v2", line_check=line_check), runs


def test_gate_refuses_a_candidate_that_sends_li_ion_to_a_wrong_bin_on_the_simulated_line(reg, tmp_path):
    """Better AP50 everywhere and better line totals, yet 2 Li-ion cells in bin 2: refused, and said so."""
    res, runs = _line_gate(reg, tmp_path, _verdict(misrouted=2, purity=0.995, recovery=0.995), _verdict())
    assert not res.ok
    assert runs == ["det-v2.onnx", "det-v1.onnx"]          # both models sort the same batch
    text = res.explain()
    assert "2 Li-ion item(s) of 40 went to a wrong sorted bin" in text and "{'bin 2': 2}" in text
    assert "purity" not in text and "recovery" not in text  # those improved
    assert res.details["line"]["active"]["li_ion_misrouted"] == 0


def test_gate_refuses_purity_lost_on_the_line_beyond_the_tolerance(reg, tmp_path):
    res, _ = _line_gate(reg, tmp_path, _verdict(purity=0.975, recovery=0.985), _verdict())
    assert not res.ok
    assert "purity on the simulated line 0.9750 < active 0.9900 - tolerance 0.010 (200 items, seed 11)" in res.explain()
    assert "recovery" not in res.explain()                  # 0.005 lower: within the tolerance


def test_gate_passes_a_candidate_no_worse_on_the_line(reg, tmp_path):
    res, _ = _line_gate(reg, tmp_path, _verdict(misrouted=1, recovery=0.985), _verdict(misrouted=1))
    assert res.ok, res.explain()                            # no worse than the active model on Li-ion
    assert res.details["line"]["candidate"]["recovery"] == 0.985


def test_gate_spends_no_simulation_on_a_candidate_refused_already(reg, tmp_path):
    res, runs = _line_gate(reg, tmp_path, _verdict(), _verdict(), li_ion_cell=0.5)
    assert not res.ok and "li_ion_cell AP50" in res.explain()
    assert runs == [] and "line" not in res.details


def test_the_gates_line_check_sorts_a_real_batch_with_the_candidate_model():
    """The wiring under the gate's last step: the station (default rules and inspectors) on the simulated
    line, with the candidate swapped in as its detector, judged from ground truth."""
    from station.cli_loop import simulated_line_verdict
    from station.config import load_config
    from vision.taxonomy import REPO_ROOT

    v = simulated_line_verdict(load_config(None), REPO_ROOT / "models" / "det-v1.onnx", 12, seed=4)
    assert v["model_version"] == "det-v1"                 # the candidate ran, not the active model
    assert v["items"] == 12 and v["seed"] == 4
    assert 0 <= v["li_ion_misrouted"] <= v["li_ion_items"] <= 12
    assert v["li_ion_misrouted"] == sum(v["li_ion_misrouted_to"].values())


def test_line_verdict_counts_li_ion_in_any_sorted_bin_but_its_own_and_not_the_manual_path():
    from station.config import load_config
    from station.report import line_verdict

    cfg = load_config(None)
    own = cfg.rules.class_to_bin["li_ion_cell"]
    rep = {"items": 60, "seed": 3, "model_version": "det-x", "purity": 0.97, "recovery": 0.96, "per_class": {
        "li_ion_cell": {"count": 33, "bins": {str(own): 30, "2": 2, "0": 1}},
        "li_ion_pack": {"count": 10, "bins": {str(cfg.rules.class_to_bin["li_ion_pack"]): 9, "4": 1}},
        "alkaline": {"count": 17, "bins": {"1": 3, "2": 14}}}}          # not Li-ion: not counted here
    v = line_verdict(rep, cfg)
    assert (v["li_ion_items"], v["li_ion_misrouted"], v["li_ion_misrouted_to"]) == (43, 3, {"bin 2": 2, "bin 4": 1})
