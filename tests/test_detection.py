"""Trained models must *detect*: floors that an untrained, inverted or constant model cannot reach.

Each model trains briefly (anomalib ``Engine``, a few dozen optimiser steps) on a generated MVTec LOCO
category (:data:`tests.detection_models.CATEGORY_ARGS`, 128x128) with the real ImageNet MobileNetV2
teacher from ``../shared/weights``, and its raw test scores (post-processor normalisation off) must
reach an image AUROC and a pixel AUROC floor. Without the weights these tests skip (a random teacher
gives no stable floor to check); everything else in the suite runs with random teachers.

How the floors were chosen (``benchmarks/detection_floors.py``, raw output
``docs/benchmarks/detection/floors.jsonl``, seeds 0-2, the same data and epochs): trained models
reach image AUROC 0.92-1.00 and pixel AUROC 0.955-0.980; the same models untrained reach at most
0.73 (image) and 0.59 (pixel); a constant score gives 0.5 and the inverted trained scores at most
0.08 (image) and 0.045 (pixel). Each floor sits at least 0.06 below the worst trained seed and at
least 0.12 above the best control, so seed noise does not fail it and no model that detects nothing
passes it. The test also checks that the inverted score fails the same floor, and a checkpoint round
trip: the reloaded model gives the same maps and scores.

Dskd's logical check uses the generator's ``"arrangement"`` preset, where every part and every pair of
neighbours looks normal and only the counts or the row rule are wrong (on the default preset every
trained model already scores 1.0 on the logical anomalies, so no student can exceed another). Measured
over seeds 0-2 (``benchmarks/detection_floors.py --models dskd --preset arrangement --epochs 30
--n-train 48``, raw ``docs/benchmarks/detection/arrangement.jsonl``): Dskd 0.94-1.00 image AUROC on the
logical anomalies, its global student alone 0.96-1.00, its local student alone 0.44-0.52 (Rd: 0.69 for
seed 0). The test asks for 0.85 from Dskd and its global student, and Dskd at least 0.25 above its
local student (measured gap 0.43-0.54).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import shared_path
from tests.detection_models import (
    ARRANGEMENT_ARGS,
    ARRANGEMENT_EPOCHS,
    CATEGORY_ARGS,
    EPOCHS,
    EXTRA_MAPS,
    GLANCE_CATEGORY_ARGS,
    GLANCE_STEPS,
    PACKD_EPOCHS,
    build,
    build_glance,
    packd_setup,
)

WEIGHTS = shared_path() / "weights" / "mobilenet_v2-b0353104.pth"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"real teacher weights {WEIGHTS} not present"),
]

#: (image AUROC floor, pixel AUROC floor) per model; see the module docstring for how they were chosen
FLOORS = {"rd": (0.9, 0.9), "ard": (0.85, 0.9), "dskd": (0.9, 0.9)}


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_dskd.data import generate_loco_category

    root = tmp_path_factory.mktemp("detection")
    generate_loco_category(root, "parts", **CATEGORY_ARGS)
    return root


_TRAINED: dict[str, tuple] = {}


def trained(name: str, root: Path) -> tuple:
    """``(model, engine, metrics)`` of ``name`` trained once per session (seed 0)."""
    if name not in _TRAINED:
        from anomalib_dskd.benchmark.detection import loco_datamodule, score_predictions, train_and_predict

        torch.set_num_threads(2)
        datamodule = loco_datamodule(root, "parts", seed=0)
        model, engine, predictions = train_and_predict(
            lambda: build(name, str(WEIGHTS)), datamodule, max_epochs=EPOCHS[name], seed=0, root_dir=root / name
        )
        _TRAINED[name] = (model, engine, score_predictions(predictions, EXTRA_MAPS.get(name, ())), datamodule)
    return _TRAINED[name]


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_trained_model_detects_anomalies(name: str, category: Path) -> None:
    _, _, metrics, _ = trained(name, category)
    image_floor, pixel_floor = FLOORS[name]
    assert metrics["image_auroc_all"] >= image_floor, metrics
    assert metrics["pixel_auroc"] >= pixel_floor, metrics
    # the floors are not reachable by the inverted score (what a sign error would give)
    assert metrics["image_auroc_all_inverted"] < image_floor
    assert metrics["pixel_auroc_inverted"] < pixel_floor


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_checkpoint_round_trip_gives_the_same_maps_and_scores(name: str, category: Path) -> None:
    model, engine, _, datamodule = trained(name, category)
    path = engine.trainer.checkpoint_callback.best_model_path
    assert path, "the Engine wrote no checkpoint"
    loaded = type(model).load_from_checkpoint(path, map_location="cpu").eval()
    model.eval()
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        ours, theirs = loaded(batch.image), model(batch.image)
    torch.testing.assert_close(ours.anomaly_map, theirs.anomaly_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.pred_score, theirs.pred_score, rtol=1e-5, atol=1e-6)


#: INT8 (anomalib's ``CompressionType.INT8_PTQ`` path) against the f32 export of the same trained model, raw
#: outputs. Measured here (this test's print, seed 0, 2026-12-02): map Pearson correlation over the test set
#: rd 0.74, ard 0.87, dskd 0.66; image AUROC f32 -> INT8 rd 1.000 -> 0.969, ard 0.906 -> 0.795, dskd
#: 1.000 -> 0.997. So INT8 costs accuracy on these small 128 px maps (the real-data study,
#: ``benchmarks/int8_accuracy.py``, measures by how much); this test does not assert the issue's accuracy target.
#: It fails when INT8 *destroys* the maps: a constant output (what anomalib's normalisation inside the graph
#: gives after INT8, see docs/benchmarks/edge/README.md) has no correlation and AUROC 0.5, a map of quantisation
#: noise correlates near 0 and falls to the untrained models' AUROC (at most 0.73, module docstring). Bounds:
#: correlation 0.5 (0.16 below the worst model), AUROC loss 0.15 (0.04 above the worst).
#: (Those figures predate ``Int8Export``, which keeps the map-smoothing ops and the scoring tail f32.) The image score must
#: also stay the maximum of the map the graph returns: with the smoothing in INT8, OpenVINO's CPU plugin returned
#: scores off by up to 1.37 on a trained juice_bottle Rd (``anomalib_dskd/components/int8.py``); 1e-4 of the map's
#: scale is float32 rounding, far below that.
INT8_MIN_MAP_CORRELATION = 0.5
INT8_MAX_AUROC_DROP = 0.15


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_int8_export_keeps_the_maps(name: str, category: Path, tmp_path: Path) -> None:
    import numpy as np

    from anomalib_dskd.benchmark.detection import auroc
    from anomalib_dskd.benchmark.measure import (
        export_openvino,
        export_openvino_int8_ptq,
        map_agreement,
        openvino_outputs,
    )
    from tests.detection_models import SIZE

    model, _, _, datamodule = trained(name, category)
    batches = list(datamodule.test_dataloader())
    images = torch.cat([b.image for b in batches]).numpy()
    labels = torch.cat([b.gt_label for b in batches]).numpy().astype(bool)
    f32 = openvino_outputs(export_openvino(model, tmp_path / "f32", SIZE), images)
    int8 = openvino_outputs(export_openvino_int8_ptq(model, datamodule, tmp_path / "int8", SIZE), images)
    agreement = map_agreement(f32["anomaly_map"], int8["anomaly_map"])
    f32_auroc = auroc(f32["pred_score"].reshape(-1), labels)
    int8_auroc = auroc(int8["pred_score"].reshape(-1), labels)
    print(f"{name}: INT8 vs f32 {agreement}, image AUROC f32 {f32_auroc:.3f} INT8 {int8_auroc:.3f}")
    assert agreement["pearson"] >= INT8_MIN_MAP_CORRELATION, agreement
    assert int8_auroc >= f32_auroc - INT8_MAX_AUROC_DROP, (f32_auroc, int8_auroc)
    assert np.isfinite(int8["anomaly_map"]).all()
    assert np.ptp(int8["pred_score"]) > 0, "INT8 gives every image the same score"
    for outputs in (f32, int8):
        map_max = outputs["anomaly_map"].reshape(len(images), -1).max(axis=1)
        scale = float(np.abs(outputs["anomaly_map"]).max())
        np.testing.assert_allclose(outputs["pred_score"].reshape(-1), map_max, rtol=0, atol=1e-4 * scale)


def test_dskd_catches_arrangement_anomalies_its_local_student_misses(tmp_path_factory: pytest.TempPathFactory) -> None:
    from anomalib_dskd.benchmark.detection import detection_run
    from anomalib_dskd.data import generate_loco_category

    root = tmp_path_factory.mktemp("arrangement")
    generate_loco_category(root, "parts", **ARRANGEMENT_ARGS)
    torch.set_num_threads(2)
    metrics = detection_run(
        lambda: build("dskd", str(WEIGHTS)), root, "parts", max_epochs=ARRANGEMENT_EPOCHS, seed=0,
        extra_maps=EXTRA_MAPS["dskd"],
    )
    assert metrics["image_auroc_logical"] >= 0.85, metrics
    assert metrics["image_auroc_logical_global"] >= 0.85, metrics
    assert metrics["image_auroc_logical"] >= metrics["image_auroc_logical_local"] + 0.25, metrics


# ---------------------------------------------------------------- Packd: few-shot, k = 4 supports of an unseen category
#: (image AUROC floor, pixel AUROC floor) of Packd on the unseen generated category ``dd`` (trained on ``aa``-``cc``;
#: FewShotDataModule leaves the target out; k = 4 supports of ``dd``). Measured with the default score (image score
#: from the support memory, map = memory + distillation; ``benchmarks/detection_floors.py --models packd --seeds 0,1,2
#: --untrained --threads 1``, raw ``docs/benchmarks/detection/packd_floors_memory.jsonl``): trained 1.0 image /
#: 0.962-0.996 pixel AUROC; untrained 1.0 / 0.585-0.937. The image score needs no training by design (the frozen
#: teacher's nearest-support distance), so it detects untrained too; the floors fail a constant output (0.5) and an
#: inverted one (image 0.0, pixel at most 0.42 here). 0.8 image is 0.2 below every run. The pixel floor stays 0.78,
#: set under the fused score (``packd_floors.jsonl``: trained 0.888-0.995, the test's own run 0.840), below every
#: trained run of both designs.
PACKD_FLOORS = (0.8, 0.78)


@pytest.fixture(scope="module")
def packd_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from anomalib_dskd.benchmark.detection import score_predictions, train_and_predict

    root = tmp_path_factory.mktemp("packd")
    build_model, datamodule = packd_setup(root, str(WEIGHTS))
    torch.set_num_threads(2)
    model, engine, predictions = train_and_predict(build_model, datamodule, max_epochs=PACKD_EPOCHS, seed=0, root_dir=root)
    return model, engine, score_predictions(predictions), datamodule


def test_packd_detects_anomalies_of_an_unseen_category(packd_trained: tuple) -> None:
    _, _, metrics, _ = packd_trained
    image_floor, pixel_floor = PACKD_FLOORS
    assert metrics["image_auroc_all"] >= image_floor, metrics
    assert metrics["pixel_auroc"] >= pixel_floor, metrics
    assert metrics["image_auroc_all_inverted"] < image_floor
    assert metrics["pixel_auroc_inverted"] < pixel_floor


def test_packd_checkpoint_round_trip_keeps_its_supports(packd_trained: tuple) -> None:
    """The reloaded model scores with the cached prototypes of its k supports: same maps and scores, no support given."""
    from anomalib_dskd.models.packd import Packd

    model, engine, _, datamodule = packd_trained
    path = engine.trainer.checkpoint_callback.best_model_path
    assert path, "the Engine wrote no checkpoint"
    loaded = Packd.load_from_checkpoint(path, map_location="cpu").eval()
    assert loaded.model.has_support and loaded.k_shot == model.k_shot
    model.eval()
    images = model.pre_processor.transform(next(iter(datamodule.test_dataloader())).image)
    with torch.no_grad():
        ours, theirs = loaded.model(images), model.model(images)
    torch.testing.assert_close(ours.anomaly_map, theirs.anomaly_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.pred_score, theirs.pred_score, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Glance: generated MVTec AD category, 256 px
#: (image AUROC floor, pixel AUROC floor). Measured with ``benchmarks/glance_detection_floor.py SEED 1`` in two
#: environments (unpinned dependencies; the same code gives different figures):
#: * ``docs/benchmarks/detection/glance_floors.jsonl`` (the first): 0.927-0.947 image / 0.724-0.736 pixel, seeds 0, 1;
#: * ``docs/benchmarks/detection/glance_floors_env2.jsonl`` (torch 2.14.1, lightning 2.6.6, timm 1.0.31):
#:   0.853-0.987 image / 0.626-0.784 pixel, seeds 0, 1, 2, 42. Seed 0, the test's, is the worst in both.
#: Inverted at most 0.147 / 0.374; a constant map scores 0.5. The floors were 0.8 / 0.65 from the first environment
#: alone, and seed 0 fell to 0.626 pixel AUROC in the second one. They are now set below every measured run by
#: about the shift seen between the two environments (0.10 on seed 0): image 0.75 (0.10 below the worst run), pixel
#: 0.55 (0.076 below the worst run, 0.05 above a constant map). Both still fail a model that scores at chance and an
#: inverted map (0.147 / 0.374).
GLANCE_FLOORS = (0.75, 0.55)


def test_glance_detects_anomalies(tmp_path_factory: pytest.TempPathFactory) -> None:
    from anomalib.data import MVTecAD

    from anomalib_dskd.benchmark.detection import score_predictions, train_and_predict
    from anomalib_dskd.data import generate_mvtec_ad_category

    root = tmp_path_factory.mktemp("glance")
    generate_mvtec_ad_category(root, "parts", seed=0, **GLANCE_CATEGORY_ARGS)
    datamodule = MVTecAD(root=root, category="parts", train_batch_size=32, eval_batch_size=8, num_workers=0, seed=0)
    torch.set_num_threads(2)
    model, _, predictions = train_and_predict(
        lambda: build_glance(str(WEIGHTS)), datamodule, max_epochs=-1, max_steps=GLANCE_STEPS, seed=0, root_dir=root
    )
    metrics = score_predictions(predictions)
    image_floor, pixel_floor = GLANCE_FLOORS
    assert metrics["image_auroc_all"] >= image_floor, metrics
    assert metrics["pixel_auroc"] >= pixel_floor, metrics
    assert metrics["image_auroc_all_inverted"] < image_floor
    assert metrics["pixel_auroc_inverted"] < pixel_floor
    assert model.local_distillation_fraction < 0.8  # stage 1 distilled (0.52-0.53 measured; 1.0 = zero predictor)
