"""Lightning module of DSKD, dual-student knowledge distillation with contextual affinity (``Dskd``).

Zhang, Suganuma, Okatani, "Contextual Affinity Distillation for Image Anomaly Detection", WACV 2024.

A frozen ImageNet teacher, a *local* student (reverse distillation, trained with the per-pixel
cosine loss) and a *global* student (its own one-class embedding, the Global Context Condensing
Block and a decoder, trained with the contextual affinity loss). Each student's anomaly map is
standardised with its mean and standard deviation over normal images, the two are added and
smoothed, and the image score is the maximum (Eq. 8). See ``docs/models/dskd.md``.

Example:
    >>> from anomalib.data import MVTecLOCO
    >>> from anomalib.engine import Engine
    >>> from anomalib_dskd import Dskd
    >>> model = Dskd(backbone="mobilenetv2_100", pre_trained="mobilenet_v2-b0353104.pth", gccb_channels=256)  # doctest: +SKIP
    >>> engine = Engine(max_epochs=10)  # doctest: +SKIP
    >>> engine.fit(model, datamodule=MVTecLOCO(root="datasets/MVTec_LOCO", category="juice_bottle"))  # doctest: +SKIP

CLI: ``anomalib train --model Dskd --model.backbone resnet18 --data anomalib.data.MVTecLOCO ...``
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from anomalib_dskd.components.int8 import F32_ELEMENTWISE_OPS, Int8Export
from anomalib_dskd.components.loaders import trainer_loaders
from anomalib_dskd.components.rd.core import require_input_size
from anomalib_dskd.components.rd.module import ReverseDistillationDefaults
from anomalib_dskd.registration import register_class
from anomalib_dskd.weights import normalize_pre_trained

from .anomaly_map import AFFINITY, PIXEL, map_kind_of
from .loss import DskdLoss
from .statistics import StreamingMoments
from .torch_model import STUDENTS, DskdModel, warn_if_uncalibrated
from .visualizer import DskdVisualizer

logger = logging.getLogger(__name__)

#: values of ``statistics_source``
STATISTICS_SOURCES = ("validation", "train")


class Dskd(ReverseDistillationDefaults, Int8Export, AnomalibModule):
    """DSKD: a local and a global student distilled from one frozen teacher, fused by Eq. 8.

    Args:
        backbone: timm CNN teacher. Defaults to the paper's ``"wide_resnet50_2"``; tested also
            with ``"resnet18"`` and ``"mobilenetv2_100"``.
        layers: teacher stage indices (timm ``out_indices``). Defaults to ``(1, 2, 3)``.
        pre_trained: ``True`` downloads ImageNet weights from the timm hub; ``False`` keeps a
            random teacher (smoke tests only); a path loads a local checkpoint (see ``docs/weights.md``).
        gccb_channels: width ``g`` of the Global Context Condensing Block. Defaults to ``1024``
            (paper). The GCCB holds about ``2 g^2 h w`` weights (h x w = embedding size, 8x8 at 256 px).
        local_loss: ``"pixel"`` (default, Eq. 1-2), ``"affinity"`` (Eq. 3-7) or ``"flatten"`` (RD's loss:
            the cosine of each image's whole flattened feature maps, as ``Rd`` and anomalib's
            ``ReverseDistillation`` train; not in the DSKD paper, measured in ``docs/models/dskd.md``) for the
            local student. The student's anomaly map follows its loss (cosine distance for ``"pixel"`` and
            ``"flatten"``, affinity KL for ``"affinity"``).
        global_loss: ``"affinity"`` (default), ``"pixel"`` or ``"flatten"`` for the global student.
        temperature: affinity temperature ``T``. Defaults to ``1``.
        affinity_chunk_size: query positions per affinity chunk (memory ``O(B * chunk * N)``);
            ``None`` computes the ``N x N`` affinities at once. Defaults to ``512``.
        students: ``"both"`` (default, DSKD), ``"local"`` or ``"global"`` (one student alone, Table 4).
        global_map_scales: indices into ``layers`` (0 = shallowest) of the scales summed into the
            global student's anomaly map; ``None`` (default, paper) = all. ``[1, 2]`` skips the
            shallowest scale's ``N^2`` affinity map at inference (faster, see ``docs/models/dskd.md``
            for the measured cost and accuracy); training always uses every scale. The Eq. 8
            statistics belong to one choice: after changing it on a trained model, recompute them.
        global_map_key_pool: ``1`` (default, paper: exact Eq. 6) or ``k``: the global student's
            shallowest-scale map uses keys pooled over ``k x k`` cells (queries at full resolution;
            ``k^2`` times fewer exponentials; inference only, the loss stays exact). An approximation,
            with its error bound and measured accuracy and latency in ``docs/models/dskd.md``. Like
            ``global_map_scales``, the Eq. 8 statistics belong to one choice. A list gives one pooling
            per teacher scale, shallow to deep (e.g. ``[4, 2, 1]``).
        global_embedding: the global student's OCBE_glo: ``"teacher_stage"`` (default, paper Fig. 3:
            the teacher's next stage, e.g. ResNet ``layer4``, trainable, on the deepest teacher
            feature alone) or ``"fused"`` (a copy of the local student's multi-scale fused OCBE).
            Measured against each other in ``docs/models/dskd.md``.
        global_embedding_init: ``"teacher"`` (default: that stage starts from the teacher's
            weights) or ``"random"``.
        statistics_source: where Eq. 8's mean / std come from. ``"validation"`` (default, paper):
            the normal images (``gt_label == 0``) of the validation set, recomputed at the start of
            every validation epoch, falling back to the training set when there is no validation
            set or it has no normal image; ``"train"``: always the training images.
        sigma: Gaussian smoothing of the final map. Defaults to ``4`` (RD).
        lr: Adam learning rate. Defaults to ``0.005``.
        betas: Adam betas. Defaults to ``(0.5, 0.999)``.
        pre_processor: pre-processor or flag for the default (resize 256x256 + ImageNet norm).
        post_processor: post-processor or flag for anomalib's default (normalisation, thresholds).
        evaluator: evaluator or flag for the default.
        visualizer: visualizer or flag for the default :class:`DskdVisualizer` (image, local,
            global and final maps side by side).

    Raises:
        InputSizeError: the pre-processor's size is not a multiple of twice the teacher's
            deepest stride (32 for the default layers).
        TeacherBackboneError: unknown or non-CNN backbone.
        TeacherWeightsError: a local checkpoint that does not fit the backbone.
    """

    #: INT8 (``INT8_PTQ``): the affinity / standardisation / fusion arithmetic stays f32 (0.1 image AUROC
    #: otherwise); the networks' own elementwise ops are quantised (``anomalib_dskd.components.int8``).
    int8_scoring_tail_types = F32_ELEMENTWISE_OPS

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str = True,
        gccb_channels: int = 1024,
        local_loss: str = PIXEL,
        global_loss: str = AFFINITY,
        temperature: float = 1.0,
        affinity_chunk_size: int | None = 512,
        students: str = "both",
        global_map_scales: Sequence[int] | None = None,
        global_map_key_pool: int | Sequence[int] = 1,
        global_embedding: str = "teacher_stage",
        global_embedding_init: str = "teacher",
        statistics_source: str = "validation",
        sigma: float = 4.0,
        lr: float = 0.005,
        betas: tuple[float, float] = (0.5, 0.999),
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
        if statistics_source not in STATISTICS_SOURCES:
            msg = f"statistics_source must be one of {STATISTICS_SOURCES}, got {statistics_source!r}."
            raise ValueError(msg)
        if students not in STUDENTS:
            msg = f"students must be one of {sorted(STUDENTS)}, got {students!r}."
            raise ValueError(msg)
        input_size = self.input_size
        self.model = DskdModel(
            backbone=backbone,
            layers=layers,
            pre_trained=normalize_pre_trained(pre_trained),
            input_size=require_input_size(input_size, "Dskd", "its GCCB kernel is the embedding size"),
            gccb_channels=gccb_channels,
            local_map=map_kind_of(local_loss),
            global_map=map_kind_of(global_loss),
            temperature=temperature,
            chunk_size=affinity_chunk_size,
            sigma=sigma,
            students=students,
            global_map_scales=global_map_scales,
            global_map_key_pool=global_map_key_pool,
            global_embedding=global_embedding,
            global_embedding_init=global_embedding_init,
        )
        active = STUDENTS[students]
        self.loss = DskdLoss(
            local_loss if "local" in active else None,
            global_loss if "global" in active else None,
            temperature,
            affinity_chunk_size,
        )
        self.statistics_source = statistics_source
        self.lr = lr
        self.betas = tuple(betas)
        self._statistics_step: int | None = None

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam over both students (their losses share no parameter, so this is the same as
        two optimisers stepping on the same batches: 'trained together')."""
        return torch.optim.Adam(self.model.student_parameters(), lr=self.lr, betas=self.betas)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Distil the teacher into both students; log the total and each student's loss."""
        del args, kwargs
        teacher, local, glob = self.model(batch.image)
        loss, parts = self.loss(teacher, local, glob)
        size = len(batch.image)
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, logger=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train_loss_{name}", value.detach(), on_epoch=True, logger=True, batch_size=size)
        return {"loss": loss}

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Eq. 8 maps and scores (with the statistics just computed from the validation set)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        """Predictions plus the per-student maps (``anomaly_map_local`` / ``anomaly_map_global``)."""
        del args, kwargs, batch_idx
        return self._predict_with_student_maps(batch)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        """Predictions plus the per-student maps (``anomaly_map_local`` / ``anomaly_map_global``)."""
        del batch_idx, dataloader_idx
        return self._predict_with_student_maps(batch)

    def _predict_with_student_maps(self, batch: Batch) -> Batch:
        predictions, parts = self.model.predict_with_student_maps(batch.image)
        batch = batch.update(**predictions._asdict())
        # Smoothed, standardised map of each student (z units); they add up to the raw final map.
        for name, value in parts.items():
            setattr(batch, f"anomaly_map_{name}", value)
        return batch

    def on_test_start(self) -> None:
        warn_if_uncalibrated(self.model, "test")

    def on_predict_start(self) -> None:
        warn_if_uncalibrated(self.model, "predict")

    # ------------------------------------------------------------------ Eq. 8 statistics
    def on_validation_epoch_start(self) -> None:
        """Recompute the statistics from the normal validation images before they are scored,
        so that validation outputs, anomalib's thresholds and the checkpoint all use them."""
        if self.trainer.sanity_checking:
            return
        self.update_statistics()

    def on_train_epoch_end(self) -> None:
        """Without a validation run after the last epoch, calibrate before the last checkpoint."""
        if self._is_last_epoch() and self._statistics_step != self.global_step:
            self.update_statistics()

    def on_train_end(self) -> None:
        """Last resort (e.g. early stopping on the training loss): calibrate the final weights."""
        if self._statistics_step != self.global_step:
            self.update_statistics()

    def _is_last_epoch(self) -> bool:
        trainer = self.trainer
        if trainer.should_stop:
            return True
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
            return True
        return trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps

    def update_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Compute Eq. 8's statistics from the trainer's data (all processes together) and store them.

        Source: the normal validation images, else the training images (see ``statistics_source``).
        Each process scores its own disjoint share of the images (indices ``rank::world_size``, no
        padding duplicates) and the float64 sums are added across processes.
        """
        self._buffers_from_rank_zero()
        candidates: list[tuple[str, list[DataLoader]]] = []
        if self.statistics_source == "validation":
            candidates.append(("validation", self._loaders("val")))
        candidates.append(("training", self._loaders("train")))
        for name, loaders in candidates:
            if not loaders:
                continue
            moments = self._moments(self._shard(loader) for loader in loaders)
            moments.reduce(self._sum_across_processes)
            if bool((moments.count > 0).all()):
                mean, std = moments.compute()
                self.model.set_statistics(mean, std, moments.images)
                self._statistics_step = self.global_step
                logger.info(
                    "Dskd map statistics from %d normal %s images: mean %s, std %s",
                    int(moments.images), name, mean.tolist(), std.tolist(),
                )
                return mean, std
            logger.info("Dskd: no normal %s image for the map statistics.", name)
        rank_zero_warn("Dskd: found no normal image to compute the map statistics (Eq. 8); they stay unchanged.")
        return None

    def compute_statistics(self, dataloader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute and store Eq. 8's statistics from ``dataloader`` in this process.

        Batches may be anomalib batches (images are pre-processed with this model's
        pre-processor; only ``gt_label == 0`` images count) or plain image tensors (all normal,
        already pre-processed). Returns ``(mean, std)`` per student (float64).
        """
        moments = self._moments([dataloader])
        mean, std = moments.compute()
        self.model.set_statistics(mean, std, moments.images)
        return mean, std

    def _moments(self, loaders: Iterable[Iterable]) -> StreamingMoments:
        moments = StreamingMoments(len(self.model.students), device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for loader in loaders:
                    for batch in loader:
                        images = self._normal_images(batch)
                        if images is not None and len(images):
                            moments.update(self.model.student_maps(images))
        finally:
            self.model.train(was_training)
        return moments

    def _normal_images(self, batch: Any) -> torch.Tensor | None:  # noqa: ANN401
        """The pre-processed normal images (``gt_label == 0``) of a batch; plain tensors count as normal."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        images = batch.image.to(self.device)
        transform = getattr(self.pre_processor, "transform", None) if self.pre_processor is not None else None
        labels = getattr(batch, "gt_label", None)
        if labels is not None:
            images = images[torch.as_tensor(labels).reshape(-1).to(self.device) == 0]
        if transform is not None and len(images):
            images = transform(images)
        return images

    def _loaders(self, split: str) -> list[DataLoader]:
        return trainer_loaders(self, split)

    def _shard(self, loader: DataLoader) -> Iterable:
        """This process's share of ``loader``'s dataset, in order, without padding duplicates."""
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset = getattr(loader, "dataset", None)
        if not isinstance(dataset, Dataset) or isinstance(dataset, IterableDataset):
            if world > 1:
                rank_zero_warn("Dskd statistics: cannot shard an iterable dataset; every process scores all of it.")
            return loader
        indices = list(range(rank, len(dataset), world))
        return DataLoader(
            Subset(dataset, indices),
            batch_size=loader.batch_size or 1,
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
        )

    def _buffers_from_rank_zero(self) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics) before scoring.

        DDP keeps parameters equal across processes but not buffers: each process updates its
        students' BatchNorm running statistics on its own batches (DDP's ``broadcast_buffers``
        only re-syncs them at the next forward through the wrapper, and this pass calls the
        model directly). Without this, each process would score its images with a slightly
        different model; with it, all use the model that rank 0 checkpoints.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for buffer in self.model.buffers():
                dist.broadcast(buffer.data, src=0)

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return tensor
        gathered = self.all_gather(tensor)  # (world, ...) - summed in rank order, deterministic
        return gathered.sum(dim=0)

    # ------------------------------------------------------------------ anomalib plumbing
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild OCBE_glo as the checkpoint's design, then restore components and fit the input size.

        Checkpoints carry the OCBE_glo design they were trained with (those written before the
        option existed hold the fused design). The shared mixin then restores the pre-processor and
        fits the GCCB kernel to its input size before the weights load.
        """
        state = checkpoint.get("state_dict", {})
        if any(key.startswith("model.global_bottleneck.fuse.") for key in state):
            kind = "fused"
        elif any(key.startswith("model.global_bottleneck.stage.") for key in state):
            kind = "teacher_stage"
        else:
            kind = None
        if kind is not None and kind != self.model.global_embedding:
            logger.info("Dskd checkpoint: OCBE_glo is the %r design; rebuilding the global student to match.", kind)
            self.model.use_global_embedding(kind)
            self.hparams["global_embedding"] = kind
        super().on_load_checkpoint(checkpoint)

    @classmethod
    def configure_visualizer(cls) -> DskdVisualizer:
        """Image, ground truth, local / global / final maps side by side (paper Fig. 4)."""
        return DskdVisualizer()


register_class(Dskd)
