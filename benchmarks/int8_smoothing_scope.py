"""INT8 with the anomaly-map smoothing convolutions kept f32, on one kept standard-profile cell (issue #16).

Exports the cell's model to OpenVINO f32 (raw outputs; ``norm`` as second argument: anomalib's normalisation in
the graph), quantises it with NNCF twice (32 training images): every op, and with the smoothing convolutions in
``nncf.IgnoredScope(names=...)``. Prints accuracy on the cell's test set and how far the image score is from the
maximum of the map the same graph returns (0 in f32).

    CI=true python benchmarks/int8_smoothing_scope.py <standard>/std_a/cells/Rd__juice_bottle__seed42.json [norm]

The smoothing ops are found by the package's rule (``anomalib_dskd.components.int8.map_smoothing_ops``: the smoothing
convolutions of graphs exported before ``UpsampleSmooth``, its resampling MatMuls since).
"""

import sys
from pathlib import Path
import tempfile
import numpy as np, torch, nncf, openvino as ov
sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_accuracy as ia
from anomalib_dskd.benchmark.measure import calibration_images, export_openvino, model_int8_types, openvino_outputs
from anomalib_dskd.components.int8 import F32_ELEMENTWISE_OPS, int8_ignored_scope, map_smoothing_ops, scoring_tail_ops
torch.set_num_threads(1)
cell = Path(sys.argv[1]); normalised = len(sys.argv) > 2
spec, module, dm = ia._load_cell(cell, normalised=normalised)
size = tuple(spec.image_size)
cal = calibration_images(dm, 32, size)
images, labels, masks = ia._test_set(dm, size)
out = Path(tempfile.mkdtemp()) / (cell.stem + ("_norm" if normalised else ""))
f32 = export_openvino(module, out / "f32", size)
model = ov.Core().read_model(str(f32))

names = map_smoothing_ops(model)
print("kept f32:", names)
ref = openvino_outputs(f32, images)
print("f32", ia._accuracy(ref, labels, masks), flush=True)
variants = [("int8", None), ("int8_smoothing_f32", nncf.IgnoredScope(names=names))]
package_scope = model_int8_types(module)  # the package's scope for this model (Int8Export), as anomalib export applies it
if any(package_scope.values()):
    variants.append(("int8_package", int8_ignored_scope(model, **package_scope)))
# the elementwise, reduction and MatMul ops of the scoring tail only (no convolution downstream), for every model
tail = scoring_tail_ops(model, F32_ELEMENTWISE_OPS)
print("scoring tail kept f32:", len(tail), "ops")
variants.append(("int8_scoring_tail_f32", nncf.IgnoredScope(names=sorted(set(names + tail)), validate=False)))
# every elementwise, reduction and MatMul op f32, networks included: INT8 on the convolutions only
variants.append(("int8_elementwise_f32", nncf.IgnoredScope(names=names, types=list(F32_ELEMENTWISE_OPS), validate=False)))
for label, scope in variants:
    kw = {"ignored_scope": scope} if scope else {}
    q = nncf.quantize(ov.Core().read_model(str(f32)), nncf.Dataset([i[None] for i in cal]), subset_size=len(cal), **kw)
    (out / label).mkdir(parents=True, exist_ok=True); ov.save_model(q, str(out / label / "model.xml"), compress_to_fp16=False)
    try:
        o = openvino_outputs(out / label / "model.xml", images)
    except RuntimeError as err:  # OpenVINO's CPU plugin refuses some quantised graphs (docs/benchmarks/edge, round 4)
        print(label, "does not compile:", [line for line in str(err).splitlines() if line.strip()][-1][:300], flush=True)
        continue
    amax = np.asarray(o["anomaly_map"]).reshape(len(images), -1).max(1)
    print(label, ia._accuracy(o, labels, masks), "pred_score vs max(map): max abs diff %.4g" % np.abs(np.asarray(o["pred_score"]).ravel() - amax).max(), flush=True)
