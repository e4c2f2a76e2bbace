"""MVTec LOCO AD ground truth: ``defects_config.json`` and per-defect mask channels.

The layout (official MVTec LOCO AD, also written by :mod:`anomalib_dskd.data.synthetic`)::

    <root>/<category>/defects_config.json
    <root>/<category>/test/<subset>/<id>.png                 subset: good, logical_anomalies, structural_anomalies
    <root>/<category>/ground_truth/<subset>/<id>/<k>.png     one PNG per defect ("channel"), k = 000, 001, ...

Each channel PNG holds one defect: pixels of the defect carry that defect type's ``pixel_value``,
all other pixels are 0. ``defects_config.json`` lists, for each ``pixel_value``, the saturation
threshold of that defect type, absolute (pixels) or relative (fraction of the defect's area).

Only numpy, OpenCV and Pillow are imported here: the module is used by the ``evaluate-loco``
command line without torch.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

GOOD = "good"
LOGICAL = "logical_anomalies"
STRUCTURAL = "structural_anomalies"
DEFECTS_CONFIG = "defects_config.json"

#: short names accepted wherever a subset is asked for
SUBSET_ALIASES = {
    "logical": LOGICAL,
    "logical_anomalies": LOGICAL,
    "structural": STRUCTURAL,
    "structural_anomalies": STRUCTURAL,
    "mean": "mean",
}


class LocoDataError(ValueError):
    """Malformed MVTec LOCO data or anomaly maps (the message names the offending file)."""


def canonical_subset(subset: str) -> str:
    """``"logical"`` -> ``"logical_anomalies"``; ``"mean"`` and other directory names unchanged."""
    return SUBSET_ALIASES.get(subset, subset)


@dataclass(frozen=True)
class DefectType:
    """One entry of ``defects_config.json``."""

    name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_area(self, defect_area: int) -> float:
        """Saturation area of a defect with ``defect_area`` pixels, as in MVTec's evaluation v2.0.

        relative: ``int(threshold * area)``; absolute: ``min(threshold, area)``. A relative
        saturation that rounds to 0 pixels (tiny defect) is raised to 1 pixel instead of
        dividing by zero.
        """
        if self.relative_saturation:
            area = float(int(self.saturation_threshold * defect_area))
        else:
            area = float(min(self.saturation_threshold, defect_area))
        return max(area, 1.0)


def read_defects_config(path: str | Path) -> dict[int, DefectType]:
    """Read ``defects_config.json`` into ``{pixel_value: DefectType}``.

    Raises:
        FileNotFoundError: the file does not exist.
        LocoDataError: the file is not a valid defects configuration.
    """
    path = Path(path)
    if not path.is_file():
        msg = (
            f"MVTec LOCO defects configuration {path} not found: sPRO needs it to look up each defect's "
            "saturation threshold (is the dataset in MVTec LOCO layout?)"
        )
        raise FileNotFoundError(msg)
    stat = path.stat()
    return dict(_read_defects_config_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=32)
def _read_defects_config_cached(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, DefectType], ...]:
    del mtime_ns, size  # cache keys only
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        msg = f"cannot read defects configuration {path}: {err}"
        raise LocoDataError(msg) from err
    if not isinstance(entries, list) or not entries:
        msg = f"defects configuration {path} must be a non-empty JSON list of defect entries"
        raise LocoDataError(msg)
    result: dict[int, DefectType] = {}
    for i, entry in enumerate(entries):
        try:
            defect = DefectType(
                name=str(entry["defect_name"]),
                pixel_value=int(entry["pixel_value"]),
                saturation_threshold=float(entry["saturation_threshold"]),
                relative_saturation=bool(entry["relative_saturation"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            msg = (
                f"entry {i} of defects configuration {path} is invalid ({type(err).__name__}: {err}); expected "
                "keys defect_name, pixel_value, saturation_threshold, relative_saturation"
            )
            raise LocoDataError(msg) from err
        if not 0 < defect.pixel_value < 256:
            msg = f"defects configuration {path}: pixel_value {defect.pixel_value} of {defect.name!r} is not in 1..255"
            raise LocoDataError(msg)
        bad_threshold = not math.isfinite(defect.saturation_threshold) or defect.saturation_threshold <= 0
        if defect.relative_saturation and defect.saturation_threshold > 1:
            bad_threshold = True
        if bad_threshold:
            msg = (
                f"defects configuration {path}: saturation_threshold {defect.saturation_threshold} of "
                f"{defect.name!r} is invalid (relative: 0 < t <= 1, absolute: t > 0 pixels)"
            )
            raise LocoDataError(msg)
        if defect.pixel_value in result:
            msg = f"defects configuration {path}: pixel_value {defect.pixel_value} is listed twice"
            raise LocoDataError(msg)
        result[defect.pixel_value] = defect
    return tuple(result.items())


@dataclass
class DefectChannel:
    """One ground-truth channel (one defect) of one test image."""

    path: Path
    defect: DefectType
    flat_index: np.ndarray  # int32/int64 indices of the defect pixels in the flattened (H, W) mask
    saturation_area: float

    @property
    def area(self) -> int:
        return int(self.flat_index.size)


@dataclass
class GroundTruth:
    """Per-defect ground truth of one test image at the ground truth's resolution."""

    shape: tuple[int, int]
    channels: list[DefectChannel] = field(default_factory=list)
    source: Path | None = None  # ground-truth directory (None for good images)

    def defect_free_mask(self) -> np.ndarray:
        """Flat boolean mask, True where no channel marks a defect."""
        mask = np.ones(self.shape[0] * self.shape[1], dtype=bool)
        for channel in self.channels:
            mask[channel.flat_index] = False
        return mask


