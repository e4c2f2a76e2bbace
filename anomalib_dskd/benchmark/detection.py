"""Does a model *detect*? A short training on generated data, scored on raw outputs, with controls.

Used by the test suite (``tests/test_detection.py``: floors that a model which detects nothing cannot
reach) and by ``benchmarks/detection_floors.py`` (the seeds and controls the floors were chosen from).

:func:`detection_run` trains a model with anomalib's ``Engine`` on a category written by
:func:`~anomalib_dskd.data.generate_loco_category`, predicts the test set with the post-processor's
normalisation off (raw scores and maps: min-max normalisation clamps scores and creates ties), and
returns image AUROC per test subset (all / logical / structural) and pixel AUROC, each also for the
inverted score (``-score``), so a test can show that an inverted model fails the same floor.
For Dskd it also scores each student alone (``image_auroc_<subset>_<student>``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: test subsets of a LOCO category
SUBSETS = ("all", "logical", "structural")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUROC of raw scores (ties count one half); ``nan`` when a class is missing."""
    from anomalib_dskd.metrics.spro_core import image_auroc

    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(image_auroc(scores[labels], scores[~labels]))


def score_predictions(predictions: list[Any], extra_maps: tuple[str, ...] = ()) -> dict[str, float]:
    """Image AUROC per subset and pixel AUROC of predicted batches (plus the inverted-score controls).

    Args:
        predictions: batches returned by ``Engine.predict`` (``pred_score``, ``anomaly_map``,
            ``gt_label``, ``gt_mask``, ``image_path``).
        extra_maps: names of further per-image maps on the batches (e.g. ``"anomaly_map_local"``) whose
            maximum is scored as an image score too (``image_auroc_<subset>_<suffix>``).
    """
    scores = torch.cat([b.pred_score.reshape(-1) for b in predictions]).double().numpy()
    labels = torch.cat([b.gt_label.reshape(-1) for b in predictions]).numpy().astype(bool)
    paths = [str(p) for b in predictions for p in b.image_path]
    family = np.array(["logical" if "logical" in p else "structural" if "structural" in p else "good" for p in paths])
    maps = torch.cat([b.anomaly_map.reshape(len(b.anomaly_map), -1) for b in predictions]).double().numpy()
    masks = torch.cat([b.gt_mask.reshape(len(b.gt_mask), -1) for b in predictions]).numpy() > 0
    extra = {
        name.removeprefix("anomaly_map_"): torch.cat(
            [getattr(b, name).reshape(len(b.pred_score), -1).amax(dim=1) for b in predictions]
        ).double().numpy()
        for name in extra_maps
    }
    results: dict[str, float] = {}
    for subset in SUBSETS:
        keep = np.ones_like(labels) if subset == "all" else (family == "good") | (family == subset)
        if subset != "all" and not (family[keep] != "good").any():  # not a LOCO layout, or no such anomaly
            continue
        results[f"image_auroc_{subset}"] = auroc(scores[keep], labels[keep])
        results[f"image_auroc_{subset}_inverted"] = auroc(-scores[keep], labels[keep])
        for suffix, values in extra.items():
            results[f"image_auroc_{subset}_{suffix}"] = auroc(values[keep], labels[keep])
    anomalous = labels
    pixels, truth = maps[anomalous].reshape(-1), masks[anomalous].reshape(-1)
    good_pixels = maps[~anomalous].reshape(-1)  # normal images' pixels are negatives too
    pixels, truth = np.concatenate([pixels, good_pixels]), np.concatenate([truth, np.zeros_like(good_pixels, bool)])
    results["pixel_auroc"] = auroc(pixels, truth)
    results["pixel_auroc_inverted"] = auroc(-pixels, truth)
    return results


def train_and_predict(
    build_model: Callable[[], Any],
    datamodule: Any,  # noqa: ANN401
    *,
    max_epochs: int,
    seed: int = 0,
    train: bool = True,
    root_dir: str | Path | None = None,
    max_steps: int = -1,
) -> tuple[Any, Any, list[Any]]:
    """Train ``build_model()`` with anomalib's ``Engine`` on ``datamodule`` and predict its test set.

    Returns ``(model, engine, predictions)``; the engine's checkpoint callback holds the last
    checkpoint (``engine.trainer.checkpoint_callback.best_model_path``) when ``train`` is true.
    """
    os.environ.setdefault("CI", "true")
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True, verbose=False)
    model = build_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine(
            max_epochs=max_epochs if train else 0,
            max_steps=max_steps if train else -1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root_dir,
        )
        if train:
            engine.fit(model, datamodule=datamodule)
        else:
            datamodule.setup()
            if hasattr(model, "compute_statistics"):  # Dskd: Eq. 8 statistics of the untrained students
                model.compute_statistics(datamodule.train_dataloader())
            if hasattr(model, "set_support") and hasattr(datamodule, "support_images"):  # Packd: the k supports
                model.set_support(datamodule.support_images())
        predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
    return model, engine, predictions


def loco_datamodule(root: str | Path, category: str, seed: int = 0, batch_size: int = 8) -> Any:  # noqa: ANN401
    """anomalib's ``MVTecLOCO`` datamodule on ``root/category``, single process (no workers)."""
    from anomalib.data import MVTecLOCO

    return MVTecLOCO(
        root=root, category=category, train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0, seed=seed
    )


def detection_run(
    build_model: Callable[[], Any],
    root: str | Path,
    category: str,
    *,
    max_epochs: int,
    seed: int = 0,
    batch_size: int = 8,
    train: bool = True,
    extra_maps: tuple[str, ...] = (),
) -> dict[str, float]:
    """Train ``build_model()`` on ``root/category`` (MVTec LOCO layout) and score its raw test predictions.

    Args:
        build_model: returns a fresh Lightning model (give it ``PostProcessor(enable_normalization=False)``
            for raw scores, ``evaluator=False`` and ``visualizer=False`` for speed).
        root / category: a category written by :func:`~anomalib_dskd.data.generate_loco_category`.
        max_epochs: training epochs (``Engine(max_epochs=...)``).
        seed: seeds Lightning (weights, shuffling) and the datamodule's split.
        batch_size: train and eval batch size.
        train: ``False`` scores the untrained model (a control; calibration still runs for Dskd).
        extra_maps: per-image maps to score as well (see :func:`score_predictions`).

    Returns:
        Metrics from :func:`score_predictions`, plus ``train_loss`` (last epoch, when logged).
    """
    datamodule = loco_datamodule(root, category, seed, batch_size)
    _, engine, predictions = train_and_predict(
        build_model, datamodule, max_epochs=max_epochs, seed=seed, train=train,
        root_dir=Path(root) / f".engine_{category}_{seed}",
    )
    results = score_predictions(predictions, extra_maps)
    loss = engine.trainer.callback_metrics.get("train_loss_epoch", engine.trainer.callback_metrics.get("train_loss"))
    if loss is not None:
        results["train_loss"] = float(loss)
    return results
