"""``anomalib-dskd demo``: the README's main job, as a smoke test with a random teacher."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from anomalib_dskd.cli.main import main

THRESHOLD_WARNING = "The validation set does not contain any anomalous images"


@pytest.mark.slow
def test_demo_end_to_end_smoke(tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    output = tmp_path / "demo"
    caplog.set_level(logging.INFO)
    # 2 epochs: anomalib logs its adaptive-threshold warning twice per validation epoch (image and pixel)
    assert main(["demo", "--no-pretrained", "--epochs", "2", "--image-size", "64", "--output", str(output)]) == 0
    summary = json.loads((output / "demo_metrics.json").read_text())
    assert summary["teacher"] == "random (smoke test)"
    for name in ("image_AUROC_logical", "image_AUROC_structural", "AUSPRO_mean_0.05", "pixel_AUROC"):
        assert 0.0 <= summary["metrics"][name] <= 1.0
    assert Path(summary["openvino_model"]).is_file()
    assert list((output / "results").rglob("*.png")), "no visualisations written"
    assert list((output / "loco_evaluation").glob("*.png")), "no sPRO curves written"
    captured = capsys.readouterr()
    printed = captured.out
    assert "AU-sPRO@0.05" in printed and "logical" in printed
    # each warning once, and none of Lightning's info lines / model summary / torch.onnx progress
    everything = captured.out + captured.err + caplog.text
    assert everything.count(THRESHOLD_WARNING) <= 1
    for noise in ("GPU available", "Total params", "[torch.onnx]", "Tip:", "eval mode"):
        assert noise not in everything, noise
    for path in ("OpenVINO model", "visualisations", "sPRO curves", "all metrics"):
        assert path in printed


def test_quiet_output_shows_each_warning_once(caplog: pytest.LogCaptureFixture) -> None:
    from anomalib_dskd.cli.demo import ONCE_LOGGERS, quiet_output

    caplog.set_level(logging.WARNING)
    logger = logging.getLogger(ONCE_LOGGERS[0])
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to 0"
    with quiet_output():
        assert not seed_logger.isEnabledFor(logging.INFO)
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name  # "GPU available", tips
        for _ in range(3):
            logger.warning(THRESHOLD_WARNING + ". As a result, ...")
        logger.warning("another message")
    assert caplog.text.count(THRESHOLD_WARNING) == 1
    assert "another message" in caplog.text
    logger.warning(THRESHOLD_WARNING)  # outside the demo nothing is filtered
    assert caplog.text.count(THRESHOLD_WARNING) == 2


def test_demo_refuses_bad_image_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--image-size", "250", "--output", str(tmp_path)]) == 2
    assert "multiple of 32" in capsys.readouterr().out


def test_demo_missing_weights_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.pth"
    assert main(["demo", "--weights", str(missing), "--output", str(tmp_path / "out"), "--image-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(missing) in err and "Traceback" not in err
