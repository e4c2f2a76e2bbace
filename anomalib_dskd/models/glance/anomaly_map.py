"""Fusion of Glance's per-patch scores into a pixel anomaly map.

Glance (Wang, Wu, Cui, Shen, CVPR 2021, supplementary C.1) fuses the 400 patch scores of an image
into a score map by inverse distance weighting (IDW; Bartier & Keller, 1996) with power ``p = 5``:
every pixel gets ``sum_i w_i s_i / sum_i w_i`` with ``w_i = 1 / d(pixel, centre_i)^p``, and a pixel at
a patch centre gets that patch's score exactly.

Written out, that is a dense ``(H * W) x P`` matrix (65,536 x 400 at 256 px): 100 MiB of float32, which
OpenVINO folds into a constant of the exported model (156 MiB for a 15 MiB network, issue #16). When the
centres form a grid (rows x columns, as Glance's patch grid does) the same map comes from small separable
factors instead: with ``t = dy^2 + dx^2`` and ``s = p / 2``,

``t^(-s) = 1 / Gamma(s) * integral exp(s u - e^u t) du = sum_r c_r exp(-lambda_r dy^2) exp(-lambda_r dx^2)``

by the trapezoidal rule in ``u`` (step 0.5; it converges exponentially for this integrand), so the
numerator is ``sum_r c_r A_r S B_r^T`` for the ``(rows, columns)`` score grid ``S`` and per-axis
``(H, rows)`` / ``(W, columns)`` factors: ~2 MiB of constants, one matrix product. Pixels at a centre
(``t = 0``) take that patch's score, as in the dense form. The two forms agree to ~1e-6 of the map's range
(float32 rounding of the dense form itself is ~2e-6; ``tests/test_glance.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: trapezoid step in ``u = log(lambda)`` of the separable IDW quadrature (error ~1e-6 of the range at p = 5)
QUADRATURE_STEP = 0.5
#: the quadrature covers ``lambda * t`` from this at the largest distance ...
QUADRATURE_LOW = 1e-3
#: ... to this at the smallest non-zero distance (beyond it ``exp(-lambda t)`` is below ~4e-18)
QUADRATURE_HIGH = 40.0


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent`` for ``x >= 0``; half-integer exponents use sqrt and products (faster than pow)."""
    if float(2 * exponent).is_integer() and 0 < exponent <= 8:
        whole, half = int(exponent), (2 * exponent) % 2 == 1
        result = torch.sqrt(x) if half else torch.ones_like(x)
        for _ in range(whole):
            result = result * x
        return result
    return x**exponent


