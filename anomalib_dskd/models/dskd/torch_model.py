"""PyTorch model of DSKD, dual-student knowledge distillation with contextual affinity.

Zhang, Suganuma, Okatani, "Contextual Affinity Distillation for Image Anomaly Detection", WACV 2024.

* Teacher: a frozen ImageNet CNN (paper: WideResNet50-2, stages 1-3), shared by both students.
* Local student: reverse distillation unchanged - one-class embedding ``OCBE_loc`` and a decoder
  mirroring the teacher (the shared core, :class:`~anomalib_dskd.components.rd.ReverseDistillationCore`).
* Global student: its own ``OCBE_glo`` (by default the teacher's next stage on ``F_T^3`` alone, as
  the paper's Fig. 3 draws it; optionally a copy of the local student's fused OCBE), the Global
  Context Condensing Block, and a decoder of the same structure as the local one.
* Scoring (Eq. 8): per student, per-scale maps (cosine distance or affinity KL) upsampled to the
  input size and summed; each standardised with the statistics held in this module's buffers;
  added, Gaussian-smoothed; the image score is the maximum.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_dskd.components.rd import InputSizeError, ReverseDistillationCore, UpsampleSmooth

from .anomaly_map import AFFINITY, MAP_KINDS, PIXEL, DskdScoreFusion, student_score_maps
from .components import GlobalContextCondensingBlock, TeacherStageEmbedding
from .components.ocbe_glo import INITS

#: values of ``global_embedding``: the paper's teacher stage, or the local student's fused OCBE design
GLOBAL_EMBEDDINGS = ("teacher_stage", "fused")

#: values of ``students``
STUDENTS = {"both": ("local", "global"), "local": ("local",), "global": ("global",)}


class DskdModel(nn.Module):
    """Teacher, local student, global student (OCBE_glo -> GCCB -> decoder) and Eq. 8 scoring.

    Args:
        backbone: timm CNN teacher (paper: ``"wide_resnet50_2"``).
        layers: teacher stage indices (timm ``out_indices``), default ``(1, 2, 3)``.
        pre_trained: ``True`` (timm hub), ``False`` (random) or a local checkpoint path.
        input_size: ``(H, W)`` the model sees; multiples of twice the teacher's deepest stride.
            It also fixes the GCCB kernel (the embedding's spatial size).
        gccb_channels: GCCB width ``g``. Defaults to ``1024`` (paper).
        local_map / global_map: anomaly map (and loss) kind per student, ``"pixel"`` (cosine
            distance, Eq. 1) or ``"affinity"`` (contextual-affinity KL, Eq. 6).
        temperature: affinity softmax temperature ``T``.
        chunk_size: query positions per affinity chunk (``None`` = direct ``N x N``).
        sigma: Gaussian smoothing of the final map.
        students: ``"both"`` (DSKD), or ``"local"`` / ``"global"`` for one student alone (Table 4).
        global_map_scales: indices into ``layers`` (0 = shallowest) of the scales whose maps make the
            global student's anomaly map; ``None`` = all (paper, Sec. 3.5). Training is unaffected
            (the loss always covers every scale). ``(1, 2)`` drops the ``N^2`` affinity map at the
            shallowest scale (4096 x 4096 at 256 px), the largest single cost of Dskd's inference
            (accuracy and speed measured in ``docs/models/dskd.md``).
        global_map_key_pool: ``1`` (default, paper) scores the shallowest global scale with the
            exact Eq. 6; ``k > 1`` pools its keys over ``k x k`` cells (:func:`pooled_affinity_kl`:
            every position still queried, ``k^2`` times fewer exponentials; an approximation with
            the error bound and measured effect in ``docs/models/dskd.md``). A sequence gives one
            pooling per teacher scale, shallow to deep (e.g. ``(4, 2, 1)``). Inference only.

    Buffers (saved in checkpoints, constant-folded into exported graphs): ``map_mean`` and
    ``map_std`` (float64, Eq. 8's mu and sigma, one entry per active student in the order of
    :attr:`students`) and ``statistics_images`` (the number of normal images they come from;
    ``0`` = not calibrated yet, in which case mean 0 and std 1 are used: the raw maps are added)
    and ``statistics_scales`` (the global map scales the statistics were computed with: scoring
    with other scales refuses to run until the statistics are recomputed).

    In train mode ``forward`` returns ``(teacher_features, local_features, global_features)``
    (``None`` for an absent student); in eval mode an :class:`~anomalib.data.InferenceBatch`
    with ``anomaly_map`` ``(B, 1, H, W)`` and ``pred_score`` ``(B,)``.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str | Path = True,
        input_size: Sequence[int] = (256, 256),
        gccb_channels: int = 1024,
        local_map: str = PIXEL,
        global_map: str = AFFINITY,
        temperature: float = 1.0,
        chunk_size: int | None = 512,
        sigma: float = 4.0,
        students: str = "both",
        global_map_scales: Sequence[int] | None = None,
        global_embedding: str = "teacher_stage",
        global_embedding_init: str = "teacher",
        global_map_key_pool: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        if global_embedding not in GLOBAL_EMBEDDINGS:
            msg = f"global_embedding must be one of {GLOBAL_EMBEDDINGS}, got {global_embedding!r}."
            raise ValueError(msg)
        if global_embedding_init not in INITS:
            msg = f"global_embedding_init must be one of {INITS}, got {global_embedding_init!r}."
            raise ValueError(msg)
        self.global_embedding = global_embedding
        self.global_embedding_init = global_embedding_init
        if students not in STUDENTS:
            msg = f"students must be one of {sorted(STUDENTS)}, got {students!r}."
            raise ValueError(msg)
        for name, kind in (("local_map", local_map), ("global_map", global_map)):
            if kind not in MAP_KINDS:
                msg = f"{name} must be one of {MAP_KINDS}, got {kind!r}."
                raise ValueError(msg)
        if temperature <= 0:
            msg = f"temperature must be positive, got {temperature}."
            raise ValueError(msg)
        self.students: tuple[str, ...] = STUDENTS[students]
        self.map_kinds = {"local": local_map, "global": global_map}
        self.temperature = float(temperature)
        self.chunk_size = chunk_size

        # Teacher + local student (OCBE_loc + decoder): reverse distillation unchanged.
        self.core = ReverseDistillationCore(backbone, layers, pre_trained, input_size)
        architecture = self.core.architecture
        self.global_map_scales = resolve_map_scales(global_map_scales, len(architecture.channels))
        self.global_map_key_pool = resolve_key_pools(
            global_map_key_pool, self.core.teacher.reductions, self.core.input_size
        )
        self.input_size: tuple[int, int] = self.core.input_size
        embedding_channels, height, width = architecture.embedding_shape(self.input_size)
        # Global student: its own OCBE, the GCCB, a decoder identical in structure to the local one.
        if "global" in self.students:
            self.global_bottleneck = self._build_global_embedding()
            self.gccb = GlobalContextCondensingBlock(embedding_channels, (height, width), gccb_channels)
            self.global_decoder = architecture.build_decoder()
        if "local" not in self.students:  # a global student alone: no local weights to train or export
            del self.core.bottleneck, self.core.decoder
            self.core.bottleneck = None
            self.core.decoder = None

        self.fusion = DskdScoreFusion(sigma)
        self.upsample = UpsampleSmooth(sigma=0)  # the raw maps of Eq. 8's statistics
        count = len(self.students)
        self.register_buffer("map_mean", torch.zeros(count, dtype=torch.float64))
        self.register_buffer("map_std", torch.ones(count, dtype=torch.float64))
        self.register_buffer("statistics_images", torch.zeros((), dtype=torch.float64))
        self.register_buffer("statistics_scales", self._scale_mask())
        self.map_mean: torch.Tensor
        self.map_std: torch.Tensor
        self.statistics_images: torch.Tensor
        self.statistics_scales: torch.Tensor

    def _build_global_embedding(self) -> nn.Module:
        architecture = self.core.architecture
        if self.global_embedding == "fused":
            return architecture.build_embedding()
        return TeacherStageEmbedding(self.core.teacher, architecture.embedding_channels, self.global_embedding_init)

    def use_global_embedding(self, kind: str) -> None:
        """Rebuild OCBE_glo as ``kind`` (e.g. to load a checkpoint trained with the other design)."""
        if kind == self.global_embedding or "global" not in self.students:
            return
        old = next(self.global_bottleneck.parameters())
        self.global_embedding = kind
        self.global_bottleneck = self._build_global_embedding().to(device=old.device, dtype=old.dtype)

    def _key_pools(self) -> list[int]:
        """Key pooling per scored global scale (``global_map_key_pool`` resolved per teacher scale)."""
        return [self.global_map_key_pool[index] for index in self.global_map_scales]

    def _scale_mask(self) -> torch.Tensor:
        # per teacher scale: 0 = not scored, else the key pooling it is scored with (1 = exact Eq. 6)
        mask = torch.zeros(len(self.core.architecture.channels), dtype=torch.uint8)  # uint8: gloo broadcasts it
        mask[list(self.global_map_scales)] = torch.tensor(self._key_pools(), dtype=torch.uint8)
        return mask

    def set_global_map_key_pool(self, key_pool: int | Sequence[int]) -> None:
        """Score the global scales with ``key_pool`` (as the constructor's; statistics must then be recomputed)."""
        self.global_map_key_pool = resolve_key_pools(key_pool, self.core.teacher.reductions, self.input_size)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # Checkpoints written before ``global_map_scales`` existed always scored every scale.
        key = prefix + "statistics_scales"
        if key not in state_dict and prefix + "map_mean" in state_dict:
            state_dict[key] = torch.ones_like(self.statistics_scales)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_statistics_scales(self) -> None:
        """Refuse to score with statistics computed for other global map scales (they would misweigh Eq. 8)."""
        if "global" not in self.students or not self.is_calibrated:
            return
        current = self._scale_mask().to(self.statistics_scales.device)
        if not torch.equal(current, self.statistics_scales):
            used = self.statistics_scales.nonzero().flatten().tolist()
            pools = [int(v) for v in self.statistics_scales.tolist()]
            msg = (
                f"Dskd's map statistics (Eq. 8) were computed with global_map_scales={tuple(used)} and "
                f"global_map_key_pool={describe_key_pools(pools)}, but the model now scores scales "
                f"{self.global_map_scales} with global_map_key_pool={describe_key_pools(self.global_map_key_pool)}. "
                "Recompute them for these settings: "
                "Engine.validate(model, datamodule) or Dskd.compute_statistics(normal_images_loader)."
            )
            raise RuntimeError(msg)

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher."""
        return self.core.teacher

    def student_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the active students (the teacher is frozen)."""
        modules: list[nn.Module] = []
        if "local" in self.students:
            modules += [self.core.bottleneck, self.core.decoder]
        if "global" in self.students:
            modules += [self.global_bottleneck, self.gccb, self.global_decoder]
        return [p for module in modules for p in module.parameters()]

    @property
    def is_calibrated(self) -> bool:
        """Whether Eq. 8's statistics have been computed (else mean 0 / std 1 are used)."""
        return bool(self.statistics_images > 0)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor, images: int | float | torch.Tensor) -> None:
        """Store Eq. 8's per-student mean and standard deviation (ordered as :attr:`students`)."""
        self.map_mean.copy_(torch.as_tensor(mean, dtype=torch.float64))
        self.map_std.copy_(torch.as_tensor(std, dtype=torch.float64))
        self.statistics_images.fill_(float(images))
        self.statistics_scales.copy_(self._scale_mask())

    def set_input_size(self, input_size: Sequence[int]) -> None:
        """Adapt to a new input size: rebuilds the GCCB (its kernel is the embedding size) if needed.

        Used when a checkpoint's pre-processor (restored after construction) has another size than
        the constructor's default; the GCCB's weights are then loaded from the checkpoint.
        """
        size = (int(input_size[0]), int(input_size[1]))
        if size == self.input_size:
            return
        self.core.architecture.check_input_size(size, "Dskd")
        resolve_key_pools(self.global_map_key_pool, self.core.teacher.reductions, size)
        self.core.input_size = size
        self.input_size = size
        if "global" in self.students:
            channels, height, width = self.core.architecture.embedding_shape(size)
            if (height, width) != self.gccb.spatial_size:
                old = next(self.gccb.parameters())
                self.gccb = GlobalContextCondensingBlock(
                    channels, (height, width), self.gccb.channels, self.gccb.project
                ).to(device=old.device, dtype=old.dtype)

    def _check_size(self, images: torch.Tensor) -> None:
        if tuple(images.shape[-2:]) != self.input_size:
            msg = (
                f"Dskd was built for {self.input_size[0]}x{self.input_size[1]} inputs (its GCCB kernel is the "
                f"embedding size), got {tuple(images.shape[-2:])}. Resize images to {self.input_size} "
                "(the pre-processor does so) or build the model for the new size."
            )
            raise InputSizeError(msg)

    def features(
        self,
        images: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """``(teacher, local_student, global_student)`` features, each shallow to deep."""
        self._check_size(images)
        teacher = self.core.teacher(images)
        local = self.core.decoder(self.core.bottleneck(teacher)) if "local" in self.students else None
        glob = None
        if "global" in self.students:
            glob = self.global_decoder(self.gccb(self.global_bottleneck(teacher)))
        return teacher, local, glob

    def student_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw per-student maps ``M_loc`` / ``M_glo`` (upsampled, summed over scales), ``(B, 1, H, W)`` each."""
        return [self.upsample(scale_maps, self.input_size) for scale_maps in self.student_scale_maps(images)]

    def student_scale_maps(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per student (in :attr:`students` order), its per-scale maps ``(B, 1, h_l, w_l)`` before upsampling."""
        teacher, local, glob = self.features(images)
        return self._scale_maps(teacher, {"local": local, "global": glob})

    def _scale_maps(
        self, teacher: list[torch.Tensor], students: dict[str, list[torch.Tensor] | None]
    ) -> list[list[torch.Tensor]]:
        maps = []
        for name in self.students:
            features = students[name]
            assert features is not None  # noqa: S101 - an active student always has features
            teacher_scales, pools = teacher, None
            if name == "global":
                pools = self._key_pools()
                if len(self.global_map_scales) < len(teacher):
                    teacher_scales = [teacher[i] for i in self.global_map_scales]
                    features = [features[i] for i in self.global_map_scales]
            maps.append(
                student_score_maps(
                    self.map_kinds[name], teacher_scales, features, self.temperature, self.chunk_size, pools
                )
            )
        return maps

    def predict_with_student_maps(self, images: torch.Tensor) -> tuple[InferenceBatch, dict[str, torch.Tensor]]:
        """Eval output plus the smoothed standardised map of each student (they add up to ``anomaly_map``)."""
        if not torch.compiler.is_compiling():
            self.check_statistics_scales()
        maps = self.student_scale_maps(images)
        mean, std = self.map_mean, self.map_std
        anomaly_map, parts = self.fusion(maps, list(mean.unbind(0)), list(std.unbind(0)), self.input_size)
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        batch = InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
        return batch, dict(zip(self.students, parts, strict=True))

    def forward(
        self,
        images: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor] | None] | InferenceBatch:
        """Features for the losses in train mode; Eq. 8 map and score in eval mode."""
        if self.training:
            return self.features(images)
        return self.predict_with_student_maps(images)[0]


