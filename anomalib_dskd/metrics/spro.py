"""MVTec LOCO metrics for anomalib: :class:`SPRO`, :class:`AUSPRO`, :class:`LocoImageAUROC`.

The metrics collect, per test image, the anomaly map (at the model's resolution), the image path
and the image score. At ``compute`` they find each image's per-defect ground truth from its path
(``<root>/<category>/test/<subset>/<id>.png`` -> ``<root>/<category>/ground_truth/<subset>/<id>/<k>.png``
and ``<root>/<category>/defects_config.json``), resize the map to the ground truth's resolution and
run :func:`~anomalib_dskd.metrics.spro_core.compute_loco_metrics`. anomalib's ``gt_mask`` and
``mask_path`` are not used: anomalib merges the per-defect masks.

States are lists of tensors reduced with ``cat``: in multi-process runs every process gathers all
maps and computes the same result (duplicates added by a distributed sampler are dropped by path).

Several metrics can share one state (one copy of the maps, one computation): pass the first as
``source=`` to the others, as :class:`~anomalib_dskd.metrics.LocoEvaluator` does. A metric with a
``source`` ignores its own updates and reads the source's result; the source must be updated and
reset as usual (put it in the same ``Evaluator``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from anomalib.metrics import AnomalibMetric
from anomalib_dskd.metrics.loco_data import (
    GOOD,
    LocoDataError,
    canonical_subset,
    load_sample_ground_truth,
    locate_loco_sample,
)
from anomalib_dskd.metrics.spro_core import (
    DEFAULT_INTEGRATION_LIMITS,
    EXACT_MAX_PIXELS,
    NUM_BINS,
    TOLERANCE,
    LocoItem,
    LocoResult,
    compute_loco_metrics,
    image_auroc,
    limit_key,
)

_SHORT = {"logical_anomalies": "logical", "structural_anomalies": "structural"}


def _short(subset: str) -> str:
    return _SHORT.get(subset, subset)


class _LocoState(Metric):
    """Shared state and computation of the LOCO metrics (see the module docstring)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        *,
        dataset_root: str | Path | None = None,
        integration_limits: Sequence[float] = DEFAULT_INTEGRATION_LIMITS,
        image_score: str = "pred_score",
        mode: str = "auto",
        aspect_tolerance: float | None = None,
        exact_max_pixels: int = EXACT_MAX_PIXELS,
        num_bins: int = NUM_BINS,
        tolerance: float = TOLERANCE,
        source: _LocoState | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if image_score not in ("pred_score", "max"):
            msg = f"image_score must be 'pred_score' (the model's image score) or 'max' (max of the map), got {image_score!r}"
            raise ValueError(msg)
        if source is not None and not isinstance(source, _LocoState):
            msg = f"source must be a LOCO metric (SPRO, AUSPRO, LocoImageAUROC), got {type(source).__name__}"
            raise TypeError(msg)
        self.dataset_root = None if dataset_root is None else str(dataset_root)
        self.integration_limits = tuple(float(v) for v in integration_limits)
        self.image_score = image_score
        self.mode = mode
        self.aspect_tolerance = aspect_tolerance
        self.exact_max_pixels = int(exact_max_pixels)
        self.num_bins = int(num_bins)
        self.tolerance = float(tolerance)
        # plain attribute, not a registered submodule: the source is an independent metric
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_result", None)
        self._warned: set[str] = set()
        if source is None:
            self.add_state("maps", default=[], dist_reduce_fx="cat")
            self.add_state("map_sizes", default=[], dist_reduce_fx="cat")
            self.add_state("path_bytes", default=[], dist_reduce_fx="cat")
            self.add_state("path_lengths", default=[], dist_reduce_fx="cat")
            self.add_state("image_scores", default=[], dist_reduce_fx="cat")

    # ------------------------------------------------------------------ fields and update
    def _check_fields(self, needs_map: bool) -> None:
        fields = list(getattr(self, "fields", ()))
        if getattr(self, "_source", None) is not None:
            return
        if "image_path" not in fields:
            msg = f"{type(self).__name__} needs the batch field 'image_path' to find the LOCO ground truth (fields={fields})"
            raise ValueError(msg)
        if needs_map and "anomaly_map" not in fields:
            msg = f"{type(self).__name__} needs the batch field 'anomaly_map' (fields={fields})"
            raise ValueError(msg)
        if self.image_score == "pred_score" and "pred_score" not in fields and "anomaly_map" not in fields:
            msg = f"{type(self).__name__} needs 'pred_score' or 'anomaly_map' among its fields (fields={fields})"
            raise ValueError(msg)

    def update(self, *values: Any) -> None:  # noqa: ANN401
        """Store the batch's maps, paths and scores (values in the order of ``self.fields``)."""
        if self._source is not None:
            return
        object.__setattr__(self, "_result", None)
        data = dict(zip(self.fields, values, strict=True))
        paths = data["image_path"]
        paths = [str(paths)] if isinstance(paths, str | Path) else [str(p) for p in paths]
        n = len(paths)
        anomaly_map = data.get("anomaly_map")
        if anomaly_map is not None:
            anomaly_map = torch.as_tensor(anomaly_map).detach()
            if anomaly_map.ndim == 4 and anomaly_map.shape[1] == 1:
                anomaly_map = anomaly_map[:, 0]
            if anomaly_map.ndim == 2 and n == 1:
                anomaly_map = anomaly_map[None]
            if anomaly_map.ndim != 3 or anomaly_map.shape[0] != n:
                msg = f"anomaly_map of shape {tuple(anomaly_map.shape)} does not match {n} image paths ({paths[0]}, ...)"
                raise ValueError(msg)
            self.maps.append(anomaly_map.float().reshape(-1))
            self.map_sizes.append(torch.tensor([anomaly_map.shape[1:]] * n, dtype=torch.int64, device=anomaly_map.device))
        score = data.get("pred_score")
        if score is not None and self.image_score == "pred_score":
            score = torch.as_tensor(score).detach().float().reshape(-1)
            if score.numel() != n:
                msg = f"pred_score with {score.numel()} values does not match {n} image paths ({paths[0]}, ...)"
                raise ValueError(msg)
        else:
            score = torch.full((n,), math.nan)
        device = self.maps[-1].device if anomaly_map is not None else score.device
        self.image_scores.append(score.to(device))
        encoded = [p.encode("utf-8") for p in paths]
        self.path_bytes.append(torch.tensor(list(b"".join(encoded)), dtype=torch.uint8, device=device))
        self.path_lengths.append(torch.tensor([len(b) for b in encoded], dtype=torch.int64, device=device))

    def reset(self) -> None:
        """Forget the stored batches and the cached result."""
        super().reset()
        object.__setattr__(self, "_result", None)

    # ------------------------------------------------------------------ computation
    def compute_result(self) -> LocoResult:
        """All LOCO numbers (computed once per epoch, shared by metrics that use this one as source)."""
        if self._source is not None:
            return self._source.compute_result()
        if self._result is None:
            should_sync = not self._is_synced
            with self.sync_context(should_sync=should_sync, should_unsync=should_sync):
                object.__setattr__(self, "_result", self._compute_local())
        return self._result

    def _gathered(self) -> tuple[list[str], np.ndarray, list[tuple[int, int]] | None, np.ndarray | None]:
        if len(self.path_lengths) == 0:
            msg = f"{type(self).__name__} was never updated: no test images to evaluate"
            raise LocoDataError(msg)
        lengths = dim_zero_cat(self.path_lengths).cpu().numpy()
        raw = dim_zero_cat(self.path_bytes).cpu().numpy().tobytes()
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        paths = [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(lengths.size)]
        scores = dim_zero_cat(self.image_scores).cpu().numpy().astype(np.float64)
        sizes, maps = None, None
        if len(self.map_sizes) > 0:
            sizes = [tuple(int(v) for v in row) for row in dim_zero_cat(self.map_sizes).cpu().numpy()]
            maps = dim_zero_cat(self.maps).cpu().numpy()
            if len(sizes) != len(paths):
                msg = "anomaly maps were stored for only some batches; every batch needs an anomaly_map"
                raise LocoDataError(msg)
        return paths, scores, sizes, maps

    def _compute_local(self) -> LocoResult:
        paths, scores, sizes, maps = self._gathered()
        offsets = None
        if sizes is not None:
            offsets = np.concatenate([[0], np.cumsum([h * w for h, w in sizes])])
        seen: set[str] = set()
        entries = []
        for i, path in enumerate(paths):
            if path in seen:  # distributed samplers repeat samples to even out the processes
                continue
            seen.add(path)
            entries.append((i, locate_loco_sample(path, self.dataset_root)))
        if sizes is None:  # image scores only (LocoImageAUROC on pred_score)
            return _image_only_result(entries, scores, self.integration_limits)
        items = []
        for i, sample in entries:
            h, w = sizes[i]
            start, stop = int(offsets[i]), int(offsets[i + 1])

            def load_map(start: int = start, stop: int = stop, h: int = h, w: int = w) -> np.ndarray:
                return maps[start:stop].reshape(h, w)

            def load_gt(shape: tuple[int, int], sample=sample):  # noqa: ANN001, ANN202
                return load_sample_ground_truth(sample, fallback_shape=shape)

            score = None
            if self.image_score == "pred_score" and math.isfinite(scores[i]):
                score = float(scores[i])
            elif self.image_score == "pred_score" and "pred_score" in self.fields:
                msg = f"pred_score of test image {sample.image_path} is {scores[i]}"
                raise LocoDataError(msg)
            items.append(LocoItem(subset=sample.subset, name=str(sample.image_path), load_map=load_map,
                                  load_ground_truth=load_gt, image_score=score))
        return compute_loco_metrics(
            items,
            integration_limits=self.integration_limits,
            mode=self.mode,
            exact_max_pixels=self.exact_max_pixels,
            num_bins=self.num_bins,
            tolerance=self.tolerance,
            aspect_tolerance=self.aspect_tolerance,
        )

    def _nan_if_absent(self, value: float, subset: str) -> torch.Tensor:
        if math.isnan(value) and subset not in self._warned:
            self._warned.add(subset)
            warnings.warn(f"{getattr(self, 'name', type(self).__name__)}: no '{subset}' test images with ground truth; "
                          "the metric is NaN", RuntimeWarning, stacklevel=3)
        return torch.tensor(value, dtype=torch.float32)


