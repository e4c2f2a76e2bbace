"""Student decoder that mirrors the teacher ("reverse" distillation, Deng & Li, CVPR 2022).

Built from anomalib's decoder blocks (:class:`DecoderBasicBlock`, :class:`DecoderBottleneck`):
each stage doubles the resolution with a 2x2 transposed convolution and produces the channel
count of the matching teacher stage, so the decoder outputs the teacher's feature shapes.
For ResNet teachers it equals anomalib's ``ResNetDecoder`` in structure (tested side by side).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.components.backbone.resnet_decoder import DecoderBasicBlock, DecoderBottleneck
from torch import nn

from .ocbe import init_resnet_style


class StudentDecoder(nn.Module):
    """Upsampling decoder producing one feature map per teacher scale.

    Args:
        in_channels: channels of the one-class embedding.
        channels: teacher channels per scale, shallow to deep.
        block: ``"basic"`` or ``"bottleneck"`` decoder blocks.
        num_blocks: blocks per decoder stage, deepest stage first (anomalib uses the first
            entries of the ResNet depth list, e.g. ``[3, 4, 6]`` for ResNet-50).
        groups: convolution groups (ResNeXt teachers).
        width_per_group: bottleneck base width (128 for wide ResNets).

    Output: list of features, shallow to deep, with the teacher's shapes.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        block: str = "basic",
        num_blocks: Sequence[int] = (2, 2, 2),
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        block_cls = {"basic": DecoderBasicBlock, "bottleneck": DecoderBottleneck}[block]
        if len(num_blocks) != len(channels):
            msg = f"num_blocks needs one entry per scale ({len(channels)}), got {list(num_blocks)}."
            raise ValueError(msg)
        stages = []
        inplanes = in_channels
        for out_channels, depth in zip(reversed(channels), num_blocks, strict=True):
            if out_channels % block_cls.expansion:
                msg = f"teacher channels {out_channels} not divisible by {block_cls.expansion} for {block} blocks."
                raise ValueError(msg)
            planes = out_channels // block_cls.expansion
            upsample = nn.Sequential(
                nn.ConvTranspose2d(inplanes, out_channels, kernel_size=2, stride=2, groups=groups, bias=False),
                nn.BatchNorm2d(out_channels),
            )
            layers = [block_cls(inplanes, planes, 2, upsample, groups, width_per_group)]
            layers += [
                block_cls(out_channels, planes, groups=groups, base_width=width_per_group) for _ in range(1, depth)
            ]
            stages.append(nn.Sequential(*layers))
            inplanes = out_channels
        self.stages = nn.ModuleList(stages)
        init_resnet_style(self)

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Decode the embedding into the teacher's scales, returned shallow to deep."""
        outputs = []
        features = embedding
        for stage in self.stages:
            features = stage(features)
            outputs.append(features)
        return outputs[::-1]
