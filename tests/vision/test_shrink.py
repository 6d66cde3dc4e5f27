"""The narrow network inherits channels that line up across every chunk, concat, residual and head."""
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="shrinking a network needs the train extra (make test installs it)")
pytest.importorskip("ultralytics", reason="shrinking a network needs the train extra (make test installs it)")

from vision.shrink import ShrinkError, shrink_into, shrink_weights  # noqa: E402

NARROW = Path(__file__).resolve().parents[2] / "vision" / "arch" / "yolo11n-narrow.yaml"


def _models():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    wide = DetectionModel("yolo11n.yaml", nc=8, verbose=False)
    narrow = DetectionModel(str(NARROW), nc=8, verbose=False)
    # trained-looking BatchNorms: a copy that put statistics on the wrong channel would show
    for m in wide.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return wide.eval(), narrow.eval()


def test_narrow_network_equals_the_wide_one_with_its_dropped_channels_silenced():
    """If every channel the narrow network drops is made exactly zero in the wide one (BatchNorm
    scale and shift 0; SiLU(0) = 0, max-pool and attention of zeros stay zero), the two networks
    compute the same function. Any channel read from the wrong place breaks the equality."""
    wide, narrow = _models()
    kept = shrink_into(wide, narrow)
    assert len(kept) > 50
    with torch.no_grad():
        for bn, idx in kept:
            dropped = torch.ones(bn.num_features, dtype=torch.bool)
            dropped[idx] = False
            bn.weight[dropped] = 0.0
            bn.bias[dropped] = 0.0
            bn.running_mean[dropped] = 0.0
        x = torch.rand(1, 3, 128, 224)
        a, b = wide(x), narrow(x)
    a = a[0] if isinstance(a, (list, tuple)) else a
    b = b[0] if isinstance(b, (list, tuple)) else b
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_without_silencing_the_networks_differ():
    """The equality above is not a property of any two networks of these shapes."""
    wide, narrow = _models()
    shrink_into(wide, narrow)
    with torch.no_grad():
        x = torch.rand(1, 3, 128, 224)
        a, b = wide(x), narrow(x)
    a = a[0] if isinstance(a, (list, tuple)) else a
    b = b[0] if isinstance(b, (list, tuple)) else b
    assert not torch.allclose(a, b, atol=1e-2)


def test_a_wider_target_is_refused():
    from ultralytics.nn.tasks import DetectionModel

    narrow = DetectionModel(str(NARROW), nc=8, verbose=False)
    wide = DetectionModel("yolo11n.yaml", nc=8, verbose=False)
    with pytest.raises(ShrinkError):
        shrink_into(narrow, wide)


def test_checkpoint_trains_as_the_narrow_architecture(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    wide = DetectionModel("yolo11n.yaml", nc=8, verbose=False)
    src = tmp_path / "wide.pt"
    wide.names = {i: f"c{i}" for i in range(8)}
    torch.save({"model": wide, "ema": None}, src)
    info = shrink_weights(src, NARROW, tmp_path / "narrow.pt")
    assert info["params_narrow"] < 0.4 * info["params_wide"]
    ck = torch.load(str(tmp_path / "narrow.pt"), map_location="cpu", weights_only=False)
    # the trainer rebuilds the network from the checkpoint's yaml and loads weights by shape
    rebuilt = DetectionModel(ck["model"].yaml, nc=8, verbose=False)
    sd = ck["model"].state_dict()
    assert all(rebuilt.state_dict()[k].shape == v.shape for k, v in sd.items())
    assert ck["model"].names[3] == "c3"


def test_cli_refuses_a_missing_or_wider_model_with_a_clear_message(tmp_path, capsys):
    from station.cli import main

    assert main(["model", "shrink", str(tmp_path / "nope.pt"), "--arch", str(NARROW),
                 "--out", str(tmp_path / "o.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    from ultralytics.nn.tasks import DetectionModel

    small = DetectionModel(str(NARROW), nc=8, verbose=False)
    torch.save({"model": small, "ema": None}, tmp_path / "narrow.pt")
    assert main(["model", "shrink", str(tmp_path / "narrow.pt"), "--arch", "yolo11n.yaml",
                 "--out", str(tmp_path / "o.pt")]) == 2
    assert "narrower" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()