def _read_mask(path: Path) -> np.ndarray:
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        msg = f"cannot read ground-truth mask {path} (not an image?)"
        raise LocoDataError(msg)
    if mask.ndim == 3:
        if mask.shape[2] == 4:
            mask = mask[..., :3]
        if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, mask.shape[2])):
            msg = f"ground-truth mask {path} is a colour image; MVTec LOCO masks are single-channel"
            raise LocoDataError(msg)
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        msg = f"ground-truth mask {path} has dtype {mask.dtype}; MVTec LOCO masks are 8-bit"
        raise LocoDataError(msg)
    return mask


def read_ground_truth_dir(gt_dir: str | Path, config: dict[int, DefectType], config_path: str | Path) -> GroundTruth:
    """Read every channel ``gt_dir/<k>.png`` of one anomalous image.

    Raises:
        FileNotFoundError: ``gt_dir`` does not exist or holds no PNG.
        LocoDataError: a mask holds a pixel value not listed in the configuration, several defect
            values, or the channels differ in size.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        msg = (
            f"ground-truth directory {gt_dir} not found (MVTec LOCO layout: "
            "<root>/<category>/ground_truth/<subset>/<id>/000.png)"
        )
        raise FileNotFoundError(msg)
    files = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() == ".png")
    if not files:
        msg = f"ground-truth directory {gt_dir} contains no PNG mask"
        raise FileNotFoundError(msg)
    shape: tuple[int, int] | None = None
    channels: list[DefectChannel] = []
    for path in files:
        mask = _read_mask(path)
        if shape is None:
            shape = (int(mask.shape[0]), int(mask.shape[1]))
        elif mask.shape != shape:
            msg = f"ground-truth mask {path} has size {mask.shape}, other channels of {gt_dir} have {shape}"
            raise LocoDataError(msg)
        histogram = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(histogram[1:]) + 1
        if values.size == 0:
            warnings.warn(f"ground-truth mask {path} is empty; it is ignored", RuntimeWarning, stacklevel=2)
            continue
        if values.size > 1:
            msg = (
                f"ground-truth mask {path} holds several defect pixel values {values.tolist()}; "
                "each MVTec LOCO channel holds exactly one defect"
            )
            raise LocoDataError(msg)
        value = int(values[0])
        if value not in config:
            msg = (
                f"pixel value {value} of ground-truth mask {path} is not listed in {config_path} "
                f"(known pixel values: {sorted(config)})"
            )
            raise LocoDataError(msg)
        defect = config[value]
        index = np.flatnonzero(mask.ravel())
        index = index.astype(np.int32) if mask.size < 2**31 else index
        channels.append(DefectChannel(path, defect, index, defect.saturation_area(int(index.size))))
    assert shape is not None
    if not channels:
        warnings.warn(f"all ground-truth masks of {gt_dir} are empty", RuntimeWarning, stacklevel=2)
    return GroundTruth(shape=shape, channels=channels, source=gt_dir)


@dataclass(frozen=True)
class LocoSample:
    """Where one test image lives in an MVTec LOCO tree."""

    category_root: Path
    subset: str
    image_id: str
    image_path: Path | None = None

    @property
    def is_good(self) -> bool:
        return self.subset == GOOD

    @property
    def config_path(self) -> Path:
        return self.category_root / DEFECTS_CONFIG

    @property
    def ground_truth_dir(self) -> Path:
        return self.category_root / "ground_truth" / self.subset / self.image_id


def locate_loco_sample(image_path: str | Path, dataset_root: str | Path | None = None) -> LocoSample:
    """Find category root, subset and id of ``<root>/<category>/test/<subset>/<id>.png``.

    ``dataset_root`` (optional) replaces the root found from the path: it may be the directory
    holding the categories or the category directory itself.
    """
    path = Path(image_path)
    parts = path.parts
    if len(parts) < 4 or path.parent.parent.name != "test":
        msg = (
            f"test image {path} is not in MVTec LOCO layout <root>/<category>/test/<subset>/<id>.png; "
            "cannot find its per-defect ground truth"
        )
        raise LocoDataError(msg)
    category_root = path.parent.parent.parent
    if dataset_root is not None:
        root = Path(dataset_root)
        category_root = root if (root / DEFECTS_CONFIG).is_file() else root / category_root.name
    return LocoSample(category_root=category_root, subset=path.parent.name, image_id=path.stem, image_path=path)


def image_size(path: Path | None) -> tuple[int, int] | None:
    """(H, W) of an image file from its header, or None when it cannot be read."""
    if path is None or not path.is_file():
        return None
    try:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - any unreadable file: fall back
        return None
    return int(height), int(width)


def load_sample_ground_truth(sample: LocoSample, fallback_shape: tuple[int, int]) -> GroundTruth:
    """Ground truth of ``sample``; good images get an empty one at the test image's resolution.

    For good images the resolution is read from the test image's header; when the image file is
    not available, ``fallback_shape`` (the anomaly map's own size) is used.
    """
    config = read_defects_config(sample.config_path)
    if sample.is_good:
        return GroundTruth(shape=image_size(sample.image_path) or tuple(fallback_shape))
    return read_ground_truth_dir(sample.ground_truth_dir, config, sample.config_path)