def resolve_key_pool(key_pool: int, stride: int, input_size: Sequence[int]) -> int:
    """Validated key pooling of one scale: a positive integer that divides that scale's feature grid."""
    if isinstance(key_pool, bool) or not isinstance(key_pool, int) or key_pool < 1:
        msg = f"global_map_key_pool must be a positive integer (1 = exact Eq. 6) or one per scale, got {key_pool!r}."
        raise ValueError(msg)
    grid = [int(side) // stride for side in input_size]
    if any(side % key_pool for side in grid):
        msg = (
            f"global_map_key_pool={key_pool} must divide the feature grid {grid[0]}x{grid[1]} "
            f"(input {tuple(input_size)}, stride {stride}); use a divisor of it, or 1 (exact)."
        )
        raise ValueError(msg)
    return key_pool


def resolve_key_pools(
    key_pool: int | Sequence[int], strides: Sequence[int], input_size: Sequence[int]
) -> tuple[int, ...]:
    """Key pooling per teacher scale: an int pools the shallowest scale only, a sequence gives every scale's."""
    if isinstance(key_pool, int) or not isinstance(key_pool, Sequence):
        pools = [key_pool] + [1] * (len(strides) - 1)
    else:
        pools = list(key_pool)
        if len(pools) != len(strides):
            msg = (
                f"global_map_key_pool as a sequence needs one value per teacher scale ({len(strides)}, shallow to "
                f"deep), got {tuple(key_pool)}."
            )
            raise ValueError(msg)
    return tuple(resolve_key_pool(pool, stride, input_size) for pool, stride in zip(pools, strides, strict=True))


def describe_key_pools(pools: Sequence[int]) -> str:
    """``k`` when only the shallowest scale is pooled (the int form of the option), else the per-scale tuple."""
    pools = [int(v) if int(v) else 1 for v in pools]  # statistics_scales holds 0 for unscored scales
    if all(v == 1 for v in pools[1:]):
        return str(pools[0])
    return str(tuple(pools))


def resolve_map_scales(scales: Sequence[int] | None, count: int) -> tuple[int, ...]:
    """Validated, sorted scale indices (``None`` = all ``count`` scales)."""
    if scales is None:
        return tuple(range(count))
    resolved = tuple(sorted({int(index) for index in scales}))
    if not resolved or resolved[0] < 0 or resolved[-1] >= count or len(resolved) != len(tuple(scales)):
        msg = (
            f"global_map_scales must be distinct indices into the teacher's {count} layers (0 = shallowest, "
            f"{count - 1} = deepest), at least one, got {tuple(scales)}."
        )
        raise ValueError(msg)
    return resolved


def warn_if_uncalibrated(model: DskdModel, stage: str) -> None:
    """Warn when Eq. 8's statistics were never computed (maps are then added unstandardised)."""
    if not model.is_calibrated:
        warnings.warn(
            f"Dskd {stage}: the per-student map statistics (Eq. 8) have not been computed - run a validation "
            "epoch (Engine.fit / Engine.validate) or Dskd.compute_statistics(dataloader) first. Using mean 0, std 1.",
            UserWarning,
            stacklevel=3,
        )
