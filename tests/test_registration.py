"""Registration with anomalib: the user's exact commands find the package's models.

These tests run real subprocesses, so they see what an installed package does at interpreter
start-up (the ``anomalib_dskd-autoload.pth`` hook), with no import done by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "CI": "true", "PYTHONWARNINGS": "ignore", "COLUMNS": "400"}


def _python(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, **env}, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def _anomalib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("anomalib")
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600, check=False)
    assert result.returncode == 0, f"anomalib {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_autoload_hook_is_installed_and_imports_nothing_heavy() -> None:
    out = _python(
        "import sys; import json; "
        "print(any(type(f).__name__ == 'AnomalibModelsFinder' for f in sys.meta_path), "
        "'torch' in sys.modules, 'anomalib' in sys.modules)",
    )
    assert out == "True False False"


def test_models_visible_to_anomalib_lookups_without_manual_import() -> None:
    out = _python(
        "import anomalib.models as m\n"
        "print('rd' in m.list_models(), type(m.get_model('rd', backbone='resnet18', pre_trained=False)).__name__)\n"
        "a = m.get_model({'class_path': 'anomalib_dskd.Rd', 'init_args': {'backbone': 'resnet18', 'pre_trained': False}})\n"
        "b = m.get_model({'class_path': 'Rd', 'init_args': {'backbone': 'resnet18', 'pre_trained': False}})\n"
        "print(type(a).__module__, type(b).__name__)",
    )
    assert out.splitlines() == ["True Rd", "anomalib_dskd.models.rd.lightning_model Rd"]


def test_autoload_can_be_switched_off() -> None:
    out = _python("import anomalib.models as m; print('rd' in m.list_models())", ANOMALIB_DSKD_AUTOLOAD="0")
    assert out == "False"


def test_importing_package_internals_first_still_registers() -> None:
    """``anomalib.models`` imported from inside the package (circular case) registers on first lookup."""
    out = _python(
        "from anomalib_dskd.components.rd import ReverseDistillationCore\n"
        "import anomalib.models as m\n"
        "print('rd' in m.list_models())",
    )
    assert out == "True"


@pytest.mark.slow
def test_cli_train_test_export_predict_with_bare_and_dotted_names(
    tiny_loco, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    root, category = tiny_loco
    data = ["--data", "anomalib.data.MVTecLOCO", "--data.root", str(root), "--data.category", category,
            "--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4"]
    model = ["--model.backbone", "resnet18", "--model.pre_trained", "false"]
    _anomalib("train", "--model", "Rd", *model, *data, "--trainer.max_epochs", "1",
              "--default_root_dir", str(tmp_path / "results"), cwd=tmp_path)
    checkpoints = list((tmp_path / "results").rglob("*.ckpt"))
    assert len(checkpoints) == 1
    ckpt = str(checkpoints[0])

    tested = _anomalib("test", "--model", "anomalib_dskd.Rd", *model, *data, "--ckpt_path", ckpt,
                       "--default_root_dir", str(tmp_path / "test"), cwd=tmp_path)
    assert "image_AUROC" in tested.stdout

    config = tmp_path / "rd.yaml"
    config.write_text(
        "model:\n  class_path: anomalib_dskd.Rd\n  init_args:\n    backbone: resnet18\n    pre_trained: false\n",
    )
    # `anomalib export --export_type openvino` (its ONNX step included; anomalib's defaults: opset 14, dynamic
    # input size), then anomalib's OpenVINOInferencer on an image file against the checkpoint's torch model
    _anomalib("export", "--config", str(config), "--export_type", "openvino", "--ckpt_path", ckpt,
              "--export_root", str(tmp_path / "export"), cwd=tmp_path)
    xml = next((tmp_path / "export").rglob("model.xml"))
    image = next((root / category / "test" / "logical_anomalies").glob("*.png"))
    monkeypatch.chdir(tmp_path)  # the inferencer writes its compile cache to ./openvino_cache
    _assert_inferencer_matches_checkpoint(xml, ckpt, image)

    _anomalib("predict", "--model", "Rd", *model, "--data", str(image), "--ckpt_path", ckpt,
              "--default_root_dir", str(tmp_path / "predict"), cwd=tmp_path)
    assert list((tmp_path / "predict").rglob("*.png"))


def _assert_inferencer_matches_checkpoint(xml: Path, ckpt: str, image: Path) -> None:
    from anomalib.data.utils import read_image
    from anomalib.deploy import OpenVINOInferencer

    from anomalib_dskd import Rd

    from .export_utils import INFERENCER_CONFIG, assert_prediction_matches, torch_outputs

    model = Rd.load_from_checkpoint(ckpt, map_location="cpu")
    post = model.post_processor
    thresholds = (float(post.normalized_image_threshold), float(post.normalized_pixel_threshold))
    prediction = OpenVINOInferencer(xml, device="CPU", config=INFERENCER_CONFIG).predict(image)
    expected = torch_outputs(model, read_image(image, as_tensor=True)[None])
    assert_prediction_matches(prediction, expected, thresholds, where="anomalib export --export_type openvino")


@pytest.mark.slow
def test_cli_missing_dataset_root_names_the_path(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("anomalib")
    missing = tmp_path / "no_such_root"
    result = subprocess.run(
        [str(exe), "train", "--model", "Rd", "--model.backbone", "resnet18", "--model.pre_trained", "false",
         "--data", "MVTecLOCO", "--data.root", str(missing), "--data.category", "parts",
         "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path / "results")],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300, check=False,
    )
    assert result.returncode != 0
    output = (result.stderr + result.stdout).replace("\n", "")  # rich may wrap long lines
    assert f"Path does not exist: {missing / 'parts'}" in output
