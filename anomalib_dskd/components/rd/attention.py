"""Channel / spatial attention for the one-class bottleneck embedding (ARD).

"Attention One-Class Embedding in Reverse Distillation for Anomaly Detection" (ARD; only the
supplementary is public) adds attention to reverse distillation's one-class bottleneck embedding
(OCBE) and compares three published attention modules:

* SE, squeeze-and-excitation (Hu et al., CVPR 2018): global average pooling, a bottleneck MLP
  (reduction 16) and a sigmoid gate per channel;
* ECA, efficient channel attention (Wang et al., CVPR 2020): global average pooling, a 1-D
  convolution across channels whose kernel size adapts to the channel count, sigmoid gate;
* CBAM, convolutional block attention module (Woo et al., ECCV 2018): channel attention from
  average- and max-pooled descriptors through a shared MLP, then spatial attention from a 7x7
  convolution over the channel-wise mean and max.

The modules are timm's implementations (:func:`timm.layers.create_attn`). They can be placed

* on the fused multi-scale features, before the embedding stage (``"fused"``);
* inside each residual block of the embedding stage, on the residual branch before the
  addition, as SE-ResNet / ECA-Net / CBAM do (``"blocks"``), with :class:`AttentionBasicBlock`
  and :class:`AttentionBottleneck`, thin subclasses of torchvision's ResNet blocks;
* or both (``"both"``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

#: attention types accepted by :func:`create_attention` (timm names).
ATTENTION_TYPES: tuple[str, ...] = ("se", "eca", "cbam")
#: where the attention goes in the one-class embedding.
ATTENTION_POSITIONS: tuple[str, ...] = ("fused", "blocks", "both")

AttentionFactory = Callable[[int], nn.Module]


class AttentionConfigError(ValueError):
    """Unknown attention type or insertion point."""


def check_attention_type(attention_type: str) -> str:
    """Return the lower-cased attention type or raise :class:`AttentionConfigError` listing the valid ones."""
    name = str(attention_type).strip().lower() if attention_type is not None else ""
    if name not in ATTENTION_TYPES:
        msg = f"Unknown attention type {attention_type!r}. Valid attention types: {', '.join(ATTENTION_TYPES)}."
        raise AttentionConfigError(msg)
    return name


def check_attention_position(position: str) -> str:
    """Return the lower-cased insertion point or raise :class:`AttentionConfigError` listing the valid ones."""
    name = str(position).strip().lower() if position is not None else ""
    if name not in ATTENTION_POSITIONS:
        valid = ", ".join(ATTENTION_POSITIONS)
        msg = f"Unknown attention insertion point {position!r}. Valid insertion points: {valid}."
        raise AttentionConfigError(msg)
    return name


def create_attention(attention_type: str, channels: int, **kwargs: Any) -> nn.Module:  # noqa: ANN401
    """Build timm's SE / ECA / CBAM module for ``channels`` channels.

    Args:
        attention_type: ``"se"``, ``"eca"`` or ``"cbam"`` (case-insensitive).
        channels: channels of the features the module gates.
        **kwargs: passed to the timm module (e.g. ``rd_ratio`` for SE and CBAM).

    Returns:
        A module mapping ``(B, C, H, W)`` to ``(B, C, H, W)``.

    Raises:
        AttentionConfigError: ``attention_type`` is not one of :data:`ATTENTION_TYPES`.
    """
    from timm.layers import create_attn

    return create_attn(check_attention_type(attention_type), int(channels), **kwargs)


def attention_factory(attention_type: str, **kwargs: Any) -> AttentionFactory:  # noqa: ANN401
    """A ``channels -> module`` factory for :func:`create_attention` (validated immediately)."""
    return partial(create_attention, check_attention_type(attention_type), **kwargs)


class AttentionBasicBlock(BasicBlock):
    """torchvision :class:`~torchvision.models.resnet.BasicBlock` with attention on the residual branch.

    ``out = relu(attention(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``, as in SE-ResNet.

    Args:
        inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer: as torchvision.
        attention: ``channels -> module`` factory, called with ``planes * expansion``.
    """

    def __init__(self, *args: Any, attention: AttentionFactory, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self.attention = attention(self.bn2.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block with the attention applied before the addition."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attention(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class AttentionBottleneck(Bottleneck):
    """torchvision :class:`~torchvision.models.resnet.Bottleneck` with attention on the residual branch.

    ``out = relu(attention(bn3(conv3(...))) + shortcut(x))``, as in SE-ResNet-50.

    Args:
        inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer: as torchvision.
        attention: ``channels -> module`` factory, called with ``planes * expansion``.
    """

    def __init__(self, *args: Any, attention: AttentionFactory, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self.attention = attention(self.bn3.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck block with the attention applied before the addition."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attention(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def attention_block(block: str, attention: AttentionFactory) -> Callable[..., nn.Module]:
    """torchvision-compatible block constructor (``"basic"`` / ``"bottleneck"``) with ``attention`` inside."""
    block_cls = {"basic": AttentionBasicBlock, "bottleneck": AttentionBottleneck}[block]
    constructor = partial(block_cls, attention=attention)
    constructor.expansion = block_cls.expansion  # type: ignore[attr-defined]
    return constructor


__all__ = [
    "ATTENTION_POSITIONS",
    "ATTENTION_TYPES",
    "AttentionBasicBlock",
    "AttentionBottleneck",
    "AttentionConfigError",
    "AttentionFactory",
    "attention_block",
    "attention_factory",
    "check_attention_position",
    "check_attention_type",
    "create_attention",
]
