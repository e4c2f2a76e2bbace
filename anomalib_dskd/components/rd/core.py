"""Backbone-generic reverse-distillation core shared by Rd, Dskd, Ard and Packd.

Reverse distillation (Deng & Li, CVPR 2022): a frozen teacher encodes the image at several
scales; a one-class bottleneck embedding (OCBE) fuses and compresses those features; a student
decoder reconstructs the teacher's features from the embedding. Where the student fails to
reproduce the teacher, the image is anomalous.

:class:`RdArchitecture` derives every width and depth from the teacher (timm ``feature_info``,
and the ResNet block structure for ResNet teachers so that the result equals anomalib's RD),
and builds as many embeddings and decoders as a model needs (Dskd has two students).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .decoder import StudentDecoder
from .ocbe import OneClassEmbedding
from .teacher import Teacher


class InputSizeError(ValueError):
    """The input size cannot be used with the teacher's feature pyramid."""


def require_input_size(input_size: Sequence[int] | None, model_name: str, why: str = "") -> tuple[int, int]:
    """Return ``input_size`` as ``(H, W)``, or raise :class:`InputSizeError` when the pre-processor fixes none."""
    if input_size is None:
        reason = f" ({why})" if why else ""
        msg = f"{model_name} needs a fixed input size{reason}: give the pre-processor a Resize transform (e.g. 256x256)."
        raise InputSizeError(msg)
    return (int(input_size[0]), int(input_size[1]))


@dataclass(frozen=True)
class RdArchitecture:
    """Widths and depths of the OCBE and decoder, derived from a teacher.

    Attributes:
        channels: teacher channels per scale, shallow to deep.
        reductions: teacher strides per scale.
        block: ``"basic"`` or ``"bottleneck"``.
        embedding_blocks: blocks in the OCBE stage.
        decoder_blocks: blocks per decoder stage, deepest first.
        groups / width_per_group: bottleneck grouping and base width of the decoder.
        signed_outputs: per scale, whether the teacher's features can be negative (the decoder
            stage then ends linearly, see :class:`StudentDecoder`).
    """

    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    block: str = "basic"
    embedding_blocks: int = 2
    decoder_blocks: tuple[int, ...] = field(default=(2, 2, 2))
    groups: int = 1
    width_per_group: int = 64
    signed_outputs: tuple[bool, ...] | None = None

    @classmethod
    def from_teacher(cls, teacher: Teacher) -> RdArchitecture:
        """Derive the architecture; ResNet teachers reproduce anomalib's RD exactly."""
        channels, reductions = tuple(teacher.channels), tuple(teacher.reductions)
        signed = tuple(teacher.signed_outputs)
        layer1 = getattr(teacher.model, "layer1", None)
        if layer1 is not None and hasattr(layer1[0], "conv1"):  # timm ResNet family
            first = layer1[0]
            bottleneck = hasattr(first, "conv3")
            depths = [len(getattr(teacher.model, f"layer{i}")) for i in range(1, 5) if hasattr(teacher.model, f"layer{i}")]
            # anomalib's decoders take the first entries of the teacher's depth list ([3, 4, 6] for ResNet-50),
            # padded with the last depth when the teacher is truncated after the deepest selected stage.
            decoder_blocks = tuple((depths + [depths[-1]] * len(channels))[: len(channels)])
            if bottleneck:
                groups = first.conv2.groups
                width = first.conv1.out_channels
                width_per_group = width * 64 // (64 * groups)
                return cls(channels, reductions, "bottleneck", 3, decoder_blocks, groups, width_per_group, signed)
            return cls(channels, reductions, "basic", 2, decoder_blocks, signed_outputs=signed)
        return cls(channels, reductions, "basic", 2, tuple([2] * len(channels)), signed_outputs=signed)

    @property
    def embedding_channels(self) -> int:
        """Channels of the one-class embedding (twice the deepest teacher stage)."""
        return 2 * self.channels[-1]

    @property
    def fused_channels(self) -> int:
        """Channels of the concatenated multi-scale features inside the embedding (before its stage)."""
        return self.channels[-1] * len(self.channels)

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 * self.reductions[-1]

    def embedding_shape(self, input_size: Sequence[int]) -> tuple[int, int, int]:
        """``(C, h, w)`` of the one-class embedding for an input of ``input_size``."""
        stride = self.input_multiple
        return (self.embedding_channels, int(input_size[0]) // stride, int(input_size[1]) // stride)

    def check_input_size(self, input_size: Sequence[int] | None, model_name: str = "reverse distillation") -> None:
        """Raise :class:`InputSizeError` unless height and width are multiples of :attr:`input_multiple`."""
        if input_size is None:
            msg = f"{model_name} needs a fixed input size: give the pre-processor a Resize transform."
            raise InputSizeError(msg)
        height, width = (int(v) for v in input_size)
        multiple = self.input_multiple
        if height % multiple or width % multiple or height < multiple or width < multiple:
            suggestion = (max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple))
            msg = (
                f"Input size {(height, width)} cannot be used by {model_name}: height and width must be "
                f"multiples of {multiple} (the one-class embedding halves the teacher's deepest stride "
                f"{self.reductions[-1]}). Resize images to e.g. {suggestion}."
            )
            raise InputSizeError(msg)

    def build_embedding(
        self,
        fused_attention: nn.Module | Callable[[int], nn.Module] | None = None,
        block_attention: Callable[[int], nn.Module] | None = None,
    ) -> OneClassEmbedding:
        """A new (trainable) one-class bottleneck embedding.

        Args:
            fused_attention: module (or ``channels -> module`` factory, called with
                :attr:`fused_channels`) applied to the fused multi-scale features.
            block_attention: ``channels -> module`` factory for attention inside each embedding block.
        """
        if fused_attention is not None and not isinstance(fused_attention, nn.Module):
            fused_attention = fused_attention(self.fused_channels)
        return OneClassEmbedding(
            self.channels,
            block=self.block,
            num_blocks=self.embedding_blocks,
            out_channels=self.embedding_channels,
            fused_attention=fused_attention,
            block_attention=block_attention,
        )

    def build_decoder(self) -> StudentDecoder:
        """A new (trainable) student decoder mirroring the teacher."""
        return StudentDecoder(
            self.embedding_channels,
            self.channels,
            block=self.block,
            num_blocks=self.decoder_blocks,
            groups=self.groups,
            width_per_group=self.width_per_group,
            signed_outputs=self.signed_outputs,
        )


