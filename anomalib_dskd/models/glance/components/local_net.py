"""Local-Net and its ImageNet teacher.

Glance (Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly Localization with Global and Local
Feature Comparison", CVPR 2021) describes every 33x33 patch by Local-Net (supplementary Table 1:
four convolutions with leaky ReLU of slope 5e-3 and two 2x2 max-pools, 33x33x3 -> 1x1x128). Local-Net
is distilled from an ImageNet CNN teacher through a linear decoder to the teacher's dimension, with a
compactness loss, as in Bergmann et al.'s "Uninformed Students" (CVPR 2020), whose 33x33 patch
network this is.

:meth:`LocalNet.grid_features` evaluates many patches of one image at once. When all patch corners
are even, the first three layers (conv, pool, conv: 95 % of the work) are computed once densely over
the whole image and each patch reads its window: the same arithmetic as running the patches one by
one (a patch at an even offset sees exactly the same pooling pairs as the dense map), 3x fewer
multiply-adds at the default 20 x 20 grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .errors import TeacherBackboneError

#: Local-Net's input patch side (supplementary Table 1).
PATCH_SIZE = 33
#: Negative slope of Local-Net's leaky ReLUs (supplementary Table 1).
LOCAL_SLOPE = 5e-3
#: Values of ``PatchTeacher``'s ``feature_layer``.
TEACHER_FEATURE_LAYERS = ("stage", "head")


class LocalNet(nn.Module):
    """Local-Net: 33x33x3 patch -> ``feature_dim`` descriptor (supplementary Table 1).

    ====== ============ ====== ======
    layer  output       kernel stride
    ====== ============ ====== ======
    conv1  31x31x128    3x3    1
    pool1  15x15x128    2x2    2
    conv2  11x11x256    5x5    1
    pool2  5x5x256      2x2    2
    conv3  4x4x256      2x2    1
    conv4  1x1x128      4x4    1
    ====== ============ ====== ======

    Every convolution is followed by a leaky ReLU (slope 5e-3), the last one included.

    The input is first standardised per colour channel with ``input_mean`` / ``input_std`` (persistent
    buffers; identity until :meth:`set_input_statistics` is called, which Glance does at its first
    training iteration). Images arrive ImageNet-normalised, which on a dark, low-contrast product is far
    from zero mean and unit variance (tire: mean -1.8, std 0.22), and Local-Net's features then start two
    orders of magnitude smaller than on a well-exposed image; see ``docs/models/glance.md``, Stage 1.

    Args:
        feature_dim: Output dimension. Defaults to ``128``.
    """

    def __init__(self, feature_dim: int = 128) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.conv1 = nn.Conv2d(3, 128, 3)
        self.conv2 = nn.Conv2d(128, 256, 5)
        self.conv3 = nn.Conv2d(256, 256, 2)
        self.conv4 = nn.Conv2d(256, self.feature_dim, 4)
        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("input_std", torch.ones(1, 3, 1, 1))
        self.input_mean: torch.Tensor
        self.input_std: torch.Tensor

    @torch.no_grad()
    def set_input_statistics(self, pixels: torch.Tensor) -> None:
        """Standardise the input with the per-channel mean / std of ``(N, 3, H, W)`` training pixels.

        Raises:
            ValueError: ``pixels`` is not ``(N, 3, H, W)`` or a channel is constant.
        """
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            msg = f"input statistics need (N, 3, H, W) pixels, got shape {tuple(pixels.shape)}"
            raise ValueError(msg)
        std = pixels.std(dim=(0, 2, 3))
        if not bool((std > 0).all()):
            msg = f"a colour channel is constant over the statistics pixels (std {std.tolist()}): cannot standardise"
            raise ValueError(msg)
        self.input_mean.copy_(pixels.mean(dim=(0, 2, 3)).view(1, 3, 1, 1))
        self.input_std.copy_(std.view(1, 3, 1, 1))

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    @staticmethod
    def _act(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, LOCAL_SLOPE)

    def _head(self, conv2_out: torch.Tensor) -> torch.Tensor:
        """pool2, conv3, conv4 on activated conv2 windows ``(N, 256, 11, 11)`` -> ``(N, D)``."""
        x = F.max_pool2d(conv2_out, 2, 2)
        x = self._act(self.conv3(x))
        x = self._act(self.conv4(x))
        return x.flatten(1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Descriptors of ``(N, 3, 33, 33)`` patches -> ``(N, feature_dim)``."""
        if patches.shape[-2:] != (PATCH_SIZE, PATCH_SIZE):
            msg = f"Local-Net takes {PATCH_SIZE}x{PATCH_SIZE} patches, got {tuple(patches.shape[-2:])}."
            raise ValueError(msg)
        x = self._act(self.conv1(self._standardise(patches)))
        x = F.max_pool2d(x, 2, 2)
        x = self._act(self.conv2(x))
        return self._head(x)

    def dense_grid_features(self, images: torch.Tensor, window_index: torch.Tensor, n_patches: int) -> torch.Tensor:
        """Descriptors of patches at even corners, sharing conv1, pool1 and conv2 across patches.

        Args:
            images: ``(B, 3, H, W)``.
            window_index: ``(P * 11 * 11,)`` flat indices into the dense conv2 map (``H2 * W2``) of each
                patch's 11x11 window, see :func:`dense_window_index`.
            n_patches: ``P``.

        Returns:
            ``(B, P, feature_dim)``.
        """
        # channels-last throughout: max pooling is several times faster on it, and each patch window is
        # gathered as whole rows of 256 channel values
        x = self._act(self.conv1(self._standardise(images).contiguous(memory_format=torch.channels_last)))
        x = F.max_pool2d(x, 2, 2)
        x = self._act(self.conv2(x))  # (B, 256, H2, W2)
        batch, channels = x.shape[:2]
        rows = x.permute(0, 2, 3, 1).reshape(batch, -1, channels).index_select(1, window_index)
        windows = rows.reshape(batch * n_patches, 11, 11, channels).permute(0, 3, 1, 2)
        return self._head(windows).reshape(batch, n_patches, -1)


