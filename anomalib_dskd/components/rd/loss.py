"""Cosine distillation losses of reverse distillation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class CosineDistillationLoss(nn.Module):
    """Sum over scales of the mean cosine distance between teacher and student features.

    Args:
        mode: ``"pixel"`` averages ``1 - cos`` over positions, computed per position along the
            channel axis (RD paper Eq. 2; DSKD Eq. 1-2). ``"flatten"`` takes the cosine between
            each sample's whole flattened feature maps, as the official RD code and anomalib's
            ``ReverseDistillationLoss`` do.

    Zero when the student reproduces the teacher exactly.
    """

    def __init__(self, mode: str = "pixel") -> None:
        super().__init__()
        if mode not in {"pixel", "flatten"}:
            msg = f"mode must be 'pixel' or 'flatten', got {mode!r}."
            raise ValueError(msg)
        self.mode = mode

    def forward(self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the scalar loss."""
        loss = teacher_features[0].new_zeros(())
        for teacher, student in zip(teacher_features, student_features, strict=True):
            if self.mode == "flatten":
                similarity = F.cosine_similarity(teacher.flatten(1), student.flatten(1), dim=1)
            else:
                similarity = F.cosine_similarity(teacher, student, dim=1)
            loss = loss + (1 - similarity).mean()
        return loss
