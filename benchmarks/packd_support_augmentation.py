"""Diagnostic (issue #14): does augmenting the k support images help Packd's memory image score?

Packd's default image score (``image_score="memory"``, levels 2-4) is the maximum of the blurred nearest-support
distance map; it needs no training, so it is scored here with the frozen teacher only, on the same seeded draws as
``packd_score_variants.py`` (``FewShotDataModule(seed=0)``, 5 draws, k = 2 / 4 / 8): ``none`` reproduces that
script's ``memimg234`` image AUROC exactly. The memory is built from the supports and their flips (``hflip``:
+ horizontal; ``flips``: + horizontal, vertical, both) or rotations (``rot4``: 0/90/180/270 degrees), as RegAD-style
few-shot methods augment supports. One JSON line per (augmentation, k, draw) appended to OUT; pixel metrics are
those of the memory map alone (Packd's map also adds the distillation term). Not a test; nothing chosen on it.

    CI=true OMP_NUM_THREADS=1 python benchmarks/packd_support_augmentation.py \\
        mvtec_ad:../shared/datasets/mvtec3d_tire_rgb:tire docs/benchmarks/packd/support_augmentation_tire.jsonl
"""

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CI", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import raw_metrics
from packd_fewshot import load_test_set

from anomalib_dskd.data.few_shot import FewShotDataModule, parse_specs
from anomalib_dskd.models.packd import Packd

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
AUGS = {
    "none": [lambda x: x],
    "hflip": [lambda x: x, lambda x: x.flip(-1)],
    "flips": [lambda x: x, lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.flip(-1, -2)],
    "rot4": [lambda x, r=r: torch.rot90(x, r, (-2, -1)) for r in range(4)],
}


@torch.no_grad()
def memory_scores(model: Packd, images: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores and maps of the memory term alone (levels 2-4: the teacher's four stages)."""
    torch_model = model.model.eval()
    scores, maps = [], []
    for start in range(0, len(images), chunk):
        batch = model.pre_processor.transform(images[start : start + chunk])
        out = torch_model.score(torch_model.support_distance_maps(torch_model.teacher(batch)))
        scores.append(out.pred_score.reshape(-1))
        maps.append(out.anomaly_map.reshape(-1, 1, *images.shape[-2:]))
    return torch.cat(scores), torch.cat(maps)


def main() -> None:
    spec, out = sys.argv[1], sys.argv[2]
    variants = sys.argv[3].split(",") if len(sys.argv) > 3 else list(AUGS)
    torch.set_num_threads(1)
    size = 256
    model = Packd(backbone="mobilenetv2_100", pre_trained=str(WEIGHTS), support_score_levels=(2, 3, 4),
                  pre_processor=Packd.configure_pre_processor((size, size)),
                  visualizer=False, evaluator=False, post_processor=False).eval()
    target = parse_specs(spec)[0]
    images, masks, labels = load_test_set(target, size)
    print("test images", len(images), flush=True)
    with open(out, "a", encoding="utf-8") as handle:
        for k in (2, 4, 8):
            datamodule = FewShotDataModule(train_sources=[], target=spec, k_shot=k, seed=0, image_size=(size, size),
                                           num_support_draws=5)
            datamodule.setup()
            for draw in range(5):
                supports = datamodule.support_images(draw)
                for name in variants:
                    start = time.time()
                    model.set_support(torch.cat([augment(supports) for augment in AUGS[name]]))
                    scores, maps = memory_scores(model, images)
                    row = {"aug": name, "target": target["category"], "k": k, "draw": draw,
                           "seconds": round(time.time() - start, 1), **raw_metrics(scores, maps, labels, masks)}
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()
                    print(row["aug"], k, draw, round(row["image_auroc"], 3), row["seconds"], flush=True)


if __name__ == "__main__":
    main()
