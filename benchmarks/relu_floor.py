"""The distillation loss a non-negative (ReLU-ended) student cannot go below, for a teacher and a set of images.

For a teacher feature vector ``t`` the best cosine any non-negative vector reaches is that of ``relu(t)``:
``|relu(t)| / |t|``. Per scale, the floor of RD's per-pixel loss (``mean over positions of 1 - cos``) and of
the flatten loss (``1 - cos`` of the whole flattened map, image by image) is computed here and summed over
scales, as the losses are. Prints one JSON object.

Usage::

    python benchmarks/relu_floor.py --weights ../shared/weights/mobilenet_v2-b0353104.pth \\
        --images ../shared/datasets/mvtec_loco_juice_bottle/juice_bottle/train/good --limit 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--images", required=True, help="folder of normal images")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    from torchvision.io import read_image
    from torchvision.transforms.v2 import functional as TF  # noqa: N812

    from anomalib_dskd.components.rd import Teacher

    teacher = Teacher(args.backbone, (1, 2, 3), args.weights)
    files = sorted(Path(args.images).glob("*.png"))[: args.limit]
    pixel, flat, negative = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(3)
    for file in files:
        image = TF.to_dtype(read_image(str(file))[:3], torch.float32, scale=True)
        image = TF.normalize(TF.resize(image, [args.size, args.size], antialias=True), [0.485, 0.456, 0.406],
                             [0.229, 0.224, 0.225])[None]
        for k, t in enumerate(teacher(image)):
            pixel[k] += float((1 - t.clamp(min=0).norm(dim=1) / t.norm(dim=1)).mean())
            flat[k] += float(1 - t.clamp(min=0).norm() / t.norm())
            negative[k] += float((t < 0).float().mean())
    n = len(files)
    print(json.dumps({
        "images": n, "backbone": args.backbone, "signed_outputs": teacher.signed_outputs,
        "negative_fraction_per_scale": [round(float(v) / n, 4) for v in negative],
        "pixel_loss_floor_per_scale": [round(float(v) / n, 4) for v in pixel],
        "pixel_loss_floor_sum": round(float(pixel.sum()) / n, 4),
        "flatten_loss_floor_per_scale": [round(float(v) / n, 4) for v in flat],
        "flatten_loss_floor_sum": round(float(flat.sum()) / n, 4),
    }))


if __name__ == "__main__":
    main()
