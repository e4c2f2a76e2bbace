"""Student decoder that mirrors the teacher ("reverse" distillation, Deng & Li, CVPR 2022).

Built from anomalib's decoder blocks (:class:`DecoderBasicBlock`, :class:`DecoderBottleneck`):
each stage doubles the resolution with a 2x2 transposed convolution and produces the channel
count of the matching teacher stage, so the decoder outputs the teacher's feature shapes.
For ResNet teachers it equals anomalib's ``ResNetDecoder`` in structure (tested side by side).

anomalib's blocks end in a ReLU, right for ResNet teachers (their stage outputs are post-ReLU) and
wrong for teachers whose stages end in a linear bottleneck (MobileNetV2, EfficientNet): about half
of their values are negative, which a ReLU output can never reach (a cosine floor of ~0.3 per scale).
The last block of each stage therefore ends without its ReLU wherever the teacher's output at that
scale is signed (:attr:`~anomalib_dskd.components.rd.Teacher.signed_outputs`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from anomalib.models.components.backbone.resnet_decoder import DecoderBasicBlock, DecoderBottleneck
from torch import nn

from .ocbe import init_resnet_style

logger = logging.getLogger(__name__)


class _StageOutput:
    """Mixin for the last block of a decoder stage: anomalib's block, with an optional linear output.

    With ``linear_output = False`` the block is anomalib's (``super().forward``). With ``True`` it
    returns ``residual + identity`` without the final ReLU, so the stage can take negative values.
    """

    linear_output: bool = False

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.linear_output:
            return super().forward(batch)  # type: ignore[misc]
        identity = batch if self.upsample is None else self.upsample(batch)
        out = self.relu(self.bn1(self.conv1(batch)))
        out = self.bn2(self.conv2(out))
        if hasattr(self, "conv3"):  # bottleneck
            out = self.bn3(self.conv3(self.relu(out)))
        return out + identity


class _BasicStageOutput(_StageOutput, DecoderBasicBlock):
    pass


class _BottleneckStageOutput(_StageOutput, DecoderBottleneck):
    pass


_STAGE_OUTPUT = {DecoderBasicBlock: _BasicStageOutput, DecoderBottleneck: _BottleneckStageOutput}


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
        signed_outputs: per teacher scale (shallow to deep), whether the teacher's features there can
            be negative; the last block of that stage then ends without its ReLU. ``None`` = all
            ``False`` (anomalib's decoder, right for ResNet teachers).

    Buffers: ``signed_outputs`` (uint8, shallow to deep, only when some scale is signed, so that a
    ResNet teacher's decoder has exactly anomalib's state dict), saved in checkpoints. Checkpoints
    written before it existed were trained with ReLU outputs everywhere and load exactly so, with a
    warning that says to retrain for the linear outputs.

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
        signed_outputs: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        block_cls = {"basic": DecoderBasicBlock, "bottleneck": DecoderBottleneck}[block]
        if len(num_blocks) != len(channels):
            msg = f"num_blocks needs one entry per scale ({len(channels)}), got {list(num_blocks)}."
            raise ValueError(msg)
        signed = [False] * len(channels) if signed_outputs is None else [bool(value) for value in signed_outputs]
        if len(signed) != len(channels):
            msg = f"signed_outputs needs one entry per scale ({len(channels)}), got {list(signed)}."
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
            classes = [block_cls] * (depth - 1) + [_STAGE_OUTPUT[block_cls]]
            layers = [classes[0](inplanes, planes, 2, upsample, groups, width_per_group)]
            layers += [cls(out_channels, planes, groups=groups, base_width=width_per_group) for cls in classes[1:]]
            stages.append(nn.Sequential(*layers))
            inplanes = out_channels
        self.stages = nn.ModuleList(stages)
        init_resnet_style(self)
        # ResNet teachers (no signed scale): no buffer, so the state dict stays exactly anomalib's.
        self.register_buffer("signed_outputs", torch.tensor(signed, dtype=torch.uint8) if any(signed) else None)
        self.signed_outputs: torch.Tensor | None
        self._apply_signed_outputs()

    def _apply_signed_outputs(self) -> None:
        """Set each stage's last block to the output kind recorded in the buffer."""
        flags = [0] * len(self.stages) if self.signed_outputs is None else self.signed_outputs.tolist()
        for stage, signed in zip(self.stages, reversed(flags), strict=True):
            stage[-1].linear_output = bool(signed)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        key = prefix + "signed_outputs"
        legacy = self.signed_outputs is not None and key not in state_dict
        if legacy and any(name.startswith(prefix + "stages.") for name in state_dict):
            # Written before signed outputs existed: every stage was trained ending in a ReLU.
            logger.warning(
                "This checkpoint's student decoder was trained before decoder stages could take negative "
                "values: it loads as trained (ReLU outputs), although the teacher's features are signed. "
                "Retrain it to get the linear outputs (much lower distillation loss with MobileNetV2 / "
                "EfficientNet teachers)."
            )
            state_dict[key] = torch.zeros_like(self.signed_outputs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._apply_signed_outputs()

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Decode the embedding into the teacher's scales, returned shallow to deep."""
        outputs = []
        features = embedding
        for stage in self.stages:
            features = stage(features)
            outputs.append(features)
        return outputs[::-1]
