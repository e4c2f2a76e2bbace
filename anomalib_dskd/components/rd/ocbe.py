"""One-class bottleneck embedding (OCBE) derived from any teacher's feature pyramid.

Reverse distillation (Deng & Li, CVPR 2022, Sec. 3.2) fuses the teacher's multi-scale features
(MFF: strided 3x3 convolutions bring every scale to the deepest one, then concatenation) and
compresses them with a trainable ResNet-stage-like block that halves the resolution (OCE).
Channel widths are derived from the teacher's ``feature_info``; for ResNet teachers the module
has exactly the structure of anomalib's ``OCBE`` (tested side by side).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .attention import attention_block


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    """3x3 convolution (no bias), BatchNorm and ReLU, as RD's multi-scale fusion uses."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def init_resnet_style(module: nn.Module) -> None:
    """Kaiming-normal convolutions and unit BatchNorm, as RD and anomalib initialise."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(sub, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(sub.weight, 1)
            nn.init.constant_(sub.bias, 0)


class OneClassEmbedding(nn.Module):
    """Multi-scale feature fusion followed by a trainable stage that halves the resolution.

    Args:
        channels: teacher channels per scale, shallow to deep (e.g. ``[256, 512, 1024]``).
        block: ``"basic"`` (ResNet BasicBlock) or ``"bottleneck"`` (ResNet Bottleneck).
        num_blocks: blocks in the embedding stage (anomalib: 2 for BasicBlock, 3 for Bottleneck).
        out_channels: output channels; default ``2 * channels[-1]`` (a ResNet's next stage).
        fused_attention: optional module applied to the concatenated multi-scale features
            before the embedding stage (used by Ard); identity by default.
        block_attention: optional ``channels -> module`` factory; when given, every block of the
            embedding stage applies such a module to its residual branch before the addition
            (SE-ResNet style, :mod:`~anomalib_dskd.components.rd.attention`; used by Ard).

    Input: the teacher features (list, shallow to deep, strides doubling). Output:
    ``(B, out_channels, H_last / 2, W_last / 2)``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        block: str = "basic",
        num_blocks: int = 2,
        out_channels: int | None = None,
        fused_attention: nn.Module | None = None,
        block_attention: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        channels = list(channels)
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        if block_attention is not None:
            block_cls = attention_block(block, block_attention)
        deepest = channels[-1]
        out_channels = out_channels or 2 * deepest
        if out_channels % block_cls.expansion:
            msg = f"out_channels={out_channels} must be divisible by {block_cls.expansion} for {block} blocks."
            raise ValueError(msg)
        # One strided path per shallower scale: c_i -> c_{i+1} -> ... -> c_last, halving each step.
        self.fuse = nn.ModuleList(
            nn.Sequential(*[
                layer
                for j in range(i, len(channels) - 1)
                for layer in conv_bn_relu(channels[j], channels[j + 1], stride=2)
            ])
            for i in range(len(channels) - 1)
        )
        self.fused_attention = fused_attention or nn.Identity()
        planes = out_channels // block_cls.expansion
        in_channels = deepest * len(channels)
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        blocks = [block_cls(in_channels, planes, stride=2, downsample=downsample)]
        blocks += [block_cls(out_channels, planes) for _ in range(1, num_blocks)]
        self.embed = nn.Sequential(*blocks)
        self.out_channels = out_channels
        init_resnet_style(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fuse the scales, then embed (halving the deepest resolution)."""
        fused = [path(feature) for path, feature in zip(self.fuse, features[:-1], strict=True)]
        fused = torch.cat([*fused, features[-1]], dim=1)
        return self.embed(self.fused_attention(fused)).contiguous()
