"""Lightning module of Packd: few-shot anomaly detection on unseen categories.

"Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang, Ma;
BMVC 2023). Reverse distillation (Deng & Li, CVPR 2022) trained on *other* categories, in groups of
one query and ``k`` normal support images of the query's category. A prototype extraction and
integration module (PEIM) summarises the supports' teacher features into ``M`` prototypes per level
and feeds them into the student decoder, so that at test time ``k`` normal images of a new category
are enough: no training, only one teacher pass over the supports.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_dskd import Packd
    >>> from anomalib_dskd.data.few_shot import FewShotDataModule
    >>> model = Packd(backbone="mobilenetv2_100", pre_trained="mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    >>> datamodule = FewShotDataModule(train_sources=[...], target={...}, k_shot=4)  # doctest: +SKIP
    >>> Engine(max_epochs=10).fit(model, datamodule=datamodule)  # doctest: +SKIP
    >>> model.set_support("new_product/good")  # k good images of a new category  # doctest: +SKIP

CLI: ``anomalib train --model Packd --data anomalib_dskd.data.few_shot.FewShotDataModule --data.k_shot 4 ...``
(see ``configs/model/packd.yaml`` and ``configs/data/few_shot_example.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_dskd.components.rd.core import require_input_size
from anomalib_dskd.components.rd.module import ReverseDistillationDefaults
from anomalib_dskd.registration import register_class
from anomalib_dskd.weights import normalize_pre_trained

from .loss import PackdLoss
from .torch_model import PackdModel, SupportError

SupportSource = str | Path | torch.Tensor | Sequence[str | Path | torch.Tensor]


class Packd(ReverseDistillationDefaults, AnomalibModule):
    """Prototype-aware contrastive knowledge distillation (PACKD) for few-shot anomaly detection.

    Trained by anomalib's ``Engine.fit`` like any one-class model (``learning_type`` is
    ``ONE_CLASS``: anomalib's Engine never trains ``FEW_SHOT`` models) on the groups of
    :class:`~anomalib_dskd.data.few_shot.FewShotDataModule`, which tells the model the group layout
    (:meth:`configure_few_shot`) and hands it the target's support draw before validation / test.

    Args:
        backbone: timm CNN teacher. Defaults to ``"wide_resnet50_2"`` (RD's teacher).
        layers: the three teacher stages distilled. Defaults to ``(1, 2, 3)``.
        pre_trained: ``True`` (timm hub), ``False`` (random, tests only) or a local checkpoint path.
        peim_levels: PEIM levels: ``1``-``3`` the distilled teacher stages, ``4`` the one-class
            embedding (prototypes from the teacher's next stage). Defaults to the paper's ``(2, 3, 4)``.
        num_prototypes: prototypes per level (``M``). Defaults to ``8``.
        attention_dim: dimension of prototypes and PEIM attention. Defaults to ``64``.
        loss_mode: RD cosine loss mode, ``"flatten"`` (as Rd) or ``"pixel"``.
        contrastive_weight: weight of the contrastive distillation loss. Defaults to ``0.1``.
        orthogonality_weight: weight of the prototype orthogonality loss. Defaults to ``0.1``.
        temperature: InfoNCE temperature. Defaults to ``0.1``.
        support_negatives: also use the supports' teacher features as contrastive negatives.
        support: optional folder / image of normal images of the category to predict on; loaded
            before validation / test / predict when no few-shot datamodule provides supports.
        sigma: Gaussian smoothing of the anomaly map. Defaults to ``4``.
        lr: Adam learning rate. Defaults to ``0.005`` (RD).
        betas: Adam betas. Defaults to ``(0.5, 0.999)`` (RD).
        pre_processor: pre-processor or flag for the default (resize 256x256 + ImageNet norm).
        post_processor: post-processor or flag for the default.
        evaluator: evaluator or flag for the default.
        visualizer: visualizer or flag for the default.

    Raises:
        InputSizeError: no fixed input size, or one that is not a multiple of twice the deepest stride.
        TeacherBackboneError: unknown or non-CNN backbone.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str = True,
        peim_levels: Sequence[int] = (2, 3, 4),
        num_prototypes: int = 8,
        attention_dim: int = 64,
        loss_mode: str = "flatten",
        contrastive_weight: float = 0.1,
        orthogonality_weight: float = 0.1,
        temperature: float = 0.1,
        support_negatives: bool = False,
        support: str | None = None,
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
        self.model = PackdModel(
            backbone=backbone,
            layers=layers,
            pre_trained=normalize_pre_trained(pre_trained),
            input_size=require_input_size(self.input_size, "Packd"),
            sigma=sigma,
            peim_levels=peim_levels,
            num_prototypes=num_prototypes,
            attention_dim=attention_dim,
        )
        self.loss = PackdLoss(loss_mode, contrastive_weight, orthogonality_weight, temperature, support_negatives)
        self.support = support
        self.lr = lr
        self.betas = tuple(betas)
        self.k_shot: int | None = None
        self.categories_per_batch: int = 1

    # ------------------------------------------------------------------ few-shot protocol
    def configure_few_shot(self, k_shot: int, categories_per_batch: int) -> None:
        """Set the layout of training batches (called by :class:`FewShotDataModule` at setup).

        A training batch holds ``G`` groups of ``1 + k_shot`` images, one group after the other,
        query first; group ``g`` belongs to category ``g % categories_per_batch`` of the batch, so
        groups whose indices differ modulo ``categories_per_batch`` are negatives of each other.
        """
        if int(k_shot) < 1 or int(categories_per_batch) < 1:
            msg = f"k_shot and categories_per_batch must be positive, got {k_shot}, {categories_per_batch}."
            raise ValueError(msg)
        self.k_shot = int(k_shot)
        self.categories_per_batch = int(categories_per_batch)

    def set_support(self, source: SupportSource, pre_processed: bool = False) -> list[torch.Tensor]:
        """Cache the prototypes of ``k`` normal images of the category to inspect (no training).

        Args:
            source: a folder of images, one image path, a list of paths, a ``(k, 3, H, W)`` tensor or a
                list of ``(3, H, W)`` tensors (RGB, values in ``[0, 1]``, any size unless ``pre_processed``).
            pre_processed: the tensors are already resized and normalised by the model's pre-processor.

        Returns:
            The cached ``(M, d)`` prototypes per PEIM level.

        Raises:
            SupportError: missing or empty folder, unreadable image, wrong tensor shape, or
                pre-processed images whose size is not the model's input size.
        """
        images = load_support_images(source)
        device = next(self.model.parameters()).device
        if pre_processed:
            batch = torch.stack(images) if len({tuple(image.shape) for image in images}) == 1 else None
            if batch is None:
                sizes = sorted({tuple(image.shape[-2:]) for image in images})
                msg = f"pre-processed support images must all have the model's input size {self.model.input_size}, got {sizes}."
                raise SupportError(msg)
        else:
            transform = self.pre_processor.transform if self.pre_processor else None
            batch = torch.cat([transform(image[None]) if transform else image[None] for image in images])
        return self.model.set_support(batch.to(device=device, dtype=torch.float32))

    def _prepare_support(self) -> None:
        """Before validation / test / predict: take the datamodule's support draw, else ``support``."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        provider = getattr(datamodule, "support_images", None)
        if callable(provider):
            self.set_support(provider())
        elif self.support and not self.model.has_support:
            self.set_support(self.support)

    def on_validation_start(self) -> None:
        """Recompute the prototypes of the support draw with the current PEIM."""
        self._prepare_support()

    def on_test_start(self) -> None:
        """Compute the prototypes of the test support draw."""
        self._prepare_support()

    def on_predict_start(self) -> None:
        """Use the datamodule's support draw, the ``support`` folder, or the cached prototypes."""
        self._prepare_support()

    # ------------------------------------------------------------------ Lightning
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the embedding, the decoder and the PEIM (the teacher is frozen)."""
        params = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Distil with prototypes of each query's supports; contrast against other categories' queries."""
        del args, kwargs
        if self.k_shot is None:
            msg = (
                "Packd trains on groups of a query and k supports: use anomalib_dskd.data.few_shot.FewShotDataModule "
                "(or call model.configure_few_shot(k_shot, categories_per_batch) for your own batches)."
            )
            raise SupportError(msg)
        images = batch.image
        group_size = 1 + self.k_shot
        if images.shape[0] % group_size:
            msg = f"a training batch of {images.shape[0]} images is not a whole number of groups of {group_size}."
            raise SupportError(msg)
        groups = images.reshape(-1, group_size, *images.shape[1:])
        outputs = self.model(groups[:, 0], groups[:, 1:])
        category = torch.arange(groups.shape[0], device=images.device) % self.categories_per_batch
        negative_mask = category[:, None] != category[None, :]
        loss, parts = self.loss(
            outputs["teacher"],
            outputs["student"],
            outputs["prototypes"],
            negative_mask,
            outputs["support"],
        )
        size = groups.shape[0]
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, logger=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_epoch=True, logger=True, batch_size=size)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict anomaly maps and scores with the cached support prototypes."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the training layout with the checkpoint (the cached prototypes are buffers already)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["packd_few_shot"] = {"k_shot": self.k_shot, "categories_per_batch": self.categories_per_batch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore anomalib's components and the input size, then the training layout of :meth:`on_save_checkpoint`."""
        super().on_load_checkpoint(checkpoint)
        layout = checkpoint.get("packd_few_shot") or {}
        self.k_shot = layout.get("k_shot", self.k_shot)
        self.categories_per_batch = layout.get("categories_per_batch", self.categories_per_batch)


def load_support_images(source: SupportSource) -> list[torch.Tensor]:
    """Read support images as a list of ``(3, H, W)`` float tensors.

    Raises:
        SupportError: a missing path, a folder without images, an unreadable image or a wrong tensor shape.
    """
    from anomalib.data.utils.image import is_image_file, read_image

    if isinstance(source, torch.Tensor):
        items: list[Any] = list(source) if source.dim() == 4 else [source]
    elif isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            msg = f"support path {path} does not exist."
            raise SupportError(msg)
        if path.is_dir():
            items = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
            if not items:
                msg = f"support folder {path} contains no images."
                raise SupportError(msg)
        else:
            items = [path]
    else:
        items = list(source)
    if not items:
        msg = "the support set is empty: give at least one normal image."
        raise SupportError(msg)
    images = []
    for item in items:
        if isinstance(item, torch.Tensor):
            image = item.float() / 255 if item.dtype == torch.uint8 else item.float()
        else:
            path = Path(item)
            if not path.is_file():
                msg = f"support image {path} does not exist."
                raise SupportError(msg)
            try:
                image = read_image(path, as_tensor=True)
            except Exception as err:
                msg = f"cannot read support image {path}: {err}"
                raise SupportError(msg) from err
        if image.dim() != 3 or image.shape[0] != 3:
            msg = f"support images must be RGB (3, H, W), got shape {tuple(image.shape)}."
            raise SupportError(msg)
        images.append(image)
    return images


register_class(Packd)
