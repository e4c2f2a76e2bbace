"""Frozen timm CNN teacher for reverse distillation.

Reverse distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022) distils a frozen ImageNet CNN (the teacher / encoder) into a student
decoder. This module wraps any timm ``features_only`` CNN as that teacher.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

#: teachers the package is tested with (any timm CNN with a stride-doubling pyramid works).
TESTED_BACKBONES = ("wide_resnet50_2", "resnet18", "mobilenetv2_100", "efficientnet_lite0")


class TeacherBackboneError(ValueError):
    """The requested backbone cannot serve as a reverse-distillation teacher."""


def check_backbone_name(backbone: str) -> None:
    """Raise :class:`TeacherBackboneError` when ``backbone`` is not a timm model name."""
    import timm

    if timm.is_model(backbone):
        return
    close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    msg = (
        f"Unknown backbone {backbone!r}: timm has no model of that name.{hint} "
        f"Tested teachers: {', '.join(TESTED_BACKBONES)}."
    )
    raise TeacherBackboneError(msg)


class Teacher(nn.Module):
    """Frozen multi-scale CNN feature extractor built from a timm ``features_only`` model.

    The teacher never trains: its parameters have ``requires_grad=False``, it stays in eval
    mode even when the parent module is put in train mode, and its forward runs without
    building a graph.

    Args:
        backbone: timm model name of a CNN, e.g. ``"wide_resnet50_2"`` (the paper's teacher),
            ``"resnet18"``, ``"mobilenetv2_100"`` or ``"efficientnet_lite0"``.
        layers: timm stage indices (``out_indices``) of the features to distil. Consecutive
            selected stages must double the stride (e.g. ``(1, 2, 3)`` = strides 4, 8, 16).
        pre_trained: ``True`` downloads ImageNet weights from the timm hub, ``False`` keeps a
            random initialisation, and a path loads a local checkpoint in timm, torchvision or
            efficientnet-lite-pytorch layout (see ``docs/weights.md``).

    Raises:
        TeacherBackboneError: unknown backbone, a backbone without a CNN feature pyramid
            (e.g. a vision transformer), or stages whose strides do not double.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str | Path = True,
    ) -> None:
        super().__init__()
        from anomalib_dskd.weights import create_timm_model

        check_backbone_name(backbone)
        layers = tuple(int(index) for index in layers)
        if len(layers) < 2 or list(layers) != sorted(set(layers)):
            msg = f"layers must be at least two increasing stage indices, got {layers!r}."
            raise TeacherBackboneError(msg)
        try:
            self.model = create_timm_model(backbone, pre_trained=pre_trained, features_only=True, out_indices=layers)
        except (RuntimeError, AssertionError, IndexError) as err:
            if "features_only" in str(err) or "out_indices" in str(err) or isinstance(err, IndexError | AssertionError):
                msg = (
                    f"Backbone {backbone!r} cannot provide feature stages {layers}: {err}. "
                    "Reverse distillation needs a CNN with multi-scale stages "
                    f"(tested: {', '.join(TESTED_BACKBONES)})."
                )
                raise TeacherBackboneError(msg) from err
            raise
        self.backbone = backbone
        self.layers = layers
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        ratios = [deep / shallow for shallow, deep in zip(self.reductions, self.reductions[1:], strict=False)]
        if any(ratio != 2 for ratio in ratios):
            kind = "a transformer or other non-pyramidal" if all(r == 1 for r in ratios) else "a"
            msg = (
                f"Backbone {backbone!r} with layers {layers} gives features at strides {self.reductions}; "
                f"reverse distillation needs stages whose stride doubles from one to the next. This looks like "
                f"{kind} backbone. Use a CNN such as {', '.join(TESTED_BACKBONES)} and consecutive stage indices."
            )
            raise TeacherBackboneError(msg)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (the embedding halves the deepest stride)."""
        return 2 * self.reductions[-1]

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002
        """Keep the teacher in eval mode whatever ``mode`` is (BatchNorm statistics stay frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the selected feature maps, shallow to deep."""
        return list(self.model(images))
