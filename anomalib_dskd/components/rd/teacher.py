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
        self.unused_blocks = _drop_blocks_after_last_feature(self.model)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()
        self.pre_trained = pre_trained
        self.signed_outputs: tuple[bool, ...] = self.probe_signed_outputs()

    def probe_signed_outputs(self) -> tuple[bool, ...]:
        """Whether each selected stage's output can be negative, read off the teacher itself.

        ResNet stages end in a ReLU (outputs >= 0); MobileNetV2 / EfficientNet stages end in a linear
        bottleneck (BatchNorm plus residual, about half the values negative). The teacher is run on a
        fixed batch of Gaussian noise (seed 0, two 64 px-or-larger images): a stage is *signed* when
        any of its values is negative. A post-ReLU stage can never produce one, whatever the input;
        a linear stage produces millions of negatives on noise, so the test has no borderline case.
        """
        size = max(64, 4 * self.reductions[-1])
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, size, size, generator=generator)
        parameter = next(self.model.parameters(), None)
        if parameter is not None:
            images = images.to(device=parameter.device, dtype=parameter.dtype)
        return tuple(bool((feature < 0).any()) for feature in self(images))

    def build_next_stage(self) -> tuple[nn.Sequential, int]:
        """A trainable copy of the teacher stage after the deepest selected one, with the teacher's weights.

        For DSKD's OCBE_glo (Zhang et al., WACV 2024, Fig. 3: "the 4-th residual stage of ResNet as
        trainable OCBE_glo"): ResNet ``layer4`` after ``layer1``-``layer3``; for MobileNetV2 /
        EfficientNet the blocks between the deepest selected feature and the next one (``blocks.5``-
        ``blocks.6`` after ``blocks.4``). The weights are the ones this teacher was built with
        (``pre_trained``: hub, local file or random).

        Returns:
            ``(stage, out_channels)``; the stage halves the resolution of the deepest selected feature.

        Raises:
            TeacherBackboneError: the teacher has no stage after the deepest selected one.
        """
        from anomalib_dskd.weights import create_timm_model

        deepest = self.layers[-1]
        try:
            extended = create_timm_model(
                self.backbone, pre_trained=self.pre_trained, features_only=True, out_indices=(deepest, deepest + 1)
            )
        except (RuntimeError, AssertionError, IndexError) as err:
            msg = (
                f"Backbone {self.backbone!r} has no stage after layer {deepest} to serve as the global student's "
                f"embedding ({err}). Use layers whose deepest index leaves a stage after it, or "
                "global_embedding='fused'."
            )
            raise TeacherBackboneError(msg) from err
        names = extended.feature_info.module_name()
        reductions = extended.feature_info.reduction()
        if len(names) != 2 or reductions[1] != 2 * reductions[0]:
            msg = f"Backbone {self.backbone!r}: the stage after layer {deepest} does not halve the resolution."
            raise TeacherBackboneError(msg)
        modules = _modules_between(extended, names[0], names[1])
        stage = nn.Sequential(*modules)
        for parameter in stage.parameters():
            parameter.requires_grad_(True)
        return stage, int(extended.feature_info.channels()[1])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # Checkpoints written before the unused blocks were dropped hold their (frozen, never used) weights.
        dropped = tuple(f"{prefix}model.blocks.{index}." for index in self.unused_blocks)
        if dropped:
            for key in [key for key in state_dict if key.startswith(dropped)]:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002
        """Keep the teacher in eval mode whatever ``mode`` is (BatchNorm statistics stay frozen)."""
        return super().train(False)

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this (the embedding halves the deepest stride)."""
        return 2 * self.reductions[-1]


    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the selected feature maps, shallow to deep."""
        return list(self.model(images))


def _drop_blocks_after_last_feature(model: nn.Module) -> tuple[int, ...]:
    """Remove the blocks after the deepest selected stage from a timm EfficientNet-family feature model.

    timm's ``EfficientNetFeatures`` (MobileNetV2, EfficientNet, ...) runs every block whatever
    ``out_indices`` asks for: with layers ``(1, 2, 3)`` a MobileNetV2 teacher computes ``blocks.5``
    and ``blocks.6`` and throws them away. Its ``forward`` loops over ``self.blocks`` and collects
    the outputs of the selected stages, so truncating the ``Sequential`` after the last selected
    block gives the same features without that work. ``FeatureListNet`` (ResNet) already stops at
    the last selected stage and is left as it is.

    Returns:
        The indices of the removed blocks (empty when nothing was removed).
    """
    blocks = getattr(model, "blocks", None)
    stages = getattr(model, "_stage_out_idx", None)
    if not isinstance(blocks, nn.Sequential) or not stages or getattr(model, "feature_hooks", None) is not None:
        return ()
    keep = max(int(stage) for stage in stages)  # forward appends a feature after block i when i + 1 is selected
    if keep >= len(blocks):
        return ()
    removed = tuple(range(keep, len(blocks)))
    model.blocks = blocks[:keep]
    return removed


def _modules_between(model: nn.Module, after: str, until: str) -> list[nn.Module]:
    """The sibling modules of ``model`` after the one named ``after`` up to and including ``until``.

    timm names feature modules ``"layer3"`` (top-level ResNet stages) or ``"blocks.4"`` (children of
    an EfficientNet's ``blocks``); ``FeatureListNet`` flattens the latter to ``"blocks_4"``.
    """

    def locate(name: str) -> tuple[str, str]:
        for candidate in (name, name.replace(".", "_")):
            parent, _, child = candidate.rpartition(".")
            container = model.get_submodule(parent) if parent else model
            if child in dict(container.named_children()):
                return parent, child
        msg = f"cannot find teacher module {name!r}"
        raise TeacherBackboneError(msg)

    (parent_a, child_a), (parent_b, child_b) = locate(after), locate(until)
    if parent_a != parent_b:
        msg = f"teacher modules {after!r} and {until!r} are not siblings; cannot cut the stage between them."
        raise TeacherBackboneError(msg)
    children = list((model.get_submodule(parent_a) if parent_a else model).named_children())
    names = [name for name, _ in children]
    start, stop = names.index(child_a), names.index(child_b)
    return [module for _, module in children[start + 1 : stop + 1]]
