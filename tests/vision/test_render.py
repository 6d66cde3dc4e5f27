import numpy as np
import pytest

from vision.render.items import DISTRACTORS, TARGET_CLASSES, draw_item, footprint_mm, sample_item
from vision.render.synth import SynthSettings, render_scene
from vision.taxonomy import load_taxonomy


def test_taxonomy_matches_the_renderer():
    tax = load_taxonomy()
    assert tuple(tax.names) == TARGET_CLASSES
    assert tuple(tax.distractors) == DISTRACTORS
    assert all(c.description for c in tax.classes)


def test_scene_is_deterministic_for_a_seed():
    a, la = render_scene(np.random.default_rng([5, 1]), SynthSettings())
    b, lb = render_scene(np.random.default_rng([5, 1]), SynthSettings())
    assert np.array_equal(a, b) and la == lb


@pytest.mark.parametrize("kind", TARGET_CLASSES + DISTRACTORS)
def test_sprite_has_its_physical_size(kind):
    rng = np.random.default_rng(3)
    for _ in range(5):
        spec = sample_item(kind, rng)
        sp = draw_item(spec, px_per_mm=2.0)
        x0, y0, x1, y1 = sp.box
        # every opaque pixel is inside the box, and the box is tight
        ys, xs = np.nonzero(sp.alpha > 0.5)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        if kind in ("cable", "plastic_fragment", "screw"):
            continue  # irregular shapes fill less than their nominal rectangle
        fl, fw = footprint_mm(spec)
        assert (x1 - x0) / 2.0 == pytest.approx(fl, rel=0.08, abs=2.0)
        assert (y1 - y0) / 2.0 == pytest.approx(fw, rel=0.08, abs=2.0)


def test_sizes_follow_items_reference():
    rng = np.random.default_rng(0)
    cells = [sample_item("li_ion_cell", rng) for _ in range(50)]
    assert {(c.length_mm, c.width_mm) for c in cells} <= {(65.0, 18.0), (70.0, 21.0)}
    coins = [sample_item("coin_cell", rng) for _ in range(50)]
    assert all(5.8 <= c.length_mm <= 20.0 for c in coins)


def test_attached_battery_is_labelled_inside_its_board():
    rng = np.random.default_rng(11)
    found = 0
    for _ in range(60):
        spec = sample_item("board_high", rng, attach_battery_p=1.0)
        if spec.attached is None:
            continue
        sp = draw_item(spec, 1.8)
        (name, (px0, py0, px1, py1)), = sp.parts
        bx0, by0, bx1, by1 = sp.box
        assert name == spec.attached.kind
        assert px0 >= bx0 - 1 and py0 >= by0 - 1 and px1 <= bx1 + 1 and py1 <= by1 + 1
        found += 1
    assert found > 20


def test_labels_are_valid_boxes_of_target_classes():
    rng = np.random.default_rng(2)
    n = 0
    for _ in range(10):
        img, labels = render_scene(rng, SynthSettings())
        H, W = img.shape[:2]
        for l in labels:
            x0, y0, x1, y1 = l.box
            assert l.class_name in TARGET_CLASSES
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            n += 1
    assert n > 20


def test_synth_command_takes_the_class_mix_and_the_share_of_boards_with_a_battery(tmp_path, capsys):
    """`kozan dataset synth --board-battery 1 --class-weight ...`: a set that teaches attached cells."""
    import json

    from station.cli import main

    out = tmp_path / "boards"
    weights = [a for c in TARGET_CLASSES if not c.startswith("board")
               for a in ("--class-weight", f"{c}=0")]
    rc = main(["dataset", "synth", "--n", "12", "--seed", "3", "--workers", "1", "--out", str(out),
               "--board-battery", "1", *weights])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["attach_battery_p"] == 1.0
    boxes = manifest["boxes"]["train"]
    boards = boxes.get("board_high", 0) + boxes.get("board_low", 0)
    cells = sum(v for k, v in boxes.items() if not k.startswith("board"))
    assert boards > 0 and cells > 0, boxes       # only boards drawn, and cells on them

    rc = main(["dataset", "synth", "--n", "2", "--out", str(tmp_path / "x"), "--class-weight", "toaster=2"])
    assert rc == 2
    assert "toaster=2" in capsys.readouterr().err


def test_subtype_weights_change_one_class_mix_and_nothing_else(tmp_path, capsys):
    """`--subtype-weight alkaline/9V=4`: more 9 V blocks among the alkaline cells; without it, the
    draws are the unweighted ones, so every dataset made before the option is made again unchanged."""
    from station.cli import main

    def subtypes(kind: str, weights: dict[str, float] | None) -> list[str]:
        rng = np.random.default_rng(11)
        return [sample_item(kind, rng, subtype_weights=weights).subtype for _ in range(3000)]

    plain = subtypes("alkaline", None)
    assert subtypes("alkaline", {}) == plain
    assert subtypes("alkaline", {"nimh/pack": 3.0}) == plain          # another class's weight: no effect
    share = subtypes("alkaline", {"alkaline/9V": 4.0}).count("9V") / 3000
    assert plain.count("9V") / 3000 == pytest.approx(0.15, abs=0.02)
    assert share == pytest.approx(0.6 / 1.45, abs=0.03)             # 0.15 x 4 against 0.85 + 0.6

    rc = main(["dataset", "synth", "--n", "2", "--workers", "1", "--out", str(tmp_path / "n"),
               "--subtype-weight", "alkaline/9V=4"])
    assert rc == 0
    assert '"alkaline/9V": 4.0' in (tmp_path / "n" / "manifest.json").read_text()
    rc = main(["dataset", "synth", "--n", "2", "--out", str(tmp_path / "x"), "--subtype-weight", "alkaline/10V=2"])
    assert rc == 2
    assert "alkaline/10V=2" in capsys.readouterr().err
    rc = main(["dataset", "synth", "--n", "2", "--out", str(tmp_path / "x"), "--subtype-weight", "alkaline/9V=-1"])
    assert rc == 2 and "0 or more" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no subtype of li_ion_cell"):
        subtypes("li_ion_cell", {"li_ion_cell/18650": 0.0, "li_ion_cell/21700": 0.0})


def test_distractor_share_sets_how_many_unlabelled_negatives_a_scene_holds(tmp_path, capsys):
    """`--distractor-share`: the far view read plastic fragments as batteries, so a set can carry more of
    the things it must not box; they stay unlabelled (negatives), and a share outside 0..1 is refused."""
    from station.cli import main

    def negatives_and_labels(share: float) -> tuple[int, int]:
        rng = np.random.default_rng(4)
        cfg = SynthSettings(distractor_p=share)
        scenes = [render_scene(rng, cfg, with_distractors=True) for _ in range(60)]
        return sum(len(d) for _, _, d in scenes), sum(len(labels) for _, labels, _ in scenes)

    none_neg, none_lab = negatives_and_labels(0.0)
    many_neg, many_lab = negatives_and_labels(0.6)
    assert none_neg == 0 and none_lab > 0
    assert many_neg > many_lab / 2                 # ~0.6 of the items, less what overlap hides

    rc = main(["dataset", "synth", "--n", "2", "--workers", "1", "--out", str(tmp_path / "d"),
               "--distractor-share", "0.6"])
    assert rc == 0
    assert '"distractor_p": 0.6' in (tmp_path / "d" / "manifest.json").read_text()
    rc = main(["dataset", "synth", "--n", "2", "--out", str(tmp_path / "x"), "--distractor-share", "1.5"])
    assert rc == 2 and "between 0 and 1" in capsys.readouterr().err