def _image_only_result(entries: list, scores: np.ndarray, limits: tuple[float, ...]) -> LocoResult:
    by_subset: dict[str, list[float]] = {}
    for i, sample in entries:
        if not math.isfinite(scores[i]):
            msg = f"image score of test image {sample.image_path} is {scores[i]}"
            raise LocoDataError(msg)
        by_subset.setdefault(sample.subset, []).append(float(scores[i]))
    if GOOD not in by_subset:
        msg = f"none of the {len(entries)} test images (e.g. {entries[0][1].image_path}) is in test/good"
        raise LocoDataError(msg)
    subsets = sorted(s for s in by_subset if s != GOOD)
    auroc = {s: image_auroc(by_subset[s], by_subset[GOOD]) for s in subsets}
    auroc["mean"] = float(np.mean(list(auroc.values()))) if subsets else math.nan
    return LocoResult(subsets=subsets, integration_limits=limits, auc_spro={}, image_auroc=auroc, curves={},
                      num_images={k: len(v) for k, v in by_subset.items()}, num_defects={}, method="image-only")


def _fields_of_source(fields: Sequence[str] | None, kwargs: dict) -> Sequence[str] | None:
    """A metric reading another metric's state checks the same batch fields (it stores nothing)."""
    source = kwargs.get("source")
    return list(source.fields) if fields is None and source is not None else fields


