"""anomalib metrics of the LOCO evaluation: SPRO, AUSPRO, LocoImageAUROC, LocoEvaluator (no Engine)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.utilities.data import dim_zero_cat

from anomalib.data import ImageBatch
from anomalib.metrics import Evaluator
from anomalib_dskd.metrics import AUSPRO, SPRO, LocoDataError, LocoEvaluator, LocoImageAUROC
from tests.test_spro import HAND_AUROC, HAND_EXPECTED, HAND_MAPS, write_hand_fixture

REPO = Path(__file__).resolve().parents[1]


def hand_batch(base: Path, subsets=("good", "logical_anomalies", "structural_anomalies"), scores=None) -> ImageBatch:  # noqa: ANN001
    maps = torch.tensor([HAND_MAPS[s]["000"] for s in subsets], dtype=torch.float32)
    paths = [str(base / "dataset" / "hand" / "test" / s / "000.png") for s in subsets]
    pred = maps.amax(dim=(1, 2)) if scores is None else torch.tensor(scores, dtype=torch.float32)
    labels = torch.tensor([0 if s == "good" else 1 for s in subsets])
    return ImageBatch(image=torch.zeros(len(subsets), 3, 2, 2), anomaly_map=maps, image_path=paths,
                      pred_score=pred, gt_label=labels)


@pytest.fixture
def hand(tmp_path: Path) -> Path:
    write_hand_fixture(tmp_path)
    return tmp_path


def test_standalone_metrics_in_stock_evaluator(hand: Path) -> None:
    metrics = [
        AUSPRO(integration_limit=0.05, subset="logical"),
        AUSPRO(integration_limit=0.3, subset="structural"),
        AUSPRO(integration_limit=1.0),
        SPRO(threshold=0.5, subset="mean"),
        SPRO(threshold=0.5, subset="structural"),
        LocoImageAUROC(subset="logical"),
        LocoImageAUROC(subset="mean", image_score="max"),
    ]
    evaluator = Evaluator(test_metrics=metrics)
    evaluator.on_test_batch_end(None, None, None, hand_batch(hand, ("good", "logical_anomalies")), 0)
    evaluator.on_test_batch_end(None, None, None, hand_batch(hand, ("structural_anomalies",)), 1)
    values = {m.name: float(m.compute()) for m in metrics}
    assert values == pytest.approx({
        "AUSPRO_logical_0.05": HAND_EXPECTED["logical_anomalies"]["0.05"],
        "AUSPRO_structural_0.3": HAND_EXPECTED["structural_anomalies"]["0.3"],
        "AUSPRO_mean_1.0": HAND_EXPECTED["mean"]["1.0"],
        "SPRO_mean": 0.5,  # anomaly_map > 0.5 strictly: the logical defect's pixel scored 0.5 does not count
        "SPRO_structural": 0.5,
        "image_AUROC_logical": HAND_AUROC["logical_anomalies"],
        "image_AUROC_mean": HAND_AUROC["mean"],
    }, abs=1e-6)


def test_pred_score_is_the_image_score(hand: Path) -> None:
    metric = LocoImageAUROC(subset="structural")  # fields: pred_score, image_path (no ground truth read)
    metric.update(hand_batch(hand, scores=[0.1, 0.9, 0.8]))
    assert float(metric.compute()) == 1.0


def test_shared_state_evaluator(hand: Path) -> None:
    evaluator = LocoEvaluator(image_score="max", save_results=False)
    names = [m.name for m in evaluator.test_metrics]
    expected_names = [f"image_AUROC_{s}" for s in ("logical", "structural", "mean")]
    for limit in ("0.05", "0.01", "0.1", "0.3", "1.0"):
        expected_names += [f"AUSPRO_{s}_{limit}" for s in ("logical", "structural", "mean")]
    assert names == [*expected_names, "pixel_AUROC"]
    # one state: the views store nothing
    batch = hand_batch(hand)
    for metric in evaluator.test_metrics[:-1]:
        metric.update(batch)
    stored = [m for m in evaluator.test_metrics[:-1] if len(getattr(m, "maps", [])) > 0]
    assert len(stored) == 1
    assert stored[0] is evaluator.loco_state
    values = {m.name: float(m.compute()) for m in evaluator.test_metrics[:-1]}
    for limit in ("0.01", "0.05", "0.1", "0.3", "1.0"):
        assert values[f"AUSPRO_logical_{limit}"] == pytest.approx(HAND_EXPECTED["logical_anomalies"][limit], abs=1e-6)
        assert values[f"AUSPRO_mean_{limit}"] == pytest.approx(HAND_EXPECTED["mean"][limit], abs=1e-6)
    assert values["image_AUROC_mean"] == pytest.approx(0.25)
    evaluator.loco_state.reset()
    with pytest.raises(LocoDataError, match="never updated"):
        evaluator.loco_state.compute_result()


def test_states_reduce_across_processes(hand: Path) -> None:
    """Simulated 2-process gather: rank 1 also got a duplicate of rank 0's good image (sampler padding)."""
    rank0, rank1 = AUSPRO(0.3, "mean"), AUSPRO(0.3, "mean")
    rank0.update(hand_batch(hand, ("good", "logical_anomalies")))
    rank1.update(hand_batch(hand, ("structural_anomalies", "good")))
    others = iter([dim_zero_cat(getattr(rank1, name)) for name in rank0._reductions])

    def fake_all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:  # noqa: ANN001
        return [tensor, next(others)]

    rank0.dist_sync_fn = fake_all_gather
    rank0.distributed_available_fn = lambda: True
    assert float(rank0.compute()) == pytest.approx(HAND_EXPECTED["mean"]["0.3"], abs=1e-6)
    assert len(rank0.maps) == 1  # local state restored after the synced compute
    assert rank0.compute_result().num_images == {"good": 1, "logical_anomalies": 1, "structural_anomalies": 1}


