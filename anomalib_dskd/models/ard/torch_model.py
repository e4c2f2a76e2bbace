"""PyTorch model of ARD: reverse distillation with attention in the one-class embedding.

"Attention One-Class Embedding in Reverse Distillation for Anomaly Detection" (ARD; main paper
not public, see ``docs/models/ard.md``), building on Deng & Li, "Anomaly Detection via Reverse
Distillation from One-Class Embedding", CVPR 2022. The ARD supplementary compares SE (Hu et al.,
CVPR 2018), ECA (Wang et al., CVPR 2020) and CBAM (Woo et al., ECCV 2018) attention inside the
one-class bottleneck embedding (OCBE); teacher and student decoder are RD's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_dskd.components.rd import ReverseDistillationCore
from anomalib_dskd.components.rd.attention import attention_factory, check_attention_position, check_attention_type

from .anomaly_map import AnomalyMapGenerator

#: default attention type, chosen from ``benchmarks/bench_ard.py`` (see ``docs/models/ard.md``).
DEFAULT_ATTENTION_TYPE = "cbam"
#: default insertion point, chosen from ``benchmarks/bench_ard.py`` (see ``docs/models/ard.md``).
DEFAULT_ATTENTION_POSITION = "both"


class ArdModel(nn.Module):
    """Frozen teacher, one-class embedding with attention, student decoder.

    Args:
        backbone: timm CNN teacher.
        layers: teacher stage indices.
        pre_trained: ``True`` (timm hub), ``False`` or a local checkpoint path.
        input_size: ``(H, W)``; multiples of twice the deepest stride (32 for the defaults).
        sigma: Gaussian smoothing of the anomaly map.
        attention_type: ``"se"``, ``"eca"`` or ``"cbam"`` (timm's modules).
        attention_position: ``"fused"`` (on the concatenated multi-scale features before the
            embedding stage), ``"blocks"`` (inside each residual block of the embedding stage,
            on the residual branch before the addition) or ``"both"``.

    In train mode ``forward`` returns ``(teacher_features, student_features)``; in eval mode an
    :class:`~anomalib.data.InferenceBatch` with ``anomaly_map`` ``(B, 1, H, W)`` and
    ``pred_score`` ``(B,)`` = the map's maximum.

    Raises:
        AttentionConfigError: unknown attention type or insertion point (the message lists the
            valid ones).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str | Path = True,
        input_size: Sequence[int] = (256, 256),
        sigma: float = 4.0,
        attention_type: str = DEFAULT_ATTENTION_TYPE,
        attention_position: str = DEFAULT_ATTENTION_POSITION,
    ) -> None:
        super().__init__()
        self.attention_type = check_attention_type(attention_type)
        self.attention_position = check_attention_position(attention_position)
        factory = attention_factory(self.attention_type)
        self.core = ReverseDistillationCore(
            backbone,
            layers,
            pre_trained,
            input_size,
            fused_attention=factory if self.attention_position in {"fused", "both"} else None,
            block_attention=factory if self.attention_position in {"blocks", "both"} else None,
        )
        self.anomaly_map_generator = AnomalyMapGenerator(self.core.input_size, sigma)

    def attention_modules(self) -> list[nn.Module]:
        """The attention modules of the embedding, fused first, then one per block."""
        bottleneck = self.core.bottleneck
        modules = [] if isinstance(bottleneck.fused_attention, nn.Identity) else [bottleneck.fused_attention]
        modules += [block.attention for block in bottleneck.embed if hasattr(block, "attention")]
        return modules

    def set_input_size(self, input_size: Sequence[int]) -> None:
        """Adapt to a new input size (a checkpoint's pre-processor): the anomaly map follows it."""
        self.anomaly_map_generator.image_size = self.core.set_input_size(input_size, "Ard")

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Features for the loss in train mode, anomaly map and score in eval mode."""
        teacher_features, student_features = self.core(images)
        if self.training:
            return teacher_features, student_features
        anomaly_map = self.anomaly_map_generator(teacher_features, student_features)
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
