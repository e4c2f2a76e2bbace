"""End to end: anomalib's Engine tests a tiny model on a generated LOCO category with LocoEvaluator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.mark.slow
def test_engine_test_logs_loco_metrics(tmp_path: Path) -> None:
    from torchvision.transforms.v2 import Resize

    from anomalib.data import MVTecLOCO
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from anomalib_dskd.metrics import LocoEvaluator
    from anomalib_dskd.metrics.testing import write_loco_category

    write_loco_category(tmp_path / "data", category="tiny", seed=1)
    datamodule = MVTecLOCO(root=tmp_path / "data", category="tiny", train_batch_size=4, eval_batch_size=4,
                           num_workers=0)
    evaluator = LocoEvaluator(save_dir=tmp_path / "loco")
    model = Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=32,
                  pre_processor=PreProcessor(transform=Resize((64, 64))), evaluator=evaluator, visualizer=False)
    engine = Engine(default_root_dir=tmp_path / "results", max_epochs=1, logger=False, enable_progress_bar=False,
                    accelerator="cpu", devices=1)
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule)[0]

    expected = [f"image_AUROC_{s}" for s in ("logical", "structural", "mean")]
    expected += [f"AUSPRO_{s}_{limit}" for s in ("logical", "structural", "mean") for limit in ("0.01", "0.05", "0.1", "0.3", "1.0")]
    expected.append("pixel_AUROC")
    for name in expected:
        assert name in results, f"{name} not logged ({sorted(results)})"
        assert math.isfinite(results[name]) and 0.0 <= results[name] <= 1.0, (name, results[name])

    # raw predictions: the evaluator's batch hook ran before anomalib's post-processor
    callbacks = engine.trainer.callbacks
    position = {type(cb): i for i, cb in enumerate(callbacks)}
    assert position[LocoEvaluator] < position[PostProcessor]

    metrics = json.loads((tmp_path / "loco" / "metrics.json").read_text())
    assert metrics["localization"]["auc_spro"]["mean"]["0.05"] == pytest.approx(results["AUSPRO_mean_0.05"], abs=1e-6)
    assert metrics["classification"]["auc_roc"]["mean"] == pytest.approx(results["image_AUROC_mean"], abs=1e-6)
    for subset in ("logical_anomalies", "structural_anomalies"):
        assert (tmp_path / "loco" / f"spro_curve_{subset}.png").stat().st_size > 10_000
