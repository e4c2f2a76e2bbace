"""anomalib's AUROC for raw (un-normalised) scores and maps.

torchmetrics' binary ROC, under anomalib's :class:`~anomalib.metrics.AUROC`, treats predictions
outside ``[0, 1]`` as logits and applies a sigmoid in ``update``. For raw anomaly scores that is
wrong: every score above ~17 becomes exactly ``1.0`` in float32, the top of the ranking turns into
ties, and the AUROC collapses towards 0.5 (measured: Glance's squared distances gave exactly 0.5;
Dskd's standardised maps lose their best-separated images). anomalib's own pipeline never sees
this because its post-processor normalises scores into ``[0, 1]`` first; every evaluation here that
scores *raw* predictions (the benchmark's ``raw_predictions``, :class:`LocoEvaluator`) must use
:func:`raw_auroc` instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any


def raw_auroc(fields: Sequence[str], **kwargs: Any) -> Any:  # noqa: ANN401
    """anomalib ``AUROC`` that ranks the values as given (no sigmoid for values outside ``[0, 1]``).

    Args:
        fields: batch fields, e.g. ``["pred_score", "gt_label"]`` or ``["anomaly_map", "gt_mask"]``.
        **kwargs: passed to :class:`anomalib.metrics.AUROC` (``prefix``, ``strict``, ...).

    Raises:
        RuntimeError: the installed torchmetrics cannot switch the sigmoid off (older than 1.8).
    """
    from anomalib.metrics import AUROC
    from torchmetrics.classification import BinaryROC

    if "normalization" not in inspect.signature(BinaryROC.__init__).parameters:
        import torchmetrics

        msg = (
            f"torchmetrics {torchmetrics.__version__} always applies a sigmoid to scores outside [0, 1], which "
            "turns raw anomaly scores into ties; install torchmetrics>=1.8 (pip install -U torchmetrics)."
        )
        raise RuntimeError(msg)
    return AUROC(fields=list(fields), normalization=None, **kwargs)
