"""raw_auroc: anomalib's AUROC on raw scores must rank them as given (no sigmoid saturation)."""

from __future__ import annotations

import torch
from anomalib.data import ImageBatch
from anomalib.metrics import AUROC

from anomalib_dskd.metrics import raw_auroc


def _batch(scores: list[float], labels: list[int]) -> ImageBatch:
    return ImageBatch(
        image=torch.zeros(len(scores), 3, 8, 8),
        pred_score=torch.tensor(scores),
        gt_label=torch.tensor(labels),
    )


def test_raw_auroc_ranks_large_scores_that_the_default_saturates() -> None:
    batch = _batch([20.0, 30.0, 40.0, 50.0], [0, 0, 1, 1])
    default = AUROC(fields=["pred_score", "gt_label"])
    default.update(batch)
    assert float(default.compute()) == 0.5  # the sigmoid makes every score 1.0: all ties
    raw = raw_auroc(["pred_score", "gt_label"])
    raw.update(batch)
    assert float(raw.compute()) == 1.0


def test_raw_auroc_equals_default_inside_unit_interval_and_handles_negative_scores() -> None:
    scores, labels = [0.1, 0.7, 0.4, 0.9, 0.2], [0, 1, 0, 1, 1]
    default, raw = AUROC(fields=["pred_score", "gt_label"]), raw_auroc(["pred_score", "gt_label"])
    default.update(_batch(scores, labels))
    raw.update(_batch(scores, labels))
    assert torch.isclose(default.compute(), raw.compute())
    shifted = raw_auroc(["pred_score", "gt_label"])
    shifted.update(_batch([s * 100 - 50 for s in scores], labels))  # monotonic: same ranking, same AUROC
    assert torch.isclose(shifted.compute(), raw.compute())
