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

Two options change how the distance is measured (``docs/models/packd.md``, "Support memory design"):
``metric="euclidean"`` uses the Euclidean distance of the (averaged, not normalised) features, as PatchCore
does; ``combine="concat"`` resizes the levels' features to the finest level's grid and concatenates them
into one memory, so one nearest neighbour must match every level at once (PatchCore's), instead of one
distance map per level that are summed. With ``"cosine"`` each level is L2-normalised before the
concatenation and the whole scaled by ``1 / sqrt(levels)``: the distance is the mean of the levels'
``1 - cos`` at the jointly nearest position.

The memory is a set of buffers whose size follows ``k``: checkpoints keep it, ONNX / OpenVINO exports
embed it as constants, and a checkpoint of another ``k`` loads (the buffers are resized on load).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


#: ``SupportMemory`` distance metrics and level combinations.
SUPPORT_METRICS = ("cosine", "euclidean")
SUPPORT_COMBINES = ("sum", "concat")


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
    """Nearest-support distance maps of the query's teacher features.

    Args:
        channels: teacher channels of each memory level (in the order of ``levels``).
        levels: teacher levels (1-3 the distilled stages, 4 the next one) the memory keeps. Only used for names.
        neighbourhood: side of the average-pooling window applied to query and support features
            (``1`` disables it). Defaults to ``3`` (PatchCore).
        metric: ``"cosine"`` (``1 - cos``, in ``[0, 2]``; default) or ``"euclidean"`` (PatchCore's).
        combine: ``"sum"`` (one memory and one distance map per level; default) or ``"concat"`` (one
            memory of the levels' features concatenated on the finest level's grid, one map).

    :meth:`set` stores ``(k, C, h, w)`` support features; :meth:`forward` maps ``(B, C, h, w)`` query
    features of the same levels to ``(B, 1, h, w)`` distances (one map per level, or one map).

    Raises:
        ValueError: an even or non-positive ``neighbourhood``, or an unknown ``metric`` / ``combine``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        levels: Sequence[int],
        neighbourhood: int = 3,
        metric: str = "cosine",
        combine: str = "sum",
    ) -> None:
        super().__init__()
        if int(neighbourhood) < 1 or int(neighbourhood) % 2 == 0:
            msg = f"the support memory's neighbourhood must be a positive odd window side, got {neighbourhood}."
            raise ValueError(msg)
        if metric not in SUPPORT_METRICS:
            msg = f"support_metric must be one of {list(SUPPORT_METRICS)}, got {metric!r}."
            raise ValueError(msg)
        if combine not in SUPPORT_COMBINES:
            msg = f"support_combine must be one of {list(SUPPORT_COMBINES)}, got {combine!r}."
            raise ValueError(msg)
        self.levels = tuple(int(level) for level in levels)
        self.neighbourhood = int(neighbourhood)
        self.metric = metric
        self.combine = combine
        bank_channels = [sum(int(channel) for channel in channels)] if combine == "concat" and channels else channels
        self.num_banks = len(bank_channels)
        for index, channel in enumerate(bank_channels):
            self.register_buffer(f"memory_{index}", torch.zeros(0, int(channel)))

    @property
    def banks(self) -> list[torch.Tensor]:
        """The ``(N, C)`` support features per memory (``N = k * h * w``; L2-normalised for ``"cosine"``)."""
        return [getattr(self, f"memory_{index}") for index in range(self.num_banks)]

    @property
    def ready(self) -> bool:
        """Whether every level holds support features."""
        return all(bank.shape[0] > 0 for bank in self.banks)

    def _aggregate(self, features: torch.Tensor) -> torch.Tensor:
        if self.neighbourhood > 1:
            features = F.avg_pool2d(
                features, self.neighbourhood, stride=1, padding=self.neighbourhood // 2, count_include_pad=False
            )
        return F.normalize(features, dim=1) if self.metric == "cosine" else features

    def _prepare(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Aggregated features per memory: per level, or (``"concat"``) one concatenation on the finest grid."""
        levels = [self._aggregate(level) for level in features]
        if self.combine != "concat" or not levels:
            return levels
        size = max((level.shape[-2:] for level in levels), key=lambda side: side[0] * side[1])
        levels = [
            level if level.shape[-2:] == size else F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            for level in levels
        ]
        if self.metric == "cosine":  # unit norm again after resizing; the concatenation too
            levels = [F.normalize(level, dim=1) / len(levels) ** 0.5 for level in levels]
        return [torch.cat(levels, dim=1)]

    def build(self, support_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(k * h * w, C)`` memory banks of ``(k, C, h, w)`` support teacher features, per memory."""
        return [
            features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).contiguous()
            for features in self._prepare(support_features)
        ]

    @torch.no_grad()
    def set(self, support_features: Sequence[torch.Tensor]) -> None:
        """Keep ``(k, C, h, w)`` support teacher features of every level (replaces the memory)."""
        for index, bank in enumerate(self.build(support_features)):
            setattr(self, f"memory_{index}", bank)

    def forward(
        self, query_features: Sequence[torch.Tensor], banks: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``(B, 1, h, w)`` nearest-support distance of each query position, per memory.

        ``banks``: memory banks to use instead of the stored ones (:meth:`build`).
        """
        maps = []
        for queries, bank in zip(self._prepare(query_features), self.banks if banks is None else banks, strict=True):
            batch, _, height, width = queries.shape
            tokens = queries.flatten(2).transpose(1, 2)  # (B, hw, C)
            # (B, hw, N) products: 4 * B * hw * N bytes (0.5 GB for 16 images of 256 px, k = 8, level 2).
            products = torch.matmul(tokens, bank.T)
            if self.metric == "cosine":
                distance = 1 - products.amax(dim=-1)
            else:  # ||q - m||^2 = ||q||^2 + ||m||^2 - 2 q.m, minimised before the square root
                squared = tokens.square().sum(-1, keepdim=True) + bank.square().sum(-1) - 2 * products
                distance = squared.amin(dim=-1).clamp_min(0).sqrt()
            maps.append(distance.reshape(batch, 1, height, width))
        return maps

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # The memory's size follows k: take the checkpoint's shape instead of refusing it.
        for index in range(self.num_banks):
            key = f"{prefix}memory_{index}"
            if key in state_dict:
                current = getattr(self, f"memory_{index}")
                setattr(self, f"memory_{index}", torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["SUPPORT_COMBINES", "SUPPORT_METRICS", "SupportMemory", "check_support_levels"]
