"""Lightning module of ARD: reverse distillation with attention in the one-class embedding (``Ard``).

"Attention One-Class Embedding in Reverse Distillation for Anomaly Detection" (ARD). Only the
supplementary is public: it compares SE, ECA and CBAM attention, reports MVTec AD, DAGM
(image AUROC 95.0 vs RD 90.4; pixel AUROC / PRO 96.2 / 94.7 vs 94.7 / 89.4) and one-class
CIFAR-10 / MNIST, and trains with Adam, lr 0.001, batch 16, 200 epochs. ARD builds on reverse
distillation (Deng & Li, CVPR 2022): a frozen teacher, a one-class bottleneck embedding (OCBE)
and a student decoder; ARD puts attention inside the OCBE. Where the attention goes is not
public, so ``Ard`` offers both plausible places (fused features, residual blocks) and both
together; the defaults were chosen by measurement (``docs/models/ard.md``).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_dskd import Ard
    >>> model = Ard(backbone="mobilenetv2_100", pre_trained="mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    >>> Engine(max_epochs=10).fit(model, datamodule=...)  # doctest: +SKIP

CLI: ``anomalib train --model Ard --model.attention_type cbam --data MVTecAD ...``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_dskd.components.int8 import F32_ELEMENTWISE_OPS, Int8Export
from anomalib_dskd.components.rd.core import require_input_size
from anomalib_dskd.components.rd.module import ReverseDistillationDefaults
from anomalib_dskd.registration import register_class
from anomalib_dskd.weights import normalize_pre_trained

from .loss import ArdLoss
from .torch_model import DEFAULT_ATTENTION_POSITION, DEFAULT_ATTENTION_TYPE, ArdModel


class Ard(ReverseDistillationDefaults, Int8Export, AnomalibModule):
    """Reverse distillation with an attention one-class embedding (ARD).

    Args:
        backbone: timm CNN teacher. Defaults to RD's ``"wide_resnet50_2"``; tested also with
            ``"resnet18"`` and ``"mobilenetv2_100"``.
        layers: teacher stage indices (timm ``out_indices``). Defaults to ``(1, 2, 3)``.
        pre_trained: ``True`` downloads ImageNet weights from the timm hub; ``False`` keeps a
            random teacher (smoke tests only); a path loads a local checkpoint (timm,
            torchvision or efficientnet-lite-pytorch layout; see ``docs/weights.md``).
        attention_type: ``"se"`` (squeeze-and-excitation), ``"eca"`` (efficient channel
            attention) or ``"cbam"`` (channel + spatial attention); timm's implementations.
            Defaults to ``"cbam"`` (measured, ``docs/models/ard.md``).
        attention_position: ``"fused"`` (on the fused multi-scale features before the embedding
            stage), ``"blocks"`` (inside each residual block of the embedding stage, before the
            addition, SE-ResNet style) or ``"both"``. Defaults to ``"both"``.
        loss_mode: cosine loss form, ``"flatten"`` (official RD code and anomalib) or ``"pixel"``
            (RD Eq. 2).
        sigma: Gaussian smoothing of the anomaly map. Defaults to ``4``.
        lr: Adam learning rate. Defaults to ``0.001`` (ARD supplementary, for 200 epochs); for short
            schedules ``0.005`` (RD's) measured better (``docs/models/ard.md``).
        betas: Adam betas. Defaults to ``(0.5, 0.999)`` (RD's official code; ARD does not say).
        pre_processor: pre-processor or flag for the default (resize 256x256 + ImageNet norm).
        post_processor: post-processor or flag for the default (:meth:`configure_post_processor`).
        evaluator: evaluator or flag for the default.
        visualizer: visualizer or flag for the default.

    Raises:
        AttentionConfigError: unknown ``attention_type`` or ``attention_position`` (a
            ``ValueError`` listing the valid values).
        InputSizeError: the pre-processor's size is not a multiple of 32 (for stride-16 features).
        TeacherBackboneError: unknown or non-CNN backbone.
        TeacherWeightsError: a local checkpoint that does not fit the backbone.
    """

    int8_scoring_tail_types = F32_ELEMENTWISE_OPS  # INT8: the scoring arithmetic stays f32 (components.int8)

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str = True,
        attention_type: str = DEFAULT_ATTENTION_TYPE,
        attention_position: str = DEFAULT_ATTENTION_POSITION,
        loss_mode: str = "flatten",
        sigma: float = 4.0,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.5, 0.999),
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        # Validate the attention settings before anything heavy is built.
        from anomalib_dskd.components.rd.attention import check_attention_position, check_attention_type

        attention_type = check_attention_type(attention_type)
        attention_position = check_attention_position(attention_position)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        input_size = self.input_size
        self.model = ArdModel(
            backbone=backbone,
            layers=layers,
            pre_trained=normalize_pre_trained(pre_trained),
            input_size=require_input_size(input_size, "Ard"),
            sigma=sigma,
            attention_type=attention_type,
            attention_position=attention_position,
        )
        self.loss = ArdLoss(loss_mode)
        self.lr = lr
        self.betas = tuple(betas)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the attention embedding and the decoder (the teacher is frozen)."""
        core = self.model.core
        params = [*core.bottleneck.parameters(), *core.decoder.parameters()]
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Distil the teacher's features into the student."""
        del args, kwargs
        loss = self.loss(*self.model(batch.image))
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, logger=True, batch_size=len(batch.image))
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict anomaly maps and scores for the validation batch."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def configure_post_processor(self) -> PostProcessor:
        """Min-max normalisation and F1-adaptive thresholds, pixel threshold also used for images.

        RD-style maps (sums of cosine distances) have no natural scale, so scores are
        normalised with the validation minimum / maximum around the F1-optimal threshold
        (sensitivity 0.5), as anomalib does for RD. Note: the normalised values are clamped to
        ``[0, 1]``, so compute AUROC / AU-PRO with a validation set that contains anomalies
        (anomalib's default ``same_as_test``) or on the raw :class:`ArdModel` outputs.
        """
        return PostProcessor(
            enable_normalization=True,
            enable_thresholding=True,
            enable_threshold_matching=True,
            image_sensitivity=0.5,
            pixel_sensitivity=0.5,
        )


register_class(Ard)
