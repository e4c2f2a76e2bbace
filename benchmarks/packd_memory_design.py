"""Packd's support memory, design by design: which nearest-support score detects on an unseen category?

Packd's image score is its support memory (``docs/models/packd.md``, "Which score"): the nearest-support
distance of the frozen teacher's features, which needs no training. Issue #14's second round left it below
k-shot PatchCore on tire and juice_bottle. This script scores a grid of memory designs, fixed before the
run, on the same teacher, test sets and seeded support draws as ``benchmarks/packd_score_variants.py``
(``FewShotDataModule.support_images(draw)``, seed 0), together with k-shot PatchCore (anomalib's model
with the k images as its whole memory bank, as in ``packd_fewshot.py``):

* ``metric``: ``cos`` (``1 - cos`` of L2-normalised features, Packd's) or ``l2`` (Euclidean, PatchCore's);
* ``levels``: teacher levels ``23``, ``234`` or ``34`` (MobileNetV2: stride 8 / 16 / 32);
* ``combine``: ``sum`` (a distance map per level, upsampled and summed, Packd's) or ``concat`` (the
  levels' features resized to the finest one's grid and concatenated, one nearest neighbour: PatchCore's);
* ``locality``: ``global`` (the nearest neighbour over every position of every support, Packd's and
  PatchCore's) or ``local`` (only support positions within ``ceil(side / 8)`` cells of the query's own
  position, i.e. 1/8 of the image: a misplaced or missing part finds no normal counterpart nearby);
* ``image``: ``blurmax`` (maximum of the upsampled, Gaussian-blurred map, Packd's) or ``max`` (no blur).

Features are averaged over a 3x3 neighbourhood first in every design (PatchCore's locally aware features).
Only image AUROC is computed per design (pixel metrics of the chosen design come from the package check).

The design is *chosen* without the target (``--select``): for each target, the design with the highest
mean image AUROC over the *other two* targets (every k, every draw); no image or label of the target
enters its choice. Every design, target, k and draw goes to the raw JSON.

Example (the command behind ``docs/benchmarks/packd/memory_design.json``)::

    CI=true OMP_NUM_THREADS=1 python benchmarks/packd_memory_design.py \\
        --target mvtec_ad:../shared/datasets/mvtec3d_tire_rgb:tire \\
        --target mvtec_ad:../shared/datasets/battery_weld:weld \\
        --target mvtec_loco:../shared/datasets/mvtec_loco_juice_bottle:juice_bottle \\
        --weights ../shared/weights/mobilenet_v2-b0353104.pth --k 2 4 8 --draws 5 \\
        --out docs/benchmarks/packd/memory_design.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

import torch
from _common import add_support_draw_args
import torch.nn.functional as F  # noqa: N812
from packd_fewshot import adapt_patchcore, load_test_set, predict

AXES = {
    "metric": ("cos", "l2"),
    "levels": ("23", "234", "34"),
    "combine": ("sum", "concat"),
    "locality": ("global", "local"),
    "image": ("blurmax", "max"),
}
PACKD_DEFAULT = "cos-234-sum-global-blurmax"


def designs() -> list[dict[str, str]]:
    """Every design of the grid, as a mapping axis -> value (name: the values joined by ``-``)."""
    return [dict(zip(AXES, values, strict=True)) for values in itertools.product(*AXES.values())]


def design_name(design: dict[str, str]) -> str:
    return "-".join(design[axis] for axis in AXES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", default=[], metavar="FORMAT:ROOT:CATEGORY")
    add_support_draw_args(parser)
    parser.add_argument("--select", type=Path, nargs="+", default=None,
                        help="result JSONs of this script (together: every target): nested selection")
    parser.add_argument("--selection-out", type=Path, default=None, help="where --select writes its JSON")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def aggregate(features: torch.Tensor) -> torch.Tensor:
    """PatchCore's locally aware features: 3x3 average (padding not counted)."""
    return F.avg_pool2d(features, 3, stride=1, padding=1, count_include_pad=False)


