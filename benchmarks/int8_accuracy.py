"""INT8 against f32 for every model, on the real data: accuracy, map agreement, latency and size.

Reads the trained models that a benchmark run kept (``evaluation.keep_checkpoint: true``, as the standard
profile does: ``<output>/cells/<cell>/model.ckpt``), exports each to OpenVINO f32, quantises it two ways and
scores all three on the cell's own test set (the same datamodule, seed and input size as the cell):

* ``f32``: anomalib's ``to_openvino`` (the pipeline the cells' latency is measured on);
* ``int8_anomalib``: anomalib's ``CompressionType.INT8_PTQ`` path (NNCF PTQ on the validation images), what
  ``anomalib export --compression_type INT8_PTQ`` gives;
* ``int8_ours``: :func:`anomalib_dskd.benchmark.measure.quantize_int8` (NNCF PTQ on 32 training images),
  the quick profile's INT8 column.

For each: image AUROC, pixel AUROC and AU-PRO (FPR limit 0.3) of the raw outputs, the maps' Pearson
correlation with the f32 maps, OpenVINO latency (batch 1, ``--threads``) and size. One JSON line per
cell and runtime on stdout and in ``--output``.

    CI=true python benchmarks/int8_accuracy.py --run results/standard --seed 42 --output int8.jsonl

Latency here is measured wherever the script runs: on a shared CPU, compare runtimes within one line
set (same cell, same minutes), not with other runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _load_cell(cell_json: Path, normalised: bool = False) -> tuple[Any, Any, Any]:
    """``(spec, module, datamodule)`` of a finished cell with a kept checkpoint."""
    import torch

    from anomalib_dskd.benchmark.config import CellSpec
    from anomalib_dskd.benchmark.data import build_datamodule
    from anomalib_dskd.benchmark.models import build_model

    spec = CellSpec.from_dict(json.loads(cell_json.with_name(cell_json.stem + ".spec.json").read_text()))
    checkpoint = torch.load(cell_json.with_suffix("") / "model.ckpt", map_location="cpu", weights_only=False)
    module = build_model(spec, evaluator=False).module
    module.on_load_checkpoint(checkpoint)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [key for key in missing if not key.startswith("evaluator.")]
    if missing or unexpected:
        msg = f"{cell_json.stem}: checkpoint does not fit the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        raise RuntimeError(msg)
    # raw maps and scores, as the cells evaluate them: anomalib's normalisation clamps into ties (and, before the
    # map smoothing was kept f32, INT8 gave every image one normalised score: docs/benchmarks/edge/README.md)
    module.post_processor.enable_normalization = normalised
    datamodule = build_datamodule(spec.dataset, spec.data, spec.seed)
    datamodule.setup("test")
    return spec, module.eval(), datamodule


def _test_set(datamodule: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN401
    """Test images resized to the input size (as the calibration images are), labels, masks at that size."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    images, labels, masks = [], [], []
    for batch in datamodule.test_dataloader():
        images.append(F.interpolate(batch.image.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1))
        labels.append(batch.gt_label.reshape(-1))
        mask = batch.gt_mask if batch.gt_mask is not None else torch.zeros(len(batch.image), *batch.image.shape[-2:])
        masks.append(F.interpolate(mask.reshape(len(mask), 1, *mask.shape[-2:]).float(), size=size, mode="nearest"))
    return (
        torch.cat(images).numpy().astype(np.float32),
        torch.cat(labels).numpy().astype(bool),
        (torch.cat(masks).numpy() > 0.5)[:, 0],
    )


def _accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    import torch
    from anomalib.metrics.aupro import _AUPRO

    from anomalib_dskd.benchmark.detection import auroc

    maps = outputs["anomaly_map"].reshape(len(labels), *masks.shape[-2:]).astype(np.float64)
    aupro = _AUPRO(fpr_limit=0.3)
    aupro.update(torch.from_numpy(maps).float(), torch.from_numpy(masks.astype(np.int64)))
    anomalous = masks[labels].any()
    return {
        "image_auroc": auroc(outputs["pred_score"].reshape(-1).astype(np.float64), labels),
        "pixel_auroc": auroc(maps.reshape(-1), masks.reshape(-1)) if anomalous else float("nan"),
        "aupro": float(aupro.compute()) if anomalous else float("nan"),
    }


