"""Packd's support memory on its own: is the memory, or its fusion with the distillation map, the weak part?

Packd's score (``docs/models/packd.md``) is ``blur(upsample_sum(distillation maps + w * memory maps))``.
The memory term needs no training: it is the nearest-support cosine distance of the frozen teacher's
features (the teacher never trains), so it can be scored for every target, k and draw without Packd's
weights. This script scores the memory alone, with the same teacher, resolution, blur, test set and the
same seeded support draws as ``benchmarks/packd_fewshot.py`` (``FewShotDataModule.support_images(draw)``),
for several memory levels. Compare with the ``packd`` (fused) and ``patchcore`` rows of the committed
``docs/benchmarks/packd/<target>.json``. Not a test; nothing here is chosen on these numbers.

Example (the command behind ``docs/benchmarks/packd/memory_ablation.json``)::

    CI=true OMP_NUM_THREADS=1 python benchmarks/packd_memory_ablation.py \\
        --target mvtec_ad:../shared/datasets/mvtec3d_tire_rgb:tire \\
        --target mvtec_ad:../shared/datasets/battery_weld:weld \\
        --target mvtec_loco:../shared/datasets/mvtec_loco_juice_bottle:juice_bottle \\
        --weights ../shared/weights/mobilenet_v2-b0353104.pth --k 2 4 8 --draws 5 --image-size 256 \\
        --out docs/benchmarks/packd/memory_ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

import torch
from _common import add_support_draw_args, raw_metrics
from packd_fewshot import load_test_set

#: memory variants: name -> support_score_levels
VARIANTS = {"memory-l2": (2,), "memory-l3": (3,), "memory-l23": (2, 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, metavar="FORMAT:ROOT:CATEGORY")
    add_support_draw_args(parser)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["memory-l23"],
                        help="memory levels to score (default: Packd's own, support_score_levels [2, 3])")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


@torch.no_grad()
def memory_scores(model: Any, images: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN401
    """Image scores and maps of the memory term alone (``PackdModel.score``: upsampling, blur and max)."""
    torch_model = model.model.eval()
    scores, maps = [], []
    for start in range(0, len(images), chunk):
        batch = model.pre_processor.transform(images[start : start + chunk])
        output = torch_model.score(torch_model.support_distance_maps(torch_model.teacher(batch)[:3]))
        scores.append(output.pred_score.reshape(-1))
        maps.append(output.anomaly_map.reshape(-1, 1, *images.shape[-2:]))
    return torch.cat(scores), torch.cat(maps)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from anomalib_dskd.data.few_shot import FewShotDataModule, parse_specs
    from anomalib_dskd.models.packd import Packd

    models = {}
    for name in args.variants:
        levels = VARIANTS[name]
        torch.manual_seed(args.seed)
        models[name] = Packd(backbone=args.backbone, pre_trained=args.weights, support_score_levels=levels,
                             pre_processor=Packd.configure_pre_processor((args.image_size,) * 2),
                             visualizer=False, evaluator=False, post_processor=False).eval()
    rows: list[dict[str, Any]] = []
    progress = tqdm(total=len(args.target) * len(args.k) * args.draws, desc="memory ablation (target, k, draw)")
    for spec in args.target:
        target = parse_specs(spec)[0]
        images, masks, labels = load_test_set(target, args.image_size)
        for k in args.k:
            datamodule = FewShotDataModule(train_sources=[], target=spec, k_shot=k, seed=args.seed,
                                           image_size=(args.image_size,) * 2, num_support_draws=args.draws)
            datamodule.setup()
            for draw in range(args.draws):
                supports = datamodule.support_images(draw)
                for name, model in models.items():
                    model.set_support(supports)
                    scores, maps = memory_scores(model, images)
                    row = {"model": name, "target": target["category"], "k": k, "draw": draw,
                           **raw_metrics(scores, maps, labels, masks)}
                    rows.append(row)
                    progress.write(json.dumps(row))
                progress.update()
    progress.close()
    summary = []
    print("\n| target | k | " + " | ".join(args.variants) + " |\n|---|---|" + "---|" * len(args.variants))
    for spec in args.target:
        category = parse_specs(spec)[0]["category"]
        for k in args.k:
            cells = []
            for name in args.variants:
                values = [r["image_auroc"] for r in rows if (r["model"], r["target"], r["k"]) == (name, category, k)]
                entry = {"model": name, "target": category, "k": k, "draws": len(values),
                         "image_auroc_mean": statistics.mean(values), "image_auroc_std": statistics.pstdev(values)}
                for key in ("pixel_auroc", "aupro"):
                    entry[key + "_mean"] = statistics.mean(
                        r[key] for r in rows if (r["model"], r["target"], r["k"]) == (name, category, k))
                summary.append(entry)
                cells.append(f"{entry['image_auroc_mean']:.3f} ± {entry['image_auroc_std']:.3f}")
            print(f"| {category} | {k} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]), "rows": rows,
                                        "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