def test_absent_subset_is_nan(hand: Path) -> None:
    metric = AUSPRO(0.05, "structural")
    metric.update(hand_batch(hand, ("good", "logical_anomalies")))
    with pytest.warns(RuntimeWarning, match="no 'structural_anomalies'"):
        assert math.isnan(float(metric.compute()))


def test_errors_name_the_files(tmp_path: Path) -> None:
    # MVTec AD layout: no defects_config.json
    root = tmp_path / "mvtec"
    metric = AUSPRO()
    batch = ImageBatch(image=torch.zeros(2, 3, 2, 2), anomaly_map=torch.rand(2, 2, 2),
                       image_path=[str(root / "bottle" / "test" / "good" / "000.png"),
                                   str(root / "bottle" / "test" / "broken" / "000.png")])
    metric.update(batch)
    with pytest.raises(FileNotFoundError, match=str(root / "bottle" / "defects_config.json")):
        metric.compute()
    # not under <category>/test/<subset>/
    metric = AUSPRO()
    metric.update(ImageBatch(image=torch.zeros(1, 3, 2, 2), anomaly_map=torch.rand(1, 2, 2),
                             image_path=[str(tmp_path / "images" / "000.png")]))
    with pytest.raises(LocoDataError, match=r"images/000\.png is not in MVTec LOCO layout"):
        metric.compute()


def test_metric_errors_bad_maps_and_no_good(hand: Path) -> None:
    metric = AUSPRO()
    batch = hand_batch(hand)
    batch.anomaly_map[2, 0, 0] = float("nan")
    metric.update(batch)
    with pytest.raises(LocoDataError, match=r"structural_anomalies/000\.png contains 1 NaN"):
        metric.compute()
    metric = AUSPRO()
    metric.update(hand_batch(hand, ("logical_anomalies", "structural_anomalies")))
    with pytest.raises(LocoDataError, match=r"good"):
        metric.compute()


def test_dataset_root_override(hand: Path, tmp_path: Path) -> None:
    # image paths point somewhere else (e.g. a copy without ground truth); dataset_root finds the ground truth
    moved = tmp_path / "elsewhere"
    metric = AUSPRO(0.3, "logical", dataset_root=hand / "dataset")
    batch = hand_batch(moved)
    batch.image_path = [p.replace(str(moved), str(hand)).replace(str(hand / "dataset"), str(moved)) for p in batch.image_path]
    metric.update(batch)
    assert float(metric.compute()) == pytest.approx(HAND_EXPECTED["logical_anomalies"]["0.3"], abs=1e-6)


def test_yaml_config_instantiates_evaluator() -> None:
    """As `anomalib train/test --model Padim --model.evaluator configs/evaluator/loco.yaml` parses it."""
    from jsonargparse import ArgumentParser

    from anomalib.models import AnomalibModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibModule, "model", fail_untyped=False, required=True)
    config = parser.parse_args(["--model", "Padim", "--model.backbone", "resnet18", "--model.pre_trained", "false",
                                "--model.evaluator", str(REPO / "configs" / "evaluator" / "loco.yaml")])
    evaluator = parser.instantiate_classes(config).model.evaluator
    assert isinstance(evaluator, LocoEvaluator)
    assert "AUSPRO_mean_0.05" in [m.name for m in evaluator.test_metrics]
    assert evaluator.raw_predictions is True


def test_binned_mode_via_metric(hand: Path) -> None:
    metric = AUSPRO(0.1, "logical", mode="binned", num_bins=4)
    metric.update(hand_batch(hand))
    assert float(metric.compute()) == pytest.approx(HAND_EXPECTED["logical_anomalies"]["0.1"], abs=1e-4)
    assert metric.compute_result().method == "binned"
    np.testing.assert_allclose(metric.compute_result().curves["logical_anomalies"].spro[-1], 1.0)
