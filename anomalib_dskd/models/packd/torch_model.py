"""PyTorch model of Packd: reverse distillation conditioned on prototypes of k support images.

"Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang, Ma;
BMVC 2023), built on the shared reverse-distillation core (Deng & Li, CVPR 2022).

Levels (the paper's numbering, supplementary Fig. 1(b)): levels ``1``-``3`` are the core teacher's
selected stages (``layers``, shallow to deep; ResNet ``layer1``-``layer3`` by default) and the
decoder outputs of the same shapes; level ``4`` is, for the supports, the teacher's next stage
(``layers[-1] + 1``, ResNet ``layer4``; the paper's "whole teacher, four stages") and, for the
query, the one-class embedding. The paper's PEIM levels are ``(2, 3, 4)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_dskd.components.rd import RdArchitecture, Teacher

from .anomaly_map import AnomalyMapGenerator
from .components import EMBEDDING_LEVEL, Peim, PrototypeConditionedDecoder
from .components.support_memory import SupportMemory, check_support_levels
from anomalib_dskd.components.rd.anomaly_map import cosine_distance_maps, upsample_and_sum


class SupportError(ValueError):
    """Missing or unusable support images."""


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Validate PEIM levels (``1``-``4``, distinct) and return them sorted, deepest last."""
    values = tuple(sorted({int(level) for level in levels}))
    if not values or any(level not in {1, 2, 3, EMBEDDING_LEVEL} for level in values) or len(values) != len(levels):
        msg = f"peim_levels must be distinct values among 1, 2, 3, 4 (4 = the one-class embedding), got {list(levels)}."
        raise ValueError(msg)
    return values


