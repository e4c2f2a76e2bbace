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
from anomalib_dskd.components.rd.anomaly_map import cosine_distance_maps

from .anomaly_map import AnomalyMapGenerator
from .components import EMBEDDING_LEVEL, Peim, PrototypeConditionedDecoder
from .components.support_memory import SupportMemory, check_support_levels


class SupportError(ValueError):
    """Missing or unusable support images."""


#: How the distillation and support-memory maps are put on one scale before they are added.
SCORE_NORMALISATIONS = ("none", "zscore", "centred")


def check_score_normalisation(value: str) -> str:
    """Validate ``score_normalisation`` (one of :data:`SCORE_NORMALISATIONS`)."""
    if value not in SCORE_NORMALISATIONS:
        msg = (
            f"score_normalisation must be one of {list(SCORE_NORMALISATIONS)}, got {value!r}: 'none' adds the raw "
            "maps, 'zscore' divides each by its spread on the supports, 'centred' also removes the supports' mean map."
        )
        raise ValueError(msg)
    return value


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Validate PEIM levels (``1``-``4``, distinct) and return them sorted, deepest last."""
    values = tuple(sorted({int(level) for level in levels}))
    if not values or any(level not in {1, 2, 3, EMBEDDING_LEVEL} for level in values) or len(values) != len(levels):
        msg = f"peim_levels must be distinct values among 1, 2, 3, 4 (4 = the one-class embedding), got {list(levels)}."
        raise ValueError(msg)
    return values


#: Which map's maximum is the image score: the anomaly map, or the support-memory term alone.
IMAGE_SCORES = ("map", "memory")


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
        support_score_levels: teacher levels of the support memory: 1-3 the distilled stages, 4 the
            teacher's next stage (the supports' level 4).
        support_metric: the memory's distance, ``"cosine"`` or ``"euclidean"`` (``SupportMemory``'s ``metric``).
        support_combine: ``"sum"`` (a map per level) or ``"concat"`` (``SupportMemory``'s ``combine``).
        score_normalisation: ``"none"`` adds the raw ``1 - cos`` maps; ``"zscore"`` divides the
            distillation map and the memory map by their standard deviation over the supports' own maps
            (each support scored against the others, leave-one-out) and subtracts their means, so each
            term counts in units of its normal spread; ``"centred"`` subtracts the supports' per-pixel
            mean map instead of the scalar mean. Both need ``k >= 2``; the statistics are buffers.
        image_score: ``"memory"``: the image score is the maximum of the blurred support-memory term
            alone, while the anomaly map stays the fusion (distillation + memory); ``"map"``: the
            maximum of the anomaly map (the paper's, with ``support_score_weight=0``).

    Train mode: ``forward(queries (G, 3, H, W), supports (G, k, 3, H, W))`` returns a dict with the
    queries' teacher and student features, the prototypes and the supports' teacher features;
    :meth:`episodes` does the same when the supports are among the images (one teacher pass; the
    episodes Packd forms from a plain one-category batch).
    Eval mode: ``forward(images)`` uses the cached prototypes of :meth:`set_support` and returns an
    :class:`~anomalib.data.InferenceBatch` (``anomaly_map`` ``(B, 1, H, W)``; ``pred_score`` its
    maximum, or with ``image_score="memory"`` the maximum of the memory term).
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
        support_score_levels: Sequence[int] = (2, 3, 4),
        support_metric: str = "cosine",
        support_combine: str = "sum",
        score_normalisation: str = "none",
        image_score: str = "memory",
    ) -> None:
        super().__init__()
        self.score_normalisation = check_score_normalisation(score_normalisation)
        if not float(support_score_weight) >= 0:
            msg = f"support_score_weight must be a number >= 0 (0 = distillation map only), got {support_score_weight}."
            raise ValueError(msg)
        self.support_score_weight = float(support_score_weight)
        self.support_score_levels = check_support_levels(support_score_levels) if self.support_score_weight else ()
        if image_score not in IMAGE_SCORES:
            msg = f"image_score must be one of {list(IMAGE_SCORES)}, got {image_score!r}."
            raise ValueError(msg)
        if image_score == "memory" and not self.support_score_levels:
            msg = (
                "image_score='memory' scores images by the support memory, which support_score_weight=0 or "
                "support_score_levels=[] switches off: use image_score='map' for the distillation score alone."
            )
            raise ValueError(msg)
        self.image_score = image_score
        layers = tuple(int(layer) for layer in layers)
        if len(layers) != 3:
            msg = f"Packd distils three teacher stages (PEIM levels 1-3), got layers={list(layers)}."
            raise ValueError(msg)
        self.peim_levels = check_levels(peim_levels)
        self.uses_embedding_level = EMBEDDING_LEVEL in self.peim_levels
        # Level 4 needs the teacher's next stage (the supports' PEIM level 4, a level-4 memory): one
        # teacher with four stages.
        next_stage = self.uses_embedding_level or EMBEDDING_LEVEL in self.support_score_levels
        teacher_layers = (*layers, layers[-1] + 1) if next_stage else layers
        self.teacher = Teacher(backbone, teacher_layers, pre_trained)
        architecture = RdArchitecture.from_teacher(self.teacher)
        if next_stage:
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
            [self.teacher.channels[level - 1] for level in self.support_score_levels],
            self.support_score_levels,
            metric=support_metric,
            combine=support_combine,
        )
        for index in range(len(self.peim_levels)):
            self.register_buffer(f"prototypes_{index}", torch.zeros(num_prototypes, attention_dim))
        # score_normalisation's statistics: (distillation std, memory std) and the shift subtracted from
        # the blurred sum ((1, 1, 1, 1) for "zscore", the (1, 1, H, W) mean map for "centred"). Unused, and
        # not saved, with "none": checkpoints of the default model keep the keys they had before.
        normalised = self.score_normalisation != "none"
        self.register_buffer("score_scales", torch.ones(2), persistent=normalised)
        self.register_buffer("score_shift", torch.zeros(1, 1, 1, 1), persistent=normalised)
        self.register_buffer("support_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("support_shots", torch.zeros((), dtype=torch.long))
        self._support_ready = False
        self.register_load_state_dict_post_hook(_sync_support_flag)

    def set_input_size(self, input_size: Sequence[int]) -> None:
        """Adapt to a new input size (a checkpoint's pre-processor): the anomaly map follows it."""
        self.architecture.check_input_size(input_size, "Packd")
        size = (int(input_size[0]), int(input_size[1]))
        if size != self.input_size and self.score_normalisation != "none" and self._support_ready:
            # the statistics were measured on maps of the old size: the support must be set again
            self.support_ready.fill_(False)
            self._support_ready = False
        self.input_size = size
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

    @torch.no_grad()
    def support_statistics(
        self, features: Sequence[torch.Tensor], prototypes: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``score_normalisation``'s ``(scales, shift)`` from the supports' own maps.

        Each support is scored as a query: its distillation map with the set's ``(M, d)`` prototypes,
        its memory map against the *other* supports (leave-one-out, since against itself it is 0).
        ``scales`` holds the standard deviations over all pixels of the blurred distillation and
        (unweighted) memory maps; ``shift`` is what the normalised sum subtracts: the weighted sum of
        the means over scales, a scalar for ``"zscore"``, a per-pixel map for ``"centred"``.

        Args:
            features: the ``k`` supports' teacher features (every level of the teacher).
            prototypes: the supports' prototypes per PEIM level.
        """
        shots = features[0].shape[0]
        if shots < 2:
            msg = (
                f"score_normalisation={self.score_normalisation!r} measures the supports' normal spread leave-one-out "
                f"and needs at least 2 support images, got {shots}: give more supports or use score_normalisation='none'."
            )
            raise SupportError(msg)
        smooth = self.anomaly_map_generator.smooth
        student = self.student(features[:3], [level.unsqueeze(0).expand(shots, -1, -1) for level in prototypes])
        terms = [smooth(cosine_distance_maps(features[:3], student), self.input_size)]
        weights = [1.0]
        if self.support_score_levels:
            memory_features = [features[level - 1] for level in self.support_score_levels]
            maps = []
            for index in range(shots):
                others = [other for other in range(shots) if other != index]
                banks = self.support_memory.build([level[others] for level in memory_features])
                level_maps = self.support_memory([level[index : index + 1] for level in memory_features], banks)
                maps.append(smooth(level_maps, self.input_size))
            terms.append(torch.cat(maps))
            weights.append(self.support_score_weight)
        scales = torch.ones(2, device=terms[0].device)
        shift = torch.zeros((), device=terms[0].device)
        for index, (term, weight) in enumerate(zip(terms, weights, strict=True)):
            scales[index] = term.std().clamp_min(1e-8)
            mean = term.mean(dim=0, keepdim=True) if self.score_normalisation == "centred" else term.mean()
            shift = shift + weight * mean / scales[index]
        return scales, shift.reshape(1, 1, *shift.shape[-2:]) if shift.dim() else shift.reshape(1, 1, 1, 1)

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
            if self.score_normalisation != "none":
                scales, shift = self.support_statistics(features, [level[0] for level in prototypes])
                self.score_scales.copy_(scales)
                self.score_shift = shift
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
        scales, shift = self.score_scales, self.score_shift
        if supports is not None:
            support_features = self.teacher(supports)
            support_prototypes = [level[0] for level in self.extract_prototypes(supports[None], support_features)]
            prototypes = [level.unsqueeze(0).expand(batch, -1, -1) for level in support_prototypes]
            banks = self.support_memory.build([support_features[level - 1] for level in self.support_score_levels])
            if self.score_normalisation != "none":
                scales, shift = self.support_statistics(support_features, support_prototypes)
        else:
            if not self._support_ready:
                msg = (
                    "Packd has no support set: call model.set_support(<folder | list of images | tensor>) with k "
                    "normal images of the category, or validate / test / predict with a datamodule that has training "
                    "images (any anomalib datamodule draws k of them; or anomalib_dskd.data.few_shot.FewShotDataModule)."
                )
                raise SupportError(msg)
            prototypes = [level.unsqueeze(0).expand(batch, -1, -1) for level in self.cached_prototypes]
        teacher_features = self.teacher(images)
        student_features = self.student(teacher_features[:3], prototypes)
        distillation = cosine_distance_maps(teacher_features[:3], student_features)
        memory = self.support_distance_maps(teacher_features, banks)
        if self.score_normalisation != "none":
            distillation = [level / scales[0] for level in distillation]
            memory = [level / scales[1] for level in memory]
        else:
            shift = None
        if self.image_score == "map":
            # Gaussian blur is linear: blurring the scaled sum, then subtracting the shift, equals adding
            # the separately blurred and standardised maps.
            return self.score(distillation + memory, shift)
        memory_map = self.anomaly_map_generator.smooth(memory, self.input_size)
        fused = self.score(distillation, shift, add=memory_map)
        return InferenceBatch(pred_score=torch.amax(memory_map, dim=(-2, -1)).reshape(-1), anomaly_map=fused.anomaly_map)

    def score(
        self, maps: Sequence[torch.Tensor], shift: torch.Tensor | None = None, add: torch.Tensor | None = None
    ) -> InferenceBatch:
        """Anomaly map and its maximum: level maps upsampled to the input size, summed, blurred, ``+ add - shift``."""
        anomaly_map = self.anomaly_map_generator.smooth(maps, self.input_size)
        if add is not None:
            anomaly_map = anomaly_map + add
        if shift is not None:
            anomaly_map = anomaly_map - shift
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # "centred"'s shift is a map of the input size, "zscore"'s a scalar: take the checkpoint's shape.
        key = f"{prefix}score_shift"
        if key in state_dict:
            self.score_shift = torch.empty_like(state_dict[key], device=self.score_shift.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _sync_support_flag(module: PackdModel, incompatible_keys: object) -> None:
    del incompatible_keys
    module._support_ready = bool(module.support_ready)


__all__ = ["IMAGE_SCORES", "SCORE_NORMALISATIONS", "PackdModel", "SupportError", "check_score_normalisation"]
