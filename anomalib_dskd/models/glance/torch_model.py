"""PyTorch model of Glance.

Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly Localization with Global and Local Feature
Comparison", CVPR 2021. Local-Net describes a 33x33 patch; Global-Net describes the image around it
(partial convolutions, the patch masked out); the IAD head (squared distance) and the DAD head (match
probability) compare the two. A regular grid of patches is scored and the scores are fused into a
pixel map by inverse distance weighting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

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

#: values of ``score_mode``: the patch score heads (suppl. C.1 mixes both; each alone is the ablation).
SCORE_MODES = ("mixed", "iad", "dad")


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
        teacher_features: The teacher's pooled feature: ``"stage"`` (last feature stage, default) or
            ``"head"`` (the classifier's pre-logits), see :class:`PatchTeacher`.
        lambda_s: Weight of the IAD term in the ``"mixed"`` patch score (0.8).
        score_mode: ``"mixed"`` (default: ``lambda_s * z_IAD + (1 - lambda_s) * z_DAD``), ``"iad"``
            (``z_IAD`` only) or ``"dad"`` (``z_DAD`` only); all three use the same trained weights.
        idw_power: IDW power (5).
        stain_size: ``(min, max)`` stain size in pixels for the DAD negatives.
        max_stains: Maximum stains per negative patch.
        fast_inference: Use the windowed Global-Net and (with ``grid_align=2``) dense Local-Net; same
            results as the per-patch reference path (``False``), which is kept for tests.
        inference_chunk: Images processed at a time in eager inference (bounds memory).
        standardise_decoder_input: Standardise Local-Net's features per channel (``BatchNorm1d``
            without affine parameters, batch statistics in training) before the distillation decoder.
            Only ``L_k`` sees it (the decoder is not used at inference). Local-Net's features start
            tiny (median channel std 1e-4 on dark images), and a plain linear decoder must grow its
            weights by orders of magnitude at Adam's ~``lr`` per step before ``L_k`` can fall.

    In eval mode ``forward(images)`` returns an :class:`~anomalib.data.InferenceBatch` with the
    ``(B, 1, H, W)`` IDW map and ``pred_score`` = its maximum (= the largest patch score).

    Score standardisation: ``s_IAD`` (a squared distance whose scale follows Local-Net's feature norm,
    measured from ~5 to ~13,000) and ``1 - P_match`` (in ``[0, 1]``) are put on one scale before
    ``lambda_s`` mixes them: ``z_IAD = (s_IAD - m_IAD) / sd_IAD`` and ``z_DAD = (1 - P_match - m_DAD) / sd_DAD``,
    with the mean / std of each over normal training images, per grid position or over all positions
    (the persistent ``(2, P)`` buffers ``score_mean`` / ``score_std``, set by :meth:`set_score_statistics`,
    exported with the model; ``score_statistics_patches`` counts the patches they come from, 0 = never
    computed). The
    paper's formula is ``lambda_s * s_IAD + (1 - lambda_s) * (1 - P_match)`` on raw values; with the
    default buffers (mean 0, std 1), which is also what a checkpoint written before the buffers
    existed loads with, the score is exactly that raw formula.

    ``local_distillation_fraction`` (persistent buffer, NaN until measured): Local-Net's held-out
    distillation loss at the end of stage 1 as a fraction of the zero-predictor baseline.
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
        score_mode: str = "mixed",
        idw_power: float = 5.0,
        stain_size: Sequence[float] = (4.0, 16.0),
        max_stains: int = 3,
        fast_inference: bool = True,
        inference_chunk: int = 4,
        standardise_decoder_input: bool = False,
        teacher_features: str = "stage",
    ) -> None:
        super().__init__()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        check_global_input_size(self.input_size)
        if not 0.0 <= float(lambda_s) <= 1.0:
            msg = f"lambda_s must be in [0, 1], got {lambda_s}"
            raise GlanceConfigError(msg)
        if score_mode not in SCORE_MODES:
            msg = f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}"
            raise GlanceConfigError(msg)
        if float(idw_power) <= 0:
            msg = f"idw_power must be > 0, got {idw_power}"
            raise GlanceConfigError(msg)
        self.patch_size = PATCH_SIZE
        self.patches_per_side = int(patches_per_side)
        self.grid_align = int(grid_align)
        self.lambda_s = float(lambda_s)
        self.score_mode = score_mode
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

        self.teacher = PatchTeacher(backbone, pre_trained, teacher_input_size, feature_layer=teacher_features)
        self.local_net = LocalNet(feature_dim)
        self.decoder: nn.Module = nn.Linear(feature_dim, self.teacher.feature_dim)
        if standardise_decoder_input:
            self.decoder = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), self.decoder)
        self.global_net = GlobalNet(feature_dim)
        self.dad = DADHead(feature_dim)
        self.stains = StainGenerator(stain_size, max_stains)
        self.global_grid = GlobalGridEvaluator(self.global_net, self.input_size, corners, PATCH_SIZE)
        self.idw = IDWFusion(self.input_size, corners.float() + (PATCH_SIZE - 1) / 2, idw_power)

        # [IAD, DAD] x grid position statistics of the patch scores over normal training patches (see the
        # class docstring); with "global" normalisation every position holds the same value
        self.register_buffer("score_mean", torch.zeros(2, self.n_patches))
        self.register_buffer("score_std", torch.ones(2, self.n_patches))
        self.register_buffer("score_statistics_patches", torch.zeros((), dtype=torch.float64))
        self.register_buffer("local_distillation_fraction", torch.tensor(math.nan))
        self.score_mean: torch.Tensor
        self.score_std: torch.Tensor
        self.score_statistics_patches: torch.Tensor
        self.local_distillation_fraction: torch.Tensor

    # ------------------------------------------------------------------ checkpoints / statistics
    #: buffers added after the first release, with the values that reproduce the old behaviour
    _LEGACY_BUFFERS: ClassVar[dict[str, Callable[[GlanceModel], torch.Tensor]]] = {
        "score_mean": lambda self: torch.zeros_like(self.score_mean),
        "score_std": lambda self: torch.ones_like(self.score_std),
        "score_statistics_patches": lambda self: torch.zeros_like(self.score_statistics_patches),
        "local_distillation_fraction": lambda self: torch.full_like(self.local_distillation_fraction, math.nan),
        "local_net.input_mean": lambda self: torch.zeros_like(self.local_net.input_mean),
        "local_net.input_std": lambda self: torch.ones_like(self.local_net.input_std),
    }

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # Checkpoints written before score standardisation existed: mean 0 / std 1 give the raw paper
        # formula they were scored with, and the distillation fraction is unknown (NaN); before Local-Net's
        # input standardisation: the identity.
        if prefix + "local_net.conv1.weight" in state_dict:
            for name, default in self._LEGACY_BUFFERS.items():
                state_dict.setdefault(prefix + name, default(self))
        saved = state_dict.get(prefix + "teacher.mean")
        if saved is not None and saved.shape != self.teacher.mean.shape:
            other = "head" if self.teacher.feature_layer == "stage" else "stage"
            msg = (f"The checkpoint's teacher feature has {saved.shape[0]} channels, this model's "
                   f"{self.teacher.feature_layer!r} feature of {self.teacher.backbone} has {self.teacher.feature_dim}. "
                   f"Checkpoints written before teacher_features existed distil the classifier's pre-logits "
                   f"feature: load them with teacher_features={other!r}.")
            raise GlanceConfigError(msg)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_score_statistics(self) -> bool:
        """Whether the score statistics were computed (else mean 0 / std 1: the raw paper formula)."""
        return bool(self.score_statistics_patches > 0)

    @torch.no_grad()
    def set_score_statistics(self, mean: torch.Tensor, std: torch.Tensor, patches: float) -> None:
        """Store the mean and standard deviation of the ``[IAD, DAD]`` patch scores of normal patches.

        Args:
            mean: ``(2,)`` (one value per head, every grid position) or ``(2, P)`` (per grid position).
            std: Same shape as ``mean``; must be positive.
            patches: Number of normal patches they come from (> 0 marks the model as calibrated).
        """
        mean = torch.as_tensor(mean, dtype=self.score_mean.dtype, device=self.score_mean.device)
        std = torch.as_tensor(std, dtype=self.score_std.dtype, device=self.score_std.device)
        if mean.dim() == 1:
            mean, std = mean[:, None], std[:, None]
        if not bool((std > 0).all()):
            msg = "score standard deviations must be positive"
            raise ValueError(msg)
        self.score_mean.copy_(mean.expand_as(self.score_mean))
        self.score_std.copy_(std.expand_as(self.score_std))
        self.score_statistics_patches.fill_(float(patches))

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

    def head_scores(self, images: torch.Tensor, fast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw per-patch head outputs ``(s_IAD, 1 - P_match)``, each ``(B, P)``, before standardisation."""
        local = self.grid_local_features(images, fast)
        global_ = self.grid_global_features(images, fast)
        return iad_distance(global_, local), 1 - self.dad.match_probability(global_, local)

    def combine_scores(self, s_iad: torch.Tensor, s_dad: torch.Tensor, score_mode: str | None = None) -> torch.Tensor:
        """Standardise the head outputs and combine them as ``score_mode`` (default: the model's).

        ``z_IAD = (s_IAD - score_mean[0]) / score_std[0]``, ``z_DAD = (1 - P_match - score_mean[1]) / score_std[1]``
        (statistics per grid position, broadcast over the batch); ``"mixed"``: ``lambda_s * z_IAD + (1 - lambda_s) * z_DAD``, ``"iad"``: ``z_IAD``, ``"dad"``: ``z_DAD``.
        Without statistics (mean 0, std 1) ``"mixed"`` is the paper's raw
        ``lambda_s * s_IAD + (1 - lambda_s) * (1 - P_match)``.
        """
        mode = self.score_mode if score_mode is None else score_mode
        if mode not in SCORE_MODES:
            msg = f"score_mode must be one of {SCORE_MODES}, got {mode!r}"
            raise GlanceConfigError(msg)
        # Standardise both heads at once against the whole (2, 1, P) buffers: OpenVINO 2026.4 folds slices of a
        # (2, P) constant (score_mean[0]) wrongly in this graph (measured: only the first position's value
        # was right); ONNX Runtime is right either way.
        heads = torch.stack([s_iad, s_dad])  # (2, B, P)
        z = (heads - self.score_mean.to(heads.dtype).unsqueeze(1)) / self.score_std.to(heads.dtype).unsqueeze(1)
        z_iad, z_dad = z[0], z[1]
        if mode == "iad":
            return z_iad
        if mode == "dad":
            return z_dad
        return self.lambda_s * z_iad + (1 - self.lambda_s) * z_dad

    def patch_scores(self, images: torch.Tensor, fast: bool | None = None) -> torch.Tensor:
        """Patch scores ``(B, P)`` of ``score_mode`` (see :meth:`combine_scores`)."""
        return self.combine_scores(*self.head_scores(images, fast))

    def maps_from_patch_scores(self, scores: torch.Tensor) -> InferenceBatch:
        """IDW anomaly map ``(B, 1, H, W)`` of patch scores ``(B, P)`` and the image score (its maximum)."""
        anomaly_map = self.idw(scores)
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map (IDW of the patch scores) and image score (its maximum)."""
        exporting = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if exporting or images.shape[0] <= self.inference_chunk:
            scores = self.patch_scores(images)
        else:
            scores = torch.cat([self.patch_scores(chunk) for chunk in images.split(self.inference_chunk)])
        return self.maps_from_patch_scores(scores)
