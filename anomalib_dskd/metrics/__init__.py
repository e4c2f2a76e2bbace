"""MVTec LOCO evaluation for anomalib: saturated per-region overlap (sPRO) and friends.

anomalib metrics (usable in :class:`anomalib.metrics.Evaluator`):

* :class:`SPRO` - mean saturated per-region overlap at a fixed threshold;
* :class:`AUSPRO` - area under the sPRO curve up to an FPR integration limit (MVTec's AU-sPRO);
* :class:`LocoImageAUROC` - image AUROC of logical or structural anomalies against good images;
* :class:`LocoEvaluator` / :func:`loco_evaluator` - a ready :class:`~anomalib.metrics.Evaluator`
  logging all LOCO numbers (and anomalib's pixel AUROC) from one shared state;
* :func:`raw_auroc` - anomalib's AUROC without torchmetrics' sigmoid, for raw (un-normalised) scores.

numpy only (no torch): :func:`compute_loco_metrics` in :mod:`anomalib_dskd.metrics.spro_core`, the
ground-truth readers in :mod:`anomalib_dskd.metrics.loco_data`. See ``docs/evaluation.md``.

Attributes are imported on first access, so ``import anomalib_dskd.metrics.spro_core`` does not
import torch or anomalib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_dskd._lazy import lazy_exports

if TYPE_CHECKING:  # pragma: no cover
    from anomalib_dskd.metrics.evaluator import LocoEvaluator, loco_evaluator
    from anomalib_dskd.metrics.loco_data import LocoDataError
    from anomalib_dskd.metrics.raw import raw_auroc
    from anomalib_dskd.metrics.spro import AUSPRO, SPRO, LocoImageAUROC
    from anomalib_dskd.metrics.spro_core import LocoResult, compute_loco_metrics

_EXPORTS = {
    "SPRO": "anomalib_dskd.metrics.spro",
    "AUSPRO": "anomalib_dskd.metrics.spro",
    "LocoImageAUROC": "anomalib_dskd.metrics.spro",
    "LocoEvaluator": "anomalib_dskd.metrics.evaluator",
    "loco_evaluator": "anomalib_dskd.metrics.evaluator",
    "LocoDataError": "anomalib_dskd.metrics.loco_data",
    "LocoResult": "anomalib_dskd.metrics.spro_core",
    "compute_loco_metrics": "anomalib_dskd.metrics.spro_core",
    "save_spro_curves": "anomalib_dskd.metrics.plotting",
    "raw_auroc": "anomalib_dskd.metrics.raw",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