def measure_cell(
    cell_json: Path, threads: int, runs: int, calibration: int, normalised: bool = False
) -> list[dict[str, Any]]:
    """The three runtimes of one cell (see the module docstring)."""
    import torch
    from torchvision.transforms.v2 import Resize

    from anomalib_dskd.benchmark.measure import (
        calibration_images,
        export_openvino,
        export_openvino_int8_ptq,
        map_agreement,
        openvino_latency,
        openvino_outputs,
        openvino_size_mb,
        quantize_int8,
    )

    torch.set_num_threads(threads)
    spec, module, datamodule = _load_cell(cell_json, normalised)
    size = tuple(spec.image_size)
    images, labels, masks = _test_set(datamodule, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        exports = {"f32": export_openvino(module, tmp_path / "f32", size)}
        export_s = {"f32": time.perf_counter() - start}
        start = time.perf_counter()
        # anomalib's PTQ feeds the validation loader's images to the exported graph as they come; outside a
        # trainer nothing resizes them, and a graph exported at the input size refuses other shapes (juice_bottle:
        # 512x256 images). Resize them in the datamodule, as a user has to (docs/benchmarks/edge/README.md).
        datamodule.val_augmentations = Resize(size, antialias=True)
        exports["int8_anomalib"] = export_openvino_int8_ptq(module, datamodule, tmp_path / "int8_anomalib", size)
        export_s["int8_anomalib"] = time.perf_counter() - start
        start = time.perf_counter()
        calibration_set = calibration_images(datamodule, calibration, size)
        exports["int8_ours"] = quantize_int8(exports["f32"], calibration_set, tmp_path / "int8_ours")
        export_s["int8_ours"] = time.perf_counter() - start + export_s["f32"]
        reference = None
        for runtime, xml in exports.items():
            outputs = openvino_outputs(xml, images, threads=threads)
            if reference is None:
                reference = outputs
            row = {
                "cell": cell_json.stem, "model": spec.model.label, "dataset": spec.dataset.name, "seed": spec.seed,
                "image_size": list(size), "runtime": runtime, "test_images": len(labels), "normalised": normalised,
                **_accuracy(outputs, labels, masks),
                **{f"map_{k}_vs_f32": v for k, v in map_agreement(reference["anomaly_map"], outputs["anomaly_map"]).items()},
                "latency_ms": openvino_latency(xml, size, warmup=5, runs=runs, threads=threads),
                "size_mib": openvino_size_mb(xml), "export_s": export_s[runtime],
                "load_average": list(os.getloadavg()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", required=True, help="benchmark output folder (repeatable)")
    parser.add_argument("--seed", type=int, action="append", default=None, help="only these seeds (repeatable)")
    parser.add_argument("--model", action="append", default=None, help="only these model labels (repeatable)")
    parser.add_argument("--dataset", action="append", default=None, help="only these datasets (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="timed latency runs per runtime")
    parser.add_argument("--calibration", type=int, default=32, help="training images for int8_ours")
    parser.add_argument("--output", type=Path, default=None, help="append JSON lines here")
    parser.add_argument(
        "--normalised", action="store_true",
        help="export with anomalib's normalisation in the graph (the default post-processor) instead of raw outputs",
    )
    args = parser.parse_args()
    os.environ.setdefault("CI", "true")
    cells = sorted(
        path for run in args.run for path in (run / "cells").glob("*.json")
        if not path.name.endswith(".spec.json") and (path.with_suffix("") / "model.ckpt").is_file()
    )
    selected = []
    for path in cells:
        result = json.loads(path.read_text())
        if result.get("status") != "ok":
            continue
        if args.seed and result["seed"] not in args.seed:
            continue
        if args.model and result["model"] not in args.model:
            continue
        if args.dataset and result["dataset"] not in args.dataset:
            continue
        selected.append(path)
    if not selected:
        sys.exit(f"no finished cell with a kept checkpoint under {[str(r) for r in args.run]} matches the filters")
    for index, path in enumerate(selected, 1):
        print(f"[{index}/{len(selected)}] {path.stem}", file=sys.stderr, flush=True)
        try:
            rows = measure_cell(path, args.threads, args.runs, args.calibration, args.normalised)
        except Exception as err:  # noqa: BLE001 - one failing cell is reported, the others still run
            rows = [{"cell": path.stem, "error": f"{type(err).__name__}: {err}"}]
            print(json.dumps(rows[0]), flush=True)
        if args.output:
            with args.output.open("a", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