class AUSPRO(AnomalibMetric, _LocoState):  # type: ignore[misc]
    """Area under the sPRO curve up to an FPR integration limit, normalised by the limit (MVTec LOCO AU-sPRO).

    Args:
        integration_limit: FPR limit (official: 0.01, 0.05, 0.1, 0.3, 1.0; papers report 0.05).
        subset: ``"logical"``, ``"structural"`` or ``"mean"`` (of the two; generally of all
            anomalous subsets present).
        dataset_root: optional root of the dataset (directory of the categories, or a category
            directory); default: found from each ``image_path``.
        integration_limits: all limits computed (the result is cached for all of them).
        image_score: ``"pred_score"`` (model's image score) or ``"max"`` (max of the map at
            ground-truth resolution, as MVTec's script) for the image AUROC of the shared result.
        mode: ``"auto"``, ``"exact"`` or ``"binned"`` (see :mod:`anomalib_dskd.metrics.spro_core`).
        aspect_tolerance: ``None`` (default) stretches the map onto the ground truth, as
            anomalib's ``Resize`` squashes the image; a number rejects maps whose aspect ratio
            differs from the ground truth's by more than that (log ratio).
        source: another LOCO metric whose state and result this one shares.
        name: logged name (default ``{prefix}AUSPRO_{subset}_{limit}``).
        fields, prefix, strict: see :class:`anomalib.metrics.AnomalibMetric`.

    Example:
        >>> from anomalib.metrics import Evaluator
        >>> evaluator = Evaluator(test_metrics=[AUSPRO(integration_limit=0.05, subset="mean")])
    """

    default_fields = ("anomaly_map", "image_path")

    def __init__(
        self,
        integration_limit: float = 0.05,
        subset: str = "mean",
        *,
        name: str | None = None,
        fields: Sequence[str] | None = None,
        prefix: str = "",
        strict: bool = True,
        **kwargs,
    ) -> None:
        limits = tuple(kwargs.pop("integration_limits", DEFAULT_INTEGRATION_LIMITS))
        if float(integration_limit) not in limits:
            limits = (*limits, float(integration_limit))
        fields = _fields_of_source(fields, kwargs)
        super().__init__(fields=fields, prefix=prefix, strict=strict, integration_limits=limits, **kwargs)
        self.integration_limit = float(integration_limit)
        self.subset = canonical_subset(subset)
        self.name = name or f"{prefix}AUSPRO_{_short(self.subset)}_{limit_key(self.integration_limit)}"
        self._check_fields(needs_map=True)

    def compute(self) -> torch.Tensor:
        """AU-sPRO of ``subset`` at ``integration_limit``."""
        value = self.compute_result().value("auc_spro", self.subset, self.integration_limit)
        return self._nan_if_absent(value, self.subset)


