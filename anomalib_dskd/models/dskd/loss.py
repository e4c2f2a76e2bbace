"""Losses of DSKD: per-pixel cosine loss (Eq. 1-2) and contextual affinity loss (Eq. 3-7).

Each student is trained with one of them (:class:`DskdLoss`); the paper's best pair (Table 5) is
per-pixel for the local student and contextual affinity for the global student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_dskd.components.rd import CosineDistillationLoss

from .anomaly_map import AFFINITY, FLATTEN, LOSS_KINDS, PIXEL, affinity_kl


class PerPixelCosineLoss(CosineDistillationLoss):
    """Eq. 1-2: ``sum_l mean_i (1 - cos(f_T,i^l, f_S,i^l))``, averaged over the batch too."""

    def __init__(self) -> None:
        super().__init__(mode="pixel")


class ContextualAffinityLoss(nn.Module):
    """Eq. 3-7: ``sum_l mean_i T^2 KL(P_T,i^l || P_S,i^l)``, averaged over the batch too.

    ``P_T,i`` is the softmax over all positions ``j`` of ``cos(f_T,i, f_T,j) / T``; ``P_S,i`` the
    softmax of ``cos(f_S,i, f_T,j) / T`` - the student's row against the *teacher's* map (Eq. 5).
    Zero exactly when every student vector points the same way as the teacher's (then the rows
    coincide), positive otherwise.

    Args:
        temperature: ``T``. Defaults to ``1`` (paper).
        chunk_size: query positions per chunk (memory ``O(B * chunk * N)`` instead of
            ``O(B * N^2)``); ``None`` = direct form. Same value and gradient either way.
    """

    def __init__(self, temperature: float = 1.0, chunk_size: int | None = 512) -> None:
        super().__init__()
        if temperature <= 0:
            msg = f"temperature must be positive, got {temperature}."
            raise ValueError(msg)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size

    def forward(self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return the scalar loss."""
        loss = teacher_features[0].new_zeros(())
        for teacher, student in zip(teacher_features, student_features, strict=True):
            loss = loss + affinity_kl(teacher, student, self.temperature, self.chunk_size).mean()
        return loss


def build_student_loss(kind: str, temperature: float = 1.0, chunk_size: int | None = 512) -> nn.Module:
    """``"pixel"`` -> :class:`PerPixelCosineLoss`, ``"affinity"`` -> :class:`ContextualAffinityLoss`,
    ``"flatten"`` -> RD's :class:`~anomalib_dskd.components.rd.CosineDistillationLoss` (``mode="flatten"``)."""
    if kind == PIXEL:
        return PerPixelCosineLoss()
    if kind == AFFINITY:
        return ContextualAffinityLoss(temperature, chunk_size)
    if kind == FLATTEN:
        return CosineDistillationLoss(mode="flatten")
    msg = f"loss must be one of {LOSS_KINDS}, got {kind!r}."
    raise ValueError(msg)


class DskdLoss(nn.Module):
    """Sum of the local and the global student's losses (students trained together).

    Args:
        local_loss / global_loss: ``"pixel"`` or ``"affinity"`` per student (Tables 4-5), ``"flatten"``
            (RD's whole-map cosine), or ``None`` for a student that is not trained.
        temperature / chunk_size: of the affinity loss.

    ``forward(teacher, local, global)`` returns ``(total, {"local": ..., "global": ...})``.
    """

    def __init__(
        self,
        local_loss: str | None = PIXEL,
        global_loss: str | None = AFFINITY,
        temperature: float = 1.0,
        chunk_size: int | None = 512,
    ) -> None:
        super().__init__()
        self.local_loss = build_student_loss(local_loss, temperature, chunk_size) if local_loss else None
        self.global_loss = build_student_loss(global_loss, temperature, chunk_size) if global_loss else None

    def forward(
        self,
        teacher_features: Sequence[torch.Tensor],
        local_features: Sequence[torch.Tensor] | None,
        global_features: Sequence[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        if self.local_loss is not None and local_features is not None:
            parts["local"] = self.local_loss(teacher_features, local_features)
        if self.global_loss is not None and global_features is not None:
            parts["global"] = self.global_loss(teacher_features, global_features)
        if not parts:
            msg = "DskdLoss got no student features to train."
            raise ValueError(msg)
        return sum(parts.values()), parts