class ReverseDistillationCore(nn.Module):
    """Teacher + one-class embedding + student decoder.

    Args:
        backbone: timm CNN name (default the paper's ``wide_resnet50_2``).
        layers: teacher stage indices (timm ``out_indices``), default ``(1, 2, 3)``.
        pre_trained: ``True`` (timm hub), ``False`` or a local checkpoint path.
        input_size: ``(H, W)`` the model will see; checked against the teacher's strides.
        fused_attention: optional module (or ``channels -> module`` factory) applied to the fused
            multi-scale features inside the embedding (Ard).
        block_attention: optional ``channels -> module`` factory for attention inside each
            embedding block (Ard).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str | Path = True,
        input_size: Sequence[int] | None = (256, 256),
        fused_attention: nn.Module | Callable[[int], nn.Module] | None = None,
        block_attention: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.teacher = Teacher(backbone, layers, pre_trained)
        self.architecture = RdArchitecture.from_teacher(self.teacher)
        self.architecture.check_input_size(input_size)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.bottleneck = self.architecture.build_embedding(fused_attention, block_attention)
        self.decoder = self.architecture.build_decoder()

    def set_input_size(self, input_size: Sequence[int], model_name: str = "reverse distillation") -> tuple[int, int]:
        """Check and record a new input size (the weights do not depend on it); returns it as ``(H, W)``."""
        size = (int(input_size[0]), int(input_size[1]))
        self.architecture.check_input_size(size, model_name)
        self.input_size = size
        return size

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return ``(teacher_features, student_features)``, each shallow to deep."""
        teacher_features = self.teacher(images)
        student_features = self.decoder(self.bottleneck(teacher_features))
        return teacher_features, student_features
