"""INT8 against f32 for every model, on the real data: accuracy, map agreement, latency and size.

Reads the trained models that a benchmark run kept (``evaluation.keep_checkpoint: true``, as the standard
profile does: ``<output>/cells/<cell>/model.ckpt``), exports each to OpenVINO f32, quantises it two ways and
scores all three on the cell's own test set (the same datamodule, seed and input size as the cell):

* ``f32``: anomalib's ``to_openvino`` (the pipeline the cells' latency is measured on);
* ``int8_anomalib``: anomalib's ``CompressionType.INT8_PTQ`` path (NNCF PTQ on the validation images), what
  ``anomalib export --compression_type INT8_PTQ`` gives;
* ``int8_ours``: :func:`anomalib_dskd.benchmark.measure.quantize_int8` (NNCF PTQ on 32 training images)
  with the model's own INT8 scope (``model_int8_types``), the quick profile's INT8 column.

With ``--torch`` also the Lightning module itself in torch (``torch``: its full inference pipeline, the
reference the export tests compare OpenVINO with).

For each: image AUROC, pixel AUROC and AU-PRO (FPR limit 0.3) of the raw outputs, the maps' Pearson
correlation with the f32 maps, latency (batch 1, ``--threads``) and size. One JSON line per
cell and runtime on stdout and in ``--output``; ``--table`` also writes the Markdown tables of
:func:`render_table` (one row per cell: latency, size, accuracy of every runtime), and ``--render`` rebuilds
them from JSON lines written before, without measuring.

    CI=true python benchmarks/int8_accuracy.py --run results/standard --seed 42 --output int8.jsonl
    CI=true python benchmarks/int8_accuracy.py --run results/edge --torch --output edge.jsonl --table edge.md

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


def _test_set(datamodule: Any, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test images resized to the input size (as the calibration images are), labels, masks at that size."""
    import torch
    import torch.nn.functional as F

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


