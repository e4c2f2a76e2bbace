"""Where Glance's detection floor in ``tests/test_detection.py`` comes from: the same training, one seed per run.

Usage: ``python benchmarks/glance_detection_floor.py SEED 1`` (``1`` = train), from the repository root, with
``../shared/weights/mobilenet_v2-b0353104.pth``; prints one JSON line.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from anomalib.data import MVTecAD

from anomalib_dskd.benchmark.detection import score_predictions, train_and_predict
from anomalib_dskd.data import generate_mvtec_ad_category
from tests.detection_models import GLANCE_CATEGORY_ARGS, GLANCE_STEPS, build_glance

w = str(Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2-b0353104.pth")
seed = int(sys.argv[1]); train = sys.argv[2] == "1"
with tempfile.TemporaryDirectory() as tmp:
    generate_mvtec_ad_category(tmp, "parts", seed=0, **GLANCE_CATEGORY_ARGS)
    dm = MVTecAD(root=tmp, category="parts", train_batch_size=32, eval_batch_size=8, num_workers=0, seed=seed)
    t = time.perf_counter()
    model, engine, preds = train_and_predict(lambda: build_glance(w), dm, max_epochs=-1, max_steps=GLANCE_STEPS, seed=seed, train=train, root_dir=tmp)
    print(json.dumps({"model": "glance", "seed": seed, "trained": train, "steps": GLANCE_STEPS if train else 0, "seconds": round(time.perf_counter()-t,1), "local_distillation_fraction": float(getattr(model, "local_distillation_fraction", float("nan"))), **{k: round(v,4) for k,v in score_predictions(preds).items()}}), flush=True)
