"""Lightning module of Glance (``Glance``).

Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly Localization with Global and Local Feature
Comparison", CVPR 2021 (and its supplementary material, cited as "suppl."). Each 33x33 patch is
described twice: by Local-Net from its own pixels, and by Global-Net from the rest of the image (the
patch masked out, partial convolutions). A patch whose content the surroundings do not predict is
anomalous even when it looks normal in isolation (a swapped cable, a misplaced part).

Training runs the paper's two stages inside one Lightning fit, by iteration count:

1. **stage 1/2, Local-Net distillation**: Local-Net (+ linear decoder) distilled from a frozen ImageNet
   CNN teacher on patches of the category's training images (and optionally of a folder of generic
   images), loss ``lambda_k L_k + lambda_c(t) L_c`` (``lambda_c`` warmed up, see ``lambda_c_warmup``);
2. **stage 2/2, Global-Net + DAD**: Global-Net and the DAD head with Local-Net frozen, loss
   ``L_IAD + lambda_t L_DAD``, negatives made by painting random stains on the patch.

Training length follows the trainer by default: the Engine's / CLI's ``max_steps`` or ``max_epochs``
budget is the total number of iterations (``trainer.estimated_stepping_batches``), of which stage 1
takes ``local_fraction``. Giving ``local_steps`` and ``global_steps`` instead fixes the schedule (the
paper's is 50,000 + 200,000, ``configs/model/glance_paper.yaml``): the model then sets the trainer's
``max_steps`` to their sum and ``max_epochs`` to ``-1``, and says so when training starts. Validation
runs once, after the last iteration (the model is complete only after stage 2). Each stage is announced
in the log and on the progress bar (``stage 1/2: Local-Net distillation``, ``stage 2/2: Global-Net + DAD``).

Stage 1 is checked: a fixed held-out set of patches, drawn at the first iteration and never trained
on, measures Local-Net's distillation loss as a fraction of the zero-predictor baseline (logged as
``train/local_distillation_fraction``, kept in ``model.local_distillation_fraction``); stage 2 starts
with a warning when it is above ``distillation_warn_fraction``. After training, the mean / std of
both patch-score heads over normal training patches are stored in buffers (exported with the model)
and put ``s_IAD`` and ``1 - P_match`` on one scale before ``lambda_s`` mixes them (``score_mode``).

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_dskd import Glance
    >>> model = Glance(backbone="mobilenetv2_100", pre_trained="mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    >>> Engine(max_steps=900).fit(model, datamodule=MVTecAD(category="cable"))  # doctest: +SKIP

CLI: ``anomalib train --model Glance --config configs/model/glance.yaml --data MVTecAD ...``
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_dskd.components.int8 import F32_ELEMENTWISE_OPS, Int8Export
from anomalib_dskd.components.loaders import trainer_loaders
from anomalib_dskd.registration import register_class
from anomalib_dskd.weights import normalize_pre_trained

from .components import TEACHER_FEATURE_LAYERS, GlanceConfigError, GlanceInputSizeError
from .loss import GlanceLoss, knowledge_distillation_loss
from .torch_model import SCORE_MODES, GlanceModel

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

#: values of ``score_normalisation``
SCORE_NORMALISATIONS = ("position", "global")
#: names of the two stages, as logged and shown on the progress bar
STAGE_NAMES = {1: "stage 1/2: Local-Net distillation", 2: "stage 2/2: Global-Net + DAD"}


class Glance(Int8Export, AnomalibModule):
    """Glancing at the Patch (Wang et al., CVPR 2021): local vs. global features of every patch.

    Args:
        backbone: timm CNN that teaches Local-Net. Defaults to the paper's ``"resnet18"``; the package
            is measured with ``"mobilenetv2_100"`` (the ImageNet weights available offline).
        pre_trained: ``True`` downloads ImageNet weights from the timm hub; ``False`` keeps a random
            teacher (smoke tests only); a path loads a local checkpoint (timm / torchvision / lukemelas
            layout, see ``docs/weights.md``).
        teacher_input_size: Side the 33x33 patch is resized to before the teacher. Defaults to ``64``.
        teacher_features: Which pooled teacher feature Local-Net distils: ``"stage"``, the global average
            of the teacher's last feature stage (512-d for the paper's ResNet-18, 320-d for MobileNetV2), or
            ``"head"``, the classifier's pre-logits feature (the same for ResNet-18; for MobileNetV2 the
            1280-d output of its 1x1 expansion head, whose best rank-128 linear reconstruction leaves 33 %
            of the held-out variance on tire, against 6 % for the stage feature: Local-Net's 128-d feature
            cannot distil it). Defaults to ``"stage"``.
        standardise_local_input: Standardise Local-Net's input per colour channel with the mean / std of
            the pixels of the teacher-statistics patches (first iteration; persistent buffers, exported).
            On a dark product (tire: ImageNet-normalised mean -1.8, std 0.22) Local-Net's features
            otherwise start ~100x smaller than the teacher's targets need and distillation stalls
            (measured in ``docs/models/glance.md``, Stage 1). Defaults to ``True``.
        teacher_std_floor: Floor of the teacher-feature standardisation, relative to the median channel
            std: ``std_c = max(std_c, teacher_std_floor * median(std))``. Channels that are almost
            constant on the statistics patches otherwise give targets of hundreds of standard deviations
            on other patches (measured on tire: ``max |z|`` 452, ``||z||^2`` up to 220,000 against a
            median of 345) and the distillation loss spikes. ``0`` is plain standardisation
            (Uninformed Students). Defaults to ``0.1``.
        feature_dim: Dimension of the local and global features. Defaults to ``128`` (suppl. Tables 1-2).
        local_steps: Fixed number of stage-1 iterations (the paper: 50,000, suppl. C.1). ``None``
            (default): ``local_fraction`` of the trainer's budget. With ``global_steps`` also ``None``
            the trainer's ``max_steps`` / ``max_epochs`` decide the training length.
        global_steps: Fixed number of stage-2 iterations (the paper: 200,000). ``None`` (default): the
            rest of the trainer's budget. Giving both fixes the schedule and overrides the trainer's
            ``max_steps`` / ``max_epochs`` (announced at the start of training).
        local_fraction: Share of the trainer's budget given to stage 1 when ``local_steps`` is
            ``None``. Defaults to ``0.3`` (the paper's 50K of 250K is 0.2; the CPU budgets here need
            more to distil, see ``docs/models/glance.md``).
        local_batch_size: Patches per stage-1 iteration. Defaults to ``16`` (suppl. C.1, fine-tuning).
        global_batch_size: (image, patch) pairs per stage-2 iteration. Defaults to ``64`` (suppl. C.1).
        lr_local: Adam learning rate of Local-Net and its decoder. Defaults to ``2e-4`` (suppl. C.1).
        lr_global: Adam learning rate of Global-Net. Defaults to ``1e-4`` (suppl. C.1).
        lr_dad: Adam learning rate of the DAD head. Defaults to ``1e-5`` (suppl. C.1).
        betas: Adam betas. Defaults to ``(0.9, 0.999)`` (suppl. C.1).
        lambda_k: Weight of the distillation loss. Defaults to ``1`` (suppl. C.1).
        lambda_c: Weight of the compactness loss once warmed up. Defaults to ``1`` (suppl. C.1).
        lambda_c_warmup: ``(start, end)`` fractions of stage 1: the compactness weight is 0 before
            ``start``, rises linearly to ``lambda_c`` at ``end`` and stays there. ``L_c`` is a
            correlation, scale invariant, so its gradient grows as ``1 / std`` of Local-Net's features,
            which start tiny (median channel std 0.013): at full weight from step 0 its gradient is ~455x
            that of ``L_k`` and Adam's updates follow it, so distillation stalls (measured, see
            ``docs/models/glance.md``). ``(0, 0)`` is the paper's constant weight. Defaults to
            ``(0.25, 0.5)``.
        lambda_t: Weight of the DAD loss. Defaults to ``0.01`` (suppl. C.1).
        lambda_s: Weight of the IAD term in the mixed patch score. Defaults to ``0.8`` (suppl. C.1).
        score_mode: Patch score: ``"mixed"`` (``lambda_s * z_IAD + (1 - lambda_s) * z_DAD``, the paper's
            combination on standardised terms), ``"iad"`` or ``"dad"`` (one head alone, the ablation).
            Inference only: the same trained weights serve all three. Defaults to ``"mixed"``.
        score_normalisation: How the score statistics (mean / std of ``s_IAD`` and ``1 - P_match`` over
            normal training images, computed after training, before validation) are taken: ``"position"``
            (default), per grid position, or ``"global"``, over all positions. Some positions are poorly
            predicted in every image (measured on a generated category: a patch half outside the image
            had ``s_IAD`` ~500 against a mean of ~38 in all 35 images and was every image's maximum, image
            AUROC 0.30); per position such a patch is only anomalous when it is worse than usual (image
            AUROC 0.95 on the same weights). ``"global"`` suits unaligned images with few training images.
        score_statistics_images: Most normal training images whose grid patches give the score
            statistics. Defaults to ``64``.
        patches_per_side: Inference grid side. Defaults to ``20`` (400 patches, suppl. C.1).
        grid_align: ``2`` rounds grid corners to even pixels (<= 1 pixel from the uniform grid), which
            lets Local-Net share its first layers across patches; ``1`` rounds to the nearest pixel.
            Defaults to ``2``.
        idw_power: Power of the inverse-distance weighting. Defaults to ``5`` (suppl. C.1).
        stain_size: ``(min, max)`` size in pixels of the stains painted on DAD negatives. Defaults to
            ``(4, 16)``.
        max_stains: Maximum stains per negative patch. Defaults to ``3``.
        generic_image_dir: Optional folder of generic images (searched recursively) mixed into the
            stage-1 patches, standing in for the paper's ImageNet distillation. Defaults to ``None``.
        generic_fraction: Share of stage-1 patches taken from ``generic_image_dir``. Defaults to ``0.5``.
        generic_max_images: Most generic images kept in memory. Defaults to ``200``.
        teacher_stats_patches: Patches used once, at the first iteration, for the teacher feature
            standardisation. Defaults to ``1024``.
        heldout_patches: Size of the fixed held-out patch set (drawn at the first iteration from that
            batch's images - and the generic folder, if any - at random positions, never trained on)
            on which the distillation fraction is measured. Defaults to ``256``.
        heldout_every: Measure the held-out fraction every this many stage-1 iterations (and always at
            the end of stage 1). ``0`` (default): ten times per stage 1.
        distillation_warn_fraction: Warn when stage 2 starts with a held-out distillation loss above
            this fraction of the zero-predictor baseline (Local-Net then explains less than half of the
            teacher's feature variance, and Global-Net learns to predict a poor descriptor). Defaults to
            ``0.5``.
        fast_inference: Windowed Global-Net / dense Local-Net grid inference (same results as the
            per-patch path, much faster). Defaults to ``True``.
        standardise_decoder_input: Standardise Local-Net's features per channel before the stage-1
            decoder (``BatchNorm1d`` without affine; training loss only, not used at inference).
            Defaults to ``False`` (Uninformed Students' plain linear decoder); see
            ``docs/models/glance.md``, Stage 1.
        pre_processor: Pre-processor or flag for the default (resize 256x256 + ImageNet norm).
        post_processor: Post-processor or flag for the default.
        evaluator: Evaluator or flag for the default.
        visualizer: Visualizer or flag for the default.

    Raises:
        GlanceInputSizeError: The pre-processor's size is not one Global-Net reduces to 1x1 (243..274).
        PatchGridError: The grid has more patches per side than distinct positions.
        TeacherBackboneError: Unknown or unsuitable teacher backbone.
        TeacherWeightsError: A local checkpoint that does not fit the backbone.
        GlanceConfigError: An unknown ``teacher_features``, negative stage lengths or loss weights, ``global_steps`` without
            ``local_steps``, fractions outside their range, batch sizes < 2, bad stain sizes or score mode;
            at the start of training, a trainer without a finite budget (no ``max_steps`` / ``max_epochs``)
            while the schedule follows the trainer.
    """

    #: INT8 (``anomalib export --compression_type INT8_PTQ``, and the benchmarks' ``quantize_int8``) quantises
    #: Local-Net and Global-Net and keeps f32: every ``MatMul`` (the separable IDW fusion's constant products, which
    #: the map-smoothing rule does not recognise, and the DAD head), the scoring tail's elementwise arithmetic (the
    #: IAD distance of two networks' features, the standardisation), and the convolutions OpenVINO's
    #: low-precision transformations cannot compile with that tail f32 (``batch_splitting_convolutions``: the last
    #: layer of each network); and, chosen without labels by map fidelity on held-out training images, the
    #: convolutions just before those (``convolutions_before_batch_splitting``) and each network's first layer
    #: (``first_convolutions``). Measured: ``docs/benchmarks/edge/README.md``, rounds 5 and 6.
    int8_ignored_types: tuple[str, ...] = ("MatMul",)
    int8_scoring_tail_types: tuple[str, ...] = F32_ELEMENTWISE_OPS
    int8_f32_rules: tuple[str, ...] = (
        "batch_splitting_convolutions",
        "convolutions_before_batch_splitting",
        "first_convolutions",
    )

    def __init__(
        self,
        backbone: str = "resnet18",
        pre_trained: bool | str = True,
        teacher_input_size: int = 64,
        teacher_features: str = "stage",
        standardise_local_input: bool = True,
        teacher_std_floor: float = 0.1,
        feature_dim: int = 128,
        local_steps: int | None = None,
        global_steps: int | None = None,
        local_fraction: float = 0.3,
        local_batch_size: int = 16,
        global_batch_size: int = 64,
        lr_local: float = 2e-4,
        lr_global: float = 1e-4,
        lr_dad: float = 1e-5,
        betas: Sequence[float] = (0.9, 0.999),
        lambda_k: float = 1.0,
        lambda_c: float = 1.0,
        lambda_c_warmup: Sequence[float] = (0.25, 0.5),
        lambda_t: float = 0.01,
        lambda_s: float = 0.8,
        score_mode: str = "mixed",
        score_normalisation: str = "position",
        score_statistics_images: int = 64,
        patches_per_side: int = 20,
        grid_align: int = 2,
        idw_power: float = 5.0,
        stain_size: Sequence[float] = (4.0, 16.0),
        max_stains: int = 3,
        generic_image_dir: str | None = None,
        generic_fraction: float = 0.5,
        generic_max_images: int = 200,
        teacher_stats_patches: int = 1024,
        heldout_patches: int = 256,
        heldout_every: int = 0,
        distillation_warn_fraction: float = 0.5,
        fast_inference: bool = True,
        standardise_decoder_input: bool = False,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        _check_non_negative(lambda_k=lambda_k, lambda_c=lambda_c, lambda_t=lambda_t, lr_local=lr_local,
                            lr_global=lr_global, lr_dad=lr_dad, teacher_std_floor=teacher_std_floor,
                            heldout_every=heldout_every,
                            **{k: v for k, v in {"local_steps": local_steps, "global_steps": global_steps}.items()
                               if v is not None})
        if global_steps is not None and local_steps is None:
            msg = ("global_steps needs local_steps: give both for a fixed schedule, only local_steps for a fixed "
                   "stage 1 and the rest of the trainer's budget for stage 2, or neither (local_fraction of the "
                   "trainer's budget)")
            raise GlanceConfigError(msg)
        if local_steps is not None and global_steps is not None and int(local_steps) + int(global_steps) < 1:
            msg = "local_steps + global_steps must be at least 1"
            raise GlanceConfigError(msg)
        if not 0.0 < float(local_fraction) < 1.0:
            msg = f"local_fraction must be in (0, 1), got {local_fraction}"
            raise GlanceConfigError(msg)
        warmup = tuple(float(v) for v in lambda_c_warmup)
        if len(warmup) != 2 or not 0.0 <= warmup[0] <= warmup[1] <= 1.0:
            msg = f"lambda_c_warmup must be (start, end) with 0 <= start <= end <= 1, got {tuple(lambda_c_warmup)!r}"
            raise GlanceConfigError(msg)
        if int(local_batch_size) < 2 or int(global_batch_size) < 1:
            msg = (f"local_batch_size must be >= 2 (the compactness loss needs a batch) and global_batch_size >= 1, "
                   f"got {local_batch_size}, {global_batch_size}")
            raise GlanceConfigError(msg)
        if int(heldout_patches) < 2 or int(score_statistics_images) < 1:
            msg = (f"heldout_patches must be >= 2 and score_statistics_images >= 1, got {heldout_patches}, "
                   f"{score_statistics_images}")
            raise GlanceConfigError(msg)
        if not float(distillation_warn_fraction) > 0:
            msg = f"distillation_warn_fraction must be > 0, got {distillation_warn_fraction}"
            raise GlanceConfigError(msg)
        if not 0.0 <= float(generic_fraction) < 1.0:
            msg = f"generic_fraction must be in [0, 1), got {generic_fraction}"
            raise GlanceConfigError(msg)
        if score_mode not in SCORE_MODES:
            msg = f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}"
            raise GlanceConfigError(msg)
        if teacher_features not in TEACHER_FEATURE_LAYERS:
            msg = f"teacher_features must be one of {TEACHER_FEATURE_LAYERS}, got {teacher_features!r}"
            raise GlanceConfigError(msg)
        if score_normalisation not in SCORE_NORMALISATIONS:
            msg = f"score_normalisation must be one of {SCORE_NORMALISATIONS}, got {score_normalisation!r}"
            raise GlanceConfigError(msg)
        if generic_image_dir is not None and not Path(generic_image_dir).expanduser().is_dir():
            msg = f"generic_image_dir {generic_image_dir!r} is not a folder"
            raise GlanceConfigError(msg)
        input_size = self.input_size
        if input_size is None:
            msg = "Glance needs a fixed input size: give the pre-processor a Resize transform (256x256)."
            raise GlanceInputSizeError(msg)
        self.model = GlanceModel(
            backbone=backbone,
            pre_trained=normalize_pre_trained(pre_trained),
            input_size=input_size,
            patches_per_side=patches_per_side,
            grid_align=grid_align,
            feature_dim=feature_dim,
            teacher_input_size=teacher_input_size,
            lambda_s=lambda_s,
            score_mode=score_mode,
            idw_power=idw_power,
            stain_size=stain_size,
            max_stains=max_stains,
            fast_inference=fast_inference,
            standardise_decoder_input=standardise_decoder_input,
            teacher_features=teacher_features,
        )
        self.standardise_local_input = bool(standardise_local_input)
        self.loss = GlanceLoss(lambda_k, lambda_c, lambda_t)
        self.teacher_std_floor = float(teacher_std_floor)
        self.fixed_local_steps = None if local_steps is None else int(local_steps)
        self.fixed_global_steps = None if global_steps is None else int(global_steps)
        self.local_fraction = float(local_fraction)
        self.lambda_c_warmup = warmup
        self.local_batch_size = int(local_batch_size)
        self.global_batch_size = int(global_batch_size)
        self.lr_local, self.lr_global, self.lr_dad = float(lr_local), float(lr_global), float(lr_dad)
        self.betas = (float(betas[0]), float(betas[1]))
        self.score_statistics_images = int(score_statistics_images)
        self.score_normalisation = score_normalisation
        self.generic_image_dir = generic_image_dir
        self.generic_fraction = float(generic_fraction)
        self.generic_max_images = int(generic_max_images)
        self.teacher_stats_patches = int(teacher_stats_patches)
        self.heldout_patches = int(heldout_patches)
        self.heldout_every = int(heldout_every)
        self.distillation_warn_fraction = float(distillation_warn_fraction)
        self._generic_images: torch.Tensor | None = None
        self._heldout: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stage1_checked = False
        self._logged_stage = 0
        self._score_statistics_step: int | None = None
        # resolved schedule: known now when fixed, at the start of training when it follows the trainer
        self.local_steps: int | None = None
        self.global_steps: int | None = None
        if self.fixed_local_steps is not None and self.fixed_global_steps is not None:
            self.set_schedule(self.fixed_local_steps + self.fixed_global_steps)

    # ------------------------------------------------------------------ schedule
    @property
    def follows_trainer(self) -> bool:
        """Whether the training length comes from the trainer (not both stage lengths fixed)."""
        return self.fixed_local_steps is None or self.fixed_global_steps is None

    @property
    def total_steps(self) -> int | None:
        """``local_steps + global_steps`` once the schedule is known (``None`` before)."""
        if self.local_steps is None or self.global_steps is None:
            return None
        return self.local_steps + self.global_steps

    def set_schedule(self, total_steps: int) -> tuple[int, int]:
        """Split a budget of ``total_steps`` iterations into ``(local_steps, global_steps)`` and store it.

        Fixed stage lengths are kept as given (then ``total_steps`` is ignored); a fixed ``local_steps``
        alone leaves the rest of the budget to stage 2; otherwise stage 1 gets ``local_fraction`` of it
        (at least one iteration, and at least one left for stage 2 when the budget has two).
        """
        total = int(total_steps)
        if not self.follows_trainer:
            self.local_steps, self.global_steps = self.fixed_local_steps, self.fixed_global_steps
        elif self.fixed_local_steps is not None:
            self.local_steps = min(self.fixed_local_steps, total)
            self.global_steps = total - self.local_steps
        else:
            local = min(max(round(self.local_fraction * total), 1), max(total - 1, 1))
            self.local_steps, self.global_steps = local, max(total - local, 0)
        return self.local_steps, self.global_steps

    def stage(self, step: int | None = None) -> int:
        """Training stage (1: Local-Net, 2: Global-Net + DAD) of iteration ``step`` (default: now)."""
        step = self.global_step if step is None else step
        if self.local_steps is None:
            msg = "Glance's schedule is not set yet: it is resolved at the start of training (or call set_schedule)."
            raise RuntimeError(msg)
        return 1 if step < self.local_steps else 2

    def lambda_c_at(self, step: int) -> float:
        """Compactness weight at stage-1 iteration ``step`` (``lambda_c_warmup``)."""
        start, end = self.lambda_c_warmup
        local = max(self.local_steps or 1, 1)
        fraction = step / local
        if fraction >= end:
            ramp = 1.0
        elif fraction < start:
            ramp = 0.0
        else:
            ramp = (fraction - start) / (end - start)
        return self.loss.lambda_c * ramp

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam with three parameter groups (suppl. C.1 learning rates).

        Only the active stage's parameters receive gradients, and Adam skips parameters without a
        gradient, so each stage updates only its own networks (and ``global_step`` counts iterations).
        """
        model = self.model
        return torch.optim.Adam(
            [
                {"params": [*model.local_net.parameters(), *model.decoder.parameters()], "lr": self.lr_local,
                 "name": "local"},
                {"params": list(model.global_net.parameters()), "lr": self.lr_global, "name": "global"},
                {"params": list(model.dad.parameters()), "lr": self.lr_dad, "name": "dad"},
            ],
            betas=self.betas,
        )

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation, no clipping; a fixed schedule also sets the training length.

        With both ``local_steps`` and ``global_steps`` given, ``max_steps`` is their sum, ``max_epochs``
        ``-1`` and validation runs once, after the last iteration. Otherwise the trainer's own
        ``max_steps`` / ``max_epochs`` are kept (and validation is moved to the end in
        :meth:`on_train_start`).
        """
        arguments: dict[str, Any] = {"num_sanity_val_steps": 0, "gradient_clip_val": 0}
        if not self.follows_trainer:
            total = self.fixed_local_steps + self.fixed_global_steps
            arguments.update({"max_steps": total, "max_epochs": -1, "check_val_every_n_epoch": None,
                              "val_check_interval": total})
        return arguments

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    def on_train_start(self) -> None:
        """Resolve the schedule from the trainer's budget, validate once at the end, announce both."""
        trainer = self.trainer
        if self.follows_trainer:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(float(total)) or int(total) < 1:
                msg = ("Glance follows the trainer's training length, but the trainer has no finite budget "
                       f"(estimated_stepping_batches={total}): set max_steps or max_epochs on the Engine / trainer, "
                       "or give Glance local_steps and global_steps.")
                raise GlanceConfigError(msg)
            local, global_ = self.set_schedule(int(total))
            source = "local_steps" if self.fixed_local_steps is not None else f"local_fraction={self.local_fraction:g}"
            logger.info(
                "Glance schedule: the trainer's budget of %d iterations (max_steps=%s, max_epochs=%s) -> "
                "%s: iterations 0..%d, %s: iterations %d..%d (%s; give local_steps and global_steps for a fixed "
                "schedule such as the paper's 50000 + 200000).",
                local + global_, trainer.max_steps, trainer.max_epochs, STAGE_NAMES[1], local - 1, STAGE_NAMES[2],
                local, local + global_ - 1, source)
            if global_ < 1:
                rank_zero_warn(f"Glance: the trainer's budget ({int(total)} iteration) leaves no iteration for "
                               "stage 2 (Global-Net + DAD): the model will not detect anything. Train longer.")
            self._validate_once_at_the_end(local + global_)
        else:
            logger.info(
                "Glance schedule: fixed local_steps=%d + global_steps=%d = %d iterations; this replaces the trainer's "
                "max_steps / max_epochs (set local_steps and global_steps to null to follow the trainer's budget, "
                "split by local_fraction).", self.local_steps, self.global_steps, self.total_steps)
        self._logged_stage = 0

    def _validate_once_at_the_end(self, total: int) -> None:
        """Move validation to the end of training (before it, the model is incomplete and uncalibrated)."""
        trainer = self.trainer
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if trainer.max_steps is not None and 0 < trainer.max_steps <= total:
            trainer.check_val_every_n_epoch = None
            trainer.val_check_batch = total * max(int(trainer.accumulate_grad_batches), 1)
        elif max_epochs > 0:
            trainer.check_val_every_n_epoch = max_epochs
        else:
            return
        logger.info("Glance: validation runs once, after the last iteration (iteration %d).", total)

    # ------------------------------------------------------------------ data
    def _load_generic_images(self) -> torch.Tensor | None:
        if self.generic_image_dir is None:
            return None
        if self._generic_images is None:
            self._generic_images = load_image_folder(
                self.generic_image_dir, self.model.input_size, self.generic_max_images, self.pre_processor)
            logger.info("Glance: %d generic images from %s for Local-Net distillation",
                        len(self._generic_images), self.generic_image_dir)
        return self._generic_images

    def _sample_patches(self, images: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` random 33x33 patches of ``images``, part of them from the generic folder if set."""
        generic = self._load_generic_images()
        n_generic = round(n * self.generic_fraction) if generic is not None and len(generic) else 0
        pools = [(images, n - n_generic)] + ([(generic.to(images), n_generic)] if n_generic else [])
        patches = []
        for pool, count in pools:
            index = torch.randint(len(pool), (count,))
            patches.append(self.model.crop(pool, index, self.model.random_corners(count)))
        return torch.cat(patches)

    # ------------------------------------------------------------------ steps
    def _announce_stage(self, stage: int, step: int) -> None:
        if stage == self._logged_stage:
            return
        if stage == 1:
            logger.info("Glance %s: iterations %d..%d", STAGE_NAMES[1], step, self.local_steps - 1)
        else:
            logger.info("Glance %s (Local-Net frozen): iterations %d..%d", STAGE_NAMES[2], step, self.total_steps - 1)
        self._logged_stage = stage
        self._describe_progress()

    def _describe_progress(self) -> None:
        """Name the stage on the training progress bar (TQDM), after the epoch."""
        trainer = self._trainer
        bar = getattr(getattr(trainer, "progress_bar_callback", None), "train_progress_bar", None)
        if bar is None or not hasattr(bar, "set_description") or not self._logged_stage:
            return
        description = f"Epoch {trainer.current_epoch} | {STAGE_NAMES[self._logged_stage]}"
        if getattr(bar, "desc", None) != description:
            bar.set_description(description)

    def on_train_epoch_start(self) -> None:
        """Keep the stage on the progress bar (TQDM resets its description every epoch)."""
        self._describe_progress()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One iteration of the current stage."""
        del args, kwargs
        images = batch.image
        losses = self.stage_losses(images)
        stage = self.stage()
        self.log("train/stage", float(stage), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        for name, value in losses.items():
            key = "train_loss" if name == "loss" else f"train/{name}"
            self.log(key, value.detach() if isinstance(value, torch.Tensor) else float(value), on_step=True,
                     on_epoch=False, prog_bar=name in {"loss", "local_distillation_fraction"}, logger=True,
                     batch_size=len(images))
        return {"loss": losses["loss"]}

    def stage_losses(self, images: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        """Losses of iteration ``step`` (default: ``global_step``) with the stage bookkeeping.

        Announces each stage, measures the held-out distillation fraction in stage 1 (every
        ``heldout_every`` iterations: the ``"local_distillation_fraction"`` entry) and, at the first
        stage-2 iteration, measures it once more and warns when it is above ``distillation_warn_fraction``.
        ``training_step`` and the benchmark loop both call this.
        """
        step = self.global_step if step is None else int(step)
        stage = self.stage(step)
        self._announce_stage(stage, step)
        if stage == 1:
            losses = self.local_stage_losses(images, step)
            every = self.heldout_every or max(self.local_steps // 10, 1)
            if step % every == 0 or step == self.local_steps - 1:
                losses["local_distillation_fraction"] = torch.tensor(self.measure_local_distillation())
            return losses
        extra: dict[str, torch.Tensor] = {}
        if not self._stage1_checked:
            extra["local_distillation_fraction"] = torch.tensor(self.finish_local_stage(images, step))
        return {**self.global_stage_losses(images), **extra}

    def _init_teacher_and_heldout(self, images: torch.Tensor) -> None:
        """Teacher standardisation (first call) and the fixed held-out patches (first call of this run)."""
        model = self.model
        if not bool(model.teacher.initialized):
            with torch.no_grad():
                stats = self._sample_patches(images, max(self.teacher_stats_patches, 2))
                model.teacher.set_statistics(
                    torch.cat([model.teacher.raw_features(chunk) for chunk in stats.split(256)]),
                    std_floor=self.teacher_std_floor)
                if self.standardise_local_input:
                    model.local_net.set_input_statistics(stats)
            logger.info("Glance: teacher features%s standardised with %d patches",
                        " and Local-Net's input" if self.standardise_local_input else "", len(stats))
        if self._heldout is None:
            with torch.no_grad():
                patches = self._sample_patches(images, self.heldout_patches)
                targets = torch.cat([model.teacher(chunk) for chunk in patches.split(256)])
            self._heldout = (patches, targets)

    @torch.no_grad()
    def measure_local_distillation(self) -> float:
        """Held-out ``L_k`` over the zero-predictor baseline (``mean ||target||^2``), stored and returned.

        The baseline is the loss of predicting 0 for the standardised targets (about the teacher's
        feature dimension); 1 means Local-Net explains nothing of the teacher, 0 a perfect copy.
        Returns NaN before the held-out set exists (no stage-1 iteration yet).
        """
        if self._heldout is None:
            return math.nan
        patches, targets = self._heldout
        model = self.model
        was_training = model.decoder.training
        model.decoder.eval()  # a standardising decoder uses its running (training) statistics, not the held-out set's
        try:
            decoded = torch.cat([model.decoder(model.local_net(chunk)) for chunk in patches.split(256)])
        finally:
            model.decoder.train(was_training)
        baseline = float(targets.square().sum(dim=-1).mean())
        fraction = float(knowledge_distillation_loss(decoded, targets)) / max(baseline, 1e-12)
        model.local_distillation_fraction.fill_(fraction)
        return fraction

    def finish_local_stage(self, images: torch.Tensor | None = None, step: int | None = None) -> float:
        """Final held-out fraction of stage 1; warns (once) when it is above ``distillation_warn_fraction``."""
        self._stage1_checked = True
        if images is not None:
            self._init_teacher_and_heldout(images)
        fraction = self.measure_local_distillation()
        if math.isnan(fraction):
            fraction = float(self.model.local_distillation_fraction)  # e.g. resumed in stage 2
        if step is None:
            step = self.global_step if self._trainer is not None else (self.local_steps or 0)
        logger.info("Glance: end of stage 1 at iteration %d: held-out distillation loss %.3f of the zero-predictor "
                    "baseline", step, fraction)
        if not math.isnan(fraction) and fraction > self.distillation_warn_fraction:
            rank_zero_warn(
                f"Glance: Local-Net is not distilled - at the end of stage 1 (iteration {step}) its held-out "
                f"distillation loss is {fraction:.2f} of the zero-predictor baseline (> distillation_warn_fraction="
                f"{self.distillation_warn_fraction:g}). Stage 2 now trains Global-Net to predict these features, and "
                "the anomaly scores will be unreliable. Give stage 1 more iterations (a larger max_steps / max_epochs, "
                "local_fraction or local_steps) or a larger lr_local, and check the teacher weights (pre_trained).")
        return fraction

    @property
    def local_distillation_fraction(self) -> float:
        """Held-out distillation loss over the zero-predictor baseline at the last measurement (NaN: never)."""
        return float(self.model.local_distillation_fraction)

    def local_stage_losses(self, images: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """Stage-1 losses on ``local_batch_size`` random patches of ``images`` (pre-processed, ``(B, 3, H, W)``).

        The first call also standardises the teacher features (``teacher_stats_patches`` patches) and
        draws the held-out patches. ``step`` sets the compactness weight (``lambda_c_warmup``).
        """
        model = self.model
        self._init_teacher_and_heldout(images)
        patches = self._sample_patches(images, self.local_batch_size)
        target = model.teacher(patches)
        features = model.local_net(patches)
        lambda_c = self.lambda_c_at(step) if self.local_steps is not None else self.loss.lambda_c
        losses = self.loss.local(model.decoder(features), target, features, lambda_c=lambda_c)
        losses["lambda_c"] = torch.tensor(lambda_c)
        return losses

    def global_stage_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage-2 losses on ``global_batch_size`` random (image, patch) pairs drawn from ``images``."""
        model = self.model
        n = self.global_batch_size
        index = torch.randint(len(images), (n,))
        corners = model.random_corners(n)
        patches = model.crop(images, index, corners)
        negatives, _ = model.stains(patches)
        with torch.no_grad():
            local = model.local_net(torch.cat([patches, negatives]))
        local_pos, local_neg = local[:n], local[n:]
        global_features = model.global_net(images[index], model.masks_for(corners).to(images))
        logits_pos = model.dad(global_features, local_pos)
        logits_neg = model.dad(global_features, local_neg)
        return self.loss.global_(global_features, local_pos, logits_pos, logits_neg)

    def on_train_end(self) -> None:
        """Check stage 1 if stage 2 never ran, calibrate the scores, warn when training stopped early."""
        self._generic_images = None
        if not self._stage1_checked and self._heldout is not None:
            self.finish_local_stage()
        if self._score_statistics_step != self.global_step:
            self.update_score_statistics()
        self._heldout = None
        total = self.total_steps
        if total is not None and self.global_step < total:
            logger.warning(
                "Glance: training stopped at iteration %d of %d (stage %d): the model is not fully trained",
                self.global_step, total, self.stage())

    # ------------------------------------------------------------------ score statistics
    def on_validation_epoch_start(self) -> None:
        """Compute the score statistics from the final weights before validation scores anything.

        Within ``fit`` they are recomputed whenever the weights changed since; a standalone
        ``validate`` / ``test`` keeps the ones in the checkpoint.
        """
        trainer = self.trainer
        if trainer.sanity_checking:
            return
        fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
        if self.model.has_score_statistics and (not fitting or self._score_statistics_step == self.global_step):
            return
        self.update_score_statistics()

    def on_test_start(self) -> None:
        """Warn when the scores are not standardised."""
        _warn_if_uncalibrated(self.model, "test")

    def on_predict_start(self) -> None:
        """Warn when the scores are not standardised."""
        _warn_if_uncalibrated(self.model, "predict")

    def update_score_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Score statistics from the trainer's training data (up to ``score_statistics_images`` normal images)."""
        loaders = self._train_loaders()
        if not loaders:
            rank_zero_warn("Glance: no training data to compute the score statistics from; they stay unchanged.")
            return None
        return self.compute_score_statistics(loaders)

    @torch.no_grad()
    def compute_score_statistics(self, data: torch.Tensor | Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean / std of ``s_IAD`` and ``1 - P_match`` over the grid patches of normal images; stored in buffers.

        Per grid position or over all positions (``score_normalisation``). Per position, each std is
        kept at or above 1 % of the median over positions (a position that is constant on the normal
        images would otherwise turn any change into an enormous score).

        Args:
            data: Pre-processed normal images ``(N, 3, H, W)``, or an iterable (data loaders, lists) of
                anomalib batches (pre-processed here with this model's pre-processor; only
                ``gt_label == 0`` images count) or of image tensors (all normal, already pre-processed).
                At most ``score_statistics_images`` images are used.

        Returns:
            ``(mean, std)``, each ``(2, P)``: ``[IAD, DAD]`` x grid position (equal columns when global).

        Raises:
            ValueError: No normal image found.
        """
        sources = [data] if isinstance(data, torch.Tensor) else list(data)
        n_patches = self.model.n_patches
        # images, then per head and position: sum, sum of squares
        totals = torch.zeros(1 + 2 * 2 * n_patches, dtype=torch.float64, device=self.device)
        sums = totals[1:].view(2, 2, n_patches)
        remaining = self.score_statistics_images
        was_training = self.model.training
        self.model.eval()
        try:
            for images in self._normal_image_chunks(sources):
                images = images[:remaining]
                for chunk in images.split(self.model.inference_chunk):
                    for index, values in enumerate(self.model.head_scores(chunk.to(self.device))):
                        values = values.to(torch.float64)
                        sums[index, 0] += values.sum(dim=0)
                        sums[index, 1] += values.square().sum(dim=0)
                totals[0] += len(images)
                remaining -= len(images)
                if remaining <= 0:
                    break
        finally:
            self.model.train(was_training)
        totals = self._sum_across_processes(totals)
        images_seen = float(totals[0])
        if images_seen == 0:
            msg = "Glance score statistics: no normal image was found."
            raise ValueError(msg)
        sums = totals[1:].view(2, 2, n_patches)
        if self.score_normalisation == "global":
            count = images_seen * n_patches
            mean = (sums[:, 0].sum(dim=1) / count)[:, None].expand(2, n_patches)
            square = (sums[:, 1].sum(dim=1) / count)[:, None].expand(2, n_patches)
        else:
            mean, square = sums[:, 0] / images_seen, sums[:, 1] / images_seen
        std = (square - mean.square()).clamp_min(0).sqrt()
        typical = torch.maximum(std.median(dim=1, keepdim=True).values, 0.1 * std.mean(dim=1, keepdim=True))
        floor = (0.01 * typical).clamp_min(1e-12)
        if bool((std.amax(dim=1) <= 1e-12).any()):
            rank_zero_warn(f"Glance score statistics: a head is constant over the normal patches (max std "
                           f"{std.amax(dim=1).tolist()}); its std is set to 1.")
            floor = torch.where(std.amax(dim=1, keepdim=True) <= 1e-12, torch.ones_like(floor), floor)
        std = torch.maximum(std, floor)
        self.model.set_score_statistics(mean, std, images_seen * n_patches)
        self._score_statistics_step = self.global_step
        logger.info("Glance score statistics (%s) from %d normal images x %d patches: s_IAD mean %.4g std %.4g, "
                    "1 - P_match mean %.4g std %.4g (medians over positions)", self.score_normalisation,
                    int(images_seen), n_patches, float(mean[0].median()), float(std[0].median()),
                    float(mean[1].median()), float(std[1].median()))
        return mean.clone(), std

    def _normal_image_chunks(self, sources: list) -> Iterable[torch.Tensor]:
        for source in sources:
            if isinstance(source, torch.Tensor):
                yield source
                continue
            for batch in source:
                if isinstance(batch, torch.Tensor):
                    yield batch
                    continue
                images = batch.image.to(self.device)
                labels = getattr(batch, "gt_label", None)
                if labels is not None:
                    images = images[torch.as_tensor(labels).reshape(-1).to(self.device) == 0]
                transform = getattr(self.pre_processor, "transform", None) if self.pre_processor else None
                if transform is not None and len(images):
                    images = transform(images)
                if len(images):
                    yield images

    def _train_loaders(self) -> list:
        return trainer_loaders(self, "train")

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return tensor
        return self.all_gather(tensor).sum(dim=0)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores of the validation batch."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())


def _warn_if_uncalibrated(model: GlanceModel, stage: str) -> None:
    if not model.has_score_statistics and model.score_mode == "mixed":
        rank_zero_warn(
            f"Glance {stage}: the score statistics have not been computed (a checkpoint from before they existed, or "
            "no training run): the mixed score is the raw lambda_s * s_IAD + (1 - lambda_s) * (1 - P_match), dominated "
            "by s_IAD. Compute them with Engine.fit, or Glance.compute_score_statistics(normal_images).")


def load_image_folder(
    folder: str | Path,
    size: tuple[int, int],
    max_images: int,
    pre_processor: PreProcessor | None = None,
) -> torch.Tensor:
    """Images of a folder (recursive, sorted), resized and normalised like the training images.

    Args:
        folder: Folder to read.
        size: ``(H, W)``.
        max_images: Most images read (evenly spread over the sorted list).
        pre_processor: Its transform is applied; ImageNet normalisation + resize if ``None``.

    Returns:
        ``(N, 3, H, W)`` float tensor.

    Raises:
        GlanceConfigError: No readable image in the folder.
    """
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF  # noqa: N812

    files = sorted(p for p in Path(folder).expanduser().rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        msg = f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {folder}"
        raise GlanceConfigError(msg)
    if len(files) > max_images:
        step = len(files) / max_images
        files = [files[int(i * step)] for i in range(max_images)]
    images = []
    for file in files:
        with Image.open(file) as image:
            tensor = TF.to_dtype(TF.to_image(image.convert("RGB")), torch.float32, scale=True)
        tensor = TF.resize(tensor, list(size), antialias=True)
        images.append(tensor)
    batch = torch.stack(images)
    transform = getattr(pre_processor, "transform", None)
    if transform is not None:
        return transform(batch)
    return TF.normalize(batch, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _check_non_negative(**values: float) -> None:
    bad = {name: value for name, value in values.items() if float(value) < 0}
    if bad:
        msg = f"these Glance settings must be >= 0: {bad}"
        raise GlanceConfigError(msg)


register_class(Glance)
