"""MVTec LOCO evaluation (sPRO curves, AU-sPRO, image AUROC) in numpy.

This is the computation behind :class:`~anomalib_dskd.metrics.AUSPRO`,
:class:`~anomalib_dskd.metrics.LocoEvaluator` and ``anomalib-dskd evaluate-loco``. It follows
MVTec's official evaluation v2.0 (``evaluate_experiment.py``):

* a pixel is positive at threshold t when its score is strictly greater than t (the official
  ``np.greater``: a score equal to t is negative);
* each defect channel k of an anomalous image has a saturation area ``s_k`` (from
  ``defects_config.json``); its saturated overlap at threshold t is
  ``min(#{defect pixels with score > t}, s_k) / s_k``; sPRO(t) is the mean over all defects of
  the subset;
* FPR(t) is the fraction of defect-free pixels (pixels no channel marks; all pixels of good
  images) with score > t;
* one curve for {logical + good} and one for {structural + good} (generally: each anomalous
  subset directory + good); AU-sPRO(L) is the trapezoid area of sPRO over FPR in [0, L],
  interpolated linearly at L, divided by L; ``mean`` averages the subsets;
* image AUROC per subset (subset images against good images), image score = max of the map
  unless the caller gives one; ``mean`` averages the subsets;
* ``per_threshold`` (``metrics.json``'s ``localization.per_threshold``): thresholds in descending
  order with the FPR over all defect-free pixels of the test set and the mean sPRO over all its
  defects (every subset together, as the official script's ``MetricsAggregator``).

Instead of the official script's iterative threshold refinement (``curve_max_distance``) the curve
is computed exactly or with a certified error bound:

``exact``
    All scores are sorted once; the curve has a point at every distinct score b: the point of the
    thresholds t just below b (``score > t`` selects the scores ``>= b``), the limit of the official
    refinement for ``curve_max_distance -> 0``. Used when the test set has at most
    ``exact_max_pixels`` pixels (default 2**24, e.g. 100 maps of 400x400).
``binned``
    For large test sets (a full LOCO category has ~400 million pixels): defect pixels are kept
    exactly (only the ``s_k`` highest scores of each defect matter), defect-free pixels are
    counted in ``num_bins`` equal-width score bins. Each bin edge e is a genuine threshold (the
    largest float32 t below it: ``score > t`` selects the scores in the bins from e up), so every
    curve point is exact; only the straight segment between two consecutive points replaces the
    true staircase, which changes AU-sPRO(L) by at most ``sum(dFPR * dsPRO) / (2 L)`` over the
    bins below L. Bins whose share of that bound is too large are split again (another pass over
    the maps) until the bound is below ``tolerance`` (default 1e-4) or ``max_refinements`` passes
    were made; the bound is reported in :attr:`LocoResult.error_bound`.

Ties: pixels with equal scores pass a threshold together; the segment between the two points
around a tie is a straight line (as in the official script, which thresholds with ``np.greater``:
at a threshold equal to their score, tied pixels are all negative).

``per_threshold`` lists the points of the overall curve at genuine thresholds (exact counts with
``score > t`` in both modes: distinct scores in the exact mode, bin edges in the binned mode), thinned
so that consecutive points are at most ``per_threshold_distance`` apart where the scores allow (the
official script stops refining at ``curve_max_distance``, 0.01 by default); the first threshold is the
highest score (FPR 0, sPRO 0), the last one lies just below the lowest score (FPR 1, sPRO 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anomalib_dskd.metrics.loco_data import GOOD, LOGICAL, STRUCTURAL, GroundTruth, LocoDataError

DEFAULT_INTEGRATION_LIMITS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)
#: largest distance between consecutive ``per_threshold`` points (the official ``curve_max_distance`` default)
PER_THRESHOLD_DISTANCE = 0.01
EXACT_MAX_PIXELS = 2**24
NUM_BINS = 2**20
TOLERANCE = 1e-4

ProgressFn = Callable[[Iterable[Any], str, int], Iterable[Any]]


def limit_key(limit: float) -> str:
    """JSON key of an integration limit, as the official script writes it (``"0.05"``, ``"1.0"``)."""
    return str(float(limit))


@dataclass
class LocoItem:
    """One test image for :func:`compute_loco_metrics`.

    Args:
        subset: directory name under ``test/`` (``good``, ``logical_anomalies``, ...).
        name: how errors refer to the image (usually the anomaly map or image file).
        load_map: returns the anomaly map (2-D, any resolution with the ground truth's aspect).
            Called once per pass; may read a file each time.
        load_ground_truth: returns the image's :class:`GroundTruth`, given the map's (H, W).
        image_score: image-level score; ``None`` = max of the map at ground-truth resolution.
    """

    subset: str
    name: str
    load_map: Callable[[], np.ndarray]
    load_ground_truth: Callable[[tuple[int, int]], GroundTruth]
    image_score: float | None = None


@dataclass
class SproCurve:
    """sPRO curve of one subset: points ordered by decreasing threshold, from (0, 0) to (1, 1)."""

    fpr: np.ndarray
    spro: np.ndarray

    def auc(self, limit: float) -> float:
        """Area under the curve for FPR in [0, limit], divided by limit."""
        return trapezoid_below(self.fpr, self.spro, limit) / limit


@dataclass
class LocoResult:
    """Everything the LOCO evaluation computes. Subset keys are directory names."""

    subsets: list[str]
    integration_limits: tuple[float, ...]
    auc_spro: dict[str, dict[str, float]]  # subset | "mean" -> limit key -> value
    image_auroc: dict[str, float]  # subset | "mean" -> value
    curves: dict[str, SproCurve]
    num_images: dict[str, int]
    num_defects: dict[str, int]
    method: str  # "exact" or "binned"
    error_bound: dict[str, dict[str, float]] = field(default_factory=dict)
    refinement_passes: int = 0
    #: ``{"thresholds", "mean_spros", "fp_rates"}``: the overall curve at descending thresholds (or ``None``)
    per_threshold: dict[str, list[float]] | None = None
    _events: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_official_json(self) -> dict[str, Any]:
        """``metrics.json`` in the schema of MVTec's official ``evaluate_experiment.py``.

        ``localization`` holds ``auc_spro`` (per subset and ``mean``) and, when computed,
        ``per_threshold`` (``thresholds``, ``mean_spros``, ``fp_rates``: one list entry per threshold).
        """
        localization: dict[str, Any] = {"auc_spro": {k: dict(v) for k, v in self.auc_spro.items()}}
        if self.per_threshold is not None:
            localization["per_threshold"] = {k: list(v) for k, v in self.per_threshold.items()}
        return {"localization": localization, "classification": {"auc_roc": dict(self.image_auroc)}}

    def spro_at(self, threshold: float, subset: str = "mean") -> float:
        """Mean saturated per-region overlap of the defects of ``subset`` at ``anomaly_map > threshold``.

        Strictly greater, as the official script: a pixel whose score equals ``threshold`` is negative.
        """
        if subset == "mean":
            values = [self.spro_at(threshold, s) for s in self.subsets]
            return float(np.mean(values)) if values else math.nan
        if subset not in self._events:
            return math.nan
        scores, suffix = self._events[subset]
        return float(suffix[np.searchsorted(scores, threshold, side="right")])  # events > threshold

    def value(self, metric: str, subset: str = "mean", limit: float | None = None) -> float:
        """Look up ``"auc_spro"`` (needs ``limit``) or ``"image_auroc"``; NaN when the subset is absent."""
        if metric == "image_auroc":
            return float(self.image_auroc.get(subset, math.nan))
        if metric == "auc_spro":
            return float(self.auc_spro.get(subset, {}).get(limit_key(limit if limit is not None else 0.05), math.nan))
        msg = f"unknown LOCO metric {metric!r}"
        raise ValueError(msg)

    def summary(self) -> str:
        """Human-readable table of all numbers."""
        columns = [*self.subsets, "mean"]
        width = max(12, *(len(c) + 2 for c in columns))
        lines = [f"MVTec LOCO evaluation ({self.method}; images: {self.num_images}, defects: {self.num_defects})"]
        lines.append("metric".ljust(16) + "".join(c.rjust(width) for c in columns))
        lines.append("image AUROC".ljust(16) + "".join(f"{self.image_auroc.get(c, math.nan):{width}.4f}" for c in columns))
        for limit in self.integration_limits:
            key = limit_key(limit)
            row = "".join(f"{self.auc_spro.get(c, {}).get(key, math.nan):{width}.4f}" for c in columns)
            lines.append(f"AU-sPRO@{key}".ljust(16) + row)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# small numerical helpers
# --------------------------------------------------------------------------------------------


def trapezoid_below(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [x[0], x_max], interpolating linearly at ``x_max``.

    ``x`` must be non-decreasing (vertical steps allowed). Mirrors the official ``trapezoid``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        if ins <= 0 or ins >= len(x):
            msg = f"integration limit {x_max} outside the curve's range [{x[0]}, {x[-1]}]"
            raise ValueError(msg)
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_interp + y0) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def image_auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve (ties count one half), as ``sklearn.metrics.roc_auc_score``."""
    positive = np.asarray(positive, dtype=np.float64)
    negative = np.sort(np.asarray(negative, dtype=np.float64))
    if positive.size == 0 or negative.size == 0:
        return math.nan
    below = np.searchsorted(negative, positive, side="left")
    below_or_equal = np.searchsorted(negative, positive, side="right")
    return float((below.sum() + 0.5 * (below_or_equal - below).sum()) / (positive.size * negative.size))


def resize_map(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (OpenCV ``INTER_LINEAR`` = torch bilinear, ``align_corners=False``)."""
    if anomaly_map.shape == tuple(shape):
        return anomaly_map
    import cv2

    return cv2.resize(anomaly_map, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)


def check_map(anomaly_map: Any, name: str) -> np.ndarray:  # noqa: ANN401
    """Return ``anomaly_map`` as a float32 (H, W) array; clear errors for bad shapes or values."""
    array = np.asarray(anomaly_map)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or min(array.shape) == 0:
        msg = f"anomaly map {name} has shape {array.shape}; expected a single-channel 2-D map"
        raise LocoDataError(msg)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        msg = f"anomaly map {name} has dtype {array.dtype}; expected real numbers"
        raise LocoDataError(msg)
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(array.size - finite.sum() - n_nan)
        msg = f"anomaly map {name} contains {n_nan} NaN and {n_inf} infinite scores"
        raise LocoDataError(msg)
    return array


def check_aspect(map_shape: tuple[int, int], gt_shape: tuple[int, int], name: str, tolerance: float | None) -> None:
    """Raise when the map's aspect ratio differs from the ground truth's by more than ``tolerance``."""
    if tolerance is None or tuple(map_shape) == tuple(gt_shape):
        return
    map_aspect = map_shape[1] / map_shape[0]
    gt_aspect = gt_shape[1] / gt_shape[0]
    # allow one pixel of rounding on the map's shorter side
    slack = max(tolerance, 1.0 / min(map_shape))
    if abs(math.log(map_aspect / gt_aspect)) > slack:
        msg = (
            f"anomaly map {name} has size {tuple(map_shape)} (H, W) whose aspect ratio {map_aspect:.4f} does not "
            f"match the ground truth's {tuple(gt_shape)} ({gt_aspect:.4f}); the map cannot be resized onto it"
        )
        raise LocoDataError(msg)


# --------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------


@dataclass
class _Defect:
    subset: str
    top_scores: np.ndarray  # float32, descending: the ceil(s) highest scores of the defect
    saturation_area: float


@dataclass
class _ItemInfo:
    subset: str
    shape: tuple[int, int]
    defect_index: np.ndarray | None  # flat indices of pixels in any defect channel


def _event_arrays(defects: list[_Defect]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and sPRO weights of the 'events' of a subset's defects.

    A defect with saturation area s contributes weight 1/(s K) (K defects in the subset) for each
    of its floor(s) highest pixels and (s - floor(s))/(s K) for the next one; sPRO(t) is the sum of
    the weights of the events with score > t. This equals mean_k min(#{score > t}, s_k) / s_k.
    """
    if not defects:
        return np.zeros(0, np.float64), np.zeros(0, np.float64)
    n_defects = len(defects)
    scores, weights = [], []
    for defect in defects:
        s = defect.saturation_area
        top = defect.top_scores.astype(np.float64)
        w = np.full(top.size, 1.0 / (s * n_defects))
        whole = math.floor(s)
        if top.size > whole:  # fractional saturation area (absolute threshold not an integer)
            w[whole] = (s - whole) / (s * n_defects)
        scores.append(top)
        weights.append(w)
    return np.concatenate(scores), np.concatenate(weights)


def _top_scores(values: np.ndarray, saturation_area: float) -> np.ndarray:
    count = min(values.size, math.ceil(saturation_area))
    if count < values.size:
        values = np.partition(values, values.size - count)[values.size - count :]
    return np.sort(values)[::-1].astype(np.float32)


def _exact_curve(negatives: np.ndarray, ev_scores: np.ndarray, ev_weights: np.ndarray) -> SproCurve:
    """Curve with a point at every distinct score.

    Only the defect-free scores are sorted (in their own dtype); the sPRO at each distinct value b
    (the point of ``score > t`` for t just below b, i.e. of the scores >= b) is looked up among the
    (few) defect events. Where events lie strictly between two consecutive
    values, the vertical segment they make is kept by an extra point (FPR before b, sPRO just above b).
    """
    neg = np.sort(negatives)
    n = neg.size
    order = np.argsort(ev_scores, kind="stable")
    ev = ev_scores[order]
    suffix = np.concatenate([np.cumsum(ev_weights[order][::-1])[::-1], [0.0]])  # weight of events >= ev[j]
    if n == 0:
        return _finish_curve(np.zeros(1), suffix[:1])
    first = np.flatnonzero(np.concatenate([[True], neg[1:] != neg[:-1]]))  # first index of each distinct value
    values = neg[first][::-1].astype(np.float64)  # descending
    fpr = (n - first[::-1]) / n
    del neg, first
    spro = suffix[np.searchsorted(ev, values, side="left")]  # events >= value
    spro_above = suffix[np.searchsorted(ev, values, side="right")]  # events > value
    fpr_before = np.concatenate([[0.0], fpr[:-1]])
    spro_before = np.concatenate([[0.0], spro[:-1]])
    need = np.flatnonzero(spro_above > spro_before)
    fpr = np.insert(fpr, need, fpr_before[need])
    spro = np.insert(spro, need, spro_above[need])
    return _finish_curve(fpr, spro)


def _finish_curve(fpr: np.ndarray, spro: np.ndarray) -> SproCurve:
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    spro = np.concatenate([[0.0], np.minimum(spro, 1.0), [1.0]])
    # drop repeated points (thresholds that change nothing for this subset)
    keep = np.ones(fpr.size, dtype=bool)
    keep[1:] = (np.diff(fpr) != 0) | (np.diff(spro) != 0)
    return SproCurve(fpr=fpr[keep], spro=spro[keep])


class _Binning:
    """Equal-width bins on y = (score - lo) * scale in [0, num_bins], refined by splitting bins."""

    def __init__(self, lo: float, hi: float, num_bins: int) -> None:
        self.lo = float(lo)
        self.num_bins = int(num_bins)
        self.scale = self.num_bins / (float(hi) - self.lo) if hi > lo else 0.0
        self.edges = np.arange(self.num_bins, dtype=np.float64)  # lower edges in y space
        self.touched = np.zeros(self.num_bins, dtype=bool)  # uniform bins split in the current pass

    def y(self, scores: np.ndarray) -> np.ndarray:
        y = scores.astype(np.float64)
        y -= self.lo
        y *= self.scale
        return y

    def uniform_index(self, y: np.ndarray) -> np.ndarray:
        index = y.astype(np.int64)
        np.minimum(index, self.num_bins - 1, out=index)
        return index

    def index(self, y: np.ndarray) -> np.ndarray:
        """Interval of each y among the current edges (monotone in y: a genuine threshold set)."""
        return np.maximum(np.searchsorted(self.edges, y, side="right") - 1, 0)

    def upper_edges(self) -> np.ndarray:
        return np.concatenate([self.edges[1:], [float(self.num_bins)]])

    def single_valued(self) -> np.ndarray:
        """Intervals too narrow to hold two distinct float32 scores.

        All pixels of such an interval are tied, so the straight segment over it is exact (as
        for ties in the exact mode): it contributes nothing to the error bound.
        """
        if self.scale == 0.0:
            return np.ones(self.edges.size, dtype=bool)
        low = self.lo + self.edges / self.scale
        high = self.lo + self.upper_edges() / self.scale
        magnitude = np.minimum(np.abs(low), np.abs(high))
        magnitude[(low <= 0) & (high >= 0)] = 0.0
        spacing = np.spacing(magnitude.astype(np.float32)).astype(np.float64)
        return (high - low) * (1 + 1e-9) < spacing


def _suffix_sums(values: np.ndarray) -> np.ndarray:
    return np.cumsum(values[::-1])[::-1]


def _binned_curve(counts: np.ndarray, n_neg: int, ev_interval: np.ndarray, ev_weights: np.ndarray) -> tuple:
    """Curve points at the lower edge of each interval (descending thresholds) plus per-interval steps."""
    n_int = counts.size
    fpr_at = _suffix_sums(counts.astype(np.float64)) / max(n_neg, 1)
    dspro = np.bincount(ev_interval, weights=ev_weights, minlength=n_int) if ev_weights.size else np.zeros(n_int)
    spro_at = _suffix_sums(dspro)
    # reverse: from the highest threshold to the lowest
    curve = _finish_curve(fpr_at[::-1], spro_at[::-1])
    dfpr = counts / max(n_neg, 1)
    # FPR at the upper side of each interval (where the interval's box starts)
    fpr_upper = fpr_at - dfpr
    return curve, dfpr, dspro, fpr_upper


def _event_lookup(ev_scores: np.ndarray, ev_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted event scores and the suffix sums of their weights: sPRO(t) = suffix[searchsorted(scores, t, "right")]."""
    order = np.argsort(ev_scores, kind="stable")
    return ev_scores[order], np.concatenate([np.cumsum(ev_weights[order][::-1])[::-1], [0.0]])


def _thin(fpr: np.ndarray, spro: np.ndarray, distance: float) -> np.ndarray:
    """Indices of the points to keep: both ends of every step that crosses a multiple of ``distance``
    in arc length, and the two ends of the curve. Consecutive kept points are at most ``distance``
    apart, or one step of the curve (which no threshold can split); at most ``2 * (2 / distance + 1)``."""
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(fpr), np.diff(spro)))])
    cross = np.flatnonzero(np.diff(np.floor(length / distance)) > 0)
    keep = np.zeros(fpr.size, dtype=bool)
    keep[[0, -1]] = True
    keep[cross] = keep[cross + 1] = True
    return np.flatnonzero(keep)


def _per_threshold(thresholds: np.ndarray, fpr: np.ndarray, events: tuple[np.ndarray, np.ndarray],
                   n_defects: int, distance: float) -> dict[str, list[float]]:
    """The official ``per_threshold`` block from descending ``thresholds`` and their exact FPRs."""
    ev_scores, suffix = events
    spro = suffix[np.searchsorted(ev_scores, thresholds, side="right")]  # defect events > t
    distinct = np.flatnonzero(np.concatenate([[True], (np.diff(fpr) != 0) | (np.diff(spro) != 0)]))
    thresholds, fpr, spro = thresholds[distinct], fpr[distinct], spro[distinct]  # one threshold per point
    keep = _thin(fpr, spro, distance)
    spro = spro[keep] if n_defects else np.full(keep.size, math.nan)  # the official script has none either
    return {"thresholds": thresholds[keep].tolist(), "mean_spros": spro.tolist(), "fp_rates": fpr[keep].tolist()}


def _below(value: float) -> float:
    """The largest float32 below ``value`` (``score > _below(min)`` holds for every float32 score)."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _exact_thresholds(negatives: np.ndarray, ev_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct score (descending) and one below the lowest, with the FPR of ``score > t``."""
    neg = np.sort(negatives)
    thresholds = np.unique(np.concatenate([neg, ev_scores.astype(neg.dtype)])).astype(np.float64)[::-1]
    thresholds = np.append(thresholds, _below(thresholds[-1]))
    return thresholds, (neg.size - np.searchsorted(neg, thresholds, side="right")) / max(neg.size, 1)


def _edge_thresholds(binning: _Binning, counts: np.ndarray, n_neg: int, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds at the bin edges (descending, the highest score first), with their exact FPRs.

    The threshold of edge e is the largest float32 t with y(t) < e: since y is monotone, ``score > t``
    holds exactly for the float32 scores counted from e up.
    """
    fpr_at = np.concatenate([_suffix_sums(counts.astype(np.float64)), [0.0]]) / max(n_neg, 1)
    if binning.scale == 0.0:  # a single score value
        return np.array([hi, _below(hi)]), np.array([0.0, fpr_at[0]])
    edges = binning.edges
    t = (binning.lo + edges / binning.scale).astype(np.float32)
    down, up = np.float32(-np.inf), np.float32(np.inf)
    for _ in range(8):  # a few ulps of rounding at most
        t = np.where(binning.y(t) >= edges, np.nextafter(t, down), t)
        above = np.nextafter(t, up)
        t = np.where(binning.y(above) < edges, above, t)
    bad = (binning.y(t) >= edges) | (binning.y(np.nextafter(t, up)) < edges)
    if bad.any():  # pragma: no cover - the loop above converges within one or two steps
        msg = f"could not place {int(bad.sum())} bin-edge thresholds"
        raise RuntimeError(msg)
    return np.concatenate([[hi], t.astype(np.float64)[::-1]]), fpr_at[::-1]


def _bound_contributions(dfpr, dspro, fpr_upper, limit) -> np.ndarray:  # noqa: ANN001
    contrib = 0.5 * dfpr * dspro / limit
    contrib[fpr_upper >= limit] = 0.0
    return contrib


def compute_loco_metrics(
    items: Sequence[LocoItem],
    *,
    integration_limits: Sequence[float] = DEFAULT_INTEGRATION_LIMITS,
    mode: str = "auto",
    exact_max_pixels: int = EXACT_MAX_PIXELS,
    num_bins: int = NUM_BINS,
    tolerance: float = TOLERANCE,
    max_refinements: int = 8,
    refine_factor: int = 256,
    aspect_tolerance: float | None = 0.01,
    per_threshold_distance: float | None = PER_THRESHOLD_DISTANCE,
    progress: ProgressFn | None = None,
) -> LocoResult:
    """Compute the MVTec LOCO metrics of ``items`` (see the module docstring).

    Args:
        items: one :class:`LocoItem` per test image.
        integration_limits: FPR limits of AU-sPRO.
        mode: ``"exact"``, ``"binned"`` or ``"auto"`` (exact up to ``exact_max_pixels`` pixels).
        exact_max_pixels: largest test set (pixels at ground-truth resolution) evaluated exactly in auto mode.
        num_bins: score bins of the binned mode's first pass.
        tolerance: largest accepted error bound of the binned mode (per subset and limit).
        max_refinements: most refinement passes of the binned mode.
        refine_factor: sub-bins per refined bin.
        aspect_tolerance: largest |log(aspect ratio map / ground truth)| accepted when resizing a map
            to its ground truth; ``None`` stretches any map onto the ground truth (anomalib's
            square ``Resize``).
        per_threshold_distance: largest distance between consecutive points of
            :attr:`LocoResult.per_threshold` where the scores allow; ``None``: no ``per_threshold``.
        progress: optional wrapper ``progress(iterable, description, total)`` (e.g. tqdm).

    Raises:
        LocoDataError: bad maps, ground truth, or no good images.
    """
    if mode not in ("auto", "exact", "binned"):
        msg = f"mode must be 'auto', 'exact' or 'binned', got {mode!r}"
        raise ValueError(msg)
    limits = tuple(float(v) for v in integration_limits)
    if not limits or any(not 0 < v <= 1 for v in limits):
        msg = f"integration limits must lie in (0, 1], got {limits}"
        raise ValueError(msg)
    items = list(items)
    if not items:
        msg = "no test images to evaluate"
        raise LocoDataError(msg)
    if not any(item.subset == GOOD for item in items):
        msg = (
            f"none of the {len(items)} test images is in a '{GOOD}' subset (e.g. {items[0].name}); the false "
            "positive rate and image AUROC need defect-free test images"
        )
        raise LocoDataError(msg)
    subsets = sorted({item.subset for item in items if item.subset != GOOD}, key=_subset_order)
    if not subsets:
        msg = f"all {len(items)} test images are in '{GOOD}' (e.g. {items[0].name}); there is nothing to localize"
        raise LocoDataError(msg)
    wrap = progress or (lambda iterable, desc, total: iterable)  # noqa: ARG005

    def load(item: LocoItem) -> np.ndarray:
        return check_map(item.load_map(), item.name)

    # ---- pass 1: ground truth, image scores, defect scores, score range (and negatives if exact)
    keep_negatives = mode != "binned"
    negatives: dict[str, list[np.ndarray]] = {GOOD: [], **{s: [] for s in subsets}}
    n_neg = dict.fromkeys(negatives, 0)
    defects: list[_Defect] = []
    infos: list[_ItemInfo] = []
    scores: dict[str, list[float]] = {GOOD: [], **{s: [] for s in subsets}}
    lo, hi, total_pixels = math.inf, -math.inf, 0
    for item in wrap(items, "reading anomaly maps", len(items)):
        anomaly_map = load(item)
        gt = item.load_ground_truth(anomaly_map.shape)
        if item.subset != GOOD and not gt.channels:
            warnings.warn(f"anomalous image {item.name} has no defect in its ground truth", RuntimeWarning, stacklevel=2)
        check_aspect(anomaly_map.shape, gt.shape, item.name, aspect_tolerance)
        full = resize_map(anomaly_map, gt.shape).ravel()
        lo, hi = min(lo, float(full.min())), max(hi, float(full.max()))
        total_pixels += full.size
        scores[item.subset].append(float(full.max()) if item.image_score is None else float(item.image_score))
        defect_index = None
        if gt.channels:
            for channel in gt.channels:
                top = _top_scores(full[channel.flat_index], channel.saturation_area)
                defects.append(_Defect(item.subset, top, channel.saturation_area))
            if len(gt.channels) == 1:
                defect_index = gt.channels[0].flat_index
            else:
                union = np.zeros(full.size, dtype=bool)
                for channel in gt.channels:
                    union[channel.flat_index] = True
                defect_index = np.flatnonzero(union).astype(gt.channels[0].flat_index.dtype)
        infos.append(_ItemInfo(item.subset, tuple(gt.shape), defect_index))
        free = full if defect_index is None else np.delete(full, defect_index)
        n_neg[item.subset] += free.size
        if keep_negatives:
            if mode == "auto" and total_pixels > exact_max_pixels:
                keep_negatives = False
                negatives = {k: [] for k in negatives}
            else:
                negatives[item.subset].append(free.copy() if free is full else free)

    method = "exact" if keep_negatives else "binned"
    subset_defects = {s: [d for d in defects if d.subset == s] for s in subsets}
    events = {s: _event_arrays(subset_defects[s]) for s in subsets}
    all_events = _event_lookup(*_event_arrays(defects))  # every defect of the test set, for per_threshold
    per_threshold = None
    for s in subsets:
        if not subset_defects[s]:
            warnings.warn(f"subset {s} has no defect in its ground truth; its AU-sPRO is NaN", RuntimeWarning, stacklevel=2)

    curves: dict[str, SproCurve] = {}
    error_bound: dict[str, dict[str, float]] = {}
    passes = 0
    if method == "exact":
        for s in subsets:
            neg = np.concatenate(negatives[GOOD] + negatives[s])
            curves[s] = _exact_curve(neg, *events[s])
            error_bound[s] = {limit_key(v): 0.0 for v in limits}
        if per_threshold_distance is not None:
            every = np.concatenate([a for arrays in negatives.values() for a in arrays])
            thresholds, fpr = _exact_thresholds(every, all_events[0])
            del every
            per_threshold = _per_threshold(thresholds, fpr, all_events, len(defects), per_threshold_distance)
        del negatives
    else:
        binning = _Binning(lo, hi, num_bins)
        counts = {k: np.zeros(binning.num_bins, dtype=np.int64) for k in negatives}

        # per interval: lowest and highest defect-free y seen in a refinement pass (+-inf: unknown)
        neg_min = np.full(binning.num_bins, -np.inf)
        neg_max = np.full(binning.num_bins, np.inf)

        def data_pass(desc: str, first: bool) -> None:
            nonlocal neg_min, neg_max
            n_int = binning.num_bins if first else binning.edges.size
            new_counts = {k: np.zeros(n_int, dtype=np.int64) for k in counts}
            new_min, new_max = np.full(n_int, np.inf), np.full(n_int, -np.inf)
            for item, info in wrap(list(zip(items, infos, strict=True)), desc, len(items)):
                anomaly_map = load(item)
                full = resize_map(anomaly_map, info.shape).ravel()
                free = full if info.defect_index is None else np.delete(full, info.defect_index)
                y = binning.y(free)
                if first:
                    new_counts[info.subset] += np.bincount(binning.uniform_index(y), minlength=n_int)
                else:
                    y = y[binning.touched[binning.uniform_index(y)]]
                    index = binning.index(y)
                    new_counts[info.subset] += np.bincount(index, minlength=n_int)
                    np.minimum.at(new_min, index, y)
                    np.maximum.at(new_max, index, y)
            if first:
                counts.update(new_counts)
                return
            touched = binning.touched[binning.uniform_index(binning.edges)]
            for k in counts:
                counts[k] = np.where(touched, new_counts[k], counts[k])
            neg_min = np.where(touched, new_min, neg_min)
            neg_max = np.where(touched, new_max, neg_max)

        def tied_intervals() -> np.ndarray:
            """Intervals whose pixels (defect-free and defect events) all share one score."""
            tied = binning.single_valued()
            ev_y = np.concatenate([binning.y(events[s][0]) for s in subsets])
            ev_index = binning.index(ev_y)
            ev_min, ev_max = np.full(binning.edges.size, np.inf), np.full(binning.edges.size, -np.inf)
            np.minimum.at(ev_min, ev_index, ev_y)
            np.maximum.at(ev_max, ev_index, ev_y)
            has_neg, has_ev = neg_min <= neg_max, ev_min <= ev_max
            neg_single = has_neg & (neg_min == neg_max)
            ev_single = ~has_ev | (ev_min == ev_max)
            return tied | (neg_single & ev_single & (~has_ev | (ev_min == neg_min)))

        data_pass("counting scores", first=True)
        while True:
            ev_interval = {s: binning.index(binning.y(events[s][0])) for s in subsets}
            split = np.zeros(binning.edges.size, dtype=bool)
            tied = tied_intervals()
            worst = 0.0
            for s in subsets:
                c = counts[GOOD] + counts[s]
                curve, dfpr, dspro, fpr_upper = _binned_curve(c, n_neg[GOOD] + n_neg[s], ev_interval[s], events[s][1])
                curves[s] = curve
                error_bound[s] = {}
                for limit in limits:
                    contrib = _bound_contributions(dfpr, dspro, fpr_upper, limit)
                    contrib[tied] = 0.0
                    total = float(contrib.sum())
                    error_bound[s][limit_key(limit)] = total
                    worst = max(worst, total)
                    if total > tolerance:
                        order = np.argsort(contrib)[::-1]
                        remaining = total - np.cumsum(contrib[order])
                        n_split = int(np.searchsorted(-remaining, -tolerance / 8, side="left")) + 1
                        split[order[:n_split]] = True
            if worst <= tolerance or passes >= max_refinements:
                break
            # split the selected intervals into refine_factor parts (in y space)
            width = binning.upper_edges() - binning.edges
            split &= width > 1e-12 * np.maximum(1.0, np.abs(binning.edges))
            if not split.any():
                break
            parts = binning.edges[split][:, None] + width[split][:, None] * (np.arange(1, refine_factor) / refine_factor)
            old_edges = binning.edges
            binning.touched[:] = False
            binning.touched[binning.uniform_index(old_edges[split])] = True
            binning.edges = np.unique(np.concatenate([old_edges, parts.ravel()]))
            # carry counts and ranges of untouched intervals over to the new edge list
            position = np.searchsorted(binning.edges, old_edges)

            def expand(values: np.ndarray, fill: float) -> np.ndarray:
                out = np.full(binning.edges.size, fill, dtype=values.dtype)
                out[position] = values
                return out

            for k in counts:
                counts[k] = expand(counts[k], 0)
            neg_min, neg_max = expand(neg_min, -np.inf), expand(neg_max, np.inf)
            passes += 1
            data_pass(f"refining score bins (pass {passes})", first=False)
        if worst > tolerance:
            warnings.warn(
                f"binned sPRO: error bound {worst:.2e} above tolerance {tolerance:.0e} after {passes} refinement passes "
                "(very concentrated scores?)",
                RuntimeWarning,
                stacklevel=2,
            )
        if per_threshold_distance is not None:
            thresholds, fpr = _edge_thresholds(binning, sum(counts.values()), sum(n_neg.values()), hi)
            per_threshold = _per_threshold(thresholds, fpr, all_events, len(defects), per_threshold_distance)

    # ---- AU-sPRO and image AUROC
    auc_spro: dict[str, dict[str, float]] = {}
    for s in subsets:
        auc_spro[s] = {
            limit_key(v): (curves[s].auc(v) if subset_defects[s] else math.nan) for v in limits
        }
    auc_spro["mean"] = {limit_key(v): float(np.mean([auc_spro[s][limit_key(v)] for s in subsets])) for v in limits}
    auroc = {s: image_auroc(scores[s], scores[GOOD]) for s in subsets}
    auroc["mean"] = float(np.mean([auroc[s] for s in subsets]))

    event_lookup = {s: _event_lookup(*events[s]) for s in subsets}

    return LocoResult(
        subsets=subsets,
        integration_limits=limits,
        auc_spro=auc_spro,
        image_auroc=auroc,
        curves=curves,
        num_images={k: len(v) for k, v in scores.items()},
        num_defects={s: len(subset_defects[s]) for s in subsets},
        method=method,
        error_bound=error_bound,
        refinement_passes=passes,
        per_threshold=per_threshold,
        _events=event_lookup,
    )


def _subset_order(name: str) -> tuple[int, str]:
    return ({LOGICAL: 0, STRUCTURAL: 1}.get(name, 2), name)
