"""Diagnostic (issue #16): Glance INT8 on a kept benchmark cell, with and without its first layers f32 and NNCF's
MIXED preset (asymmetric activations). Not used to choose the package's scope: it reads the cell's test set.

Exports the cell's model (raw outputs) to OpenVINO f32, quantises it (32 training images) with Glance's own scope
(``model_int8_types``), that scope plus the ``first_convolutions`` rule (each network's first layer f32), and both
again with ``nncf.QuantizationPreset.MIXED``; prints image AUROC, pixel AUROC and AU-PRO of each on the test set.

    CI=true python benchmarks/glance_int8_first_layers.py <edge run>/cells/Glance__tire__seed42.json
"""

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("CI", "true")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_accuracy as ia
import nncf
import openvino as ov
import torch

from anomalib_dskd.benchmark.measure import calibration_images, export_openvino, model_int8_types, openvino_outputs
from anomalib_dskd.components.int8 import first_convolutions, int8_ignored_scope


def main() -> None:
    torch.set_num_threads(1)
    cell = Path(sys.argv[1])
    spec, module, datamodule = ia._load_cell(cell, normalised=False)
    size = tuple(spec.image_size)
    calibration = calibration_images(datamodule, 32, size)
    images, labels, masks = ia._test_set(datamodule, size)
    out = Path(tempfile.mkdtemp())
    f32 = export_openvino(module, out / "f32", size)
    graph = ov.Core().read_model(str(f32))
    print("first convolutions:", first_convolutions(graph), flush=True)
    print("f32", ia._accuracy(openvino_outputs(f32, images), labels, masks), flush=True)
    types = model_int8_types(module)
    for label, extra, preset in (
        ("package", (), None), ("package+first", ("first_convolutions",), None),
        ("package+mixed", (), nncf.QuantizationPreset.MIXED),
        ("package+first+mixed", ("first_convolutions",), nncf.QuantizationPreset.MIXED),
    ):
        scope = int8_ignored_scope(graph, **{**types, "rules": types["rules"] + extra})
        kwargs = {"preset": preset} if preset is not None else {}
        quantized = nncf.quantize(ov.Core().read_model(str(f32)), nncf.Dataset([image[None] for image in calibration]),
                                  subset_size=len(calibration), ignored_scope=scope, **kwargs)
        xml = out / label / "model.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        print(label, ia._accuracy(openvino_outputs(xml, images), labels, masks), flush=True)


if __name__ == "__main__":
    main()
