"""The regular grid of patches Glance scores at inference.

Glance (Wang, Wu, Cui, Shen, CVPR 2021, supplementary C.1) crops "20 patches on each side (totally
400 patches for an image), uniformly distributed, overlap allowed", in raster-scan order.
"""

from __future__ import annotations

import torch

from .errors import PatchGridError


def grid_positions(length: int, patch_size: int, count: int, align: int = 1) -> torch.Tensor:
    """``count`` uniformly spaced patch starts along an axis of ``length`` pixels.

    The exact positions ``i * (length - patch_size) / (count - 1)`` are rounded to the nearest multiple
    of ``align`` that keeps the patch inside the image (``align=2`` moves a patch by at most 1 pixel
    and lets Local-Net run densely, see :meth:`~.local_net.LocalNet.dense_grid_features`).

    Args:
        length: Image side.
        patch_size: Patch side.
        count: Patches along the axis.
        align: Rounding step (1 or 2).

    Returns:
        ``(count,)`` int64 starts, strictly increasing.

    Raises:
        PatchGridError: The patch is larger than the image, ``count < 1``, or more patches than distinct
            (aligned) positions.
    """
    if align not in (1, 2):
        msg = f"grid_align must be 1 or 2, got {align}"
        raise PatchGridError(msg)
    if patch_size > length:
        msg = f"the {patch_size}x{patch_size} patch is larger than the {length}-pixel image side"
        raise PatchGridError(msg)
    if count < 1:
        msg = f"patches_per_side must be >= 1, got {count}"
        raise PatchGridError(msg)
    span = length - patch_size
    available = span // align + 1
    if count > available:
        msg = (
            f"a grid of {count} patches per side does not fit a {length}-pixel side with {patch_size}-pixel "
            f"patches: there are only {available} distinct patch positions (grid_align={align}); use at most "
            f"{available} patches per side"
        )
        raise PatchGridError(msg)
    if count == 1:
        exact = torch.tensor([span / 2], dtype=torch.float64)
    else:
        exact = torch.arange(count, dtype=torch.float64) * span / (count - 1)
    starts = (torch.round(exact / align) * align).long().clamp(max=span - span % align)
    if bool((starts[1:] <= starts[:-1]).any()):  # pragma: no cover - excluded by the count check
        msg = f"grid positions collide: {starts.tolist()}"
        raise PatchGridError(msg)
    return starts


def grid_corners(image_size: tuple[int, int], patch_size: int, per_side: int, align: int = 1) -> torch.Tensor:
    """``(per_side**2, 2)`` top-left corners ``(y, x)`` of the grid, raster-scan order."""
    rows = grid_positions(image_size[0], patch_size, per_side, align)
    cols = grid_positions(image_size[1], patch_size, per_side, align)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def patch_index(image_size: tuple[int, int], corners: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Flat pixel indices ``(P * patch_size**2,)`` of each patch, for ``index_select`` on ``(B, C, H * W)``."""
    offsets = torch.arange(patch_size)
    rows = corners[:, 0, None] + offsets
    cols = corners[:, 1, None] + offsets
    return (rows[:, :, None] * image_size[1] + cols[:, None, :]).reshape(-1)


def crop_patches(images: torch.Tensor, index: torch.Tensor, n_patches: int, patch_size: int) -> torch.Tensor:
    """Patches ``(B * P, C, p, p)`` of ``images`` ``(B, C, H, W)`` at the flat ``index`` of :func:`patch_index`."""
    batch, channels = images.shape[:2]
    patches = images.reshape(batch, channels, -1).index_select(2, index)
    return patches.reshape(batch, channels, n_patches, patch_size, patch_size).transpose(1, 2).reshape(
        -1, channels, patch_size, patch_size)
