"""Anomaly maps from teacher / student features, with a separable Gaussian blur.

Reverse distillation scores each position by ``1 - cos(teacher, student)`` per scale, upsamples
the maps bilinearly to the input size, sums them and smooths the sum with a Gaussian
(sigma 4). anomalib applies that blur as one 33x33 convolution, which costs about 40% of its RD
forward pass (anomalib issue #3780). A Gaussian kernel is separable, so two 1-D passes (33 + 33
taps instead of 1089 per pixel) give the same result up to float rounding, and they export to
ONNX / OpenVINO as two ordinary convolutions and a reflect pad.

Upsampling, adding and smoothing are all linear and act on each axis separately, so the whole chain is
``sum_l R_l M_l C_l`` with one constant matrix per axis and scale (:class:`UpsampleSmooth`): two small
matrix products per scale instead of an ``H x W`` interpolation per scale and a reflect-padded filter over
the full-size map. Same result to float rounding; in OpenVINO (f32, 2 threads) the chain of a three-scale
map costs a small fraction of the interpolate-and-filter graph (``benchmarks/edge_breakdown.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.models.components.filters.blur import compute_kernel_size
from kornia.filters import get_gaussian_kernel1d
from torch import nn


class SeparableGaussianBlur2d(nn.Module):
    """Gaussian blur as a horizontal then a vertical 1-D convolution with reflect padding.

    Equal (to float rounding) to :class:`anomalib.models.components.filters.GaussianBlur2d`
    with the same sigma, kernel size and ``border_type="reflect"``: reflection padding acts
    per axis, so padding and filtering one axis at a time is the same operation.

    Args:
        sigma: standard deviation in pixels. Defaults to ``4`` (RD).
        kernel_size: odd kernel size; default ``2 * int(4 * sigma + 0.5) + 1`` (33 for sigma 4),
            as anomalib computes it.
    """

    def __init__(self, sigma: float = 4.0, kernel_size: int | None = None) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.kernel_size = int(kernel_size or compute_kernel_size(sigma))
        if self.kernel_size % 2 == 0:
            msg = f"kernel_size must be odd, got {self.kernel_size}."
            raise ValueError(msg)
        kernel = get_gaussian_kernel1d(self.kernel_size, self.sigma).reshape(-1)
        kernel = kernel / kernel.sum()
        self.register_buffer("kernel_x", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_y", kernel.view(1, 1, -1, 1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Blur ``(B, C, H, W)`` maps channel by channel (H and W must exceed kernel_size // 2)."""
        batch, channels, height, width = maps.shape
        pad = self.kernel_size // 2
        flat = maps.reshape(batch * channels, 1, height, width)
        flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), self.kernel_x)
        flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), self.kernel_y)
        return flat.reshape(batch, channels, height, width)


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` matrix of 1-D bilinear interpolation with ``align_corners=True`` (float64).

    ``F.interpolate(..., mode="bilinear", align_corners=True)`` along one axis is this matrix times the
    signal: output ``o`` samples the input at ``o * (size_in - 1) / (size_out - 1)``.
    """
    matrix = np.zeros((size_out, size_in))
    if size_in == 1 or size_out == 1:
        matrix[:, 0] = 1.0
        return matrix
    source = np.arange(size_out) * ((size_in - 1) / (size_out - 1))
    low = np.minimum(np.floor(source).astype(int), size_in - 2)
    frac = source - low
    rows = np.arange(size_out)
    matrix[rows, low] = 1.0 - frac
    matrix[rows, low + 1] += frac
    return matrix


def reflect_filter_matrix(kernel: Sequence[float], size: int) -> np.ndarray:
    """``(size, size)`` matrix of a 1-D ``same`` convolution with reflect padding (``F.pad(mode="reflect")``)."""
    pad = len(kernel) // 2
    if size <= pad:
        msg = f"A {len(kernel)}-tap filter with reflect padding needs more than {pad} samples per axis, got {size}."
        raise ValueError(msg)
    matrix = np.zeros((size, size))
    for out in range(size):
        for tap, weight in enumerate(kernel):
            index = out + tap - pad
            if index < 0:
                index = -index
            elif index >= size:
                index = 2 * (size - 1) - index
            matrix[out, index] += weight
    return matrix


class UpsampleSmooth(nn.Module):
    """``blur(sum_l upsample(M_l))`` evaluated as ``sum_l R_l @ M_l @ C_l``: the RD map's resize, sum and smoothing.

    Bilinear upsampling (``align_corners=True``, as anomalib) and the reflect-padded separable Gaussian of
    :class:`SeparableGaussianBlur2d` are linear and act on rows and columns separately, so for a scale of
    ``h x w`` the chain is ``R (H x h) = G_H A_h`` on the left and ``C (w x W) = (G_W A_w)^T`` on the right,
    with ``A`` the interpolation and ``G`` the filter matrix of one axis. The matrices are built once per
    feature size (float64, then cast), from the filter's taps, and enter exported graphs as constants.
    Equal to ``blur(upsample_and_sum(maps))`` to float rounding (tested); much cheaper, because no map is
    ever formed at ``H x W`` before the last product and there is no padding.

    Both matrices preserve constants (every row of ``A`` and ``G`` sums to 1), so standardising a map
    (subtracting a mean, dividing by a standard deviation) commutes with this operator.

    Args:
        image_size: default output ``(H, W)``; ``None``: every call gives its ``size``.
        sigma: Gaussian sigma in pixels; ``0`` = upsampling and summing only.
        kernel_size: as :class:`SeparableGaussianBlur2d`.
    """

    def __init__(
        self, image_size: Sequence[int] | None = None, sigma: float = 4.0, kernel_size: int | None = None
    ) -> None:
        super().__init__()
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.sigma = float(sigma)
        self.taps: tuple[float, ...] = ()
        if sigma > 0:
            blur = SeparableGaussianBlur2d(sigma, kernel_size)
            self.taps = tuple(float(v) for v in blur.kernel_x.reshape(-1).double())
        self._matrices: dict[tuple[int, int], torch.Tensor] = {}

    def axis_matrix(self, size_in: int, size_out: int) -> torch.Tensor:
        """``(size_out, size_in)`` float64 matrix: interpolate one axis to ``size_out``, then filter it."""
        key = (int(size_in), int(size_out))
        if key not in self._matrices:
            matrix = bilinear_matrix(*key)
            if self.taps:
                matrix = reflect_filter_matrix(self.taps, key[1]) @ matrix
            self._matrices[key] = torch.from_numpy(matrix)
        return self._matrices[key]

    def forward(self, maps: Sequence[torch.Tensor], size: Sequence[int] | None = None) -> torch.Tensor:
        """Per-scale maps ``(B, C, h_l, w_l)`` -> ``(B, C, H, W)``, upsampled, summed and smoothed.

        ``size``: output ``(H, W)`` for this call instead of ``image_size``.
        """
        if size is None and self.image_size is None:
            msg = "UpsampleSmooth was built without an image_size: give the output size, forward(maps, size=(H, W))."
            raise ValueError(msg)
        height, width = (int(size[0]), int(size[1])) if size is not None else self.image_size
        total = None
        for scale_map in maps:
            rows = self.axis_matrix(scale_map.shape[-2], height).to(device=scale_map.device, dtype=scale_map.dtype)
            cols = self.axis_matrix(scale_map.shape[-1], width).to(device=scale_map.device, dtype=scale_map.dtype)
            resized = torch.matmul(torch.matmul(rows, scale_map), cols.transpose(0, 1))
            total = resized if total is None else total + resized
        if total is None:
            msg = "UpsampleSmooth needs at least one map."
            raise ValueError(msg)
        return total

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, sigma={self.sigma}"


def cosine_distance_maps(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Per-scale ``1 - cos`` maps, each ``(B, 1, h_k, w_k)`` (RD Eq. 1)."""
    return [
        (1 - F.cosine_similarity(teacher, student, dim=1)).unsqueeze(1)
        for teacher, student in zip(teacher_features, student_features, strict=True)
    ]


def upsample_and_sum(maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsample per-scale maps to ``image_size`` (align_corners as anomalib) and add them."""
    total = None
    for scale_map in maps:
        resized = F.interpolate(scale_map, size=image_size, mode="bilinear", align_corners=True)
        total = resized if total is None else total + resized
    return total


class AnomalyMapGenerator(nn.Module):
    """RD anomaly map: per-scale cosine distance, upsampled, summed, Gaussian-smoothed.

    Args:
        image_size: output ``(H, W)``, normally the model's input size.
        sigma: Gaussian sigma; ``0`` disables smoothing.
    """

    def __init__(self, image_size: Sequence[int], sigma: float = 4.0) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.blur = SeparableGaussianBlur2d(sigma) if sigma > 0 else nn.Identity()
        self.smooth = UpsampleSmooth(self.image_size, sigma)

    def forward(self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return ``(B, 1, H, W)`` anomaly maps (``blur(upsample_and_sum(maps))``, as :class:`UpsampleSmooth`)."""
        return self.smooth(cosine_distance_maps(teacher_features, student_features), self.image_size)
