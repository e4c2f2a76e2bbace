"""NNCF INT8 with op types kept in f32: which part of a trained model's graph INT8 must not touch.

One kept standard-profile cell (path on stdin), raw outputs (normalisation off), its test set; our PTQ
(``quantize_int8``, 32 training images) with ``nncf.IgnoredScope(types=...)`` for each variant below,
against the f32 export. Prints one line per variant: accuracy, map agreement with f32, latency (only
meaningful on an idle machine).

    echo <run>/cells/Dskd__juice_bottle__seed42.json | CI=true python benchmarks/int8_ignored_scope.py

The variants of a run are the list ``VARIANTS`` (edit it to try others; the committed outputs name theirs).
"""
from pathlib import Path
import sys
import tempfile
sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_accuracy as ia
from anomalib_dskd.benchmark.measure import (
    F32_ELEMENTWISE_OPS, calibration_images, export_openvino, map_agreement, openvino_latency, openvino_outputs, quantize_int8,
)
import torch
torch.set_num_threads(2)
VARIANTS = [
    ("default", None),
    ("matmul_exp_f32", ("MatMul", "Exp")),
    ("eltwise_f32", F32_ELEMENTWISE_OPS),
]
cell = Path(sys.stdin.readline().strip())
spec, module, dm = ia._load_cell(cell)
size = tuple(spec.image_size)
images, labels, masks = ia._test_set(dm, size)
cal = calibration_images(dm, 32, size)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    f32 = export_openvino(module, tmp/"f32", size)
    ref = openvino_outputs(f32, images)
    print("f32", ia._accuracy(ref, labels, masks), flush=True)
    for label, types in VARIANTS:
        x = quantize_int8(f32, cal, tmp/label, ignored_types=types)
        out = openvino_outputs(x, images)
        print(label, ia._accuracy(out, labels, masks), map_agreement(ref["anomaly_map"], out["anomaly_map"]), openvino_latency(x, size, runs=10), flush=True)
    print("f32 latency", openvino_latency(f32, size, runs=10))
