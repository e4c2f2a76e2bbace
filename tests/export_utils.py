"""Export-parity helpers shared by the model tests: ONNX (onnxruntime) and OpenVINO (f32) vs torch.

Also the deployment checks of ``tests/test_deploy.py``: anomalib's ``OpenVINOInferencer`` predictions
against torch's, scores and maps within ``rel`` of the torch output's scale, labels and masks equal
wherever the torch value is further than that from its threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: OpenVINO compile configuration of every check: f32 (the CPU plugin defaults to bf16 where the CPU has it)
INFERENCER_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
#: what anomalib's OpenVINOInferencer returns for a model exported with its post-processor
PREDICTION_FIELDS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


def torch_outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Outputs of the whole Lightning pipeline (pre-processor, model, post-processor) in eval mode."""
    model.eval()
    with torch.no_grad():
        batch = model(images)
    return {name: value.detach().numpy() for name, value in batch._asdict().items() if isinstance(value, torch.Tensor)}


def _scale(theirs: np.ndarray) -> float:
    """What ``rel`` is relative to: the range of the torch output, or its magnitude when larger."""
    theirs = np.asarray(theirs, dtype=np.float64)
    return max(float(np.ptp(theirs)), float(np.abs(theirs).max()), 1e-6)


def _close(name: str, ours: np.ndarray, theirs: np.ndarray, rel: float, scale: float | None = None) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape or ours.size == theirs.size, (name, ours.shape, theirs.shape)
    if scale is None:
        scale = _scale(theirs) if name != "pred_label" else 1.0
    error = float(np.abs(ours.reshape(-1) - theirs.reshape(-1)).max())
    assert error <= rel * scale, f"{name}: max abs error {error:.3g} > {rel} x {scale:.3g}"


def assert_export_parity(model, tmp_path: Path, input_size: tuple[int, int], rel: float = 1e-3) -> dict[str, Path]:  # noqa: ANN001
    """Export ``model`` to ONNX and OpenVINO and compare anomaly maps and scores with torch.

    OpenVINO is compiled with ``INFERENCE_PRECISION_HINT=f32`` (it defaults to bf16 on CPUs that
    support it). Errors are measured relative to the range of the torch output. One dynamo export: the
    OpenVINO IR is the ONNX file converted as ``to_openvino`` converts it (``ov.convert_model`` +
    ``ov.save_model``, no fp16 compression); ``to_openvino`` itself, through ``Engine.export``, runs
    for every model in ``tests/test_deploy.py``.
    """
    import onnxruntime as ort
    import openvino as ov

    torch.manual_seed(0)
    images = torch.rand(2, 3, *input_size)
    expected = torch_outputs(model, images)
    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=input_size, opset_version=18)
    ov_path = tmp_path / "openvino" / "model.xml"
    ov_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(onnx_path), ov_path, compress_to_fp16=False)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))

    compiled = ov.Core().compile_model(str(ov_path), "CPU", INFERENCER_CONFIG)
    ov_result = compiled(images.numpy())
    ov_out = {next(iter(port.get_names())): ov_result[port] for port in compiled.outputs}

    for name in ("anomaly_map", "pred_score"):
        assert name in expected, f"torch output has no {name}"
        _close(f"onnx {name}", onnx_out[name], expected[name], rel)
        _close(f"openvino {name}", ov_out[name], expected[name], rel)
    return {"onnx": Path(onnx_path), "openvino": Path(ov_path)}


def batch_outputs(batch) -> dict[str, np.ndarray]:
    """The prediction fields of a torch batch (``InferenceBatch`` or ``Engine.predict``'s ``ImageBatch``)."""
    return {name: getattr(batch, name).detach().cpu().numpy() for name in PREDICTION_FIELDS}


def assert_prediction_matches(
    prediction,  # anomalib's NumpyImageBatch
    expected: dict[str, np.ndarray],
    thresholds: tuple[float, float],
    rel: float = 1e-3,
    where: str = "",
) -> None:
    """An ``OpenVINOInferencer.predict`` result equals torch's ``expected`` outputs of the same images.

    ``anomaly_map`` within ``rel`` of the torch map's scale (as ``assert_export_parity``), ``pred_score``
    within ``rel`` of the normalised score range [0, 1]; ``pred_label`` / ``pred_mask`` equal wherever torch's score / map is
    further than that tolerance from its (normalised) image / pixel threshold (most pixels must be).
    Layouts are the inferencer's: maps ``(N, 1, H, W)``, masks ``(N, H, W, 1)``; torch's ``(N, 1, H, W)``.
    """
    for name in PREDICTION_FIELDS:
        assert getattr(prediction, name) is not None, f"{where}: the inferencer returned no {name}"
    # The post-processor normalises image scores to [0, 1]: that range is their scale. A single image's score
    # has no range, and its magnitude made the tolerance depend on where the score fell (0.24 in one CI run: a
    # 4x tighter bound than the map's, failed by a 0.0004 difference that the map check accepted).
    scales = {"pred_score": 1.0, "anomaly_map": _scale(expected["anomaly_map"])}
    _close(f"{where} pred_score", prediction.pred_score, expected["pred_score"], rel, scales["pred_score"])
    _close(f"{where} anomaly_map", prediction.anomaly_map, expected["anomaly_map"], rel, scales["anomaly_map"])
    checks = (("pred_label", "pred_score", thresholds[0]), ("pred_mask", "anomaly_map", thresholds[1]))
    for name, values, threshold in checks:
        reference = np.asarray(expected[values], dtype=np.float64).reshape(-1)
        decided = np.abs(reference - threshold) > rel * scales[values]
        if name == "pred_mask":  # not for labels: a validation image's score can be the F1 threshold itself
            assert decided.mean() >= 0.5, f"{where} {name}: most torch values lie at the threshold {threshold}"
        ours = np.asarray(getattr(prediction, name)).reshape(-1).astype(bool)
        theirs = np.asarray(expected[name]).reshape(-1).astype(bool)
        assert ours.size == theirs.size, (where, name, ours.size, theirs.size)
        flipped = int((ours[decided] != theirs[decided]).sum())
        assert flipped == 0, f"{where} {name}: {flipped} of {int(decided.sum())} decided values differ from torch"
