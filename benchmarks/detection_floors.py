"""Where the detection floors of ``tests/test_detection.py`` come from: the same short trainings, more seeds.

For each model, trains on a generated MVTec LOCO category (``tests/test_detection.py``'s
:data:`CATEGORY_ARGS`) with the real MobileNetV2 teacher, for the test's epochs, over several seeds,
and prints one JSON line per (model, seed) with image AUROC per subset (all / logical / structural),
pixel AUROC, the inverted-score controls and, with ``--untrained``, the same model untrained.
The floors in the test are set below the worst seed here with margin, and above what an untrained,
inverted or constant model reaches (see the test's docstring).

Usage::

    python benchmarks/detection_floors.py --weights ../shared/weights/mobilenet_v2-b0353104.pth \\
        --models rd,ard,dskd --seeds 0,1,2 --untrained > docs/benchmarks/detection/floors.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.detection_models import CATEGORY_ARGS, EPOCHS, EXTRA_MAPS, PACKD_EPOCHS, build, packd_setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--models", default="rd,ard,dskd")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--untrained", action="store_true", help="also score each model untrained")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="parts", help="generator preset (the tests use 'parts')")
    parser.add_argument("--epochs", type=int, default=None, help="override the tests' epochs")
    parser.add_argument("--n-train", type=int, default=None, help="override the tests' training images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from anomalib_dskd.benchmark.detection import detection_run, score_predictions, train_and_predict
    from anomalib_dskd.data import generate_loco_category

    with tempfile.TemporaryDirectory() as tmp:
        category = {**CATEGORY_ARGS, "preset": args.preset}
        if args.n_train:
            category["n_train"] = args.n_train
        generate_loco_category(tmp, "parts", **category)
        for name in args.models.split(","):
            if name == "packd":  # few-shot: its own categories and datamodule (tests/detection_models.py)
                packd_root = Path(tmp) / "packd"
                build_packd, datamodule = packd_setup(packd_root, args.weights)
                for seed in [int(s) for s in args.seeds.split(",")]:
                    for trained in (True, False) if args.untrained else (True,):
                        start = time.perf_counter()
                        _, _, predictions = train_and_predict(
                            build_packd, datamodule, max_epochs=args.epochs or PACKD_EPOCHS, seed=seed, train=trained,
                            root_dir=packd_root,
                        )
                        row = {"model": name, "seed": seed, "trained": trained,
                               "epochs": (args.epochs or PACKD_EPOCHS) if trained else 0,
                               "seconds": round(time.perf_counter() - start, 1),
                               **{k: round(v, 4) for k, v in score_predictions(predictions).items()}}
                        print(json.dumps(row), flush=True)
                continue
            for seed in [int(s) for s in args.seeds.split(",")]:
                for trained in (True, False) if args.untrained else (True,):
                    start = time.perf_counter()
                    result = detection_run(
                        lambda name=name: build(name, args.weights), tmp, "parts", max_epochs=args.epochs or EPOCHS[name],
                        seed=seed, train=trained, extra_maps=EXTRA_MAPS.get(name, ()),
                    )
                    row = {"model": name, "seed": seed, "trained": trained, "epochs": (args.epochs or EPOCHS[name]) if trained else 0,
                           "preset": args.preset, "n_train": category["n_train"],
                           "seconds": round(time.perf_counter() - start, 1), **{k: round(v, 4) for k, v in result.items()}}
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
