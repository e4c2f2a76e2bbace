"""Speed, size and memory measurements of one trained model (CPU, batch 1).

* :func:`torch_latency`: the whole Lightning pipeline (pre-processor, model, post-processor) in eval
  mode under ``torch.inference_mode``, ``threads`` intra-op threads.
* :func:`export_openvino`: anomalib's ``to_openvino`` (opset 18, fixed input size): the same pipeline.
* :func:`quantize_int8`: NNCF post-training quantisation of the exported f32 model, calibrated on
  ``n`` *training* (normal) images resized to the input size.
* :func:`openvino_latency`: OpenVINO CPU plugin, ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO would
  otherwise run f32 models in bf16 on CPUs that support it), ``INFERENCE_NUM_THREADS=threads``, latency
  hint, one synchronous infer request.

Latency = median (and 90th percentile) of ``runs`` timed calls after ``warmup`` untimed ones, on a
random image: the models are dense CNNs / nearest-neighbour searches, whose cost does not depend on the
pixel values. On a shared machine the numbers carry the load of other processes: the cell records the
load average before and after (see :mod:`anomalib_dskd.benchmark.cell`).
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anomalib_dskd.components.int8 import F32_ELEMENTWISE_OPS, int8_ignored_scope

__all__ = [
    "F32_ELEMENTWISE_OPS",
    "count_parameters",
    "cpu_seconds",
    "export_openvino",
    "export_openvino_int8_ptq",
    "latency_stats",
    "map_agreement",
    "openvino_outputs",
    "openvino_latency",
    "openvino_size_mb",
    "peak_rss_mb",
    "model_int8_types",
    "quantize_int8",
    "torch_latency",
]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) used by this process so far, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def count_parameters(module: Any) -> int:  # noqa: ANN401
    """Number of parameters (frozen teacher included; buffers such as a memory bank excluded)."""
    return int(sum(p.numel() for p in module.parameters()))


def latency_stats(samples_s: list[float]) -> dict[str, float]:
    """Milliseconds: median, p90, mean, min over the timed runs."""
    ms = sorted(1000.0 * s for s in samples_s)
    p90 = ms[min(len(ms) - 1, math.ceil(0.9 * len(ms)) - 1)]
    return {
        "median": statistics.median(ms),
        "p90": p90,
        "mean": statistics.fmean(ms),
        "min": ms[0],
        "runs": len(ms),
    }


def _time_calls(call: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    if runs < 1:
        msg = f"runs must be >= 1, got {runs}"
        raise ValueError(msg)
    for _ in range(max(0, warmup)):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return latency_stats(samples)


def torch_latency(
    model: Any,  # noqa: ANN401
    image_size: tuple[int, int],
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = 2,
) -> dict[str, float]:
    """Batch-1 latency of the model's full inference pipeline in torch, on the CPU.

    Args:
        model: an anomalib Lightning module (its ``forward`` runs pre-processor, model, post-processor).
        image_size: input ``(height, width)``.
        warmup: untimed calls first.
        runs: timed calls.
        threads: torch intra-op threads during the measurement (restored afterwards).

    Returns:
        Latency statistics in milliseconds (see :func:`latency_stats`).
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    model = model.cpu().eval()
    image = torch.rand(1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            return _time_calls(lambda: model(image), warmup, runs)
    finally:
        torch.set_num_threads(previous)


def export_openvino(model: Any, export_root: Path, image_size: tuple[int, int], opset_version: int = 18) -> Path:  # noqa: ANN401
    """Export the model (pre- and post-processing included) to OpenVINO IR, f32 weights.

    Returns:
        Path of the ``.xml`` file.
    """
    model = model.cpu().eval()
    return Path(
        model.to_openvino(
            export_root,
            input_size=tuple(image_size),
            onnx_kwargs={"opset_version": int(opset_version)},
        ),
    )


def calibration_images(datamodule: Any, count: int, image_size: tuple[int, int]) -> np.ndarray:  # noqa: ANN401
    """The first ``count`` training images, resized to the input size: ``(N, 3, H, W)`` float32 in [0, 1]."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    datamodule.setup("fit")
    dataset = datamodule.train_data
    images = []
    for index in range(min(count, len(dataset))):
        image = dataset[index].image
        if not isinstance(image, torch.Tensor):  # pragma: no cover - anomalib always gives tensors
            image = torch.as_tensor(np.asarray(image))
        image = F.interpolate(image[None].float(), size=tuple(image_size), mode="bilinear", antialias=True)
        images.append(image.clamp(0, 1).numpy())
    if not images:
        msg = "no training images to calibrate INT8 quantisation with"
        raise RuntimeError(msg)
    return np.concatenate(images).astype(np.float32)


def model_int8_types(model: Any) -> dict[str, tuple[str, ...]]:  # noqa: ANN401
    """The INT8 scope a model declares (``Int8Export``), as :func:`quantize_int8`'s keyword arguments.

    The package's models keep their scoring arithmetic f32 (``int8_scoring_tail_types``, some also
    ``int8_ignored_types``); anomalib's built-ins declare nothing (``()``: only the map smoothing stays f32).
    Quantising a package model without its scope is not what its users get from ``anomalib export``.
    """
    return {
        "ignored_types": tuple(getattr(model, "int8_ignored_types", ())),
        "tail_types": tuple(getattr(model, "int8_scoring_tail_types", ())),
        "rules": tuple(getattr(model, "int8_f32_rules", ())),
    }


def quantize_int8(
    xml_path: Path,
    images: np.ndarray,
    output_dir: Path,
    ignored_types: tuple[str, ...] | None = None,
    tail_types: tuple[str, ...] | None = None,
    rules: tuple[str, ...] | None = None,
) -> Path:
    """NNCF post-training INT8 quantisation of an OpenVINO model.

    Args:
        xml_path: the f32 model.
        images: calibration images ``(N, 3, H, W)`` (one per calibration step, batch 1).
        output_dir: where ``model.xml`` / ``model.bin`` of the INT8 model are written.
        ignored_types: OpenVINO op types NNCF must leave in f32 (e.g. ``F32_ELEMENTWISE_OPS``); the
            map-smoothing convolutions always stay f32 (``anomalib_dskd.components.int8``: OpenVINO's image
            score is wrong when they are INT8). ``None``: no op type.
        tail_types: op types NNCF must leave in f32 in the scoring tail only (``scoring_tail_ops``; the
            package's RD-family path uses ``F32_ELEMENTWISE_OPS``). ``None``: none. Pass a model's own scope
            with ``**model_int8_types(model)``.
        rules: names of ``anomalib_dskd.components.int8.INT8_F32_RULES`` whose ops stay f32 (a model's
            ``int8_f32_rules``). ``None``: none.

    Returns:
        Path of the INT8 ``.xml``.
    """
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    dataset = nncf.Dataset([image[None] for image in images])
    scope = int8_ignored_scope(model, tuple(ignored_types or ()), tuple(tail_types or ()), tuple(rules or ()))
    quantized = nncf.quantize(model, dataset, subset_size=len(images), ignored_scope=scope)
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / "model.xml"
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def export_openvino_int8_ptq(
    model: Any,  # noqa: ANN401
    datamodule: Any,  # noqa: ANN401
    export_root: Path,
    image_size: tuple[int, int],
    opset_version: int = 18,
) -> Path:
    """anomalib's own INT8 path: ``to_openvino(compression_type=CompressionType.INT8_PTQ, datamodule=...)``.

    What ``anomalib export --export_type openvino --compression_type INT8_PTQ`` runs: NNCF
    post-training quantisation calibrated on the datamodule's *validation* images (anomalib's
    choice; :func:`quantize_int8` calibrates on training images instead). The package's models override
    the quantisation call with their ignored scope (``anomalib_dskd.components.int8.Int8Export``).
    """
    from anomalib.deploy import CompressionType

    model = model.cpu().eval()
    return Path(
        model.to_openvino(
            export_root,
            input_size=tuple(image_size),
            compression_type=CompressionType.INT8_PTQ,
            datamodule=datamodule,
            onnx_kwargs={"opset_version": int(opset_version)},
        ),
    )


def openvino_outputs(xml_path: Path, images: np.ndarray, threads: int | None = 2) -> dict[str, np.ndarray]:
    """Every output of an OpenVINO model for ``images`` ``(N, 3, H, W)``, one image per call, f32 precision.

    Returns:
        Output name (``pred_score``, ``anomaly_map``, ...) -> values stacked over the images.
    """
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(str(xml_path), "CPU", config)
    outputs: dict[str, list[np.ndarray]] = {}
    for image in images:
        result = compiled(image[None].astype(np.float32))
        for port in compiled.outputs:
            outputs.setdefault(port.get_any_name(), []).append(np.asarray(result[port]))
    return {name: np.concatenate(values) for name, values in outputs.items()}


def map_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far ``other`` maps are from ``reference`` maps (e.g. INT8 vs f32), per image and overall.

    Returns:
        ``pearson`` (over all pixels of all images), ``pearson_min`` (the worst image's), ``pearson_mean`` (the
        mean of the images'), and ``max_abs_rel`` (the largest absolute difference over the reference's value range).
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    oth = np.asarray(other, dtype=np.float64).reshape(len(other), -1)

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(), b - b.mean()
        denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
        return float((a * b).sum() / denominator) if denominator > 0 else float("nan")

    span = float(ref.max() - ref.min()) or 1.0
    per_image = [pearson(a, b) for a, b in zip(ref, oth, strict=True)]
    return {
        "pearson": pearson(ref.reshape(-1), oth.reshape(-1)),
        "pearson_min": min(per_image),
        "pearson_mean": float(np.mean(per_image)),
        "max_abs_rel": float(np.abs(ref - oth).max() / span),
    }


def openvino_latency(
    xml_path: Path,
    image_size: tuple[int, int],
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = 2,
) -> dict[str, float]:
    """Batch-1 latency of an OpenVINO model on the CPU (f32 inference precision).

    Returns:
        Latency statistics in milliseconds (see :func:`latency_stats`).
    """
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(str(xml_path), "CPU", config)
    request = compiled.create_infer_request()
    image = np.random.default_rng(0).random((1, 3, *image_size), dtype=np.float32)
    return _time_calls(lambda: request.infer({0: image}), warmup, runs)


def openvino_size_mb(xml_path: Path) -> float:
    """Size on disk of an OpenVINO model (``.xml`` + ``.bin``), in MiB."""
    xml_path = Path(xml_path)
    files = [xml_path, xml_path.with_suffix(".bin")]
    return sum(f.stat().st_size for f in files if f.is_file()) / (1024 * 1024)