def _torch_outputs(module: Any, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """``pred_score`` and ``anomaly_map`` of the Lightning module's own inference pipeline, in torch."""
    import torch

    scores, maps = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = module(torch.from_numpy(images[start : start + batch_size]))
            scores.append(batch.pred_score.reshape(-1).float().numpy())
            maps.append(batch.anomaly_map.reshape(len(scores[-1]), -1).float().numpy())
    return {"pred_score": np.concatenate(scores), "anomaly_map": np.concatenate(maps)}


def _torch_size_mib(module: Any) -> float:
    """Size of the torch model's state (parameters and buffers, e.g. a memory bank), in MiB."""
    state = module.model.state_dict()
    return sum(value.numel() * value.element_size() for value in state.values()) / (1024 * 1024)


def measure_cell(
    cell_json: Path, threads: int, runs: int, calibration: int, normalised: bool = False, with_torch: bool = False
) -> list[dict[str, Any]]:
    """The runtimes of one cell (see the module docstring)."""
    import torch
    from torchvision.transforms.v2 import Resize

    from anomalib_dskd.benchmark.measure import (
        calibration_images,
        export_openvino,
        export_openvino_int8_ptq,
        map_agreement,
        model_int8_types,
        openvino_latency,
        openvino_outputs,
        openvino_size_mb,
        quantize_int8,
        torch_latency,
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
        exports["int8_ours"] = quantize_int8(
            exports["f32"], calibration_set, tmp_path / "int8_ours", **model_int8_types(module),
        )
        export_s["int8_ours"] = time.perf_counter() - start + export_s["f32"]
        runtimes = ["f32", *(["torch"] if with_torch else []), "int8_anomalib", "int8_ours"]
        reference = None
        for runtime in runtimes:
            if runtime == "torch":
                outputs = _torch_outputs(module, images)
                measured = {
                    "latency_ms": torch_latency(module, size, warmup=5, runs=runs, threads=threads),
                    "size_mib": _torch_size_mib(module), "export_s": 0.0,
                }
            else:
                xml = exports[runtime]
                outputs = openvino_outputs(xml, images, threads=threads)
                measured = {
                    "latency_ms": openvino_latency(xml, size, warmup=5, runs=runs, threads=threads),
                    "size_mib": openvino_size_mb(xml), "export_s": export_s[runtime],
                }
            if reference is None:
                reference = outputs
            row = {
                "cell": cell_json.stem, "model": spec.model.label, "dataset": spec.dataset.name, "seed": spec.seed,
                "image_size": list(size), "runtime": runtime, "test_images": len(labels), "normalised": normalised,
                **_accuracy(outputs, labels, masks),
                **{f"map_{k}_vs_f32": v for k, v in map_agreement(reference["anomaly_map"], outputs["anomaly_map"]).items()},
                **measured, "threads": threads, "load_average": list(os.getloadavg()),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


#: runtimes in table order, and their column names
_RUNTIMES = {"torch": "torch", "f32": "OV f32", "int8_ours": "OV INT8 (package)", "int8_anomalib": "OV INT8 (anomalib PTQ)"}


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of :func:`measure_cell` rows: one line per cell, every runtime side by side.

    Latency is the median of the timed batch-1 calls in milliseconds; the INT8 deltas are INT8 minus OpenVINO
    f32 on the same test images (raw scores and maps). Cells without an f32 row are left out.
    """
    by_cell: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if "runtime" in row:
            by_cell.setdefault(row["cell"], {})[row["runtime"]] = row
    cells = [(name, runtimes) for name, runtimes in by_cell.items() if "f32" in runtimes]
    present = [runtime for runtime in _RUNTIMES if any(runtime in runtimes for _, runtimes in cells)]

    def cell(runtimes: dict[str, dict[str, Any]], runtime: str, text: Any) -> str:
        return text(runtimes[runtime]) if runtime in runtimes else "-"

    lines = [
        "| model | dataset | " + " | ".join(f"{_RUNTIMES[r]} ms" for r in present)
        + " | f32 / INT8 (package) | " + " | ".join(f"{_RUNTIMES[r]} MiB" for r in present) + " |",
        "|" + "---|" * (3 + 2 * len(present)),
    ]
    for _, runtimes in cells:
        f32 = runtimes["f32"]
        speedup = (
            f"{f32['latency_ms']['median'] / runtimes['int8_ours']['latency_ms']['median']:.2f}"
            if "int8_ours" in runtimes else "-"
        )
        lines.append(
            f"| {f32['model']} | {f32['dataset']} | "
            + " | ".join(cell(runtimes, r, lambda x: f"{x['latency_ms']['median']:.2f}") for r in present)
            + f" | {speedup} | "
            + " | ".join(cell(runtimes, r, lambda x: f"{x['size_mib']:.1f}") for r in present) + " |"
        )
    lines += [
        "",
        "| model | dataset | " + " | ".join(f"{_RUNTIMES[r]} image AUROC / AU-PRO" for r in present)
        + " | INT8 (package) - f32 | INT8 (anomalib PTQ) - f32 | worst image map Pearson, INT8 (package) vs f32 |",
        "|" + "---|" * (5 + len(present)),
    ]

    def delta(runtimes: dict[str, dict[str, Any]], runtime: str) -> str:
        if runtime not in runtimes:
            return "-"
        f32, other = runtimes["f32"], runtimes[runtime]
        return f"{other['image_auroc'] - f32['image_auroc']:+.3f} / {other['aupro'] - f32['aupro']:+.3f}"

    for _, runtimes in cells:
        f32 = runtimes["f32"]
        lines.append(
            f"| {f32['model']} | {f32['dataset']} | "
            + " | ".join(cell(runtimes, r, lambda x: f"{x['image_auroc']:.3f} / {x['aupro']:.3f}") for r in present)
            + f" | {delta(runtimes, 'int8_ours')} | {delta(runtimes, 'int8_anomalib')} | "
            + cell(runtimes, "int8_ours", lambda x: f"{x['map_pearson_min_vs_f32']:.3f}") + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", default=[], help="benchmark output folder (repeatable)")
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
    parser.add_argument("--torch", action="store_true", help="also measure the torch model (a `torch` row per cell)")
    parser.add_argument("--table", type=Path, default=None, help="write the Markdown tables of this run here")
    parser.add_argument(
        "--render", type=Path, default=None, metavar="JSONL",
        help="only print (and with --table write) the tables of rows written before; measures nothing",
    )
    args = parser.parse_args()
    os.environ.setdefault("CI", "true")
    if args.render is not None:
        rows = [json.loads(line) for line in args.render.read_text(encoding="utf-8").splitlines() if line.strip()]
        _write_table(render_table(rows), args.table)
        return
    if not args.run:
        parser.error("give --run (a benchmark output folder) or --render (JSON lines written before)")
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
    every_row = []
    for index, path in enumerate(selected, 1):
        print(f"[{index}/{len(selected)}] {path.stem}", file=sys.stderr, flush=True)
        try:
            rows = measure_cell(path, args.threads, args.runs, args.calibration, args.normalised, args.torch)
        except Exception as err:  # noqa: BLE001 - one failing cell is reported, the others still run
            rows = [{"cell": path.stem, "error": f"{type(err).__name__}: {err}"}]
            print(json.dumps(rows[0]), flush=True)
        every_row += rows
        if args.output:
            with args.output.open("a", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
    if args.table is not None:
        _write_table(render_table(every_row), args.table)


def _write_table(table: str, path: Path | None) -> None:
    print(table, end="")
    if path is not None:
        path.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
