"""``anomalib-dskd demo``: the README's main job, as a smoke test with a random teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalib_dskd.cli.main import main


@pytest.mark.slow
def test_demo_end_to_end_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "demo"
    assert main(["demo", "--no-pretrained", "--epochs", "1", "--image-size", "64", "--output", str(output)]) == 0
    summary = json.loads((output / "demo_metrics.json").read_text())
    assert summary["teacher"] == "random (smoke test)"
    for name in ("image_AUROC_logical", "image_AUROC_structural", "AUSPRO_mean_0.05", "pixel_AUROC"):
        assert 0.0 <= summary["metrics"][name] <= 1.0
    assert Path(summary["openvino_model"]).is_file()
    assert list((output / "results").rglob("*.png")), "no visualisations written"
    assert list((output / "loco_evaluation").glob("*.png")), "no sPRO curves written"
    printed = capsys.readouterr().out
    assert "AU-sPRO@0.05" in printed and "logical" in printed


def test_demo_refuses_bad_image_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--image-size", "250", "--output", str(tmp_path)]) == 2
    assert "multiple of 32" in capsys.readouterr().out


def test_demo_missing_weights_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.pth"
    assert main(["demo", "--weights", str(missing), "--output", str(tmp_path / "out"), "--image-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(missing) in err and "Traceback" not in err