class SPRO(AnomalibMetric, _LocoState):  # type: ignore[misc]
    """Mean saturated per-region overlap at a fixed threshold (``anomaly_map > threshold``, strictly, as MVTec's).

    Same arguments as :class:`AUSPRO`, with ``threshold`` instead of ``integration_limit``.
    Default name ``{prefix}SPRO_{subset}``.
    """

    default_fields = ("anomaly_map", "image_path")

    def __init__(
        self,
        threshold: float = 0.5,
        subset: str = "mean",
        *,
        name: str | None = None,
        fields: Sequence[str] | None = None,
        prefix: str = "",
        strict: bool = True,
        **kwargs,
    ) -> None:
        fields = _fields_of_source(fields, kwargs)
        super().__init__(fields=fields, prefix=prefix, strict=strict, **kwargs)
        self.threshold = float(threshold)
        self.subset = canonical_subset(subset)
        self.name = name or f"{prefix}SPRO_{_short(self.subset)}"
        self._check_fields(needs_map=True)

    def compute(self) -> torch.Tensor:
        """sPRO of ``subset`` at ``threshold``."""
        value = self.compute_result().spro_at(self.threshold, self.subset)
        return self._nan_if_absent(value, self.subset)


class LocoImageAUROC(AnomalibMetric, _LocoState):  # type: ignore[misc]
    """Image AUROC of logical or structural anomalies against the good test images, or their mean.

    Default fields ``("pred_score", "image_path")`` (no ground truth needed). With
    ``image_score="max"`` and fields ``("anomaly_map", "image_path")`` the image score is the max
    of the map at ground-truth resolution, as in MVTec's script. Default name
    ``{prefix}AUROC_{subset}`` with prefix ``"image_"``.
    """

    default_fields = ("pred_score", "image_path")

    def __init__(
        self,
        subset: str = "mean",
        *,
        name: str | None = None,
        fields: Sequence[str] | None = None,
        prefix: str = "image_",
        strict: bool = True,
        **kwargs,
    ) -> None:
        if kwargs.get("image_score") == "max" and fields is None and kwargs.get("source") is None:
            fields = ("anomaly_map", "image_path")
        fields = _fields_of_source(fields, kwargs)
        super().__init__(fields=fields, prefix=prefix, strict=strict, **kwargs)
        self.subset = canonical_subset(subset)
        self.name = name or f"{prefix}AUROC_{_short(self.subset)}"
        self._check_fields(needs_map=False)

    def compute(self) -> torch.Tensor:
        """Image AUROC of ``subset``."""
        value = self.compute_result().value("image_auroc", self.subset)
        return self._nan_if_absent(value, self.subset)
