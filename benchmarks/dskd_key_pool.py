"""Dskd's ``global_map_key_pool`` on trained models (output of 2026-12-02: docs/benchmarks/edge/key_pool_juice_bottle.json): accuracy and map error against exact Eq. 6 scoring.

Re-scores the Dskd models a benchmark run kept (``evaluation.keep_checkpoint: true``, the standard profile)
with the shallowest global scale's keys pooled over ``k x k`` cells, or each scale's (``--pool 4,2,1``, shallow
to deep), for each ``--pool`` value: the Eq. 8
statistics are recomputed on the cell's validation images (normal ones; as ``Engine.validate`` does), then
the cell's test set is scored on raw outputs (torch). Training is untouched (the weights are the cell's).

For each cell and ``k``: image AUROC (all, and per LOCO subset where there is one), pixel AUROC, AU-PRO
(FPR limit 0.3), and the error of the global student's raw map against the exact one (relative max abs
error over the exact map's range, Pearson correlation) on the test images and, label-free, on the validation
images (``validation_global_map_*``: the figure to choose a setting on without looking at test results).

    CI=true python benchmarks/dskd_key_pool.py --run results/standard --dataset juice_bottle --pool 1 --pool 2 --pool 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_accuracy import _accuracy, _load_cell, _test_set  # noqa: E402


def _pool(text: str) -> int | list[int]:
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--dataset", action="append", default=None)
    parser.add_argument("--seed", type=int, action="append", default=None)
    parser.add_argument(
        "--pool", type=_pool, action="append", required=True,
        help="key pooling: k (the shallowest scale; 1 = exact) or one value per scale, shallow to deep, e.g. 4,2,1",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("CI", "true")
    torch.set_num_threads(args.threads)
    from anomalib_dskd.benchmark.detection import auroc
    from anomalib_dskd.benchmark.measure import map_agreement

    cells = sorted(p for run in args.run for p in (run / "cells").glob("Dskd__*.json") if not p.name.endswith(".spec.json"))
    for path in cells:
        result = json.loads(path.read_text())
        if result.get("status") != "ok" or not (path.with_suffix("") / "model.ckpt").is_file():
            continue
        if (args.dataset and result["dataset"] not in args.dataset) or (args.seed and result["seed"] not in args.seed):
            continue
        spec, module, datamodule = _load_cell(path)
        images, labels, masks = _test_set(datamodule, tuple(spec.image_size))
        datamodule.setup("fit")
        loader = datamodule.val_dataloader() if len(getattr(datamodule, "val_data", []) or []) else datamodule.train_dataloader()
        exact_global = exact_validation = None
        validation = [b.image for b in loader]
        for pool in args.pool:
            module.model.set_global_map_key_pool(pool)
            module.compute_statistics(loader)
            with torch.no_grad():  # the label-free fidelity figure a setting can be chosen on: validation maps
                validation_global = np.concatenate(
                    [module.model.student_maps(module.pre_processor.transform(b))[-1].numpy() for b in validation]
                )
            if exact_validation is None and pool in (1, [1, 1, 1]):
                exact_validation = validation_global
            with torch.no_grad():
                batch = module.pre_processor.transform(torch.from_numpy(images))
                outputs, maps = {"pred_score": [], "anomaly_map": []}, []
                for start in range(0, len(batch), 8):
                    chunk = batch[start : start + 8]
                    out = module.model(chunk)
                    outputs["pred_score"].append(out.pred_score.numpy())
                    outputs["anomaly_map"].append(out.anomaly_map.numpy())
                    maps.append(module.model.student_maps(chunk)[-1].numpy())
            outputs = {k: np.concatenate(v) for k, v in outputs.items()}
            global_map = np.concatenate(maps)
            if exact_global is None and pool in (1, [1, 1, 1]):
                exact_global = global_map
            subsets = {}
            paths = [str(p) for p in datamodule.test_data.samples.image_path]
            for subset in ("logical", "structural"):
                keep = np.array([("good" in p) or (subset in p) for p in paths])
                if keep.any() and (labels[keep]).any() and (~labels[keep]).any() and any(subset in p for p in paths):
                    subsets[f"image_auroc_{subset}"] = auroc(outputs["pred_score"][keep].astype(np.float64), labels[keep])
            row = {
                "cell": path.stem, "dataset": spec.dataset.name, "seed": spec.seed, "key_pool": pool,
                **_accuracy(outputs, labels, masks), **subsets,
                **({f"global_map_{k}_vs_exact": v for k, v in map_agreement(exact_global, global_map).items()}
                   if exact_global is not None else {}),
                **({f"validation_global_map_{k}_vs_exact": v
                    for k, v in map_agreement(exact_validation, validation_global).items()}
                   if exact_validation is not None else {}),
            }
            print(json.dumps(row), flush=True)
            if args.output:
                with args.output.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
