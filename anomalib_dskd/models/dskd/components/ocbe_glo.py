"""OCBE_glo of DSKD as the paper draws it: the teacher's next stage, trainable, fed with F_T^3 alone.

Zhang, Suganuma, Okatani, "Contextual Affinity Distillation for Image Anomaly Detection", WACV 2024.
Fig. 3: "We use the 4-th residual stage of ResNet as trainable OCBE_glo"; Sec. 3.4: global context
is condensed "by compressing the high-semantic level feature F_T^3", while the local student's
multi-scale fusion "decreases the global contextual learning ability". So the global student's
embedding is the teacher stage after the deepest distilled one (ResNet ``layer4``: 1024x16x16 ->
2048x8x8 for WideResNet50-2 at 256 px), applied to the deepest teacher feature only, initialised
from the teacher's weights of that stage and trained. For teachers whose next stage is not twice
as wide as the deepest distilled one (MobileNetV2: 96 -> 320 channels), a 1x1 convolution and
BatchNorm project it to the decoder's embedding width (``2 *`` the deepest teacher channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_dskd.components.rd import Teacher
from anomalib_dskd.components.rd.ocbe import init_resnet_style

#: values of ``init``
INITS = ("teacher", "random")


class TeacherStageEmbedding(nn.Module):
    """The teacher's next stage (trainable) on the deepest teacher feature, projected to ``out_channels``.

    Args:
        teacher: the frozen teacher; its stage after the deepest selected one is copied.
        out_channels: embedding channels the global decoder expects (``2 *`` deepest teacher channels).
        init: ``"teacher"`` (default: the teacher's weights of that stage, ImageNet when the teacher
            has them) or ``"random"`` (Kaiming, as RD initialises its OCBE).

    Input: the teacher features (shallow to deep; only the deepest is used). Output:
    ``(B, out_channels, H_last / 2, W_last / 2)``.
    """

    def __init__(self, teacher: Teacher, out_channels: int, init: str = "teacher") -> None:
        super().__init__()
        if init not in INITS:
            msg = f"global_embedding_init must be one of {INITS}, got {init!r}."
            raise ValueError(msg)
        self.stage, stage_channels = teacher.build_next_stage()
        if init == "random":
            init_resnet_style(self.stage)
        self.project: nn.Module = nn.Identity()
        if stage_channels != out_channels:
            self.project = nn.Sequential(
                nn.Conv2d(stage_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)
            )
            init_resnet_style(self.project)
        self.out_channels = out_channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed the deepest teacher feature ``F_T^3``."""
        return self.project(self.stage(features[-1])).contiguous()
