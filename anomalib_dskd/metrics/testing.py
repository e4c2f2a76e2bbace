"""Tiny MVTec LOCO trees for tests, examples and benchmarks of the LOCO evaluation.

:func:`write_loco_category` writes a small but complete category (train, validation, test images,
per-defect ground truth with several channels per image, ``defects_config.json`` with absolute and
relative saturation) that anomalib's ``MVTecLOCO`` datamodule reads. Images are smooth noise with
bright/dark blobs where the defects are, so even an untrained feature extractor scores them higher.
For realistic synthetic data use :func:`anomalib_dskd.data.generate_loco_category`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: defect types of the tiny trees: two logical, two structural, absolute and relative saturation
TINY_DEFECTS = (
    {"defect_name": "missing_part", "pixel_value": 255, "saturation_threshold": 40, "relative_saturation": False},
    {"defect_name": "extra_part", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": True},
    {"defect_name": "scratch", "pixel_value": 253, "saturation_threshold": 0.5, "relative_saturation": True},
    {"defect_name": "stain", "pixel_value": 252, "saturation_threshold": 30, "relative_saturation": False},
)
_FAMILY_VALUES = {"logical_anomalies": (255, 254), "structural_anomalies": (253, 252)}


def _write_png(path: Path, array: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        msg = f"could not write {path}"
        raise OSError(msg)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    noise = rng.normal(0.0, 1.0, (max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
    smooth = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    image = 110 + 18 * smooth + rng.normal(0, 3, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _blob(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    mask = np.zeros((h, w), np.uint8)
    cy, cx = int(rng.integers(h // 5, 4 * h // 5)), int(rng.integers(w // 5, 4 * w // 5))
    axes = (int(rng.integers(max(2, w // 14), max(3, w // 6))), int(rng.integers(max(2, h // 14), max(3, h // 6))))
    cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def write_loco_category(
    root: str | Path,
    category: str = "tiny",
    image_size: tuple[int, int] = (48, 64),
    n_train: int = 8,
    n_validation: int = 2,
    n_good: int = 4,
    n_logical: int = 3,
    n_structural: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``<root>/<category>`` in MVTec LOCO layout and return that path.

    Every second anomalous image has two defect channels (``000.png`` and ``001.png``).
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / category
    base.mkdir(parents=True, exist_ok=True)
    (base / "defects_config.json").write_text(json.dumps(list(TINY_DEFECTS), indent=4))
    for split, folder, count in (("train", "good", n_train), ("validation", "good", n_validation), ("test", "good", n_good)):
        for i in range(count):
            _write_png(base / split / folder / f"{i:03d}.png", _background(rng, image_size))
    for subset, count in (("logical_anomalies", n_logical), ("structural_anomalies", n_structural)):
        values = _FAMILY_VALUES[subset]
        for i in range(count):
            image = _background(rng, image_size)
            for k in range(1 + i % 2):
                mask = _blob(rng, image_size)
                value = values[(i + k) % len(values)]
                image[mask] = (235, 235, 235) if k == 0 else (25, 25, 25)
                _write_png(base / "ground_truth" / subset / f"{i:03d}" / f"{k:03d}.png", mask.astype(np.uint8) * value)
            _write_png(base / "test" / subset / f"{i:03d}.png", image)
    return base