@functools.cache
def local_mask(side: tuple[int, int], shots: int) -> torch.Tensor:
    """``(hw, k * hw)`` True where a support position lies within ``ceil(side / 8)`` cells of the query's."""
    height, width = side
    radius_h, radius_w = math.ceil(height / 8), math.ceil(width / 8)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    near = ((rows[:, None] - rows[None]).abs() <= radius_h) & ((cols[:, None] - cols[None]).abs() <= radius_w)
    return near.repeat(1, shots)


def prepare(features: list[torch.Tensor], design: dict[str, str]) -> list[torch.Tensor]:
    """Per-level (or one concatenated) ``(B, C, h, w)`` features of a design's levels, metric applied."""
    levels = [features[int(level) - 2] for level in design["levels"]]
    levels = [aggregate(level) for level in levels]
    if design["metric"] == "cos":
        levels = [F.normalize(level, dim=1) for level in levels]
    if design["combine"] == "concat":
        size = levels[0].shape[-2:]
        resized = [F.interpolate(level, size=size, mode="bilinear", align_corners=False) for level in levels]
        if design["metric"] == "cos":
            # each level unit norm again after resizing; the concatenation then has cos = mean of level cos
            resized = [F.normalize(level, dim=1) / math.sqrt(len(resized)) for level in resized]
        levels = [torch.cat(resized, dim=1)]
    return levels


def distance_maps(query: list[torch.Tensor], support: list[torch.Tensor], design: dict[str, str]) -> list[torch.Tensor]:
    """``(B, 1, h, w)`` nearest-support distance per level (or per concatenation)."""
    maps = []
    for q, s in zip(query, support, strict=True):
        batch, channels, height, width = q.shape
        tokens = q.flatten(2).transpose(1, 2)  # (B, hw, C)
        bank = s.permute(0, 2, 3, 1).reshape(-1, channels)  # (k hw, C), support-major as local_mask
        if design["metric"] == "cos":
            distance = 1 - tokens @ bank.T
        else:  # squared Euclidean from one matrix product; the square root after the minimum
            distance = (tokens.square().sum(-1, keepdim=True) + bank.square().sum(-1)) - 2 * tokens @ bank.T
        if design["locality"] == "local":
            distance.masked_fill_(~local_mask((height, width), s.shape[0]), float("inf"))
        nearest = distance.amin(dim=-1)
        if design["metric"] == "l2":
            nearest = nearest.clamp_min(0).sqrt()
        maps.append(nearest.reshape(batch, 1, height, width))
    return maps


def image_scores(maps: list[torch.Tensor], design: dict[str, str], generator: Any, size: tuple[int, int]) -> torch.Tensor:  # noqa: ANN401
    if design["image"] == "blurmax":
        combined = generator.smooth(maps, size)
    else:
        combined = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)
    return combined.amax(dim=(-2, -1)).reshape(-1)


@torch.no_grad()
def teacher_levels(model: Any, images: torch.Tensor, chunk: int = 16) -> list[torch.Tensor]:  # noqa: ANN401
    """Teacher features of levels 2, 3, 4 of ``[0, 1]`` images."""
    outputs: list[list[torch.Tensor]] = [[], [], []]
    for start in range(0, len(images), chunk):
        features = model.model.teacher(model.pre_processor.transform(images[start : start + chunk]))
        for index in range(3):
            outputs[index].append(features[index + 1])
    return [torch.cat(level) for level in outputs]


