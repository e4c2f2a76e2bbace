"""Support memory of Packd: a nearest-support distance map fused with the distillation map.

"Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang, Ma;
BMVC 2023) conditions the student on prototypes of the ``k`` support images. Trained across
categories, that student stays a category-agnostic reconstructor: it reconstructs the anomalies of an
unseen category too, and its answer barely depends on the supports (issue #14). This module makes the
score depend on them directly: the supports' teacher features of the chosen levels are kept as a
memory (every position of every support image), and every query position gets

``d(p) = 1 - max_m cos(f_q(p), f_m)``

the cosine distance of the query's teacher feature to its nearest support feature, in the same
``1 - cos`` units as RD's distillation map (Deng & Li, CVPR 2022, Eq. 1), so the two maps add without a
learned scale. Features are averaged over a ``3 x 3`` neighbourhood first, as PatchCore does
(Roth et al., CVPR 2022, "locally aware patch features"); the nearest neighbour runs over all
positions of all supports (position-free, as PatchCore's memory bank), so unaligned categories work.

The memory is a set of buffers whose size follows ``k``: checkpoints keep it, ONNX / OpenVINO exports
embed it as constants, and a checkpoint of another ``k`` loads (the buffers are resized on load).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def check_support_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Validate support-memory levels (distinct values among 1-4, 4 = the teacher's next stage; may be empty)."""
    values = tuple(sorted({int(level) for level in levels}))
    if any(level not in {1, 2, 3, 4} for level in values) or len(values) != len(levels):
        msg = (
            f"support_score_levels must be distinct teacher levels among 1, 2, 3, 4 (4 = the stage after the "
            f"distilled ones), got {list(levels)}: use for instance [2, 3] (PatchCore's layers) or [] to score "
            "with the distillation map only."
        )
        raise ValueError(msg)
    return values


class SupportMemory(nn.Module):
    """Nearest-support cosine distance maps of the query's teacher features.

    Args:
        channels: teacher channels of each memory level (in the order of ``levels``).
        levels: teacher levels (1-3 the distilled stages, 4 the next one) the memory keeps. Only used for names.
        neighbourhood: side of the average-pooling window applied to query and support features
            (``1`` disables it). Defaults to ``3`` (PatchCore).

    :meth:`set` stores ``(k, C, h, w)`` support features; :meth:`forward` maps ``(B, C, h, w)`` query
    features of the same levels to ``(B, 1, h, w)`` distances in ``[0, 2]``.
    """

    def __init__(self, channels: Sequence[int], levels: Sequence[int], neighbourhood: int = 3) -> None:
        super().__init__()
        if int(neighbourhood) < 1 or int(neighbourhood) % 2 == 0:
            msg = f"the support memory's neighbourhood must be a positive odd window side, got {neighbourhood}."
            raise ValueError(msg)
        self.levels = tuple(int(level) for level in levels)
        self.neighbourhood = int(neighbourhood)
        for index, channel in enumerate(channels):
            self.register_buffer(f"memory_{index}", torch.zeros(0, int(channel)))

    @property
    def banks(self) -> list[torch.Tensor]:
        """The ``(N, C)`` L2-normalised support features per level (``N = k * h * w``)."""
        return [getattr(self, f"memory_{index}") for index in range(len(self.levels))]

    @property
    def ready(self) -> bool:
        """Whether every level holds support features."""
        return all(bank.shape[0] > 0 for bank in self.banks)

    def _aggregate(self, features: torch.Tensor) -> torch.Tensor:
        if self.neighbourhood > 1:
            features = F.avg_pool2d(
                features, self.neighbourhood, stride=1, padding=self.neighbourhood // 2, count_include_pad=False
            )
        return F.normalize(features, dim=1)

    def build(self, support_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(k * h * w, C)`` memory banks of ``(k, C, h, w)`` support teacher features, per level."""
        return [
            self._aggregate(features).permute(0, 2, 3, 1).reshape(-1, features.shape[1]).contiguous()
            for features in support_features
        ]

    @torch.no_grad()
    def set(self, support_features: Sequence[torch.Tensor]) -> None:
        """Keep ``(k, C, h, w)`` support teacher features of every level (replaces the memory)."""
        for index, bank in enumerate(self.build(support_features)):
            setattr(self, f"memory_{index}", bank)

    def forward(
        self, query_features: Sequence[torch.Tensor], banks: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``(B, 1, h, w)`` nearest-support cosine distance of each query position, per level.

        ``banks``: memory banks to use instead of the stored ones (:meth:`build`).
        """
        maps = []
        for features, bank in zip(query_features, self.banks if banks is None else banks, strict=True):
            queries = self._aggregate(features)
            batch, channels, height, width = queries.shape
            tokens = queries.flatten(2).transpose(1, 2)  # (B, hw, C)
            # (B, hw, N) similarities: 4 * B * hw * N bytes (0.5 GB for 16 images of 256 px, k = 8, level 2).
            nearest = torch.matmul(tokens, bank.T).amax(dim=-1)
            maps.append((1 - nearest).reshape(batch, 1, height, width))
        return maps

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # The memory's size follows k: take the checkpoint's shape instead of refusing it.
        for index in range(len(self.levels)):
            key = f"{prefix}memory_{index}"
            if key in state_dict:
                current = getattr(self, f"memory_{index}")
                setattr(self, f"memory_{index}", torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["SupportMemory", "check_support_levels"]