def grid_axes(centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows, columns)`` if ``centers`` ``(P, 2)`` are exactly ``rows x columns`` in raster order, else ``None``."""
    rows, cols = torch.unique(centers[:, 0]), torch.unique(centers[:, 1])
    if rows.numel() * cols.numel() != centers.shape[0]:
        return None
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return (rows, cols) if torch.equal(grid, centers) else None


class IDWFusion(nn.Module):
    """Inverse-distance-weighted interpolation of patch scores at fixed centres onto the pixel grid.

    Centres on a grid (rows x columns in raster order, Glance's patch grid) use the separable form of the
    module docstring: per-axis factors of ~2 MiB in all, buffers that are not saved in checkpoints (they
    follow from the centres). Other centres use the dense ``(H*W, P)`` weight matrix, recomputed from the
    centre coordinates in each call (cached in eager mode); exported, OpenVINO folds it into a constant.

    Args:
        image_size: ``(H, W)`` of the map.
        centers: ``(P, 2)`` centre coordinates ``(y, x)`` in pixels (may be fractional).
        power: IDW power. Defaults to ``5`` (the paper).
        separable: ``None`` (default): the separable form whenever the centres form a grid; ``False``: the
            dense form always (the reference the separable one is tested against); ``True``: refuse
            centres that are not a grid.

    Raises:
        ValueError: ``separable=True`` with centres that are not a raster-order grid.
    """

    def __init__(
        self, image_size: tuple[int, int], centers: torch.Tensor, power: float = 5.0, separable: bool | None = None
    ) -> None:
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.power = float(power)
        self.register_buffer("centers", centers.float(), persistent=False)
        self._cache: torch.Tensor | None = None
        axes = grid_axes(self.centers) if separable is not False else None
        if separable and axes is None:
            msg = "separable IDW needs centres that form a grid (rows x columns, raster order); use separable=None."
            raise ValueError(msg)
        self.separable = axes is not None
        if axes is not None:
            self._build_separable(*axes)

    def _build_separable(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Per-axis quadrature factors, the normalising denominator and the at-a-centre selection (float64 math)."""
        height, width = self.image_size
        ys = torch.arange(height, dtype=torch.float64)
        xs = torch.arange(width, dtype=torch.float64)
        dy = (ys[:, None] - rows.double()[None, :]) ** 2  # (H, rows)
        dx = (xs[:, None] - cols.double()[None, :]) ** 2  # (W, cols)
        # smallest non-zero and largest squared distance: the two smallest values per axis suffice for the former
        sums = (torch.unique(dy)[:2, None] + torch.unique(dx)[None, :2]).flatten()
        low = math.log(QUADRATURE_LOW / float(dy.max() + dx.max()))
        high = math.log(QUADRATURE_HIGH / float(sums[sums > 0].min()))
        exponent = self.power / 2
        u = torch.arange(low, high + QUADRATURE_STEP, QUADRATURE_STEP, dtype=torch.float64)
        coefficients = QUADRATURE_STEP * torch.exp(exponent * u) / math.gamma(exponent)
        lam = torch.exp(u)[:, None, None]
        row_factors = coefficients[:, None, None] * torch.exp(-lam * dy[None])  # (R, H, rows)
        col_factors = torch.exp(-lam * dx[None])  # (R, W, cols)
        # (R * cols, W): the second product's right factor, r-major like the left one's columns
        col_stack = col_factors.permute(0, 2, 1).reshape(-1, width)
        ones = torch.ones(1, 1, rows.numel(), cols.numel(), dtype=torch.float64)
        denominator = self._numerator(ones, row_factors, col_stack)[0]
        at_row = ys[:, None] == rows.double()[None, :]  # (H, rows) one-hot where a pixel row is a centre row
        at_col = xs[:, None] == cols.double()[None, :]
        at_centre = at_row.any(1)[:, None] & at_col.any(1)[None, :]
        self.register_buffer("row_factors", row_factors.float(), persistent=False)
        self.register_buffer("col_stack", col_stack.float(), persistent=False)
        self.register_buffer("inverse_denominator", (1 / denominator).float(), persistent=False)
        self.register_buffer("at_row", at_row.float(), persistent=False)
        self.register_buffer("at_col_t", at_col.float().T.contiguous(), persistent=False)
        self.register_buffer("at_centre", at_centre, persistent=False)

    @staticmethod
    def _numerator(grid: torch.Tensor, row_factors: torch.Tensor, col_stack: torch.Tensor) -> torch.Tensor:
        """``sum_r A_r S B_r^T`` for ``(B, 1, rows, cols)`` scores: ``(B, H, W)``."""
        left = torch.matmul(row_factors, grid)  # (B, R, H, cols)
        batch, terms, height, cols = left.shape
        return left.permute(0, 2, 1, 3).reshape(batch, height, terms * cols) @ col_stack

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
        if self.separable:
            grid = scores.reshape(-1, 1, self.at_row.shape[1], self.at_col_t.shape[0]).to(self.row_factors.dtype)
            interpolated = self._numerator(grid, self.row_factors, self.col_stack) * self.inverse_denominator
            at_centres = self.at_row @ grid[:, 0] @ self.at_col_t  # each centre pixel's own patch score
            return torch.where(self.at_centre, at_centres, interpolated).unsqueeze(1)
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