def select(paths: list[Path], out: Path | None) -> int:
    """Nested selection: each target's design = the best mean image AUROC over the other targets."""
    rows = [row for path in paths for row in json.loads(path.read_text())["rows"]]
    targets = sorted({row["target"] for row in rows})
    names = [design_name(design) for design in designs()]

    def mean(model: str, target_set: set[str], k: int | None = None) -> float:
        values = [r["image_auroc"] for r in rows if r["model"] == model and r["target"] in target_set
                  and (k is None or r["k"] == k)]
        return statistics.mean(values)

    result = {"sources": [str(path) for path in paths], "command": " ".join([sys.executable, *sys.argv]), "targets": {}}
    for target in targets:
        others = set(targets) - {target}
        ranking = sorted(names, key=lambda name: mean(name, others), reverse=True)
        chosen = ranking[0]
        per_k = {}
        for k in sorted({r["k"] for r in rows}):
            per_k[k] = {model: mean(model, {target}, k) for model in (chosen, PACKD_DEFAULT, "patchcore")}
        result["targets"][target] = {
            "chosen": chosen,
            "validation_auroc": {name: round(mean(name, others), 4) for name in ranking[:10]},
            "target_auroc": per_k,
        }
        print(f"{target}: chosen on {sorted(others)}: {chosen} (validation {mean(chosen, others):.4f}; "
              f"default {mean(PACKD_DEFAULT, others):.4f}, patchcore {mean('patchcore', others):.4f})")
        for k, values in per_k.items():
            print(f"   k={k}: " + ", ".join(f"{m} {v:.4f}" for m, v in values.items()))
    print("\nall targets, mean image AUROC (top 12; for information: reads every target):")
    overall = sorted(names + ["patchcore"], key=lambda name: mean(name, set(targets)), reverse=True)
    for name in overall[:12]:
        print(f"  {name}: " + ", ".join(f"{t} {mean(name, {t}):.4f}" for t in targets))
    if out:
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.select:
        return select(args.select, args.selection_out)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from anomalib_dskd.data.few_shot import FewShotDataModule, parse_specs
    from anomalib_dskd.metrics import raw_auroc
    from anomalib_dskd.models.packd import Packd

    def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
        from types import SimpleNamespace

        metric = raw_auroc(["pred_score", "gt_label"])
        metric.update(SimpleNamespace(pred_score=scores, gt_label=labels))
        return float(metric.compute())

    size = (args.image_size, args.image_size)
    model = Packd(backbone=args.backbone, pre_trained=args.weights, support_score_levels=(2, 3, 4),
                  pre_processor=Packd.configure_pre_processor(size), visualizer=False, evaluator=False,
                  post_processor=False).eval()
    generator = model.model.anomaly_map_generator
    grid = designs()
    rows: list[dict[str, Any]] = []
    progress = tqdm(total=len(args.target) * len(args.k) * args.draws, desc="memory designs (target, k, draw)")
    for spec in args.target:
        target = parse_specs(spec)[0]
        images, _, labels = load_test_set(target, args.image_size)
        test_features = teacher_levels(model, images)
        for k in args.k:
            datamodule = FewShotDataModule(train_sources=[], target=spec, k_shot=k, seed=args.seed,
                                           image_size=size, num_support_draws=args.draws)
            datamodule.setup()
            for draw in range(args.draws):
                supports = datamodule.support_images(draw)
                support_features = teacher_levels(model, supports)
                base = {"target": target["category"], "k": k, "draw": draw}
                for design in grid:
                    if design["image"] != AXES["image"][0]:
                        continue  # the maps serve every image score: computed once, below
                    start = time.perf_counter()
                    bank = prepare(support_features, design)
                    scores: dict[str, list[torch.Tensor]] = {image: [] for image in AXES["image"]}
                    for chunk in range(0, len(images), 4):
                        query = prepare([f[chunk : chunk + 4] for f in test_features], design)
                        maps = distance_maps(query, bank, design)
                        for image in AXES["image"]:
                            scores[image].append(image_scores(maps, {**design, "image": image}, generator, size))
                    seconds = round(time.perf_counter() - start, 3)
                    for image, values in scores.items():
                        rows.append({"model": design_name({**design, "image": image}), **base,
                                     "image_auroc": auroc(torch.cat(values), labels), "maps_seconds": seconds})
                patchcore, _ = adapt_patchcore(args, supports)
                scores, _ = predict(patchcore.model, patchcore.pre_processor.transform, images)
                rows.append({"model": "patchcore", **base, "image_auroc": auroc(scores, labels)})
                default = next(r for r in rows[::-1] if r["model"] == PACKD_DEFAULT)
                progress.write(f"{base}: default {default['image_auroc']:.4f}, patchcore {rows[-1]['image_auroc']:.4f}, "
                               f"best design {max(r['image_auroc'] for r in rows[-len(grid) - 1:-1]):.4f}")
                progress.update()
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                            "axes": AXES, "rows": rows}, indent=0))
    progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
