"""Few-shot (RegAD / PACKD) protocol for anomalib: multi-category k-shot training and support draws.

anomalib 2.7 has no few-shot datamodule, and its ``Engine`` never trains ``FEW_SHOT`` models. The
protocol of RegAD (Huang et al., ECCV 2022) and PACKD (Gu, Yang, Ma; BMVC 2023) is:

* **training** on several categories, leaving the target category out; each training sample is a
  query plus ``k`` normal support images of the *same* category; batches mix categories (the
  contrastive loss takes negatives from other categories);
* **testing** on the target category's test set, with ``k`` support images drawn from the target's
  normal training images with a seed; the metrics are averaged over several draws (10 in the papers).

:class:`FewShotDataModule` implements it over any anomalib image dataset layout (MVTec AD, MVTec LOCO,
Folder), across datasets (train on some, test on another). It is an
:class:`~anomalib.data.AnomalibDataModule`, so ``Engine.fit`` / ``Engine.test`` and
``anomalib train --data anomalib_dskd.data.few_shot.FewShotDataModule`` accept it, and its batches
are anomalib :class:`~anomalib.data.ImageBatch` objects:

* a training batch holds ``train_batch_size`` groups of ``1 + k_shot`` images, group after group,
  query first; the datamodule tells the model that layout (``model.configure_few_shot``);
* validation / test batches are the target's test images; the model pulls the current support draw
  (:meth:`FewShotDataModule.support_images`, draw ``support_draw``) at the start of validation / test.

One anomalib test run evaluates one draw; :func:`evaluate_support_draws` runs ``Engine.test`` once per
draw and averages the metrics.

Dataset specs (``train_sources`` entries and ``target``) are mappings (YAML / JSON) or strings:

* ``{"format": "mvtec_ad", "root": "datasets/MVTecAD", "category": "bottle"}`` (``category`` may be
  a list, expanding to one source per category); formats ``mvtec_ad``, ``mvtec_loco``, ``folder``;
* ``{"format": "folder", "root": "...", "category": "<name>", "normal_dir": "good", "abnormal_dir":
  "bad", "mask_dir": "masks", "normal_test_dir": "good_test"}`` (anomalib ``FolderDataset`` arguments);
* the string ``"mvtec_ad:datasets/MVTecAD:bottle"`` (``format:root:category``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib import TaskType
from anomalib.data import AnomalibDataModule, ImageBatch, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import Compose, Resize, Transform

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    "mvtec_ad": "mvtec_ad",
    "mvtecad": "mvtec_ad",
    "mvtec": "mvtec_ad",
    "mvtec_loco": "mvtec_loco",
    "mvtecloco": "mvtec_loco",
    "loco": "mvtec_loco",
    "folder": "folder",
}
FOLDER_KEYS = ("normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir", "extensions")


class FewShotDataError(ValueError):
    """A dataset spec, split or support request that the few-shot protocol cannot serve."""


# ---------------------------------------------------------------------------------------------- specs
def parse_specs(spec: Mapping[str, Any] | str) -> list[dict[str, Any]]:
    """Normalise one dataset spec into a list of ``{"format", "root", "category", ...}`` dicts."""
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) < 3:
            msg = f"dataset spec {spec!r} must be 'format:root:category' or a mapping."
            raise FewShotDataError(msg)
        spec = {"format": parts[0], "root": ":".join(parts[1:-1]), "category": parts[-1]}
    spec = dict(spec)
    fmt = FORMATS.get(str(spec.get("format", "")).strip().lower().replace("-", "_"))
    if fmt is None:
        msg = f"unknown dataset format {spec.get('format')!r} in {spec}; use one of mvtec_ad, mvtec_loco, folder."
        raise FewShotDataError(msg)
    if not spec.get("root") or not spec.get("category"):
        msg = f"dataset spec {spec} needs 'root' and 'category'."
        raise FewShotDataError(msg)
    categories = spec["category"] if isinstance(spec["category"], list | tuple) else [spec["category"]]
    return [{**spec, "format": fmt, "root": str(spec["root"]), "category": str(category)} for category in categories]


def category_dir(spec: Mapping[str, Any]) -> Path:
    """Folder holding the spec's category (``root/category`` for MVTec layouts, ``root`` for Folder)."""
    root = Path(spec["root"]).expanduser().resolve()
    return root if spec["format"] == "folder" else root / spec["category"]