class PackdModel(nn.Module):
    """Teacher, one-class embedding, PEIM and prototype-conditioned student decoder.

    Args:
        backbone: timm CNN teacher.
        layers: the three teacher stage indices distilled (RD's levels 1-3).
        pre_trained: ``True`` (timm hub), ``False`` or a local checkpoint path.
        input_size: ``(H, W)``; multiples of twice the deepest stride.
        sigma: Gaussian smoothing of the anomaly map.
        peim_levels: levels with prototype extraction and integration (paper: ``(2, 3, 4)``).
        num_prototypes: prototypes per level (``M``).
        attention_dim: dimension of the prototypes and of the PEIM attention.
        support_score_weight: weight of the nearest-support distance maps
            (:class:`~anomalib_dskd.models.packd.components.support_memory.SupportMemory`) added to the
            distillation maps; ``0`` scores with the distillation map alone (the paper's score).
        support_score_levels: teacher levels (1-3) of the support memory.

    Train mode: ``forward(queries (G, 3, H, W), supports (G, k, 3, H, W))`` returns a dict with the
    queries' teacher and student features, the prototypes and the supports' teacher features;
    :meth:`episodes` does the same when the supports are among the images (one teacher pass; the
    episodes Packd forms from a plain one-category batch).
    Eval mode: ``forward(images)`` uses the cached prototypes of :meth:`set_support` and returns an
    :class:`~anomalib.data.InferenceBatch` (``anomaly_map`` ``(B, 1, H, W)``, ``pred_score`` = max).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str | Path = True,
        input_size: Sequence[int] = (256, 256),
        sigma: float = 4.0,
        peim_levels: Sequence[int] = (2, 3, 4),
        num_prototypes: int = 8,
        attention_dim: int = 64,
        support_score_weight: float = 1.0,
        support_score_levels: Sequence[int] = (2, 3),
    ) -> None:
        super().__init__()
        if not float(support_score_weight) >= 0:
            msg = f"support_score_weight must be a number >= 0 (0 = distillation map only), got {support_score_weight}."
            raise ValueError(msg)
        self.support_score_weight = float(support_score_weight)
        self.support_score_levels = check_support_levels(support_score_levels) if self.support_score_weight else ()
        layers = tuple(int(layer) for layer in layers)
        if len(layers) != 3:
            msg = f"Packd distils three teacher stages (PEIM levels 1-3), got layers={list(layers)}."
            raise ValueError(msg)
        self.peim_levels = check_levels(peim_levels)
        self.uses_embedding_level = EMBEDDING_LEVEL in self.peim_levels
        # Level 4 needs the teacher's next stage for the supports: one teacher with four stages.
        teacher_layers = (*layers, layers[-1] + 1) if self.uses_embedding_level else layers
        self.teacher = Teacher(backbone, teacher_layers, pre_trained)
        architecture = RdArchitecture.from_teacher(self.teacher)
        if self.uses_embedding_level:
            architecture = dataclasses.replace(
                architecture,
                channels=architecture.channels[:3],
                reductions=architecture.reductions[:3],
                decoder_blocks=architecture.decoder_blocks[:3],
                signed_outputs=architecture.signed_outputs[:3] if architecture.signed_outputs else None,
            )
        self.architecture = architecture
        architecture.check_input_size(input_size, "Packd")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.bottleneck = architecture.build_embedding()
        support_channels = [self.teacher.channels[level - 1] for level in self.peim_levels]
        student_channels = [
            architecture.embedding_channels if level == EMBEDDING_LEVEL else architecture.channels[level - 1]
            for level in self.peim_levels
        ]
        self.peim = Peim(support_channels, student_channels, num_prototypes, attention_dim)
        self.decoder = PrototypeConditionedDecoder(architecture.build_decoder(), self.peim, self.peim_levels)
        self.anomaly_map_generator = AnomalyMapGenerator(self.input_size, sigma)
        self.support_memory = SupportMemory(
            [self.teacher.channels[level - 1] for level in self.support_score_levels], self.support_score_levels
        )
        for index in range(len(self.peim_levels)):
            self.register_buffer(f"prototypes_{index}", torch.zeros(num_prototypes, attention_dim))
        self.register_buffer("support_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("support_shots", torch.zeros((), dtype=torch.long))
        self._support_ready = False
        self.register_load_state_dict_post_hook(_sync_support_flag)

    def set_input_size(self, input_size: Sequence[int]) -> None:
        """Adapt to a new input size (a checkpoint's pre-processor): the anomaly map follows it."""
        self.architecture.check_input_size(input_size, "Packd")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.anomaly_map_generator.image_size = self.input_size

    # ------------------------------------------------------------------ features
    def _support_level_features(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [features[level - 1] for level in self.peim_levels]

    def extract_prototypes(
        self, supports: torch.Tensor, features: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Per-level ``(G, M, d)`` prototypes of ``(G, k, 3, H, W)`` pre-processed support images.

        ``features``: the supports' teacher features if already computed (flattened over ``G * k``).
        """
        groups, shots = supports.shape[:2]
        features = self.teacher(supports.flatten(0, 1)) if features is None else features
        level_features = [
            feature.reshape(groups, shots, *feature.shape[1:]) for feature in self._support_level_features(features)
        ]
        return self.peim.extract(level_features)

    def support_distance_maps(
        self, teacher_features: Sequence[torch.Tensor], banks: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Weighted nearest-support distance maps of the query's teacher features (empty if weight 0).

        ``banks``: the memory of other supports (``support_memory.build``) instead of the cached one.
        """
        if not self.support_score_levels:
            return []
        maps = self.support_memory([teacher_features[level - 1] for level in self.support_score_levels], banks)
        return [self.support_score_weight * level_map for level_map in maps]

    def student(
        self, teacher_features: Sequence[torch.Tensor], prototypes: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Prototype-conditioned student features (levels 1-3, shallow to deep)."""
        return self.decoder(self.bottleneck(list(teacher_features[:3])), prototypes)

    # ------------------------------------------------------------------ support cache
    @property
    def cached_prototypes(self) -> list[torch.Tensor]:
        """The cached ``(M, d)`` prototypes per PEIM level."""
        return [getattr(self, f"prototypes_{index}") for index in range(len(self.peim_levels))]

    @property
    def has_support(self) -> bool:
        """Whether :meth:`set_support` has cached prototypes."""
        return self._support_ready

    @torch.no_grad()
    def set_support(self, supports: torch.Tensor) -> list[torch.Tensor]:
        """Compute and cache the prototypes of ``(k, 3, H, W)`` pre-processed support images.

        Runs the teacher and the PEIM extractors once (no training); the prototypes and the support
        memory's features are stored in buffers (saved in checkpoints, constants in ONNX / OpenVINO
        exports).
        """
        if supports.dim() != 4 or supports.shape[1] != 3:
            msg = f"support images must be a (k, 3, H, W) tensor, got shape {tuple(supports.shape)}."
            raise SupportError(msg)
        if tuple(supports.shape[-2:]) != self.input_size:
            msg = (
                f"support images are {tuple(supports.shape[-2:])} after pre-processing but the model expects "
                f"{self.input_size}: resize them to the model's input size."
            )
            raise SupportError(msg)
        was_training = self.training
        self.eval()
        try:
            features = self.teacher(supports)
            prototypes = self.extract_prototypes(supports.unsqueeze(0), features)
            self.support_memory.set([features[level - 1] for level in self.support_score_levels])
        finally:
            self.train(was_training)
        for index, level_prototypes in enumerate(prototypes):
            getattr(self, f"prototypes_{index}").copy_(level_prototypes[0])
        self.support_ready.fill_(True)
        self.support_shots.fill_(supports.shape[0])
        self._support_ready = True
        return [level[0] for level in prototypes]

    # ------------------------------------------------------------------ forward
    def episodes(self, images: torch.Tensor, support_index: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Training features of ``G`` episodes whose images share one teacher pass.

        Args:
            images: ``(N, 3, H, W)`` pre-processed images; the first ``G`` are the queries.
            support_index: ``(G, k)`` indices into ``images`` of each query's supports (a support may
                be another episode's query: the teacher is frozen, so its features serve both roles).

        Returns:
            The queries' teacher (``"teacher"``) and prototype-conditioned student (``"student"``)
            features of levels 1-3, the per-level ``(G, M, d)`` prototypes (``"prototypes"``) and the
            supports' ``(G, k, C, h, w)`` teacher features of levels 1-3 (``"support"``).
        """
        groups = support_index.shape[0]
        features = self.teacher(images)
        query_features = [feature[:groups] for feature in features]
        support_features = [feature[support_index] for feature in features]
        prototypes = self.peim.extract(self._support_level_features(support_features))
        student_features = self.student(query_features, prototypes)
        return {
            "teacher": query_features[:3],
            "student": student_features,
            "prototypes": prototypes,
            "support": support_features[:3],
        }

    def forward(
        self,
        images: torch.Tensor,
        supports: torch.Tensor | None = None,
    ) -> dict[str, list[torch.Tensor]] | InferenceBatch:
        """Training features (train mode, needs ``supports``) or anomaly map and score (eval mode)."""
        if self.training:
            if supports is None:
                msg = "Packd trains on (query, k supports) groups: pass supports of shape (G, k, 3, H, W)."
                raise SupportError(msg)
            groups, shots = supports.shape[:2]
            index = torch.arange(groups, groups * (1 + shots), device=images.device).reshape(groups, shots)
            return self.episodes(torch.cat([images, supports.flatten(0, 1)]), index)
        batch = images.shape[0]
        banks = None
        if supports is not None:
            support_features = self.teacher(supports)
            prototypes = [
                level.expand(batch, -1, -1) for level in self.extract_prototypes(supports[None], support_features)
            ]
            banks = self.support_memory.build([support_features[level - 1] for level in self.support_score_levels])
        else:
            if not self._support_ready:
                msg = (
                    "Packd has no support set: call model.set_support(<folder | list of images | tensor>) with k "
                    "normal images of the category, or validate / test / predict with a datamodule that has training "
                    "images (any anomalib datamodule draws k of them; or anomalib_dskd.data.few_shot.FewShotDataModule)."
                )
                raise SupportError(msg)
            prototypes = [level.unsqueeze(0).expand(batch, -1, -1) for level in self.cached_prototypes]
        teacher_features = self.teacher(images)[:3]
        student_features = self.student(teacher_features, prototypes)
        maps = cosine_distance_maps(teacher_features, student_features) + self.support_distance_maps(teacher_features, banks)
        return self.score(maps)

    def score(self, maps: Sequence[torch.Tensor]) -> InferenceBatch:
        """Anomaly map (level maps upsampled to the input size, summed, blurred) and its maximum as the score."""
        anomaly_map = self.anomaly_map_generator.blur(upsample_and_sum(maps, self.input_size))
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


def _sync_support_flag(module: PackdModel, incompatible_keys: object) -> None:
    del incompatible_keys
    module._support_ready = bool(module.support_ready)


__all__ = ["PackdModel", "SupportError"]
