"""PyTorch model of plain reverse distillation over any timm CNN teacher.

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_dskd.components.rd import ReverseDistillationCore

from .anomaly_map import AnomalyMapGenerator


class RdModel(nn.Module):
    """Reverse distillation: frozen teacher, one-class embedding, student decoder.

    Args:
        backbone: timm CNN teacher.
        layers: teacher stage indices.
        pre_trained: ``True`` (timm hub), ``False`` or a local checkpoint path.
        input_size: ``(H, W)``; multiples of twice the deepest stride (32 for the defaults).
        sigma: Gaussian smoothing of the anomaly map.

    In train mode ``forward`` returns ``(teacher_features, student_features)``; in eval mode an
    :class:`~anomalib.data.InferenceBatch` with ``anomaly_map`` ``(B, 1, H, W)`` and
    ``pred_score`` ``(B,)`` = the map's maximum.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str | Path = True,
        input_size: Sequence[int] = (256, 256),
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.core = ReverseDistillationCore(backbone, layers, pre_trained, input_size)
        self.anomaly_map_generator = AnomalyMapGenerator(self.core.input_size, sigma)

    def set_input_size(self, input_size: Sequence[int]) -> None:
        """Adapt to a new input size (a checkpoint's pre-processor): the anomaly map follows it."""
        self.anomaly_map_generator.image_size = self.core.set_input_size(input_size, "Rd")

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Features for the loss in train mode, anomaly map and score in eval mode."""
        teacher_features, student_features = self.core(images)
        if self.training:
            return teacher_features, student_features
        anomaly_map = self.anomaly_map_generator(teacher_features, student_features)
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