def source_name(spec: Mapping[str, Any]) -> str:
    """``format/category``, the label of a source in logs and results."""
    return f"{spec['format']}/{spec['category']}"


def build_dataset(spec: Mapping[str, Any], split: str, augmentations: Transform | None = None) -> AnomalibDataset:
    """The anomalib dataset of a normalised spec for ``split`` (``"train"`` or ``"test"``)."""
    directory = category_dir(spec)
    if not directory.is_dir():
        msg = f"dataset folder {directory} (from {dict(spec)}) does not exist."
        raise FewShotDataError(msg)
    fmt = spec["format"]
    if fmt == "mvtec_ad":
        from anomalib.data.datasets.image.mvtecad import MVTecADDataset

        return MVTecADDataset(root=spec["root"], category=spec["category"], augmentations=augmentations, split=split)
    if fmt == "mvtec_loco":
        from anomalib.data.datasets.image.mvtec_loco import MVTecLOCODataset

        return MVTecLOCODataset(root=spec["root"], category=spec["category"], augmentations=augmentations, split=split)
    from anomalib.data.datasets.image.folder import FolderDataset

    kwargs = {key: spec[key] for key in FOLDER_KEYS if spec.get(key) is not None}
    if "normal_dir" not in kwargs:
        msg = f"folder spec {dict(spec)} needs 'normal_dir'."
        raise FewShotDataError(msg)
    return FolderDataset(name=spec["category"], root=spec["root"], augmentations=augmentations, split=split, **kwargs)


def normal_rows(dataset: AnomalibDataset) -> list[int]:
    """Row indices of the dataset's normal images (label 0), in path order."""
    samples = dataset.samples
    rows = [int(i) for i in np.flatnonzero(samples.label_index.to_numpy() == 0)]
    return sorted(rows, key=lambda row: str(samples.iloc[row].image_path))


def draw_rows(rows: Sequence[int], k_shot: int, seed: Sequence[int]) -> list[int]:
    """``k_shot`` of ``rows`` without replacement, sorted, drawn by ``numpy.random.default_rng(seed)``.

    The support draw of :class:`FewShotDataModule` (``seed = (seed, draw)``) and of Packd on a plain
    datamodule (``seed = (support_seed,)``); the caller checks that ``rows`` has ``k_shot`` entries.
    """
    rng = np.random.default_rng([int(value) for value in seed])
    return sorted(rows[i] for i in rng.choice(len(rows), int(k_shot), replace=False))


