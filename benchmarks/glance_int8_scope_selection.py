"""Issue #16: choose Glance's INT8 scope without labels, then measure what the choice does on the test set.

For a kept Glance benchmark cell (a trained model): exports it to OpenVINO f32 and quantises it (NNCF, the 32
first training images, as ``int8_accuracy.py``'s package path) with four candidate scopes, the same four as
``glance_int8_first_layers.py``:

* ``package``: Glance's own scope (``model_int8_types``: ``MatMul``, the scoring tail, batch-splitting convolutions);
* ``package+first``: plus the ``first_convolutions`` rule (each network's first convolution f32);
* ``package+mixed``: NNCF's ``MIXED`` preset (asymmetric activations);
* ``package+first+mixed``: both.

**The choice reads no label and no test image.** Fidelity is measured on *normal training images that the
calibration did not use* (the training images after the first 32, at most 32 of them): the mean per-image Pearson
correlation of the INT8 anomaly map with the f32 map, and the relative error of the image score. The candidate with
the highest map correlation, rounded to three decimals, is chosen (ties: the earlier, cheaper one in the list above). The test-set
figures of every candidate are printed and written for information; only the chosen one is the result.

``--greedy N`` then searches further, still label-free: starting from the chosen candidate, each convolution
that it quantises is kept f32 on its own (one quantisation each) and ranked by the held-out map correlation it
gives; the top 1, 2, ..., ``N`` of that ranking are then kept f32 together, and the best of all variants by
held-out map correlation is the final choice (ties to the smaller set).

    CI=true python benchmarks/glance_int8_scope_selection.py <run>/cells/Glance__tire__seed42.json --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("CI", "true")
warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_accuracy as ia
import nncf
import numpy as np
import openvino as ov
import torch

from anomalib_dskd.benchmark.measure import (
    calibration_images,
    export_openvino,
    map_agreement,
    model_int8_types,
    openvino_outputs,
)
from anomalib_dskd.components.int8 import int8_ignored_scope

CANDIDATES = (
    ("package", (), None),
    ("package+first", ("first_convolutions",), None),
    ("package+mixed", (), "MIXED"),
    ("package+first+mixed", ("first_convolutions",), "MIXED"),
)
CALIBRATION = 32


def fidelity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean per-image map correlation and mean relative image-score error of ``candidate`` against ``reference``."""
    agreement = map_agreement(reference["anomaly_map"], candidate["anomaly_map"])
    spread = np.ptp(reference["anomaly_map"]) or 1.0
    error = np.abs(candidate["pred_score"].astype(np.float64) - reference["pred_score"].astype(np.float64))
    return {"map_correlation": agreement["pearson_mean"], "score_error_of_map_range": float(np.mean(error) / spread)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell", type=Path)
    parser.add_argument("--held-out", type=int, default=32, help="training images after the calibration ones")
    parser.add_argument("--greedy", type=int, default=0, help="extra convolutions to keep f32, label-free (see above)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec, module, datamodule = ia._load_cell(args.cell, normalised=False)
    size = tuple(spec.image_size)
    training = calibration_images(datamodule, CALIBRATION + args.held_out, size)
    calibration, held_out = training[:CALIBRATION], training[CALIBRATION:]
    if len(held_out) == 0:
        msg = f"{args.cell}: no training images beyond the {CALIBRATION} calibration images to measure fidelity on"
        raise SystemExit(msg)
    images, labels, masks = ia._test_set(datamodule, size)
    out = Path(tempfile.mkdtemp())
    f32 = export_openvino(module, out / "f32", size)
    graph = ov.Core().read_model(str(f32))
    reference = openvino_outputs(f32, held_out)
    result = {"cell": str(args.cell), "command": " ".join([sys.executable, *sys.argv]),
              "calibration_images": len(calibration), "held_out_images": len(held_out),
              "f32_test": ia._accuracy(openvino_outputs(f32, images), labels, masks), "candidates": {}}
    print(f"{args.cell.stem}: calibration {len(calibration)}, held-out {len(held_out)}; f32 test {result['f32_test']}",
          flush=True)
    types = model_int8_types(module)
    calibration_data = nncf.Dataset([image[None] for image in calibration])

    def quantise(label: str, scope: nncf.IgnoredScope, preset: str | None) -> dict:
        start = time.perf_counter()
        kwargs = {"preset": getattr(nncf.QuantizationPreset, preset)} if preset else {}
        quantized = nncf.quantize(ov.Core().read_model(str(f32)), calibration_data, subset_size=len(calibration),
                                  ignored_scope=scope, **kwargs)
        xml = out / label / "model.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        entry = {"held_out_fidelity": fidelity(reference, openvino_outputs(xml, held_out)),
                 "test_for_information": ia._accuracy(openvino_outputs(xml, images), labels, masks),
                 "quantise_seconds": round(time.perf_counter() - start, 1)}
        result["candidates"][label] = entry
        print(label, json.dumps(entry), flush=True)
        return entry

    scopes = {}
    for label, extra, preset in CANDIDATES:
        scopes[label] = (int8_ignored_scope(graph, **{**types, "rules": types["rules"] + extra}), preset)
        quantise(label, *scopes[label])

    def correlation(name: str) -> float:
        return round(result["candidates"][name]["held_out_fidelity"]["map_correlation"], 3)

    chosen = min(result["candidates"], key=lambda name: -correlation(name))  # the first best: ties to the cheaper
    result["chosen_before_greedy"] = chosen
    if args.greedy:
        base_scope, preset = scopes[chosen]
        kept = set(base_scope.names)
        convolutions = [op.get_friendly_name() for op in graph.get_ordered_ops()
                        if op.get_type_name() == "Convolution" and op.get_friendly_name() not in kept]
        print(f"greedy: {len(convolutions)} quantised convolutions to try", flush=True)
        single = {}
        for index, name in enumerate(convolutions):
            scope = nncf.IgnoredScope(names=sorted(kept | {name}), types=list(base_scope.types), validate=False)
            single[name] = quantise(f"{chosen}+conv{index}", scope, preset)["held_out_fidelity"]["map_correlation"]
        ranking = sorted(convolutions, key=lambda name: -single[name])
        result["greedy_ranking"] = [{"op": name, "held_out_map_correlation": single[name]} for name in ranking]
        for count in range(2, min(args.greedy, len(ranking)) + 1):
            scope = nncf.IgnoredScope(names=sorted(kept | set(ranking[:count])), types=list(base_scope.types),
                                      validate=False)
            quantise(f"{chosen}+top{count}", scope, preset)
        chosen = min(result["candidates"], key=lambda name: (-correlation(name), name.count("+")))
    result["chosen"] = chosen
    result["chosen_test_change"] = {key: result["candidates"][chosen]["test_for_information"][key] - value
                                    for key, value in result["f32_test"].items()}
    print(f"chosen (held-out map correlation): {chosen}; test change vs f32 {result['chosen_test_change']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
