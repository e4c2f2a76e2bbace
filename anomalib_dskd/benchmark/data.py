"""Datamodules of the benchmark: anomalib's MVTecLOCO / MVTecAD / Folder, and generated data.

Every model of a cell gets the same datamodule: same images, batch sizes, splits and seed.
Synthetic datasets are generated once per run by :func:`prepare_dataset` (in the runner, before
the grid), under ``<output>/data/<dataset name>``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from anomalib_dskd.benchmark.config import DatasetSpec

logger = logging.getLogger(__name__)

__all__ = ["build_datamodule", "prepare_dataset"]


def prepare_dataset(spec: DatasetSpec, data_dir: Path, image_size: tuple[int, int]) -> DatasetSpec:
    """Generate a synthetic dataset (once; reused when already written) and set its ``root``.

    Args:
        spec: the dataset (real datasets are returned unchanged).
        data_dir: folder for generated data (``<output>/data``).
        image_size: default image size of generated images (the model's input size).

    Returns:
        The same spec, with ``root`` and ``category`` filled in for synthetic data.
    """
    if not spec.is_synthetic:
        return spec
    from anomalib_dskd.data import generate_loco_category, generate_mvtec_ad_category

    root = Path(data_dir) / spec.name
    category = spec.category or spec.name
    kwargs: dict[str, Any] = {"seed": 0, "image_size": tuple(image_size)}
    kwargs.update(spec.generate)
    if "image_size" in spec.generate:
        kwargs["image_size"] = tuple(spec.generate["image_size"])
    marker = root / category / ".benchmark_generated"
    signature = repr(sorted(kwargs.items()))
    if not (marker.is_file() and marker.read_text() == signature):
        generator = generate_loco_category if spec.format == "synthetic_loco" else generate_mvtec_ad_category
        generator(root, category, overwrite=True, **kwargs)
        marker.write_text(signature)
    spec.root = str(root.resolve())
    spec.category = category
    return spec


def build_datamodule(spec: DatasetSpec, data: dict[str, Any], seed: int) -> Any:  # noqa: ANN401
    """The anomalib datamodule of a dataset.

    Args:
        spec: the dataset (synthetic ones already generated: ``root`` set).
        data: loader settings (``train_batch_size``, ``eval_batch_size``, ``num_workers``, ...).
        seed: seed of the datamodule's random splits and of the ``max_train_images`` subset.

    Returns:
        An :class:`anomalib.data.AnomalibDataModule`.
    """
    from anomalib.data import Folder, MVTecAD, MVTecLOCO

    kwargs = {**data, **spec.datamodule, "seed": seed}
    if spec.format in {"mvtec_loco", "synthetic_loco"}:
        datamodule = MVTecLOCO(root=spec.root, category=spec.category, **kwargs)
    elif spec.format in {"mvtec_ad", "synthetic_mvtec_ad"}:
        datamodule = MVTecAD(root=spec.root, category=spec.category, **kwargs)
    else:
        kwargs.setdefault("name", spec.name)
        datamodule = Folder(root=spec.root, **kwargs)
    if spec.max_train_images:
        _limit_train_images(datamodule, spec.max_train_images, seed)
    return datamodule


def _limit_train_images(datamodule: Any, limit: int, seed: int) -> None:  # noqa: ANN401
    """Keep a seeded random subset of at most ``limit`` training images (after the splits are made)."""
    import numpy as np

    original = datamodule._create_val_split  # noqa: SLF001

    def create_val_split_then_subsample() -> None:
        original()
        train = datamodule.train_data
        if len(train) > limit:
            indices = np.random.default_rng(seed).choice(len(train), size=limit, replace=False)
            datamodule.train_data = train.subsample(sorted(int(i) for i in indices))

    datamodule._create_val_split = create_val_split_then_subsample  # noqa: SLF001
