"""Fusion of Glance's per-patch scores into a pixel anomaly map.

Glance (Wang, Wu, Cui, Shen, CVPR 2021, supplementary C.1) fuses the 400 patch scores of an image
into a score map by inverse distance weighting (IDW; Bartier & Keller, 1996) with power ``p = 5``:
every pixel gets ``sum_i w_i s_i / sum_i w_i`` with ``w_i = 1 / d(pixel, centre_i)^p``, and a pixel at
a patch centre gets that patch's score exactly.
"""

from __future__ import annotations

import torch
from torch import nn


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent`` for ``x >= 0``; half-integer exponents use sqrt and products (faster than pow)."""
    if float(2 * exponent).is_integer() and 0 < exponent <= 8:
        whole, half = int(exponent), (2 * exponent) % 2 == 1
        result = torch.sqrt(x) if half else torch.ones_like(x)
        for _ in range(whole):
            result = result * x
        return result
    return x**exponent


class IDWFusion(nn.Module):
    """Inverse-distance-weighted interpolation of patch scores at fixed centres onto the pixel grid.

    The ``(H*W, P)`` weight matrix is recomputed from the centre coordinates in each call (a few
    element-wise operations; it is cached in eager mode) so that exports stay small.

    Args:
        image_size: ``(H, W)`` of the map.
        centers: ``(P, 2)`` centre coordinates ``(y, x)`` in pixels (may be fractional).
        power: IDW power. Defaults to ``5`` (the paper).
    """

    def __init__(self, image_size: tuple[int, int], centers: torch.Tensor, power: float = 5.0) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.power = float(power)
        self.register_buffer("centers", centers.float(), persistent=False)
        self._cache: torch.Tensor | None = None

    def weights(self) -> torch.Tensor:
        """Normalised weights ``(H * W, P)``; rows of pixels at a centre are one-hot (to float precision)."""
        height, width = self.image_size
        ys = torch.arange(height, device=self.centers.device, dtype=torch.float32)
        xs = torch.arange(width, device=self.centers.device, dtype=torch.float32)
        dy = (ys[:, None] - self.centers[:, 0]) ** 2  # (H, P)
        dx = (xs[:, None] - self.centers[:, 1]) ** 2  # (W, P)
        squared = (dy[:, None, :] + dx[None, :, :]).reshape(height * width, -1)
        # Squared distances are clamped to a tiny minimum: a pixel at a centre gets weight >= 1e15 (1e30 at
        # power 5) against <= 1 for every other centre (>= 1 pixel away), so after normalisation its value
        # is that patch's score to float precision - no branch needed (and the clamp survives ONNX graph
        # optimisation, unlike an added epsilon, which the optimiser folds away).
        min_squared = max(10.0 ** (-60.0 / self.power), 1e-30)
        inverse = 1.0 / _power(squared.clamp(min=min_squared), self.power / 2)
        return inverse / inverse.sum(dim=1, keepdim=True)

    def _weights(self) -> torch.Tensor:
        exporting = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if exporting:
            return self.weights()
        if self._cache is None or self._cache.device != self.centers.device:
            self._cache = self.weights()
        return self._cache

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 1, H, W)`` from patch scores ``(B, P)``."""
        weights = self._weights()
        maps = scores.to(weights.dtype) @ weights.transpose(0, 1)  # (B, H*W)
        return maps.reshape(-1, 1, *self.image_size)

    def __getstate__(self) -> dict:
        """Pickle without the cached weight matrix (it is rebuilt on first use)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_cache"] = None
        return state

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        self._cache = None
        return super()._apply(fn, recurse)
