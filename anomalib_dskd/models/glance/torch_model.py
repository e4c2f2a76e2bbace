"""PyTorch model of Glance.

Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly Localization with Global and Local Feature
Comparison", CVPR 2021. Local-Net describes a 33x33 patch; Global-Net describes the image around it
(partial convolutions, the patch masked out); the IAD head (squared distance) and the DAD head (match
probability) compare the two. A regular grid of patches is scored and the scores are fused into a
pixel map by inverse distance weighting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from .anomaly_map import IDWFusion
from .components import (
    PATCH_SIZE,
    DADHead,
    GlanceConfigError,
    GlobalGridEvaluator,
    GlobalNet,
    LocalNet,
    PatchTeacher,
    StainGenerator,
    check_global_input_size,
    crop_patches,
    grid_corners,
    hole_masks,
    patch_index,
)
from .components.local_net import dense_window_index
from .loss import iad_distance


class GlanceModel(nn.Module):
    """Local-Net, Global-Net, DAD head, patch teacher and the grid inference.

    Args:
        backbone: timm CNN teacher of Local-Net (the paper: ``"resnet18"``).
        pre_trained: ``True`` (timm hub), ``False`` (random teacher, tests only) or a local checkpoint.
        input_size: ``(H, W)`` of the pre-processed images; each side in 243..274 (256 in the paper).
        patches_per_side: Inference grid side (20 -> 400 patches per image in the paper).
        grid_align: 2 rounds grid corners to even pixels (dense Local-Net; <= 1 pixel from uniform), 1 to
            the nearest pixel.
        feature_dim: Local / global feature dimension (128).
        teacher_input_size: Side the 33x33 patch is resized to for the teacher.
        lambda_s: Weight of ``s_IAD`` in the patch score (0.8).
        idw_power: IDW power (5).
        stain_size: ``(min, max)`` stain size in pixels for the DAD negatives.
        max_stains: Maximum stains per negative patch.
        fast_inference: Use the windowed Global-Net and (with ``grid_align=2``) dense Local-Net; same
            results as the per-patch reference path (``False``), which is kept for tests.
        inference_chunk: Images processed at a time in eager inference (bounds memory).

    In eval mode ``forward(images)`` returns an :class:`~anomalib.data.InferenceBatch` with the
    ``(B, 1, H, W)`` IDW map and ``pred_score`` = its maximum (= the largest patch score).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pre_trained: bool | str | Path = True,
        input_size: Sequence[int] = (256, 256),
        patches_per_side: int = 20,
        grid_align: int = 2,
        feature_dim: int = 128,
        teacher_input_size: int = 64,
        lambda_s: float = 0.8,
        idw_power: float = 5.0,
        stain_size: Sequence[float] = (4.0, 16.0),
        max_stains: int = 3,
        fast_inference: bool = True,
        inference_chunk: int = 4,
    ) -> None:
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        check_global_input_size(self.input_size)
        if not 0.0 <= float(lambda_s) <= 1.0:
            msg = f"lambda_s must be in [0, 1], got {lambda_s}"
            raise GlanceConfigError(msg)
        if float(idw_power) <= 0:
            msg = f"idw_power must be > 0, got {idw_power}"
            raise GlanceConfigError(msg)
        self.patch_size = PATCH_SIZE
        self.patches_per_side = int(patches_per_side)
        self.grid_align = int(grid_align)
        self.lambda_s = float(lambda_s)
        self.fast_inference = bool(fast_inference)
        self.inference_chunk = max(1, int(inference_chunk))

        corners = grid_corners(self.input_size, PATCH_SIZE, self.patches_per_side, self.grid_align)
        self.n_patches = int(corners.shape[0])
        self.register_buffer("corners", corners, persistent=False)
        self.register_buffer("patch_index", patch_index(self.input_size, corners, PATCH_SIZE), persistent=False)
        self.dense_local = bool((corners % 2 == 0).all())
        if self.dense_local:
            self.register_buffer(
                "dense_index", dense_window_index(corners, self.input_size), persistent=False)

        self.teacher = PatchTeacher(backbone, pre_trained, teacher_input_size)
        self.local_net = LocalNet(feature_dim)
        self.decoder = nn.Linear(feature_dim, self.teacher.feature_dim)
        self.global_net = GlobalNet(feature_dim)
        self.dad = DADHead(feature_dim)
        self.stains = StainGenerator(stain_size, max_stains)
        self.global_grid = GlobalGridEvaluator(self.global_net, self.input_size, corners, PATCH_SIZE)
        self.idw = IDWFusion(self.input_size, corners.float() + (PATCH_SIZE - 1) / 2, idw_power)

    # ------------------------------------------------------------------ training helpers
    def random_corners(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, 2)`` uniformly random top-left corners of 33x33 patches inside the image."""
        high = torch.tensor([self.input_size[0] - PATCH_SIZE + 1, self.input_size[1] - PATCH_SIZE + 1])
        return (torch.rand(n, 2, generator=generator) * high).long().clamp(max=high - 1)

    @staticmethod
    def crop(images: torch.Tensor, image_index: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """``(n, C, 33, 33)`` patches of ``images[image_index[i]]`` at ``corners[i]``."""
        return torch.stack([
            images[int(i), :, int(y) : int(y) + PATCH_SIZE, int(x) : int(x) + PATCH_SIZE]
            for i, (y, x) in zip(image_index.tolist(), corners.tolist(), strict=True)
        ])

    def masks_for(self, corners: torch.Tensor) -> torch.Tensor:
        """``(n, 1, H, W)`` Global-Net masks: 0 on the patch at each corner, 1 elsewhere."""
        return hole_masks(self.input_size, corners, PATCH_SIZE)

    # ------------------------------------------------------------------ grid inference
    def grid_local_features(self, images: torch.Tensor, fast: bool | None = None) -> torch.Tensor:
        """Local-Net features ``(B, P, D)`` of every grid patch."""
        fast = self.fast_inference if fast is None else fast
        if fast and self.dense_local:
            return self.local_net.dense_grid_features(images, self.dense_index, self.n_patches)
        patches = crop_patches(images, self.patch_index, self.n_patches, PATCH_SIZE)
        return self.local_net(patches).reshape(images.shape[0], self.n_patches, -1)

    def grid_global_features(self, images: torch.Tensor, fast: bool | None = None) -> torch.Tensor:
        """Global-Net features ``(B, P, D)`` with the hole on each grid patch."""
        fast = self.fast_inference if fast is None else fast
        if fast:
            return self.global_grid(images)
        masks = self.masks_for(self.corners).to(images)
        features = [
            self.global_net(image[None].expand(self.n_patches, -1, -1, -1), masks) for image in images
        ]
        return torch.stack(features)

    def patch_scores(self, images: torch.Tensor, fast: bool | None = None) -> torch.Tensor:
        """Patch scores ``(B, P)``: ``lambda_s * s_IAD + (1 - lambda_s) * (1 - P_match)``."""
        local = self.grid_local_features(images, fast)
        global_ = self.grid_global_features(images, fast)
        s_iad = iad_distance(global_, local)
        p_match = self.dad.match_probability(global_, local)
        return self.lambda_s * s_iad + (1 - self.lambda_s) * (1 - p_match)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map (IDW of the patch scores) and image score (its maximum)."""
        exporting = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if exporting or images.shape[0] <= self.inference_chunk:
            scores = self.patch_scores(images)
        else:
            scores = torch.cat([self.patch_scores(chunk) for chunk in images.split(self.inference_chunk)])
        anomaly_map = self.idw(scores)
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
