"""Glance in INT8 with the dense and the separable IDW fusion, on one trained model (generated data).

Issue #16: Glance's OpenVINO model held its IDW fusion as a dense 65,536 x 400 constant (156 MiB exported); the
fusion is now separable (``anomalib_dskd/models/glance/anomaly_map.py``, ~2 MiB). This script trains Glance as
``tests/test_detection.py::test_glance_detects_anomalies`` does (generated MVTec-AD category, its step budget,
``--seed``), exports it twice to OpenVINO f32 (separable IDW, and the dense form, ``separable=False``), and
quantises each with NNCF (``quantize_int8``, 32 training images as calibration) under three scopes: only the
map-smoothing ops f32 (what Glance declared before 2026-12-07), ``--f32-types`` (op types kept f32 everywhere,
default ``MatMul``: the IDW products and the DAD head), and Glance's own scope (``model_int8_types``: ``MatMul``,
the scoring tail and the batch-splitting last layers f32, what ``anomalib export`` applies). For every graph: size, image AUROC and the
map's Pearson correlation with its own f32 graph on the test set, and batch-1 latency (2 threads, median of 20
calls). ``separable_f32_vs_torch_max_abs``: the separable f32 graph's map against the torch model's on 4 test images.
One JSON object on stdout and in ``--out``.

    CI=true python benchmarks/glance_int8_idw.py --seed 0 --out docs/benchmarks/edge/glance_int8_idw_seed0.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import command_line  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--f32-types", default="MatMul", help="comma-separated OpenVINO op types kept f32 everywhere")
    parser.add_argument("--weights", default=str(Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from anomalib.data import MVTecAD

    from anomalib_dskd.benchmark.detection import auroc, train_and_predict
    from anomalib_dskd.benchmark.measure import (
        export_openvino,
        map_agreement,
        model_int8_types,
        openvino_latency,
        openvino_outputs,
        openvino_size_mb,
        quantize_int8,
    )
    from anomalib_dskd.data import generate_mvtec_ad_category
    from anomalib_dskd.models.glance.anomaly_map import IDWFusion
    from tests.detection_models import GLANCE_CATEGORY_ARGS, GLANCE_STEPS, build_glance

    size = tuple(GLANCE_CATEGORY_ARGS["image_size"])
    f32_types = tuple(t for t in args.f32_types.split(",") if t)
    result: dict = {"command": command_line("benchmarks/glance_int8_idw.py", args), "seed": args.seed, "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_mvtec_ad_category(root, "parts", seed=0, **GLANCE_CATEGORY_ARGS)
        datamodule = MVTecAD(root=root, category="parts", train_batch_size=32, eval_batch_size=8, num_workers=0,
                             seed=args.seed)
        start = time.perf_counter()
        model, _, _ = train_and_predict(lambda: build_glance(args.weights), datamodule, max_epochs=-1,
                                        max_steps=GLANCE_STEPS, seed=args.seed, root_dir=root)
        result["train_s"] = round(time.perf_counter() - start, 1)
        model = model.cpu().eval()
        batches = list(datamodule.test_dataloader())
        images = torch.cat([b.image for b in batches]).numpy()
        labels = torch.cat([b.gt_label for b in batches]).numpy().astype(bool)
        calibration = torch.cat([b.image for b in datamodule.train_dataloader()])[:32].numpy()
        fusion = model.model.idw
        for form in ("separable", "dense"):
            model.model.idw = IDWFusion(fusion.image_size, fusion.centers, fusion.power,
                                        separable=None if form == "separable" else False)
            f32 = export_openvino(model, root / form / "f32", size)
            graphs = {
                f"{form}/f32": f32,
                f"{form}/int8_smoothing_only": quantize_int8(f32, calibration, root / form / "int8_a"),
                f"{form}/int8_{'_'.join(f32_types) or 'none'}_f32": quantize_int8(
                    f32, calibration, root / form / "int8_b", ignored_types=f32_types),
                f"{form}/int8_package": quantize_int8(f32, calibration, root / form / "int8_c", **model_int8_types(model)),
            }
            reference = None
            for name, xml in graphs.items():
                outputs = openvino_outputs(xml, images, threads=args.threads)
                reference = outputs if reference is None else reference
                latency = openvino_latency(xml, size, warmup=5, runs=20, threads=args.threads)
                row = {"size_mib": round(openvino_size_mb(xml), 2), "latency_ms": round(latency["median"], 2),
                       "image_auroc": round(float(auroc(outputs["pred_score"].reshape(-1), labels)), 4),
                       **{f"map_{k}_vs_f32": round(float(v), 4)
                          for k, v in map_agreement(reference["anomaly_map"], outputs["anomaly_map"]).items()}}
                result["graphs"][name] = row
                print(name, json.dumps(row), flush=True)
        model.model.idw = fusion
        with torch.no_grad():  # the Lightning module pre-processes as the exported graph does
            torch_map = model(torch.from_numpy(images[:4])).anomaly_map.numpy()
        ov_map = openvino_outputs(export_openvino(model, root / "check", size), images[:4])["anomaly_map"]
        result["separable_f32_vs_torch_max_abs"] = float(np.abs(torch_map - ov_map.reshape(torch_map.shape)).max())
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
