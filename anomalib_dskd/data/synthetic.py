"""Deterministic synthetic anomaly-detection datasets in MVTec LOCO AD and MVTec AD layouts.

Every normal image shows the same arrangement of four coloured parts on a mildly textured tray
(a red disc, a blue square, a green triangle and a yellow hexagon, laid out on a 3 x 2 grid with two
empty cells), with a little seeded jitter of position, size, rotation, illumination and sensor noise.

Anomalies come in two families, each defect type with its own ground-truth pixel value:

* **logical** (the parts look fine, the arrangement is wrong): ``missing_object`` (mask: where the part
  should be), ``extra_object`` (mask: the surplus part), ``swapped_objects`` (two parts exchange
  places; mask: both places) and ``misplaced_object`` (a part sits in an empty cell; mask: the new place
  and the empty old place);
* **structural** (local damage): ``scratch`` (thin bright or dark curved line across a part),
  ``contamination`` (irregular blob of a foreign colour) and ``dent`` (local warp of a part's outline with
  dark shading).

Some anomalous LOCO images carry two defects of different types, written as two ground-truth channels
(``000.png`` and ``001.png``), as in the real MVTec LOCO AD dataset.

The output is byte-for-byte reproducible: each image is drawn from its own generator
``numpy.random.default_rng((seed, stream, index))``, so the same seed always gives the same files and
changing one count does not change the other images.

Example:
    >>> from anomalib_dskd.data import generate_loco_category
    >>> path = generate_loco_category("/tmp/synthetic_loco", seed=0, overwrite=True)  # doctest: +SKIP
    >>> from anomalib.data import MVTecLOCO
    >>> datamodule = MVTecLOCO(root="/tmp/synthetic_loco", category=path.name)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "ARRANGEMENT_DEFECT_TYPES",
    "ARRANGEMENT_LOGICAL_DEFECTS",
    "DEFECT_TYPES",
    "LOGICAL_DEFECTS",
    "MIN_IMAGE_SIDE",
    "PRESETS",
    "STRUCTURAL_DEFECTS",
    "DefectType",
    "generate_loco_category",
    "generate_mvtec_ad_category",
    "loco_defects_config",
]

#: Smallest accepted image height / width in pixels (the 3 x 2 layout gets too small below this).
MIN_IMAGE_SIDE = 64
#: Largest accepted image height / width in pixels (a sanity limit against typos).
MAX_IMAGE_SIDE = 8192


@dataclass(frozen=True)
class DefectType:
    """One defect type of the synthetic category, as listed in ``defects_config.json``.

    Attributes:
        name: Defect name (``defect_name`` in the config).
        family: ``"logical"`` or ``"structural"``.
        pixel_value: Value of the defect region in its ground-truth channel (1-255).
        relative_saturation: Whether ``saturation_threshold`` is a fraction of the defect area
            (``True``) or an absolute number of pixels (``False``).
        saturation: The fraction for relative entries; for absolute entries the threshold is computed
            from the image size (the mean area of one part), see :func:`loco_defects_config`.
    """

    name: str
    family: str
    pixel_value: int
    relative_saturation: bool
    saturation: float = 1.0


#: All defect types, in ``defects_config.json`` order.
DEFECT_TYPES: tuple[DefectType, ...] = (
    DefectType("missing_object", "logical", 255, relative_saturation=False),
    DefectType("extra_object", "logical", 254, relative_saturation=True, saturation=1.0),
    DefectType("swapped_objects", "logical", 253, relative_saturation=True, saturation=1.0),
    DefectType("misplaced_object", "logical", 252, relative_saturation=False),
    DefectType("scratch", "structural", 251, relative_saturation=True, saturation=1.0),
    DefectType("contamination", "structural", 250, relative_saturation=True, saturation=1.0),
    DefectType("dent", "structural", 249, relative_saturation=True, saturation=0.5),
)
#: Logical defect types of the ``"arrangement"`` preset (then come the structural types above).
ARRANGEMENT_DEFECT_TYPES: tuple[DefectType, ...] = (
    DefectType("row_duplicate", "logical", 248, relative_saturation=True, saturation=1.0),
    DefectType("row_exchange", "logical", 247, relative_saturation=True, saturation=1.0),
)
#: Presets of :func:`generate_loco_category`.
PRESETS: tuple[str, ...] = ("parts", "arrangement")
#: Names of the logical defect types.
LOGICAL_DEFECTS: tuple[str, ...] = tuple(d.name for d in DEFECT_TYPES if d.family == "logical")
#: Names of the structural defect types.
STRUCTURAL_DEFECTS: tuple[str, ...] = tuple(d.name for d in DEFECT_TYPES if d.family == "structural")
ARRANGEMENT_LOGICAL_DEFECTS: tuple[str, ...] = tuple(d.name for d in ARRANGEMENT_DEFECT_TYPES)
_DEFECTS_BY_NAME = {d.name: d for d in (*DEFECT_TYPES, *ARRANGEMENT_DEFECT_TYPES)}

# Random streams: each image uses default_rng((seed, stream, index)).
_STREAM_TEXTURE = 0
_STREAM_TRAIN = 1
_STREAM_VALIDATION = 2
_STREAM_TEST_GOOD = 3
_STREAM_LOGICAL = 4
_STREAM_STRUCTURAL = 5
_STREAM_MVTEC_DEFECT = 100  # + index of the defect type in DEFECT_TYPES

_GRID_COLS, _GRID_ROWS = 3, 2
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_SCALE = 1 << _SHIFT


@dataclass(frozen=True)
class _PartKind:
    name: str
    n_vertices: int
    vertex_radius: float  # in units of the part radius
    base_angle: float  # degrees
    colour: tuple[int, int, int]  # RGB
    slot: tuple[int, int]  # (column, row) in the 3 x 2 grid


_PARTS: tuple[_PartKind, ...] = (
    _PartKind("red_disc", 48, 1.0, 0.0, (205, 45, 40), (0, 0)),
    _PartKind("blue_square", 4, 1.2, 45.0, (40, 85, 200), (2, 0)),
    _PartKind("green_triangle", 3, 1.25, -90.0, (40, 150, 70), (0, 1)),
    _PartKind("yellow_hexagon", 6, 1.08, 0.0, (235, 180, 30), (1, 1)),
)
_FREE_SLOTS: tuple[tuple[int, int], ...] = ((1, 0), (2, 1))
_FOREIGN_COLOURS: tuple[tuple[int, int, int], ...] = ((120, 45, 150), (90, 55, 25), (30, 30, 35), (40, 190, 200))


@dataclass(frozen=True)
class _Part:
    kind: _PartKind
    cx: float
    cy: float
    radius: float
    angle: float  # degrees

    def polygon(self) -> np.ndarray:
        """Vertices as float (N, 2) array of (x, y)."""
        n = self.kind.n_vertices
        theta = np.deg2rad(self.kind.base_angle + self.angle) + 2.0 * np.pi * np.arange(n) / n
        rad = self.radius * self.kind.vertex_radius
        return np.stack([self.cx + rad * np.cos(theta), self.cy + rad * np.sin(theta)], axis=1)


@dataclass(frozen=True)
class _Geometry:
    height: int
    width: int

    @property
    def cell_w(self) -> float:
        return self.width / _GRID_COLS

    @property
    def cell_h(self) -> float:
        return self.height / _GRID_ROWS

    @property
    def radius(self) -> float:
        """Nominal part radius in pixels."""
        return 0.30 * min(self.cell_w, self.cell_h)

    def slot_centre(self, slot: tuple[int, int]) -> tuple[float, float]:
        col, row = slot
        return (col + 0.5) * self.cell_w, (row + 0.5) * self.cell_h


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------
def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        msg = f"{name} must be an integer, got {value!r} ({type(value).__name__})."
        raise TypeError(msg)
    if value < minimum:
        what = "positive" if minimum == 1 else f">= {minimum}"
        msg = f"{name} must be {what}, got {value}."
        raise ValueError(msg)
    return int(value)


def _check_image_size(image_size: object) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if isinstance(image_size, np.ndarray):
        image_size = tuple(image_size.tolist())
    if (
        not isinstance(image_size, Sequence)
        or isinstance(image_size, str)
        or len(image_size) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in image_size)
    ):
        msg = f"image_size must be a pair of integers (height, width), e.g. (256, 256); got {image_size!r}."
        raise TypeError(msg)
    height, width = int(image_size[0]), int(image_size[1])
    if min(height, width) < MIN_IMAGE_SIDE or max(height, width) > MAX_IMAGE_SIDE:
        msg = (
            f"image_size (height, width) = ({height}, {width}) is out of range: both sides must be between "
            f"{MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} pixels so that the 3 x 2 layout of parts and the defects fit. "
            f"Use e.g. image_size=(256, 256) or (200, 400)."
        )
        raise ValueError(msg)
    return height, width


def _check_category(category: object) -> str:
    if not isinstance(category, str) or not category.strip():
        msg = f"category must be a non-empty folder name, got {category!r}."
        raise ValueError(msg)
    if "/" in category or "\\" in category or category in {".", ".."} or category != category.strip():
        msg = (
            f"category must be a plain folder name without path separators or surrounding spaces, got "
            f"{category!r}. Put the parent folders in `root` instead."
        )
        raise ValueError(msg)
    return category


def _prepare_category_dir(root: str | Path, category: str, overwrite: bool) -> Path:
    root_path = Path(root).expanduser()
    if root_path.exists() and not root_path.is_dir():
        msg = f"root {str(root_path)!r} exists and is not a folder; pass a folder path as root."
        raise NotADirectoryError(msg)
    out = root_path / category
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        msg = f"{str(out)!r} exists and is not a plain folder; remove it or choose another category/root."
        raise FileExistsError(msg)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            msg = (
                f"category folder {str(out)!r} already exists and is not empty. Pass overwrite=True "
                f"(CLI: --overwrite) to replace it, or choose another root or category."
            )
            raise FileExistsError(msg)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
def _fixed_points(points: np.ndarray) -> np.ndarray:
    return np.round(points * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _fill(shape: tuple[int, int], polygon: np.ndarray, *, antialias: bool) -> np.ndarray:
    """Rasterise a polygon into a uint8 (H, W) map (0..255 when antialiased, else 0/255)."""
    out = np.zeros(shape, dtype=np.uint8)
    line_type = cv2.LINE_AA if antialias else cv2.LINE_8
    cv2.fillPoly(out, [_fixed_points(polygon)], 255, lineType=line_type, shift=_SHIFT)
    return out


def _footprint(part: _Part, shape: tuple[int, int]) -> np.ndarray:
    return _fill(shape, part.polygon(), antialias=False) > 0


def _paint(
    canvas: np.ndarray,
    alpha_u8: np.ndarray,
    colour: np.ndarray | Sequence[float] | Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> None:
    """Alpha-composite a colour onto the float canvas, in place, inside the alpha's bounding box.

    ``colour`` is an RGB triple, an (H, W, 3) layer, or a function of the box's pixel coordinates
    ``(yy, xx)`` returning an (h, w, 3) layer.
    """
    x0, y0, w, h = cv2.boundingRect(alpha_u8)
    if w == 0 or h == 0:
        return
    y1, x1 = y0 + h, x0 + w
    a = alpha_u8[y0:y1, x0:x1, None].astype(np.float32) / 255.0
    if callable(colour):
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        layer = colour(yy, xx)
    else:
        layer = np.asarray(colour, dtype=np.float32)
        if layer.ndim == 3:
            layer = layer[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1.0 - a) + layer * a


def _background_texture(seed: int, geom: _Geometry) -> np.ndarray:
    """Fixed tray texture of a category (float32 (H, W, 3)): low-frequency mottling plus a fine weave."""
    rng = np.random.default_rng((seed, _STREAM_TEXTURE))
    h, w = geom.height, geom.width
    low = rng.normal(0.0, 1.0, size=(4, max(2, round(4 * w / h)))).astype(np.float32)
    low = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    mid_shape = (max(2, h // 12), max(2, w // 12))
    mid = rng.normal(0.0, 1.0, size=mid_shape).astype(np.float32)
    mid = cv2.resize(mid, (w, h), interpolation=cv2.INTER_LINEAR)
    period = max(4.0, min(h, w) / 36.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    weave = np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
    lum = 5.0 * low + 3.0 * mid + 4.0 * weave
    base = np.array([186.0, 181.0, 170.0], dtype=np.float32)
    tint = np.array([1.0, 0.97, 0.9], dtype=np.float32)
    return base + lum[..., None] * tint


def _normal_layout(rng: np.random.Generator, geom: _Geometry) -> list[_Part]:
    parts = []
    for kind in _PARTS:
        cx, cy = geom.slot_centre(kind.slot)
        r = geom.radius
        parts.append(
            _Part(
                kind,
                cx + rng.uniform(-0.06, 0.06) * r,
                cy + rng.uniform(-0.06, 0.06) * r,
                r * rng.uniform(0.97, 1.03),
                rng.uniform(-4.0, 4.0),
            ),
        )
    return parts


def _render(parts: Sequence[_Part], texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw the tray and the parts; returns a float32 RGB canvas (before sensor noise)."""
    geom_h, geom_w = texture.shape[:2]
    canvas = texture * rng.uniform(0.97, 1.03)
    for part in parts:
        colour = np.asarray(part.kind.colour, dtype=np.float32)
        # soft drop shadow
        shadow = _fill((geom_h, geom_w), part.polygon() + part.radius * 0.08, antialias=True)
        shadow = cv2.GaussianBlur(shadow, (0, 0), max(1.0, part.radius * 0.06))
        _paint(canvas, (shadow.astype(np.float32) * 0.35).astype(np.uint8), (60.0, 58.0, 55.0))
        # body with a light gradient from the top-left and a slight radial sheen
        alpha = _fill((geom_h, geom_w), part.polygon(), antialias=True)

        def shaded(yy: np.ndarray, xx: np.ndarray, part: _Part = part, colour: np.ndarray = colour) -> np.ndarray:
            dx, dy = (xx - part.cx) / part.radius, (yy - part.cy) / part.radius
            shade = 1.0 - 0.08 * (dx + dy) - 0.05 * np.clip(dx * dx + dy * dy, 0.0, 1.5)
            return colour * shade[..., None]

        _paint(canvas, alpha, shaded)
        # darker rim
        rim = np.zeros((geom_h, geom_w), dtype=np.uint8)
        thickness = max(1, round(part.radius * 0.07))
        cv2.polylines(rim, [_fixed_points(part.polygon())], True, 255, thickness, cv2.LINE_AA, _SHIFT)
        _paint(canvas, rim, colour * 0.55)
    return canvas


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = canvas + 2.0 * rng.standard_normal(size=canvas.shape, dtype=np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# logical defects: change the layout before rendering; return the mask of the defect
# --------------------------------------------------------------------------------------------------
@dataclass
class _SceneState:
    parts: list[_Part | None]  # None: removed by a missing_object defect
    free_slots: list[tuple[int, int]]
    untouched: list[int]  # indices into parts not yet used by a defect


def _take(rng: np.random.Generator, pool: list, count: int = 1) -> list:
    chosen = sorted(rng.choice(len(pool), size=count, replace=False).tolist(), reverse=True)
    return [pool.pop(i) for i in chosen]


def _in_slot(part: _Part, slot: tuple[int, int], geom: _Geometry, rng: np.random.Generator) -> _Part:
    cx, cy = geom.slot_centre(slot)
    r = geom.radius
    return replace(part, cx=cx + rng.uniform(-0.1, 0.1) * r, cy=cy + rng.uniform(-0.1, 0.1) * r)


def _missing_object(state: _SceneState, geom: _Geometry, rng: np.random.Generator) -> np.ndarray:
    (idx,) = _take(rng, state.untouched)
    mask = _footprint(state.parts[idx], (geom.height, geom.width))
    state.parts[idx] = None
    return mask


def _extra_object(state: _SceneState, geom: _Geometry, rng: np.random.Generator) -> np.ndarray:
    (slot,) = _take(rng, state.free_slots)
    kind = _PARTS[int(rng.integers(len(_PARTS)))]
    extra = _in_slot(_Part(kind, 0.0, 0.0, geom.radius * rng.uniform(0.97, 1.03), rng.uniform(-4, 4)), slot, geom, rng)
    state.parts.append(extra)
    return _footprint(extra, (geom.height, geom.width))


def _swapped_objects(state: _SceneState, geom: _Geometry, rng: np.random.Generator) -> np.ndarray:
    i, j = _take(rng, state.untouched, 2)
    a, b = state.parts[i], state.parts[j]
    shape = (geom.height, geom.width)
    mask = _footprint(a, shape) | _footprint(b, shape)
    state.parts[i] = replace(a, cx=b.cx, cy=b.cy)
    state.parts[j] = replace(b, cx=a.cx, cy=a.cy)
    return mask | _footprint(state.parts[i], shape) | _footprint(state.parts[j], shape)


def _misplaced_object(state: _SceneState, geom: _Geometry, rng: np.random.Generator) -> np.ndarray:
    (idx,) = _take(rng, state.untouched)
    (slot,) = _take(rng, state.free_slots)
    shape = (geom.height, geom.width)
    mask = _footprint(state.parts[idx], shape)
    state.parts[idx] = _in_slot(state.parts[idx], slot, geom, rng)
    return mask | _footprint(state.parts[idx], shape)


_LogicalFn = Callable[[_SceneState, _Geometry, np.random.Generator], np.ndarray]
_LOGICAL_FNS: dict[str, _LogicalFn] = {
    "missing_object": _missing_object,
    "extra_object": _extra_object,
    "swapped_objects": _swapped_objects,
    "misplaced_object": _misplaced_object,
}


# --------------------------------------------------------------------------------------------------
# structural defects: damage the rendered canvas in place; return the mask of the defect
# --------------------------------------------------------------------------------------------------
def _scratch(canvas: np.ndarray, part: _Part, geom: _Geometry, rng: np.random.Generator) -> np.ndarray:
    shape = (geom.height, geom.width)
    r = part.radius
    centre = np.array([part.cx, part.cy]) + rng.uniform(-0.35, 0.35, size=2) * r
    theta = rng.uniform(0.0, np.pi)
    direction = np.array([np.cos(theta), np.sin(theta)])
    normal = np.array([-direction[1], direction[0]])
    length = r * rng.uniform(1.5, 2.1)
    bend = rng.uniform(-0.15, 0.15) * length
    t = np.linspace(-0.5, 0.5, 16)[:, None]
    points = centre + t * length * direction + (1.0 - 4.0 * t * t) * bend * normal
    thickness = max(2, round(r * 0.09))
    luminance = float(np.dot(part.kind.colour, (0.299, 0.587, 0.114)))
    colour = (40.0, 38.0, 42.0) if luminance > 140 else (245.0, 243.0, 236.0)
    line = np.zeros(shape, dtype=np.uint8)
    cv2.polylines(line, [_fixed_points(points)], False, 255, thickness, cv2.LINE_AA, _SHIFT)
    _paint(canvas, line, colour)
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.polylines(mask, [_fixed_points(points)], False, 255, thickness + 2, cv2.LINE_8, _SHIFT)
    return mask > 0


def _contamination(canvas: np.ndarray, part: _Part, geom: _Geometry, rng: np.random.Generator) -> np.ndarray:
    shape = (geom.height, geom.width)
    r = part.radius
    if rng.random() < 0.75:  # on the part
        centre = np.array([part.cx, part.cy]) + rng.uniform(-0.45, 0.45, size=2) * r
    else:  # on the tray, somewhere in the image
        centre = np.array([rng.uniform(0.1, 0.9) * geom.width, rng.uniform(0.1, 0.9) * geom.height])
    n = 16
    blob_r = r * rng.uniform(0.3, 0.45)
    theta = 2.0 * np.pi * np.arange(n) / n
    wobble = rng.normal(0.0, 1.0, size=n)
    wobble = (wobble + np.roll(wobble, 1) + np.roll(wobble, -1)) / 3.0  # smooth the outline
    radii = blob_r * np.clip(1.0 + 0.45 * wobble, 0.45, 1.6)
    polygon = centre + np.stack([radii * np.cos(theta), radii * np.sin(theta)], axis=1)
    colour = np.asarray(_FOREIGN_COLOURS[int(rng.integers(len(_FOREIGN_COLOURS)))], dtype=np.float32)
    alpha = _fill(shape, polygon, antialias=True)

    def speckled(yy: np.ndarray, _xx: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal(size=yy.shape, dtype=np.float32)
        return colour * (1.0 + 0.12 * cv2.GaussianBlur(noise, (0, 0), 1.5))[..., None]

    _paint(canvas, alpha, speckled)
    return _fill(shape, polygon, antialias=False) > 0


def _dent(canvas: np.ndarray, part: _Part, geom: _Geometry, rng: np.random.Generator) -> np.ndarray:
    shape = (geom.height, geom.width)
    r = part.radius
    phi = rng.uniform(0.0, 2.0 * np.pi)
    outward = np.array([np.cos(phi), np.sin(phi)])
    before = _footprint(part, shape).astype(np.uint8)
    # distance from the centre to the outline along `outward` (ray march on the footprint)
    steps = np.arange(0.0, 1.5 * r * part.kind.vertex_radius, 0.5)
    ray_x = np.clip(np.round(part.cx + steps * outward[0]).astype(int), 0, geom.width - 1)
    ray_y = np.clip(np.round(part.cy + steps * outward[1]).astype(int), 0, geom.height - 1)
    inside = before[ray_y, ray_x] > 0
    edge = float(steps[np.nonzero(inside)[0].max()]) if inside.any() else 0.8 * r
    q = np.array([part.cx, part.cy]) + 0.92 * edge * outward
    sigma = r * rng.uniform(0.24, 0.3)
    push = 1.5 * sigma
    reach = int(math.ceil(3.0 * sigma + push)) + 2
    x0, x1 = max(0, int(q[0]) - reach), min(geom.width, int(q[0]) + reach + 1)
    y0, y1 = max(0, int(q[1]) - reach), min(geom.height, int(q[1]) + reach + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    g = np.exp(-((xx - q[0]) ** 2 + (yy - q[1]) ** 2) / (2.0 * sigma * sigma)).astype(np.float32)
    map_x = (xx + push * outward[0] * g).astype(np.float32)
    map_y = (yy + push * outward[1] * g).astype(np.float32)
    warped = cv2.remap(canvas, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    after = cv2.remap(before, map_x, map_y, interpolation=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
    soft_after = cv2.GaussianBlur(after.astype(np.float32), (0, 0), 1.0)
    darken = 1.0 - 0.55 * g * soft_after
    canvas[y0:y1, x0:x1] = warped * darken[..., None]
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = (g > 0.25) & ((before[y0:y1, x0:x1] > 0) | (after > 0))
    return mask


_StructuralFn = Callable[[np.ndarray, _Part, _Geometry, np.random.Generator], np.ndarray]
_STRUCTURAL_FNS: dict[str, _StructuralFn] = {
    "scratch": _scratch,
    "contamination": _contamination,
    "dent": _dent,
}


# --------------------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------------------
def _make_image(
    rng: np.random.Generator,
    geom: _Geometry,
    texture: np.ndarray,
    defects: Sequence[str] = (),
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one image (uint8 RGB) with the given defects; returns it and one bool mask per defect."""
    parts: list[_Part | None] = list(_normal_layout(rng, geom))
    state = _SceneState(parts=parts, free_slots=list(_FREE_SLOTS), untouched=list(range(len(parts))))
    masks: dict[int, np.ndarray] = {}
    for position, name in enumerate(defects):
        if name in _LOGICAL_FNS:
            masks[position] = _LOGICAL_FNS[name](state, geom, rng)
    canvas = _render([p for p in state.parts if p is not None], texture, rng)
    # structural damage goes on parts still present, preferably a different part for each defect
    present = [i for i, p in enumerate(state.parts) if p is not None]
    for position, name in enumerate(defects):
        if name in _STRUCTURAL_FNS:
            pool = [i for i in present if i in state.untouched] or present
            (idx,) = _take(rng, pool)
            if idx in state.untouched:
                state.untouched.remove(idx)
            masks[position] = _STRUCTURAL_FNS[name](canvas, state.parts[idx], geom, rng)
    return _finish(canvas, rng), [masks[i] for i in range(len(defects))]


# --------------------------------------------------------------------------------------------------
# the "arrangement" preset: every part and every neighbourhood looks normal, only the whole is wrong
# --------------------------------------------------------------------------------------------------
#: the three kinds of the arrangement preset (two of each per image)
_ARRANGEMENT_KINDS: tuple[_PartKind, ...] = _PARTS[:3]


def _arrangement_rows(rng: np.random.Generator, defect: str | None) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Kinds (indices into the three kinds) per row, and the (column, row) slots a logical defect marks.

    Normal: each row is a permutation of the three kinds (two of each kind per image). Adjacent parts
    within a row always differ, every kind appears in every slot, and vertical pairs are random; so is
    every part, and every pair of neighbouring parts, in the defects below:

    * ``row_duplicate``: one row is ``(X, Y, X)`` (its kind ``Z`` missing), the other a permutation:
      the counts are wrong (three ``X``, one ``Z``). Marked: the two ``X`` of that row.
    * ``row_exchange``: rows ``(X, Y, X)`` and ``(Z, Y, Z)``: two of each kind as in normal images,
      but neither row holds all three kinds. Marked: the four corner parts.
    """
    if defect is None:
        return [rng.permutation(3).tolist(), rng.permutation(3).tolist()], []
    x, y, z = rng.permutation(3).tolist()
    first = int(rng.integers(2))
    if defect == "row_duplicate":
        rows = [[x, y, x], rng.permutation(3).tolist()]
        marked = [(0, 0), (2, 0)]
    elif defect == "row_exchange":
        rows = [[x, y, x], [z, y, z]]
        marked = [(0, 0), (2, 0), (0, 1), (2, 1)]
    else:
        msg = f"unknown arrangement defect {defect!r}"
        raise ValueError(msg)
    if first:  # the defective row is the bottom one as often as the top one
        rows = rows[::-1]
        marked = [(col, 1 - row) for col, row in marked]
    return rows, marked


def _make_arrangement_image(
    rng: np.random.Generator,
    geom: _Geometry,
    texture: np.ndarray,
    defects: Sequence[str] = (),
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render one image of the arrangement preset (at most one logical defect) and its masks."""
    logical = [name for name in defects if name in ARRANGEMENT_LOGICAL_DEFECTS]
    rows, marked = _arrangement_rows(rng, logical[0] if logical else None)
    parts: dict[tuple[int, int], _Part] = {}
    r = geom.radius
    for row, kinds in enumerate(rows):
        for col, kind in enumerate(kinds):
            cx, cy = geom.slot_centre((col, row))
            parts[(col, row)] = _Part(
                _ARRANGEMENT_KINDS[kind],
                cx + rng.uniform(-0.06, 0.06) * r,
                cy + rng.uniform(-0.06, 0.06) * r,
                r * rng.uniform(0.97, 1.03),
                rng.uniform(-4.0, 4.0),
            )
    canvas = _render(list(parts.values()), texture, rng)
    shape = (geom.height, geom.width)
    masks: list[np.ndarray] = []
    untouched = list(parts)
    for name in defects:
        if name in ARRANGEMENT_LOGICAL_DEFECTS:
            mask = np.zeros(shape, dtype=bool)
            for slot in marked:
                mask |= _footprint(parts[slot], shape)
            masks.append(mask)
        else:
            (slot,) = _take(rng, untouched)
            masks.append(_STRUCTURAL_FNS[name](canvas, parts[slot], geom, rng))
    return _finish(canvas, rng), masks


def _loco_defects_for(index: int, family: str, preset: str = "parts") -> tuple[str, ...]:
    """Defect types of the ``index``-th anomalous image of a family (some images get two)."""
    if preset == "arrangement" and family == "logical":
        return (ARRANGEMENT_LOGICAL_DEFECTS[index % len(ARRANGEMENT_LOGICAL_DEFECTS)],)
    names = LOGICAL_DEFECTS if family == "logical" else STRUCTURAL_DEFECTS
    first = names[index % len(names)]
    two = index % 3 == 2 if family == "logical" else index % 4 == 3
    return (first, names[(index + 1) % len(names)]) if two else (first,)


def _write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        msg = f"could not write image {path}"
        raise OSError(msg)


def _write_mask(path: Path, mask: np.ndarray, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.where(mask, np.uint8(value), np.uint8(0))):
        msg = f"could not write mask {path}"
        raise OSError(msg)


def _write_good(
    out: Path,
    folder: str,
    count: int,
    stream: int,
    seed: int,
    geom: _Geometry,
    texture: np.ndarray,
    make_image: Callable[..., tuple[np.ndarray, list[np.ndarray]]] = _make_image,
) -> None:
    for i in range(count):
        image, _ = make_image(np.random.default_rng((seed, stream, i)), geom, texture)
        _write_rgb(out / folder / "good" / f"{i:03d}.png", image)


def _mean_part_area(geom: _Geometry) -> int:
    """Mean area in pixels of one part at nominal size (for absolute saturation thresholds)."""
    areas = []
    for kind in _PARTS:
        poly = _Part(kind, 0.0, 0.0, geom.radius, 0.0).polygon()
        x, y = poly[:, 0], poly[:, 1]
        areas.append(0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))))
    return round(sum(areas) / len(areas))


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def loco_defects_config(image_size: tuple[int, int] = (256, 256), preset: str = "parts") -> list[dict[str, object]]:
    """Return the ``defects_config.json`` entries of a synthetic category.

    Absolute entries (``missing_object``, ``misplaced_object``) saturate at the mean area of one part,
    like ``missing_top_label`` in the official juice_bottle config; the other entries are relative
    (1.0, or 0.5 for ``dent``).

    Args:
        image_size: Image size as (height, width) in pixels; absolute thresholds depend on it.
        preset: ``"parts"`` (:data:`DEFECT_TYPES`) or ``"arrangement"`` (:data:`ARRANGEMENT_DEFECT_TYPES`,
            then the structural types).

    Returns:
        A list of dicts with keys ``defect_name``, ``pixel_value``, ``saturation_threshold`` and
        ``relative_saturation``, in :data:`DEFECT_TYPES` order.
    """
    height, width = _check_image_size(image_size)
    preset = _check_preset(preset)
    types = DEFECT_TYPES
    if preset == "arrangement":
        types = (*ARRANGEMENT_DEFECT_TYPES, *(d for d in DEFECT_TYPES if d.family == "structural"))
    area = _mean_part_area(_Geometry(height, width))
    return [
        {
            "defect_name": d.name,
            "pixel_value": d.pixel_value,
            "saturation_threshold": float(d.saturation) if d.relative_saturation else area,
            "relative_saturation": d.relative_saturation,
        }
        for d in types
    ]


def _check_preset(preset: object) -> str:
    if preset not in PRESETS:
        msg = f"preset must be one of {PRESETS}, got {preset!r}."
        raise ValueError(msg)
    return str(preset)


def generate_loco_category(
    root: str | Path,
    category: str = "synthetic_parts",
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (256, 256),
    n_train: int = 16,
    n_validation: int = 4,
    n_test_good: int = 8,
    n_logical: int = 8,
    n_structural: int = 8,
    overwrite: bool = False,
    preset: str = "parts",
) -> Path:
    """Write a synthetic category in the MVTec LOCO AD layout.

    Layout written under ``root/category``::

        train/good/000.png ...
        validation/good/000.png ...
        test/good/000.png ...
        test/logical_anomalies/000.png ...
        test/structural_anomalies/000.png ...
        ground_truth/logical_anomalies/000/000.png [001.png]
        ground_truth/structural_anomalies/000/000.png [001.png]
        defects_config.json

    Each ground-truth PNG is one defect channel: single-channel uint8, same size as the image, 0 on the
    background and the defect's ``pixel_value`` (see :func:`loco_defects_config`) on the defect region.
    Every third logical image and every fourth structural image has two defects (``000.png`` and
    ``001.png``). Good images have no ground truth. Anomalous images cycle through the defect types
    (logical: missing, extra, swapped, misplaced; structural: scratch, contamination, dent).

    Args:
        root: Dataset root folder (created if needed); the category is written to ``root/category``.
        category: Name of the category folder.
        seed: Non-negative random seed; the same seed gives byte-identical files.
        image_size: Image size as (height, width), each side between 64 and 8192 pixels (a single int
            means a square image).
        n_train: Number of normal training images (``train/good``), >= 1.
        n_validation: Number of normal validation images (``validation/good``), >= 1.
        n_test_good: Number of normal test images (``test/good``), >= 1.
        n_logical: Number of logical-anomaly test images, >= 0.
        n_structural: Number of structural-anomaly test images, >= 0.
        overwrite: Replace an existing non-empty ``root/category`` folder instead of refusing.
        preset: ``"parts"`` (default: four fixed parts; missing, extra, swapped and misplaced parts) or
            ``"arrangement"`` (harder: six parts of three kinds, each row a permutation of the three, so
            every part and every pair of neighbours looks normal in every anomaly; logical anomalies
            break only the counts or the row rule: ``row_duplicate``, ``row_exchange``, see
            :func:`_arrangement_rows`). Structural anomalies are the same in both presets.

    Returns:
        Path of the written category folder (``root/category``).

    Raises:
        TypeError: If a count, the seed or ``image_size`` has the wrong type.
        ValueError: If a count is out of range, there is no anomalous image, ``image_size`` is too small
            or too large, or ``category`` is not a plain folder name.
        FileExistsError: If ``root/category`` exists, is not empty and ``overwrite`` is false.
    """
    category = _check_category(category)
    seed = _check_int("seed", seed, 0)
    height, width = _check_image_size(image_size)
    preset = _check_preset(preset)
    n_train = _check_int("n_train", n_train, 1)
    n_validation = _check_int("n_validation", n_validation, 1)
    n_test_good = _check_int("n_test_good", n_test_good, 1)
    n_logical = _check_int("n_logical", n_logical, 0)
    n_structural = _check_int("n_structural", n_structural, 0)
    if n_logical + n_structural == 0:
        msg = "n_logical + n_structural must be at least 1: a LOCO test set needs anomalous images."
        raise ValueError(msg)

    out = _prepare_category_dir(root, category, overwrite)
    geom = _Geometry(height, width)
    texture = _background_texture(seed, geom)

    make_image = _make_arrangement_image if preset == "arrangement" else _make_image
    _write_good(out, "train", n_train, _STREAM_TRAIN, seed, geom, texture, make_image)
    _write_good(out, "validation", n_validation, _STREAM_VALIDATION, seed, geom, texture, make_image)
    _write_good(out, "test", n_test_good, _STREAM_TEST_GOOD, seed, geom, texture, make_image)
    anomalous = (("logical", n_logical, _STREAM_LOGICAL), ("structural", n_structural, _STREAM_STRUCTURAL))
    for family, count, stream in anomalous:
        folder = f"{family}_anomalies"
        for i in range(count):
            defects = _loco_defects_for(i, family, preset)
            image, masks = make_image(np.random.default_rng((seed, stream, i)), geom, texture, defects)
            _write_rgb(out / "test" / folder / f"{i:03d}.png", image)
            for k, (name, mask) in enumerate(zip(defects, masks, strict=True)):
                mask_path = out / "ground_truth" / folder / f"{i:03d}" / f"{k:03d}.png"
                _write_mask(mask_path, mask, _DEFECTS_BY_NAME[name].pixel_value)

    config = loco_defects_config((height, width), preset)
    (out / "defects_config.json").write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return out


def generate_mvtec_ad_category(
    root: str | Path,
    category: str = "synthetic_parts",
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (256, 256),
    n_train: int = 16,
    n_test_good: int = 8,
    n_per_defect: int = 4,
    defect_types: Sequence[str] = STRUCTURAL_DEFECTS,
    n_validation: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic category in the MVTec AD layout.

    Layout written under ``root/category``::

        train/good/000.png ...
        [validation/good/000.png ...]           (only when n_validation > 0)
        test/good/000.png ...
        test/<defect_type>/000.png ...
        ground_truth/<defect_type>/000_mask.png ...

    Each anomalous image has exactly one defect of its folder's type; its mask is a single-channel
    binary PNG (0 / 255) of the image size. The normal images are the same as those of
    :func:`generate_loco_category` with the same seed and size.

    Args:
        root: Dataset root folder (created if needed); the category is written to ``root/category``.
        category: Name of the category folder.
        seed: Non-negative random seed; the same seed gives byte-identical files.
        image_size: Image size as (height, width), each side between 64 and 8192 pixels.
        n_train: Number of normal training images, >= 1.
        n_test_good: Number of normal test images, >= 1.
        n_per_defect: Number of test images per defect type, >= 1.
        defect_types: Defect types to write, any of :data:`STRUCTURAL_DEFECTS` and
            :data:`LOGICAL_DEFECTS` (default: the structural ones).
        n_validation: Number of normal validation images (``validation/good``), >= 0. anomalib's
            ``MVTecAD`` datamodule ignores this folder.
        overwrite: Replace an existing non-empty ``root/category`` folder instead of refusing.

    Returns:
        Path of the written category folder (``root/category``).

    Raises:
        TypeError: If a count, the seed or ``image_size`` has the wrong type.
        ValueError: If a count is out of range, ``defect_types`` is empty, repeats or contains an unknown
            name, ``image_size`` is out of range, or ``category`` is not a plain folder name.
        FileExistsError: If ``root/category`` exists, is not empty and ``overwrite`` is false.
    """
    category = _check_category(category)
    seed = _check_int("seed", seed, 0)
    height, width = _check_image_size(image_size)
    n_train = _check_int("n_train", n_train, 1)
    n_test_good = _check_int("n_test_good", n_test_good, 1)
    n_per_defect = _check_int("n_per_defect", n_per_defect, 1)
    n_validation = _check_int("n_validation", n_validation, 0)
    if isinstance(defect_types, str):
        defect_types = (defect_types,)
    defect_types = tuple(defect_types)
    unknown = [d for d in defect_types if d not in _DEFECTS_BY_NAME]
    if not defect_types or unknown or len(set(defect_types)) != len(defect_types):
        msg = (
            f"defect_types must be a non-empty list of distinct names from {[d.name for d in DEFECT_TYPES]}; "
            f"got {list(defect_types)}" + (f" (unknown: {unknown})." if unknown else ".")
        )
        raise ValueError(msg)

    out = _prepare_category_dir(root, category, overwrite)
    geom = _Geometry(height, width)
    texture = _background_texture(seed, geom)

    _write_good(out, "train", n_train, _STREAM_TRAIN, seed, geom, texture)
    if n_validation:
        _write_good(out, "validation", n_validation, _STREAM_VALIDATION, seed, geom, texture)
    _write_good(out, "test", n_test_good, _STREAM_TEST_GOOD, seed, geom, texture)
    for name in defect_types:
        stream = _STREAM_MVTEC_DEFECT + DEFECT_TYPES.index(_DEFECTS_BY_NAME[name])
        for i in range(n_per_defect):
            image, (mask,) = _make_image(np.random.default_rng((seed, stream, i)), geom, texture, (name,))
            _write_rgb(out / "test" / name / f"{i:03d}.png", image)
            _write_mask(out / "ground_truth" / name / f"{i:03d}_mask.png", mask, 255)
    return out
