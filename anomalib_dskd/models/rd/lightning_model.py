"""Lightning module of plain reverse distillation over any timm CNN teacher (``Rd``).

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022.
anomalib's own ``ReverseDistillation`` only takes ResNet teachers; ``Rd`` takes any timm CNN
(ResNets give exactly anomalib's architecture), loads local teacher weights, and uses a
separable Gaussian blur. It is the baseline and the local student of Dskd.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_dskd import Rd
    >>> model = Rd(backbone="mobilenetv2_100", pre_trained="mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    >>> Engine(max_epochs=10).fit(model, datamodule=...)  # doctest: +SKIP

CLI: ``anomalib train --model Rd --model.backbone resnet18 --data MVTecAD ...``
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

from .loss import RdLoss
from .torch_model import RdModel


class Rd(ReverseDistillationDefaults, Int8Export, AnomalibModule):
    """Reverse distillation (RD) with a backbone-generic core.

    Args:
        backbone: timm CNN teacher. Defaults to the paper's ``"wide_resnet50_2"``; tested also
            with ``"resnet18"``, ``"mobilenetv2_100"`` and ``"efficientnet_lite0"``.
        layers: teacher stage indices (timm ``out_indices``). Defaults to ``(1, 2, 3)``
            (ResNet ``layer1``-``layer3``).
        pre_trained: ``True`` downloads ImageNet weights from the timm hub; ``False`` keeps a
            random teacher (smoke tests only); a path loads a local checkpoint (timm,
            torchvision or efficientnet-lite-pytorch layout; see ``docs/weights.md``).
        loss_mode: ``"flatten"`` (official RD code and anomalib) or ``"pixel"`` (RD Eq. 2).
        sigma: Gaussian smoothing of the anomaly map. Defaults to ``4``.
        lr: Adam learning rate. Defaults to ``0.005`` (RD).
        betas: Adam betas. Defaults to ``(0.5, 0.999)`` (RD's official code).
        pre_processor: pre-processor or flag for the default (resize 256x256 + ImageNet norm).
        post_processor: post-processor or flag for the default.
        evaluator: evaluator or flag for the default.
        visualizer: visualizer or flag for the default.

    Raises:
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
        loss_mode: str = "flatten",
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
        input_size = self.input_size
        self.model = RdModel(
            backbone=backbone,
            layers=layers,
            pre_trained=normalize_pre_trained(pre_trained),
            input_size=require_input_size(input_size, "Rd"),
            sigma=sigma,
        )
        self.loss = RdLoss(loss_mode)
        self.lr = lr
        self.betas = tuple(betas)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the embedding and the decoder (the teacher is frozen)."""
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


register_class(Rd)