# ---------------------------------------------------------------------------------------------- datasets
class FewShotTrainDataset(Dataset):
    """Normal training images of several categories, indexed flat; items carry no masks.

    Args:
        specs: normalised dataset specs, one per category.
        augmentations: transform applied to every image (must end at one fixed size).
    """

    def __init__(self, specs: Sequence[Mapping[str, Any]], augmentations: Transform | None = None) -> None:
        self.specs = [dict(spec) for spec in specs]
        self.datasets = [build_dataset(spec, "train", augmentations) for spec in self.specs]
        self.index: list[tuple[int, int]] = []
        self.category_indices: list[list[int]] = []
        for source, dataset in enumerate(self.datasets):
            rows = normal_rows(dataset)
            self.category_indices.append(list(range(len(self.index), len(self.index) + len(rows))))
            self.index += [(source, row) for row in rows]
        self._augmentations = augmentations

    @property
    def categories(self) -> list[str]:
        """Source names, one per category."""
        return [source_name(spec) for spec in self.specs]

    @property
    def augmentations(self) -> Transform | None:
        """Transform applied to every image."""
        return self._augmentations

    @augmentations.setter
    def augmentations(self, augmentations: Transform | None) -> None:
        self._augmentations = augmentations
        for dataset in self.datasets:
            dataset.augmentations = augmentations

    @property
    def task(self) -> TaskType:
        """Training images are normal only: classification."""
        return TaskType.CLASSIFICATION

    def image_paths(self) -> list[str]:
        """Paths of all training images."""
        return [str(self.datasets[source].samples.iloc[row].image_path) for source, row in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> ImageItem:
        source, row = self.index[index]
        item = self.datasets[source][row]
        return ImageItem(image=item.image, gt_label=item.gt_label, image_path=item.image_path)

    @property
    def collate_fn(self):
        """anomalib's :meth:`ImageBatch.collate`."""
        return ImageBatch.collate


class FewShotBatchSampler(Sampler[list[int]]):
    """Batches of ``groups_per_batch`` groups (query + ``k_shot`` supports of its category).

    Group ``g`` of every batch belongs to category ``order[g % categories_per_batch]`` with ``order`` a
    fresh random permutation of the categories, so the groups of the first ``categories_per_batch``
    slots are all of different categories, and two groups share a category exactly when their
    indices are equal modulo :attr:`categories_per_batch`. Queries cycle through each category's
    images in a random order; supports are ``k_shot`` other images of the category, without replacement.
    An epoch has ``max(1, images // groups_per_batch)`` batches. Draws depend only on ``seed`` and
    the epoch number.
    """

    def __init__(
        self,
        category_indices: Sequence[Sequence[int]],
        k_shot: int,
        groups_per_batch: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.category_indices = [list(indices) for indices in category_indices]
        self.k_shot = int(k_shot)
        self.groups_per_batch = int(groups_per_batch)
        self.seed = int(seed)
        self.epoch = 0
        self.categories_per_batch = max(1, min(self.groups_per_batch, len(self.category_indices)))
        self.num_batches = max(1, sum(map(len, self.category_indices)) // self.groups_per_batch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        queues: list[list[int]] = [[] for _ in self.category_indices]
        for _ in range(self.num_batches):
            order = rng.permutation(len(self.category_indices))
            batch: list[int] = []
            for group in range(self.groups_per_batch):
                category = int(order[group % self.categories_per_batch])
                indices = self.category_indices[category]
                if not queues[category]:
                    queues[category] = [indices[i] for i in rng.permutation(len(indices))]
                query = queues[category].pop()
                others = [index for index in indices if index != query]
                supports = [others[i] for i in rng.choice(len(others), self.k_shot, replace=False)]
                batch += [query, *supports]
            yield batch


# ---------------------------------------------------------------------------------------------- datamodule
class FewShotDataModule(AnomalibDataModule):
    """RegAD / PACKD few-shot protocol: leave-one-out k-shot training, seeded support draws for the target.

    Args:
        train_sources: dataset specs of the training categories (see the module docstring). Sources of
            the target category (same folder, or same category name) are dropped: the target never
            reaches training.
        target: dataset spec of the target (test) category.
        k_shot: support images per query (training) and per draw (test). Defaults to ``4``.
        num_support_draws: support draws for :func:`evaluate_support_draws`. Defaults to ``10``.
        support_draw: the draw used by validation / test / predict. Defaults to ``0``.
        seed: seed of the training groups and of the support draws.
        image_size: every image is resized to this ``(H, W)`` when loaded (the model's pre-processor
            resizes again to its own size; keep both equal). Defaults to ``(256, 256)``.
        train_batch_size: groups per training batch (a batch holds ``train_batch_size * (1 + k_shot)``
            images). Defaults to ``4``.
        eval_batch_size: test images per batch. Defaults to ``32``.
        num_workers: dataloader workers. Defaults to ``0``.
        augmentations: extra transform applied before resizing (all splits).
        val_split_mode: validation set, default ``"same_as_test"`` (the target's test set; used by
            anomalib for thresholds / normalisation only).

    Raises:
        FewShotDataError: unknown format, missing folder, fewer than ``k_shot + 1`` normal images in a
            training category or fewer than ``k_shot`` in the target, or no training category left.
    """

    def __init__(
        self,
        train_sources: Sequence[dict[str, Any] | str] = (),
        target: dict[str, Any] | str | None = None,
        k_shot: int = 4,
        num_support_draws: int = 10,
        support_draw: int = 0,
        seed: int = 0,
        image_size: tuple[int, int] = (256, 256),
        train_batch_size: int = 4,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        augmentations: Transform | None = None,
        val_split_mode: str = "same_as_test",
    ) -> None:
        resize = Resize(tuple(int(v) for v in image_size), antialias=True)
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augmentations=Compose([augmentations, resize]) if augmentations is not None else resize,
            val_split_mode=val_split_mode,
            test_split_mode="from_dir",
            seed=seed,
        )
        if target is None:
            msg = "FewShotDataModule needs a target category spec (target=...)."
            raise FewShotDataError(msg)
        if int(k_shot) < 1:
            msg = f"k_shot must be at least 1, got {k_shot}."
            raise FewShotDataError(msg)
        if int(num_support_draws) < 1 or not 0 <= int(support_draw) < int(num_support_draws):
            msg = f"need 0 <= support_draw < num_support_draws, got {support_draw} and {num_support_draws}."
            raise FewShotDataError(msg)
        targets = parse_specs(target)
        if len(targets) != 1:
            msg = f"target must be one category, got {len(targets)}."
            raise FewShotDataError(msg)
        self.target = targets[0]
        self.k_shot = int(k_shot)
        self.num_support_draws = int(num_support_draws)
        self.support_draw = int(support_draw)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        specs = [parsed for spec in train_sources for parsed in parse_specs(spec)]
        self.train_specs, self.excluded_specs = leave_target_out(specs, self.target)
        for spec in self.excluded_specs:
            logger.info("FewShotDataModule: %s is the target category; left out of training.", source_name(spec))
        self.category = self.target["category"]
        self._support_pool: AnomalibDataset | None = None

    # ------------------------------------------------------------------ setup
    def _setup(self, _stage: str | None = None) -> None:
        augmentations = self.train_augmentations
        self.train_data = FewShotTrainDataset(self.train_specs, augmentations)
        target_dir = category_dir(self.target)
        leaked = [path for path in self.train_data.image_paths() if Path(path).resolve().is_relative_to(target_dir)]
        if leaked:
            msg = f"training sources contain {len(leaked)} images of the target folder {target_dir} (e.g. {leaked[0]})."
            raise FewShotDataError(msg)
        for name, indices in zip(self.train_data.categories, self.train_data.category_indices, strict=True):
            if len(indices) < self.k_shot + 1:
                msg = (
                    f"training category {name} has {len(indices)} normal images; k_shot={self.k_shot} needs at "
                    f"least {self.k_shot + 1} (a query and {self.k_shot} other supports)."
                )
                raise FewShotDataError(msg)
        self.test_data = build_dataset(self.target, "test")
        self._support_pool = build_dataset(self.target, "train", self.test_augmentations)
        self.support_rows(0)  # fail early when the target has fewer than k normal images

    @property
    def task(self) -> TaskType:
        """Task of the target's test set."""
        return self.test_data.task if hasattr(self, "test_data") else TaskType.SEGMENTATION

    def train_dataloader(self) -> DataLoader:
        """Grouped, category-mixed batches; tells the model the group layout."""
        if not self.train_specs:
            msg = "FewShotDataModule has no training category (train_sources is empty after leaving the target out)."
            raise FewShotDataError(msg)
        sampler = FewShotBatchSampler(
            self.train_data.category_indices,
            self.k_shot,
            self.train_batch_size,
            seed=int(self.seed or 0),
        )
        model = getattr(getattr(self, "trainer", None), "lightning_module", None)
        configure = getattr(model, "configure_few_shot", None)
        if callable(configure):
            configure(self.k_shot, sampler.categories_per_batch)
        if sampler.categories_per_batch < 2:
            logger.warning("FewShotDataModule: one category per batch, so the contrastive loss has no negatives.")
        return DataLoader(
            self.train_data,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.train_data.collate_fn,
        )

    # ------------------------------------------------------------------ supports
    def support_rows(self, draw: int | None = None) -> list[int]:
        """Rows of the target's training set forming support draw ``draw`` (default :attr:`support_draw`)."""
        pool = self._pool()
        rows = normal_rows(pool)
        if len(rows) < self.k_shot:
            msg = (
                f"target {source_name(self.target)} has {len(rows)} normal training images, fewer than "
                f"k_shot={self.k_shot}."
            )
            raise FewShotDataError(msg)
        draw = self.support_draw if draw is None else int(draw)
        return draw_rows(rows, self.k_shot, (int(self.seed or 0), draw))

    def support_paths(self, draw: int | None = None) -> list[str]:
        """Image paths of support draw ``draw``."""
        pool = self._pool()
        return [str(pool.samples.iloc[row].image_path) for row in self.support_rows(draw)]

    def support_images(self, draw: int | None = None) -> torch.Tensor:
        """``(k, 3, H, W)`` support images of draw ``draw`` (resized, values in ``[0, 1]``, not normalised)."""
        pool = self._pool()
        return torch.stack([torch.as_tensor(pool[row].image) for row in self.support_rows(draw)])

    def _pool(self) -> AnomalibDataset:
        if self._support_pool is None:
            self._support_pool = build_dataset(self.target, "train", self.test_augmentations)
        return self._support_pool

    def _update_augmentations(self) -> None:
        super()._update_augmentations()
        if self._support_pool is not None and hasattr(self, "test_data"):
            self._support_pool.augmentations = self.test_data.augmentations


def leave_target_out(
    specs: Sequence[dict[str, Any]],
    target: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``specs`` into (kept, excluded): excluded share the target's folder or category name."""
    target_dir = category_dir(target)
    target_name = str(target["category"]).lower()
    kept, excluded = [], []
    for spec in specs:
        directory = category_dir(spec)
        same = directory == target_dir or str(spec["category"]).lower() == target_name
        same = same or directory.is_relative_to(target_dir)
        (excluded if same else kept).append(spec)
    return kept, excluded


def evaluate_support_draws(
    engine: Any,
    model: Any,
    datamodule: FewShotDataModule,
    draws: Sequence[int] | None = None,
    ckpt_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``engine.test`` once per support draw and average the metrics.

    Args:
        engine: an anomalib ``Engine``.
        model: the (trained) Packd model.
        datamodule: the few-shot datamodule; its ``support_draw`` is set to each draw in turn.
        draws: draw indices; default ``range(datamodule.num_support_draws)``.
        ckpt_path: optional checkpoint for ``engine.test``.

    Returns:
        ``{"per_draw": [{metric: value}, ...], "mean": {...}, "std": {...}, "draws": [...]}``.
    """
    draws = list(range(datamodule.num_support_draws)) if draws is None else [int(d) for d in draws]
    original = datamodule.support_draw
    per_draw = []
    try:
        for draw in draws:
            datamodule.support_draw = draw
            results = engine.test(model=model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
            per_draw.append({key: float(value) for key, value in (results[0] if results else {}).items()})
    finally:
        datamodule.support_draw = original
    keys = sorted(set().union(*per_draw)) if per_draw else []
    mean = {key: float(np.mean([r[key] for r in per_draw if key in r])) for key in keys}
    std = {key: float(np.std([r[key] for r in per_draw if key in r])) for key in keys}
    return {"draws": draws, "per_draw": per_draw, "mean": mean, "std": std}


__all__ = [
    "FewShotBatchSampler",
    "FewShotDataError",
    "FewShotDataModule",
    "FewShotTrainDataset",
    "build_dataset",
    "draw_rows",
    "evaluate_support_draws",
    "leave_target_out",
    "normal_rows",
    "parse_specs",
]
