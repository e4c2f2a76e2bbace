"""A ready MVTec LOCO :class:`~anomalib.metrics.Evaluator`.

Python::

    from anomalib.engine import Engine
    from anomalib.models import Padim
    from anomalib_dskd.metrics import LocoEvaluator

    model = Padim(evaluator=LocoEvaluator())
    Engine().test(model, datamodule=MVTecLOCO(root=..., category="pushpins"), ckpt_path=...)

CLI (``configs/evaluator/loco.yaml``)::

    anomalib test --model Padim --data MVTecLOCO --data.category pushpins \\
        --model.evaluator configs/evaluator/loco.yaml --ckpt_path model.ckpt

Logged test metrics (names): ``image_AUROC_{logical,structural,mean}``,
``AUSPRO_{logical,structural,mean}_{0.01,0.05,0.1,0.3,1.0}`` and anomalib's ``pixel_AUROC``
(model resolution, merged masks). All LOCO numbers come from one shared state: the maps are
stored once and the curves computed once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib.metrics import AUROC, AnomalibMetric, Evaluator
from anomalib_dskd.metrics.raw import raw_auroc
from anomalib_dskd.metrics.spro import AUSPRO, LocoImageAUROC, _LocoState
from anomalib_dskd.metrics.spro_core import DEFAULT_INTEGRATION_LIMITS

logger = logging.getLogger(__name__)

SUBSETS = ("logical", "structural")


class LocoEvaluator(Evaluator):
    """Evaluator logging MVTec LOCO image AUROC and AU-sPRO (logical, structural, mean) and pixel AUROC.

    Args:
        dataset_root: root of the LOCO dataset (categories inside, or a category directory);
            default: derived from each test image path.
        integration_limits: FPR limits of AU-sPRO (default: the official 0.01, 0.05, 0.1, 0.3, 1.0).
        image_score: ``"pred_score"`` (the model's image score) or ``"max"`` (max of the map at
            ground-truth resolution, as MVTec's script).
        pixel_auroc: also log anomalib's ``pixel_AUROC`` (model resolution, merged masks).
        raw_predictions: evaluate the maps and scores as the model produced them, before anomalib's
            ``PostProcessor`` normalises them (its clamping to [0, 1] merges the highest scores into
            ties, which flattens the low-FPR end of the sPRO curve). The evaluator then runs its
            batch hook before the post-processor's. ``False``: evaluate normalised outputs like the
            stock evaluator.
        mode: ``"auto"``, ``"exact"`` or ``"binned"`` (see :mod:`anomalib_dskd.metrics.spro_core`).
        aspect_tolerance: ``None`` stretches maps onto the ground truth (anomalib's square
            ``Resize``); a number rejects maps whose aspect ratio differs more (log ratio).
        save_dir: where ``metrics.json`` (official schema) and the sPRO-curve PNGs are written after
            testing; default ``<trainer.default_root_dir>/loco_evaluation``.
        save_results: write them at all.
        val_metrics: validation metrics (LOCO metrics are test-only).
        compute_on_cpu: see :class:`anomalib.metrics.Evaluator`.
    """

    def __init__(
        self,
        dataset_root: str | Path | None = None,
        integration_limits: Sequence[float] = DEFAULT_INTEGRATION_LIMITS,
        image_score: str = "pred_score",
        pixel_auroc: bool = True,
        raw_predictions: bool = True,
        mode: str = "auto",
        aspect_tolerance: float | None = None,
        save_dir: str | Path | None = None,
        save_results: bool = True,
        val_metrics: AnomalibMetric | Sequence[AnomalibMetric] | None = None,
        compute_on_cpu: bool = True,
    ) -> None:
        limits = tuple(float(v) for v in integration_limits)
        headline = 0.05 if 0.05 in limits else limits[0]
        fields = ["anomaly_map", "image_path"] + (["pred_score"] if image_score == "pred_score" else [])
        options: dict[str, Any] = {
            "dataset_root": dataset_root,
            "integration_limits": limits,
            "image_score": image_score,
            "mode": mode,
            "aspect_tolerance": aspect_tolerance,
        }
        source = AUSPRO(integration_limit=headline, subset="mean", fields=fields, **options)
        metrics: list[AnomalibMetric] = [LocoImageAUROC(subset=s, source=source, **options) for s in SUBSETS]
        metrics.append(LocoImageAUROC(subset="mean", source=source, **options))
        for limit in (headline, *(v for v in limits if v != headline)):
            for subset in SUBSETS:
                metrics.append(AUSPRO(integration_limit=limit, subset=subset, source=source, **options))
            metrics.append(source if limit == headline else AUSPRO(integration_limit=limit, source=source, **options))
        if pixel_auroc:
            # raw maps are not in [0, 1]: no sigmoid (see anomalib_dskd.metrics.raw)
            auroc = raw_auroc if raw_predictions else AUROC
            metrics.append(auroc(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False))
        super().__init__(val_metrics=val_metrics, test_metrics=metrics, compute_on_cpu=compute_on_cpu)
        # identity, not ==: torchmetrics overloads == to build compositional metrics
        self._source_index = next(i for i, m in enumerate(metrics) if m is source)
        self.raw_predictions = raw_predictions
        self.save_dir = None if save_dir is None else str(save_dir)
        self.save_results = save_results

    @property
    def loco_state(self) -> _LocoState:
        """The metric holding the shared state (its ``compute_result()`` returns every number)."""
        return self.test_metrics[self._source_index]

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        """With ``raw_predictions``, run this evaluator's batch hook before anomalib's post-processor."""
        del pl_module
        if not self.raw_predictions or trainer is None:
            return
        from anomalib.post_processing import PostProcessor

        callbacks = trainer.callbacks
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), None)
        if mine is None:
            return
        post = next((i for i, cb in enumerate(callbacks) if isinstance(cb, PostProcessor)), None)
        if post is not None and post < mine:
            # moving an element to an earlier position is safe while Lightning iterates the list
            callbacks.insert(post, callbacks.pop(mine))

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
        """Log the metrics; write ``metrics.json`` and sPRO-curve plots."""
        super().on_test_epoch_end(trainer, pl_module)
        if not self.save_results or trainer is None:
            return
        result = self.loco_state.compute_result()  # every process takes part in the gather
        if not getattr(trainer, "is_global_zero", True):
            return
        save_dir = Path(self.save_dir) if self.save_dir else Path(trainer.default_root_dir) / "loco_evaluation"
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "metrics.json").write_text(json.dumps(result.to_official_json(), indent=4, sort_keys=True) + "\n")
        from anomalib_dskd.metrics.plotting import save_spro_curves

        save_spro_curves(result, save_dir)
        logger.info("MVTec LOCO evaluation written to %s\n%s", save_dir, result.summary())


def loco_evaluator(**kwargs: Any) -> LocoEvaluator:  # noqa: ANN401
    """Factory: ``LocoEvaluator(**kwargs)`` (an :class:`anomalib.metrics.Evaluator`)."""
    return LocoEvaluator(**kwargs)
