"""Lightning module of Glance (``Glance``).

Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly Localization with Global and Local Feature
Comparison", CVPR 2021 (and its supplementary material, cited as "suppl."). Each 33x33 patch is
described twice: by Local-Net from its own pixels, and by Global-Net from the rest of the image (the
patch masked out, partial convolutions). A patch whose content the surroundings do not predict is
anomalous even when it looks normal in isolation (a swapped cable, a misplaced part).

Training runs the paper's two stages inside one Lightning fit, by iteration count:

1. iterations ``[0, local_steps)``: Local-Net (+ linear decoder) distilled from a frozen ImageNet CNN
   teacher on patches of the category's training images (and optionally of a folder of generic
   images), loss ``lambda_k L_k + lambda_c L_c``;
2. iterations ``[local_steps, local_steps + global_steps)``: Global-Net and the DAD head with Local-Net
   frozen, loss ``L_IAD + lambda_t L_DAD``, negatives made by painting random stains on the patch.

The trainer's ``max_steps`` is set to ``local_steps + global_steps`` and ``max_epochs`` to ``-1``
(the stage lengths decide how long training lasts; a ``max_epochs`` given to the Engine is
overridden, and anomalib logs the override). Validation runs once, after the last iteration.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_dskd import Glance
    >>> model = Glance(backbone="mobilenetv2_100", pre_trained="mobilenet_v2-b0353104.pth",
    ...                local_steps=400, global_steps=400)  # doctest: +SKIP
    >>> Engine().fit(model, datamodule=MVTecAD(category="cable"))  # doctest: +SKIP

CLI: ``anomalib train --model Glance --config configs/model/glance.yaml --data MVTecAD ...``
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_dskd.registration import register_class
from anomalib_dskd.weights import normalize_pre_trained

from .components import GlanceConfigError, GlanceInputSizeError
from .loss import GlanceLoss
from .torch_model import GlanceModel

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class Glance(AnomalibModule):
    """Glancing at the Patch (Wang et al., CVPR 2021): local vs. global features of every patch.

    Args:
        backbone: timm CNN that teaches Local-Net. Defaults to the paper's ``"resnet18"``; the package
            is measured with ``"mobilenetv2_100"`` (the ImageNet weights available offline).
        pre_trained: ``True`` downloads ImageNet weights from the timm hub; ``False`` keeps a random
            teacher (smoke tests only); a path loads a local checkpoint (timm / torchvision / lukemelas
            layout, see ``docs/weights.md``).
        teacher_input_size: Side the 33x33 patch is resized to before the teacher. Defaults to ``64``.
        feature_dim: Dimension of the local and global features. Defaults to ``128`` (suppl. Tables 1-2).
        local_steps: Iterations of stage 1 (Local-Net). Defaults to ``50000`` (suppl. C.1: 50K).
        global_steps: Iterations of stage 2 (Global-Net + DAD). Defaults to ``200000`` (suppl. C.1: 200K).
        local_batch_size: Patches per stage-1 iteration. Defaults to ``16`` (suppl. C.1, fine-tuning).
        global_batch_size: (image, patch) pairs per stage-2 iteration. Defaults to ``64`` (suppl. C.1).
        lr_local: Adam learning rate of Local-Net and its decoder. Defaults to ``2e-4`` (suppl. C.1).
        lr_global: Adam learning rate of Global-Net. Defaults to ``1e-4`` (suppl. C.1).
        lr_dad: Adam learning rate of the DAD head. Defaults to ``1e-5`` (suppl. C.1).
        betas: Adam betas. Defaults to ``(0.9, 0.999)`` (suppl. C.1).
        lambda_k: Weight of the distillation loss. Defaults to ``1`` (suppl. C.1).
        lambda_c: Weight of the compactness loss. Defaults to ``1`` (suppl. C.1).
        lambda_t: Weight of the DAD loss. Defaults to ``0.01`` (suppl. C.1).
        lambda_s: Weight of ``s_IAD`` in the patch score. Defaults to ``0.8`` (suppl. C.1).
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
        fast_inference: Windowed Global-Net / dense Local-Net grid inference (same results as the
            per-patch path, much faster). Defaults to ``True``.
        pre_processor: Pre-processor or flag for the default (resize 256x256 + ImageNet norm).
        post_processor: Post-processor or flag for the default.
        evaluator: Evaluator or flag for the default.
        visualizer: Visualizer or flag for the default.

    Raises:
        GlanceInputSizeError: The pre-processor's size is not one Global-Net reduces to 1x1 (243..274).
        PatchGridError: The grid has more patches per side than distinct positions.
        TeacherBackboneError: Unknown or unsuitable teacher backbone.
        TeacherWeightsError: A local checkpoint that does not fit the backbone.
        GlanceConfigError: Negative stage lengths or loss weights, batch sizes < 2, bad stain sizes.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pre_trained: bool | str = True,
        teacher_input_size: int = 64,
        feature_dim: int = 128,
        local_steps: int = 50000,
        global_steps: int = 200000,
        local_batch_size: int = 16,
        global_batch_size: int = 64,
        lr_local: float = 2e-4,
        lr_global: float = 1e-4,
        lr_dad: float = 1e-5,
        betas: Sequence[float] = (0.9, 0.999),
        lambda_k: float = 1.0,
        lambda_c: float = 1.0,
        lambda_t: float = 0.01,
        lambda_s: float = 0.8,
        patches_per_side: int = 20,
        grid_align: int = 2,
        idw_power: float = 5.0,
        stain_size: Sequence[float] = (4.0, 16.0),
        max_stains: int = 3,
        generic_image_dir: str | None = None,
        generic_fraction: float = 0.5,
        generic_max_images: int = 200,
        teacher_stats_patches: int = 1024,
        fast_inference: bool = True,
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
        _check_non_negative(local_steps=local_steps, global_steps=global_steps, lambda_k=lambda_k,
                            lambda_c=lambda_c, lambda_t=lambda_t, lr_local=lr_local, lr_global=lr_global,
                            lr_dad=lr_dad)
        if int(local_steps) + int(global_steps) < 1:
            msg = "local_steps + global_steps must be at least 1"
            raise GlanceConfigError(msg)
        if int(local_batch_size) < 2 or int(global_batch_size) < 1:
            msg = (f"local_batch_size must be >= 2 (the compactness loss needs a batch) and global_batch_size >= 1, "
                   f"got {local_batch_size}, {global_batch_size}")
            raise GlanceConfigError(msg)
        if not 0.0 <= float(generic_fraction) < 1.0:
            msg = f"generic_fraction must be in [0, 1), got {generic_fraction}"
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
            idw_power=idw_power,
            stain_size=stain_size,
            max_stains=max_stains,
            fast_inference=fast_inference,
        )
        self.loss = GlanceLoss(lambda_k, lambda_c, lambda_t)
        self.local_steps = int(local_steps)
        self.global_steps = int(global_steps)
        self.local_batch_size = int(local_batch_size)
        self.global_batch_size = int(global_batch_size)
        self.lr_local, self.lr_global, self.lr_dad = float(lr_local), float(lr_global), float(lr_dad)
        self.betas = (float(betas[0]), float(betas[1]))
        self.generic_image_dir = generic_image_dir
        self.generic_fraction = float(generic_fraction)
        self.generic_max_images = int(generic_max_images)
        self.teacher_stats_patches = int(teacher_stats_patches)
        self._generic_images: torch.Tensor | None = None
        self._logged_stage = 0

    # ------------------------------------------------------------------ schedule
    @property
    def total_steps(self) -> int:
        """``local_steps + global_steps``: the trainer's ``max_steps``."""
        return self.local_steps + self.global_steps

    def stage(self, step: int | None = None) -> int:
        """Training stage (1: Local-Net, 2: Global-Net + DAD) of iteration ``step`` (default: now)."""
        step = self.global_step if step is None else step
        return 1 if step < self.local_steps else 2

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
        """Training length in iterations; validation once, after the last iteration."""
        return {
            "max_steps": self.total_steps,
            "max_epochs": -1,
            "check_val_every_n_epoch": None,
            "val_check_interval": self.total_steps,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 0,
        }

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

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
    def _log_stage(self, stage: int) -> None:
        if stage != self._logged_stage:
            if stage == 1:
                logger.info("Glance: stage 1 (Local-Net distillation) for iterations 0..%d", self.local_steps - 1)
            else:
                logger.info(
                    "Glance: stage 2 (Global-Net + DAD head, Local-Net frozen) starts at iteration %d, runs to %d",
                    self.global_step, self.total_steps - 1)
            self._logged_stage = stage

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One iteration of the current stage."""
        del args, kwargs
        stage = self.stage()
        self._log_stage(stage)
        self.log("train/stage", float(stage), on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        images = batch.image
        if stage == 1:
            losses = self.local_stage_losses(images)
        else:
            losses = self.global_stage_losses(images)
        for name, value in losses.items():
            self.log(f"train/{name}" if name != "loss" else "train_loss", value.detach(), on_step=True,
                     on_epoch=False, prog_bar=name == "loss", logger=True, batch_size=len(images))
        return {"loss": losses["loss"]}

    def local_stage_losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage-1 losses on ``local_batch_size`` random patches of ``images`` (pre-processed, ``(B, 3, H, W)``).

        The first call also standardises the teacher features (``teacher_stats_patches`` patches).
        """
        model = self.model
        if not bool(model.teacher.initialized):
            with torch.no_grad():
                stats = self._sample_patches(images, max(self.teacher_stats_patches, 2))
                model.teacher.set_statistics(
                    torch.cat([model.teacher.raw_features(chunk) for chunk in stats.split(256)]))
            logger.info("Glance: teacher features standardised with %d patches", len(stats))
        patches = self._sample_patches(images, self.local_batch_size)
        target = model.teacher(patches)
        features = model.local_net(patches)
        return self.loss.local(model.decoder(features), target, features)

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
        """Warn when training stopped before the end of stage 2 (e.g. a ``max_steps`` override)."""
        self._generic_images = None
        if self.global_step < self.total_steps:
            logger.warning(
                "Glance: training stopped at iteration %d of %d (stage %d): the model is not fully trained",
                self.global_step, self.total_steps, self.stage())

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores of the validation batch."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())


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