def dense_window_index(corners: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Flat indices of each patch's 11x11 window in Local-Net's dense conv2 map.

    Args:
        corners: ``(P, 2)`` even top-left corners ``(y, x)``.
        image_size: ``(H, W)``.

    Returns:
        ``(P * 121,)`` int64 indices into the flattened ``(H2, W2)`` conv2 map, ``H2 = (H - 2) // 2 - 4``.
    """
    if bool((corners % 2 != 0).any()):
        msg = "dense Local-Net evaluation needs even patch corners"
        raise ValueError(msg)
    width2 = (image_size[1] - 2) // 2 - 4
    offsets = torch.arange(11)
    rows = corners[:, 0, None] // 2 + offsets  # (P, 11)
    cols = corners[:, 1, None] // 2 + offsets
    return (rows[:, :, None] * width2 + cols[:, None, :]).reshape(-1)


class PatchTeacher(nn.Module):
    """Frozen ImageNet CNN that gives the distillation target of each patch.

    The patch (already normalised like the image) is resized to ``input_size`` and passed through the
    timm CNN; a globally pooled feature is standardised with per-channel statistics of the training
    patches (as in "Uninformed Students"), which :meth:`set_statistics` stores in persistent buffers.

    ``feature_layer`` picks the feature:

    * ``"stage"`` (default): the global average of the last feature stage (timm ``features_only``, last
      ``out_indices``): 512-d for the paper's ResNet-18, 320-d for MobileNetV2.
    * ``"head"``: the classifier's pooled pre-logits feature (timm ``num_classes=0``). For ResNet-18 it is
      the same 512-d feature; for MobileNetV2 and EfficientNet it comes after the classifier's 1x1
      expansion convolution (320 -> 1280 channels), whose output Local-Net's 128-d feature cannot
      carry through a linear decoder: on tire the best rank-128 linear reconstruction of those targets
      leaves 33 % of their variance on held-out patches, against 6 % for the 320-d stage feature.

    Args:
        backbone: timm model name (a CNN; the paper uses ``"resnet18"``).
        pre_trained: ``True`` (timm hub), ``False`` (random, tests only) or a local checkpoint path,
            loaded by :func:`anomalib_dskd.weights.create_timm_model`.
        input_size: Side the 33x33 patch is resized to before the teacher. ``33`` feeds it as is.
        feature_layer: ``"stage"`` or ``"head"``, see above.

    Raises:
        TeacherBackboneError: Unknown timm name, an unknown ``feature_layer``, or a model that cannot
            take ``input_size`` inputs.
    """

    def __init__(
        self,
        backbone: str,
        pre_trained: bool | str | Path = True,
        input_size: int = 64,
        feature_layer: str = "stage",
    ) -> None:
        super().__init__()
        from anomalib_dskd.components.rd.teacher import check_backbone_name
        from anomalib_dskd.weights import create_timm_model

        check_backbone_name(backbone)
        if feature_layer not in TEACHER_FEATURE_LAYERS:
            msg = f"teacher feature_layer must be one of {TEACHER_FEATURE_LAYERS}, got {feature_layer!r}"
            raise TeacherBackboneError(msg)
        self.backbone = backbone
        self.input_size = int(input_size)
        self.feature_layer = feature_layer
        timm_kwargs = {"num_classes": 0} if feature_layer == "head" else {"features_only": True, "out_indices": (-1,)}
        try:
            self.model = create_timm_model(backbone, pre_trained=pre_trained, **timm_kwargs)
            self.model.eval()
            with torch.no_grad():
                probe = self._pooled(torch.zeros(1, 3, self.input_size, self.input_size))
        except (RuntimeError, AssertionError, ValueError, TypeError) as err:
            if type(err).__name__ in {"TeacherWeightsError"}:
                raise
            msg = (
                f"Backbone {backbone!r} cannot serve as Glance's patch teacher at {self.input_size}x{self.input_size} "
                f"inputs ({type(err).__name__}: {err}). Use a timm CNN such as 'mobilenetv2_100' or 'resnet18'."
            )
            raise TeacherBackboneError(msg) from err
        if probe.ndim != 2:
            msg = f"Backbone {backbone!r} does not give a pooled feature vector (got shape {tuple(probe.shape)})."
            raise TeacherBackboneError(msg)
        self.feature_dim = int(probe.shape[1])
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("mean", torch.zeros(self.feature_dim))
        self.register_buffer("std", torch.ones(self.feature_dim))
        self.register_buffer("initialized", torch.tensor(False))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_layer == "head":
            return self.model(x)
        return self.model(x)[-1].mean(dim=(2, 3))

    def train(self, mode: bool = True) -> PatchTeacher:
        """The teacher always stays in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def raw_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Unstandardised teacher features of ``(N, 3, 33, 33)`` patches -> ``(N, feature_dim)``."""
        if patches.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            patches = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
        return self._pooled(patches)

    @torch.no_grad()
    def set_statistics(self, features: torch.Tensor, std_floor: float = 0.0) -> None:
        """Store the per-channel mean and standard deviation of raw teacher features ``(N, D)``.

        Args:
            features: Raw teacher features of the statistics patches.
            std_floor: Each channel's std is raised to at least ``std_floor * median(std)`` (and 1e-6):
                nearly constant channels would otherwise give targets of hundreds of standard
                deviations on other patches. ``0`` is plain standardisation.
        """
        std = features.std(0)
        floor = max(float(std_floor) * float(std.median()), 1e-6)
        self.mean.copy_(features.mean(0))
        self.std.copy_(std.clamp(min=floor))
        self.initialized.fill_(True)

    @torch.no_grad()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Standardised teacher features (the distillation target)."""
        return (self.raw_features(patches) - self.mean) / self.std
