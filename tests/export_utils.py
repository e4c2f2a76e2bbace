"""Export-parity helpers shared by the model tests: ONNX (onnxruntime) and OpenVINO (f32) vs torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def torch_outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Outputs of the whole Lightning pipeline (pre-processor, model, post-processor) in eval mode."""
    model.eval()
    with torch.no_grad():
        batch = model(images)
    return {name: value.detach().numpy() for name, value in batch._asdict().items() if isinstance(value, torch.Tensor)}


def _close(name: str, ours: np.ndarray, theirs: np.ndarray, rel: float) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape or ours.size == theirs.size, (name, ours.shape, theirs.shape)
    scale = max(float(np.ptp(theirs)), float(np.abs(theirs).max()), 1e-6) if name != "pred_label" else 1.0
    error = float(np.abs(ours.reshape(-1) - theirs.reshape(-1)).max())
    assert error <= rel * scale, f"{name}: max abs error {error:.3g} > {rel} x {scale:.3g}"


def assert_export_parity(model, tmp_path: Path, input_size: tuple[int, int], rel: float = 1e-3) -> dict[str, Path]:  # noqa: ANN001
    """Export ``model`` to ONNX and OpenVINO and compare anomaly maps and scores with torch.

    OpenVINO is compiled with ``INFERENCE_PRECISION_HINT=f32`` (it defaults to bf16 on CPUs that
    support it). Errors are measured relative to the range of the torch output.
    """
    import onnxruntime as ort
    import openvino as ov

    torch.manual_seed(0)
    images = torch.rand(2, 3, *input_size)
    expected = torch_outputs(model, images)
    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=input_size, opset_version=18)
    ov_path = model.to_openvino(tmp_path / "openvino", input_size=input_size, onnx_kwargs={"opset_version": 18})

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))

    compiled = ov.Core().compile_model(str(ov_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_result = compiled(images.numpy())
    ov_out = {next(iter(port.get_names())): ov_result[port] for port in compiled.outputs}

    for name in ("anomaly_map", "pred_score"):
        assert name in expected, f"torch output has no {name}"
        _close(f"onnx {name}", onnx_out[name], expected[name], rel)
        _close(f"openvino {name}", ov_out[name], expected[name], rel)
    return {"onnx": Path(onnx_path), "openvino": Path(ov_path)}
