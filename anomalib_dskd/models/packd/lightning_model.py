"""Lightning module of Packd: few-shot anomaly detection on unseen categories.

"Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang, Ma;
BMVC 2023). Reverse distillation (Deng & Li, CVPR 2022) trained on *other* categories, in groups of
one query and ``k`` normal support images of the query's category. A prototype extraction and
integration module (PEIM) summarises the supports' teacher features into ``M`` prototypes per level
and feeds them into the student decoder, so that at test time ``k`` normal images of a new category
are enough: no training, only one teacher pass over the supports.

Two ways to train and test it, both through anomalib's ``Engine``:

* **across categories** (the paper's protocol) with
  :class:`~anomalib_dskd.data.few_shot.FewShotDataModule`: batches of ``(query, k supports)`` groups
  of several categories, seeded support draws of an unseen target category;
* **on one category** with any plain anomalib datamodule (``MVTecAD``, ``Folder``, ...): Packd forms
  the episodes itself from each training batch and, at validation / test / predict, draws ``k``
  supports from the datamodule's training images with ``support_seed``.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_dskd import Packd
    >>> from anomalib_dskd.data.few_shot import FewShotDataModule
    >>> model = Packd(backbone="mobilenetv2_100", pre_trained="mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    >>> datamodule = FewShotDataModule(train_sources=[...], target={...}, k_shot=4)  # doctest: +SKIP
    >>> Engine(max_epochs=10).fit(model, datamodule=datamodule)  # doctest: +SKIP
    >>> model.set_support("new_product/good")  # k good images of a new category  # doctest: +SKIP

    On one category with anomalib's own datamodule:

    >>> from anomalib.data import MVTecAD
    >>> model = Packd(k_shot=4, support_seed=0)  # doctest: +SKIP
    >>> Engine(max_epochs=10).train(model, datamodule=MVTecAD(category="bottle", train_batch_size=8))  # doctest: +SKIP

CLI: ``anomalib train --model Packd --data anomalib_dskd.data.few_shot.FewShotDataModule --data.k_shot 4 ...``
(see ``configs/model/packd.yaml`` and ``configs/data/few_shot_example.yaml``).
"""

from __future__ import annotations

import logging
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

from anomalib_dskd.components.int8 import F32_ELEMENTWISE_OPS, Int8Export
from anomalib_dskd.components.rd.core import require_input_size
from anomalib_dskd.components.rd.module import ReverseDistillationDefaults
from anomalib_dskd.registration import register_class
from anomalib_dskd.weights import normalize_pre_trained

from .loss import PackdLoss
from .torch_model import PackdModel, SupportError

logger = logging.getLogger(__name__)

SupportSource = str | Path | torch.Tensor | Sequence[str | Path | torch.Tensor]


