"""Export Dskd (whole pipeline) to ONNX and OpenVINO at full size; check parity with torch; print file sizes.

Random teacher weights by default (``--weights`` for real ones); the Eq. 8 statistics are set to
non-trivial values so that the exported graph must carry them. OpenVINO is compiled with
``INFERENCE_PRECISION_HINT=f32`` (and, for comparison, with the CPU default, bf16 where supported).

    CI=true python benchmarks/dskd_export_check.py --backbone mobilenetv2_100 --gccb-channels 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("CI", "true")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default="false")
    parser.add_argument("--gccb-channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default=None, help="keep the exports here (default: a temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(0)

    import onnxruntime
    import openvino as ov
    from anomalib.post_processing import PostProcessor

    from anomalib_dskd.models.dskd import Dskd

    model = Dskd(
        backbone=args.backbone,
        pre_trained=args.weights,
        gccb_channels=args.gccb_channels,
        visualizer=False,
        evaluator=False,
        post_processor=PostProcessor(enable_normalization=False, enable_thresholding=False),
    ).eval()
    images = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        local, glob = model.model.student_maps(model.pre_processor.transform(images))
    model.model.set_statistics(
        torch.stack([local.mean(), glob.mean()]), torch.stack([local.std(), glob.std()]), args.batch
    )
    with torch.no_grad():
        expected = model(images)
    reference = expected.anomaly_map.numpy()
    span = float(reference.max() - reference.min())

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        start = time.perf_counter()
        onnx_path = model.to_onnx(root, input_size=(args.size, args.size))
        onnx_s = time.perf_counter() - start
        start = time.perf_counter()
        xml = model.to_openvino(root, input_size=(args.size, args.size))
        ov_s = time.perf_counter() - start
        onnx_bytes = sum(p.stat().st_size for p in onnx_path.parent.iterdir())
        ov_bytes = sum(p.stat().st_size for p in xml.parent.iterdir() if p.suffix in {".xml", ".bin"})
        print(f"{args.backbone}, g={args.gccb_channels}, {args.size}x{args.size}")
        print(f"ONNX     {onnx_bytes / 1e6:7.1f} MB  (export {onnx_s:.0f} s)  {onnx_path}")
        print(f"OpenVINO {ov_bytes / 1e6:7.1f} MB  (export {ov_s:.0f} s, FP32 weights)  {xml}")
        trainable = sum(p.numel() for p in model.model.student_parameters())
        total = sum(p.numel() for p in model.model.parameters())
        print(f"parameters: {total / 1e6:.2f} M ({trainable / 1e6:.2f} M trainable students, rest frozen teacher)")

        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        outputs = {"onnxruntime": dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))}
        core = ov.Core()
        for label, config in (("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino default", {})):
            compiled = core.compile_model(str(xml), "CPU", config)
            result = compiled(images.numpy())
            outputs[label] = {out.get_any_name(): result[out] for out in compiled.outputs}
            precision = compiled.get_property("INFERENCE_PRECISION_HINT")
            outputs[label]["_precision"] = str(precision)
        print(f"torch map range {span:.4f}; max |difference| / range:")
        for label, out in outputs.items():
            amap = np.abs(out["anomaly_map"].reshape(reference.shape) - reference).max() / span
            score = np.abs(out["pred_score"].reshape(-1) - expected.pred_score.numpy()).max() / span
            note = out.get("_precision", "")
            print(f"  {label:17s} map {amap:.2e}  score {score:.2e}  {note}")


if __name__ == "__main__":
    main()
