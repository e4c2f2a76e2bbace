"""Can the k supports alone tell which memory distance suits a new category? (issue #14, diagnostic)

``benchmarks/packd_memory_design.py`` found that the memory's best distance flips between targets (Euclidean on
tire and juice_bottle, cosine on weld), so a design validated on other categories goes wrong on the next one. A
few-shot user has only the k normal supports. This script tries a per-category choice that reads nothing else:

* leave one support out; the memory holds the other ``k - 1``;
* score the left-out support (normal) and ``--synthetic`` corrupted copies of it (anomalous): half with anomalib's
  ``PerlinAnomalyGenerator`` (Perlin-noise blobs, DRAEM's synthetic anomalies), half with a cut-paste (a random
  rectangle of another support pasted at another place, a "misplaced part");
* per candidate design, the AUROC of the left-out supports against their corrupted copies, pooled over the ``k``
  left-out supports;
* the design with the highest self-check AUROC is chosen for that draw (ties: the first candidate, the package
  default).

The test-set image AUROC of the chosen design is then read from ``packd_memory_design.py``'s raw output (same
teacher, same seeded draws, same designs): no test image or label enters the choice. Printed per target and k:
the self-chosen design's mean image AUROC, the default's and k-shot PatchCore's. With k = 2 the memory of a
left-out check holds one image, so the check is weakest there.

    CI=true OMP_NUM_THREADS=1 python benchmarks/packd_support_selfcheck.py \\
        --target mvtec_ad:../shared/datasets/mvtec3d_tire_rgb:tire ... \\
        --grid docs/benchmarks/packd/memory_design_weld_tire.json docs/benchmarks/packd/memory_design_juice_bottle.json \\
        --weights ../shared/weights/mobilenet_v2-b0353104.pth --out docs/benchmarks/packd/support_selfcheck.json
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
from _common import add_support_draw_args
from packd_memory_design import distance_maps, image_scores, prepare, teacher_levels

#: the candidates, fixed before this script ran (after the design grid): Packd's default first.
CANDIDATES = (
    "cos-234-sum-global-blurmax",
    "l2-234-concat-global-blurmax",
    "cos-234-concat-global-blurmax",
    "l2-234-sum-global-blurmax",
)
AXES = ("metric", "levels", "combine", "locality", "image")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, metavar="FORMAT:ROOT:CATEGORY")
    parser.add_argument("--grid", type=Path, nargs="+", required=True, help="packd_memory_design.py raw outputs")
    add_support_draw_args(parser)
    parser.add_argument("--synthetic", type=int, default=8, help="corrupted copies per left-out support")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def corrupt(image: torch.Tensor, others: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` corrupted copies of a ``(3, H, W)`` image in [0, 1]: Perlin blobs, then cut-pastes from ``others``."""
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    perlin = PerlinAnomalyGenerator(probability=1.0)
    height, width = image.shape[-2:]
    copies = []
    for index in range(count):
        if index % 2 == 0:
            copies.append(perlin(image.clone())[0].clamp(0, 1))
            continue
        side_h = int(torch.randint(height // 8, height // 3, (1,), generator=generator))
        side_w = int(torch.randint(width // 8, width // 3, (1,), generator=generator))
        source = others[int(torch.randint(len(others), (1,), generator=generator))]
        y0, x0 = (int(torch.randint(height - side_h, (1,), generator=generator)),
                  int(torch.randint(width - side_w, (1,), generator=generator)))
        y1, x1 = (int(torch.randint(height - side_h, (1,), generator=generator)),
                  int(torch.randint(width - side_w, (1,), generator=generator)))
        copy = image.clone()
        copy[:, y1 : y1 + side_h, x1 : x1 + side_w] = source[:, y0 : y0 + side_h, x0 : x0 + side_w]
        copies.append(copy)
    return torch.stack(copies)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from anomalib_dskd.benchmark.detection import auroc
    from anomalib_dskd.data.few_shot import FewShotDataModule, parse_specs
    from anomalib_dskd.models.packd import Packd

    grid = [row for path in args.grid for row in json.loads(path.read_text())["rows"]]
    size = (args.image_size, args.image_size)
    model = Packd(backbone=args.backbone, pre_trained=args.weights, support_score_levels=(2, 3, 4),
                  pre_processor=Packd.configure_pre_processor(size), visualizer=False, evaluator=False,
                  post_processor=False).eval()
    generator = model.model.anomaly_map_generator
    designs = {name: dict(zip(AXES, name.split("-"), strict=True)) for name in CANDIDATES}
    rows: list[dict[str, Any]] = []
    for spec in args.target:
        category = parse_specs(spec)[0]["category"]
        for k in args.k:
            datamodule = FewShotDataModule(train_sources=[], target=spec, k_shot=k, seed=args.seed, image_size=size,
                                           num_support_draws=args.draws)
            datamodule.setup()
            for draw in range(args.draws):
                torch.manual_seed(1000 * k + draw)  # the Perlin generator draws from torch's global generator
                rng = torch.Generator().manual_seed(1000 * k + draw)
                supports = datamodule.support_images(draw)
                copies = [corrupt(supports[i], supports[torch.arange(k) != i], args.synthetic, rng) for i in range(k)]
                features = teacher_levels(model, supports)
                copy_features = [teacher_levels(model, batch) for batch in copies]
                checks = {}
                for name, design in designs.items():
                    normal, anomalous = [], []
                    for i in range(k):
                        keep = torch.arange(k) != i
                        bank = prepare([level[keep] for level in features], design)
                        query = prepare([level[i : i + 1] for level in features], design)
                        normal.append(image_scores(distance_maps(query, bank, design), design, generator, size))
                        query = prepare(copy_features[i], design)
                        anomalous.append(image_scores(distance_maps(query, bank, design), design, generator, size))
                    scores = torch.cat(normal + anomalous).double().numpy()
                    labels = torch.cat([torch.zeros(k), torch.ones(k * args.synthetic)]).bool().numpy()
                    checks[name] = auroc(scores, labels)
                chosen = max(CANDIDATES, key=lambda name: checks[name])  # first maximum: the default wins ties
                test = {name: next(r["image_auroc"] for r in grid if (r["model"], r["target"], r["k"], r["draw"])
                                   == (name, category, k, draw)) for name in (*CANDIDATES, "patchcore")}
                row = {"target": category, "k": k, "draw": draw, "selfcheck_auroc": checks, "chosen": chosen,
                       "chosen_test_auroc": test[chosen], "test_auroc": test}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = []
    print("\n| target | k | self-chosen | default | Patchcore-k | choices |\n|---|---|---|---|---|---|")
    for spec in args.target:
        category = parse_specs(spec)[0]["category"]
        for k in args.k:
            cell = [r for r in rows if (r["target"], r["k"]) == (category, k)]
            entry = {
                "target": category, "k": k, "draws": len(cell),
                "selfchosen_mean": statistics.mean(r["chosen_test_auroc"] for r in cell),
                "default_mean": statistics.mean(r["test_auroc"][CANDIDATES[0]] for r in cell),
                "patchcore_mean": statistics.mean(r["test_auroc"]["patchcore"] for r in cell),
                "choices": {name: sum(r["chosen"] == name for r in cell) for name in CANDIDATES},
            }
            summary.append(entry)
            print(f"| {category} | {k} | {entry['selfchosen_mean']:.3f} | {entry['default_mean']:.3f} | "
                  f"{entry['patchcore_mean']:.3f} | {entry['choices']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]), "candidates": CANDIDATES,
                                        "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