class Packd(ReverseDistillationDefaults, Int8Export, AnomalibModule):
    """Prototype-aware contrastive knowledge distillation (PACKD) for few-shot anomaly detection.

    Trained by anomalib's ``Engine.fit`` like any one-class model (``learning_type`` is
    ``ONE_CLASS``: anomalib's Engine never trains ``FEW_SHOT`` models), in episodes of a query and
    ``k`` normal supports of the query's category (supplementary, Sec. "Detailed Architecture of RD
    and PACKD", Fig. 1(b): the supports go through the teacher, the PEIM turns their features into
    prototypes that condition the query's student; ``../shared/papers/packd_supplementary.txt``).

    * **FewShotDataModule** (several categories, the paper's protocol): the datamodule forms the
      episodes, tells the model their layout (:meth:`configure_few_shot`) and hands it the target's
      support draw before validation / test.
    * **A plain anomalib datamodule** (one category, ordinary ``ImageBatch`` es): every image of a
      training batch is a query, and its ``k_shot`` supports are drawn at random from the *other*
      images of the same batch (never the query itself: compared by index and by ``image_path``).
      A shuffled batch is a random subset of the category's training images, so each query's supports
      are a uniformly random ``k``-subset of the other training images, as in the paper's episodes,
      and one teacher pass serves queries and supports (the teacher is frozen). The draw uses torch's
      global generator, so ``seed_everything`` makes it reproducible. A batch smaller than
      ``k_shot + 1`` (the last, short batch of an epoch) takes the missing candidates from the
      previous batch of the same fit; training refuses to start when ``train_batch_size`` or the
      training set is below ``k_shot + 1``. All queries of such a batch share one category, so the
      contrastive loss has no other-category negatives (only support negatives if
      ``support_negatives``): train with ``FewShotDataModule`` to learn across categories.

    Support set at validation / test / predict (:meth:`on_validation_start` and its siblings), in
    order: the few-shot datamodule's draw; the images of the last explicit :meth:`set_support` call;
    the ``support`` folder; ``k_shot`` normal images drawn from the datamodule's training set
    (``trainer.datamodule.train_data``) by ``numpy.random.default_rng([support_seed])``, logged at
    INFO level; the images of an earlier draw; the prototypes cached in a checkpoint. The prototypes
    are recomputed with the current PEIM each time and are buffers: checkpoints keep them and
    exports embed them as constants.

    Args:
        backbone: timm CNN teacher. Defaults to ``"wide_resnet50_2"`` (RD's teacher).
        layers: the three teacher stages distilled. Defaults to ``(1, 2, 3)``.
        pre_trained: ``True`` (timm hub), ``False`` (random, tests only) or a local checkpoint path.
        peim_levels: PEIM levels: ``1``-``3`` the distilled teacher stages, ``4`` the one-class
            embedding (prototypes from the teacher's next stage). Defaults to the paper's ``(2, 3, 4)``.
        num_prototypes: prototypes per level (``M``). Defaults to ``8``.
        attention_dim: dimension of prototypes and PEIM attention. Defaults to ``64``.
        support_score_weight: weight of the nearest-support distance map added to the distillation
            map (the supports' teacher features of ``support_score_levels`` kept as a memory; every
            query position scored by ``1 - cos`` to its nearest support feature, the distillation
            map's own units). ``0`` is the paper's score, the distillation map alone. Defaults to
            ``1`` (why: ``docs/models/packd.md``, "Support memory").
        support_score_levels: teacher levels of the support memory (1-3 the distilled stages, 4 the
            teacher's next stage). Defaults to ``(2, 3, 4)``, chosen by the leave-one-target-out
            selection of ``docs/models/packd.md`` ("Which score").
        support_metric: distance of the support memory, ``"cosine"`` (``1 - cos``) or ``"euclidean"``
            (PatchCore's). Defaults to ``"cosine"``.
        support_combine: ``"sum"`` (a distance map per memory level, summed) or ``"concat"`` (the levels'
            features concatenated on the finest grid, one nearest neighbour; PatchCore's). Defaults to
            ``"sum"``. Both: ``docs/models/packd.md``, "Support memory design".
        score_normalisation: how the distillation and memory maps are put on one scale before they
            are added: ``"none"`` (raw ``1 - cos``), ``"zscore"`` (each divided by its spread on the
            supports' own leave-one-out maps, means removed) or ``"centred"`` (the supports' per-pixel
            mean map removed). See :class:`~anomalib_dskd.models.packd.torch_model.PackdModel`.
            Defaults to ``"none"``.
        image_score: ``"memory"``: the image score is the maximum of the support-memory term, the
            anomaly map the fusion; ``"map"``: the maximum of the anomaly map. Defaults to ``"memory"``.
        loss_mode: RD cosine loss mode, ``"flatten"`` (as Rd) or ``"pixel"``.
        contrastive_weight: weight of the contrastive distillation loss. Defaults to ``0.1``.
        orthogonality_weight: weight of the prototype orthogonality loss. Defaults to ``0.1``.
        temperature: InfoNCE temperature. Defaults to ``0.1``.
        support_negatives: also use the supports' teacher features as contrastive negatives.
        support: optional folder / image of normal images of the category to predict on; loaded
            before validation / test / predict when no few-shot datamodule provides supports (and no
            :meth:`set_support` call did).
        k_shot: supports per query in the episodes formed from plain training batches, and size of
            the support draw from a plain datamodule's training set. ``FewShotDataModule`` replaces it
            with its own ``k_shot``. Defaults to ``4``.
        support_seed: seed of the support draw from a plain datamodule's training set. Defaults to ``0``.
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
        ValueError: ``k_shot`` below 1.
    """

    int8_scoring_tail_types = F32_ELEMENTWISE_OPS  # INT8: the scoring arithmetic stays f32 (components.int8)

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[int] = (1, 2, 3),
        pre_trained: bool | str = True,
        peim_levels: Sequence[int] = (2, 3, 4),
        num_prototypes: int = 8,
        attention_dim: int = 64,
        support_score_weight: float = 1.0,
        support_score_levels: Sequence[int] = (2, 3, 4),
        support_metric: str = "cosine",
        support_combine: str = "sum",
        score_normalisation: str = "none",
        image_score: str = "memory",
        loss_mode: str = "flatten",
        contrastive_weight: float = 0.1,
        orthogonality_weight: float = 0.1,
        temperature: float = 0.1,
        support_negatives: bool = False,
        support: str | None = None,
        k_shot: int = 4,
        support_seed: int = 0,
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
            support_score_weight=support_score_weight,
            support_score_levels=support_score_levels,
            support_metric=support_metric,
            support_combine=support_combine,
            score_normalisation=score_normalisation,
            image_score=image_score,
        )
        self.loss = PackdLoss(loss_mode, contrastive_weight, orthogonality_weight, temperature, support_negatives)
        if int(k_shot) < 1:
            msg = f"k_shot must be at least 1, got {k_shot}."
            raise ValueError(msg)
        self.support = support
        self.lr = lr
        self.betas = tuple(betas)
        self.k_shot: int = int(k_shot)
        self.support_seed = int(support_seed)
        self.categories_per_batch: int = 1
        self.support_paths: list[str] | None = None  # where the cached prototypes' images came from
        self._grouped_batches = False  # training batches are FewShotDataModule groups (this fit)
        self._support_images: torch.Tensor | None = None  # pre-processed images of the current support set
        self._explicit_support = False  # set by a user's set_support call: kept over datamodule draws
        self._previous_batch: tuple[torch.Tensor, list[str] | None] | None = None

    # ------------------------------------------------------------------ few-shot protocol
    def configure_few_shot(self, k_shot: int, categories_per_batch: int) -> None:
        """Set the layout of training batches (called by :class:`FewShotDataModule` at setup).

        A training batch holds ``G`` groups of ``1 + k_shot`` images, one group after the other,
        query first; group ``g`` belongs to category ``g % categories_per_batch`` of the batch, so
        groups whose indices differ modulo ``categories_per_batch`` are negatives of each other.
        The layout holds for the current (or next) fit; without it, training batches are plain
        one-category batches (see the class docstring).
        """
        if int(k_shot) < 1 or int(categories_per_batch) < 1:
            msg = f"k_shot and categories_per_batch must be positive, got {k_shot}, {categories_per_batch}."
            raise ValueError(msg)
        self.k_shot = int(k_shot)
        self.categories_per_batch = int(categories_per_batch)
        self._grouped_batches = True

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

        The images are kept (not in checkpoints): validation / test / predict recompute their
        prototypes with the current PEIM and prefer them over a plain datamodule's support draw.
        """
        prototypes = self._use_support(source, pre_processed)
        self._explicit_support = True
        return prototypes

    def _use_support(self, source: SupportSource, pre_processed: bool = False) -> list[torch.Tensor]:
        """:meth:`set_support` without marking the support as the user's (the hooks' own draws)."""
        items = support_items(source)
        images = load_support_images(items)
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
        batch = batch.to(device=device, dtype=torch.float32)
        prototypes = self.model.set_support(batch)
        self._support_images = batch.detach()
        self.support_paths = [str(item) for item in items] if not any(map(torch.is_tensor, items)) else None
        return prototypes

    def _refresh_support(self) -> None:
        """Recompute the prototypes of the kept support images with the current PEIM."""
        if self._support_images is not None:
            self.model.set_support(self._support_images.to(next(self.model.parameters()).device))

    def draw_support_paths(self, dataset: Any) -> list[str]:
        """``k_shot`` normal images of an anomalib dataset, drawn with :attr:`support_seed`.

        Args:
            dataset: an anomalib dataset (``samples`` with ``image_path`` and ``label_index``), e.g. a
                datamodule's ``train_data``.

        Returns:
            The drawn image paths, sorted: the same dataset and seed give the same paths.

        Raises:
            SupportError: the dataset has fewer than ``k_shot`` normal images.
        """
        from anomalib_dskd.data.few_shot import draw_rows, normal_rows

        rows = normal_rows(dataset)
        if len(rows) < self.k_shot:
            msg = (
                f"the datamodule's training set has {len(rows)} normal images, fewer than Packd's k_shot={self.k_shot} "
                "supports: lower k_shot, or give the support set with model.set_support(<folder>)."
            )
            raise SupportError(msg)
        return [str(dataset.samples.iloc[row].image_path) for row in draw_rows(rows, self.k_shot, (self.support_seed,))]

    def _prepare_support(self) -> None:
        """Before validation / test / predict: choose the support set (order in the class docstring)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        provider = getattr(datamodule, "support_images", None)
        train_data = getattr(datamodule, "train_data", None)
        if callable(provider):
            self._use_support(provider())
            paths = getattr(datamodule, "support_paths", None)
            self.support_paths = paths() if callable(paths) else None
        elif self._explicit_support and self._support_images is not None:
            self._refresh_support()
        elif self.support:
            self._use_support(self.support)
            self._explicit_support = True
        elif train_data is not None and hasattr(getattr(train_data, "samples", None), "image_path"):
            paths = self.draw_support_paths(train_data)
            if paths != self.support_paths or self._support_images is None:
                logger.info(
                    "Packd: support set = %d normal training images drawn with support_seed=%d: %s",
                    len(paths),
                    self.support_seed,
                    ", ".join(paths),
                )
                self._use_support(paths)
            else:
                self._refresh_support()
        elif self._support_images is not None:
            self._refresh_support()

    def on_validation_start(self) -> None:
        """Choose the support set (order in the class docstring); its prototypes with the current PEIM."""
        self._prepare_support()

    def on_test_start(self) -> None:
        """Choose the support set (order in the class docstring); its prototypes with the current PEIM."""
        self._prepare_support()

    def on_predict_start(self) -> None:
        """Choose the support set (order in the class docstring); its prototypes with the current PEIM."""
        self._prepare_support()

    # ------------------------------------------------------------------ Lightning
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the embedding, the decoder and the PEIM (the teacher is frozen)."""
        params = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas)

    def on_train_start(self) -> None:
        """Plain one-category batches: check that every query can get ``k_shot`` other images as supports."""
        self._previous_batch = None
        if self._grouped_batches:
            return
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        batch_size = getattr(loader, "batch_size", None)
        dataset = getattr(loader, "dataset", None)
        size = len(dataset) if hasattr(dataset, "__len__") else None
        needed = self.k_shot + 1
        if size is not None and size < needed:
            msg = (
                f"Packd draws each query's k_shot={self.k_shot} supports from the other training images of its "
                f"category, but the training set has {size} images: it needs at least {needed}; lower k_shot."
            )
            raise SupportError(msg)
        if batch_size is not None and batch_size < needed:
            msg = (
                f"Packd forms its training episodes from each batch (a query and k_shot={self.k_shot} supports drawn "
                f"from the other images of the batch), so train_batch_size must be at least {needed}, got "
                f"{batch_size}: raise train_batch_size or lower k_shot (or train on groups with "
                "anomalib_dskd.data.few_shot.FewShotDataModule)."
            )
            raise SupportError(msg)
        logger.info(
            "Packd: plain training batches of one category; each query gets %d supports drawn from the other images of "
            "its batch (no other-category negatives for the contrastive loss; FewShotDataModule trains across "
            "categories).",
            self.k_shot,
        )

    def on_fit_end(self) -> None:
        """Forget this fit's batch layout and cached batch (the next fit may use plain batches)."""
        self._grouped_batches = False
        self._previous_batch = None

    def _group_episodes(self, images: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
        """Episodes of a :class:`FewShotDataModule` batch and its other-category negative mask."""
        group_size = 1 + self.k_shot
        if images.shape[0] % group_size:
            msg = f"a training batch of {images.shape[0]} images is not a whole number of groups of {group_size}."
            raise SupportError(msg)
        groups = images.reshape(-1, group_size, *images.shape[1:])
        outputs = self.model(groups[:, 0], groups[:, 1:])
        category = torch.arange(groups.shape[0], device=images.device) % self.categories_per_batch
        return outputs, category[:, None] != category[None, :]

    def _batch_episodes(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """Episodes of a plain batch: every image a query, ``k_shot`` supports among the batch's others."""
        images = batch.image
        paths = [str(path) for path in batch.image_path] if batch.image_path is not None else None
        pool, pool_paths = images, paths
        if images.shape[0] <= self.k_shot and self._previous_batch is not None:
            previous, previous_paths = self._previous_batch
            keep = list(range(previous.shape[0]))
            if paths is not None and previous_paths is not None:
                current = set(paths)
                keep = [index for index in keep if previous_paths[index] not in current]
                pool_paths = paths + [previous_paths[index] for index in keep]
            else:
                pool_paths = None
            pool = torch.cat([images, previous[keep]])
        self._previous_batch = (images.detach(), paths)
        index = draw_episode_supports(images.shape[0], self.k_shot, pool_paths, pool.shape[0])
        return self.model.episodes(pool, index.to(images.device))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Distil with prototypes of each query's supports; contrast against other categories' queries.

        ``FewShotDataModule`` groups (:meth:`configure_few_shot`), or episodes formed from a plain batch
        (:meth:`_batch_episodes`: one category, so no other-category negatives).
        """
        del args, kwargs
        if self._grouped_batches:
            outputs, negative_mask = self._group_episodes(batch.image)
        else:
            outputs, negative_mask = self._batch_episodes(batch), None
        loss, parts = self.loss(
            outputs["teacher"],
            outputs["student"],
            outputs["prototypes"],
            negative_mask,
            outputs["support"],
        )
        size = outputs["teacher"][0].shape[0]
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, logger=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_epoch=True, logger=True, batch_size=size)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict anomaly maps and scores with the cached support prototypes."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep ``k_shot``, the layout and the support paths (the cached prototypes are buffers already)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["packd_few_shot"] = {
            "k_shot": self.k_shot,
            "categories_per_batch": self.categories_per_batch,
            "support_paths": self.support_paths,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore anomalib's components and the input size, then what :meth:`on_save_checkpoint` kept.

        The checkpoint's prototypes replace any earlier support set: a later validation / test /
        predict draws anew from its datamodule, or scores with these prototypes.
        """
        super().on_load_checkpoint(checkpoint)
        layout = checkpoint.get("packd_few_shot") or {}
        self.k_shot = int(layout.get("k_shot") or self.k_shot)
        self.categories_per_batch = layout.get("categories_per_batch", self.categories_per_batch)
        self.support_paths = layout.get("support_paths")
        self._support_images = None
        self._explicit_support = False


def draw_episode_supports(queries: int, k_shot: int, paths: Sequence[str] | None, candidates: int) -> torch.Tensor:
    """``(queries, k_shot)`` indices of each query's supports among ``candidates`` images, never the query.

    Query ``i`` is candidate ``i``; a candidate is excluded for query ``i`` when it is ``i`` or has the same
    ``image_path`` (``paths``, one per candidate, or ``None``). Each query gets a uniformly random
    ``k_shot``-subset of its other candidates (the smallest of i.i.d. uniform scores from torch's global
    generator: ``seed_everything`` makes the draw reproducible).

    Raises:
        SupportError: a query has fewer than ``k_shot`` other candidates.
    """
    same = torch.zeros(queries, candidates, dtype=torch.bool)
    same[torch.arange(queries), torch.arange(queries)] = True
    if paths is not None:
        same |= torch.tensor([[path == other for other in paths] for path in paths[:queries]], dtype=torch.bool)
    available = int((~same).sum(1).min())
    if available < k_shot:
        msg = (
            f"a training batch of {queries} images leaves a query only {available} other images as supports, fewer "
            f"than k_shot={k_shot}: raise train_batch_size to at least {k_shot + 1} or lower k_shot."
        )
        raise SupportError(msg)
    scores = torch.rand(queries, candidates).masked_fill(same, 2.0)
    return scores.topk(k_shot, dim=1, largest=False).indices


def support_items(source: SupportSource) -> list[Any]:
    """The images of a support source: ``(3, H, W)`` tensors, or paths (a folder's images, sorted).

    Raises:
        SupportError: a missing path, a folder without images or an empty source.
    """
    from anomalib.data.utils.image import is_image_file

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
    return items


def load_support_images(source: SupportSource) -> list[torch.Tensor]:
    """Read support images as a list of ``(3, H, W)`` float tensors.

    Raises:
        SupportError: a missing path, a folder without images, an unreadable image or a wrong tensor shape.
    """
    from anomalib.data.utils.image import read_image

    images = []
    for item in support_items(source):
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
