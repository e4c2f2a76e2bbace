"""Partial convolution and mask-aware max pooling.

Partial convolution (Liu et al., "Image Inpainting for Irregular Holes Using Partial Convolutions",
ECCV 2018) is what Global-Net of Glance (Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly
Localization with Global and Local Feature Comparison", CVPR 2021, supplementary Table 2) is built
from: the patch under inspection is a hole (mask 0) and the network sees only its surroundings.

For a window with binary mask ``M`` and input ``X``::

    out  = W^T (X * M) * sum(1) / sum(M) + b    if sum(M) > 0
         = 0                                    otherwise
    M'   = 1 if sum(M) > 0 else 0

Masks here have one channel that is shared by all feature channels. The paper's Global-Net takes a
``256 x 256 x 3`` mask whose three channels are equal; with equal channels the multi-channel rule
gives the same ``sum(1) / sum(M)`` ratio, so a one-channel mask is exactly equivalent and cheaper.

The module also exposes the two halves of the computation (:meth:`PartialConv2d.mask_update` and
:meth:`PartialConv2d.apply_ratio`), so that a caller that knows the masks in advance (Glance's grid
inference, where the masks depend only on the patch position) can precompute them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

#: value that stands for "minus infinity" in mask-aware max pooling (finite: safe in ONNX / OpenVINO).
_NEG = -3.0e38


class PartialConv2d(nn.Conv2d):
    """2-D partial convolution with a one-channel binary mask (Liu et al., ECCV 2018).

    Same constructor as :class:`torch.nn.Conv2d` (``groups`` must be 1). ``forward(x, mask)``
    returns ``(output, updated_mask)``. With a mask of ones and no padding the output equals the
    plain convolution's; pixels where the mask is 0 never influence the output.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        stride: Stride. Defaults to ``1``.
        padding: Zero padding (the mask is padded with zeros, i.e. padding counts as a hole, as
            in the reference implementation). Defaults to ``0`` (Glance's Table 2).
        dilation: Dilation. Defaults to ``1``.
        bias: Learnable bias. Defaults to ``True``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups=1, bias=bias)
        self.register_buffer("mask_kernel", torch.ones(1, 1, *self.kernel_size), persistent=False)
        self.window_size = float(self.kernel_size[0] * self.kernel_size[1])

    def mask_update(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Renormalisation ratio and updated mask for an input mask.

        Args:
            mask: ``(B, 1, H, W)`` binary mask (1 = valid pixel, 0 = hole).

        Returns:
            ``(ratio, updated_mask)``, both ``(B, 1, H', W')``: ``ratio = sum(1) / sum(M)`` where the
            window holds a valid pixel and 0 elsewhere; ``updated_mask = 1`` where it does.
        """
        with torch.no_grad():
            count = F.conv2d(
                mask.to(self.mask_kernel.dtype),
                self.mask_kernel,
                None,
                self.stride,
                self.padding,
                self.dilation,
            )
            updated = (count > 0).to(count.dtype)
            ratio = self.window_size / count.clamp(min=1.0) * updated
        return ratio, updated

    def apply_ratio(self, masked_input: torch.Tensor, ratio: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """The partial convolution of an already masked input with precomputed ratio and mask.

        Args:
            masked_input: ``X * M``, ``(B, C_in, H, W)``.
            ratio: From :meth:`mask_update`; broadcastable to the output.
            updated: From :meth:`mask_update`; broadcastable to the output.

        Returns:
            ``(B, C_out, H', W')``.
        """
        raw = F.conv2d(masked_input, self.weight, None, self.stride, self.padding, self.dilation)
        out = raw * ratio
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1) * updated
        return out

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial convolution of ``x`` under ``mask``.

        Args:
            x: ``(B, C_in, H, W)`` input.
            mask: ``(B, 1, H, W)`` binary mask (1 = valid), or ``(1, 1, H, W)`` to share one mask.

        Returns:
            ``(output, updated_mask)``: ``(B, C_out, H', W')`` and ``(B, 1, H', W')``.
        """
        ratio, updated = self.mask_update(mask)
        return self.apply_ratio(x * mask, ratio, updated), updated


class PartialMaxPool2d(nn.Module):
    """Mask-aware max pooling: the maximum over the valid pixels of each window.

    A window with at least one valid pixel gives a valid output (the same rule as the partial
    convolution's mask update); a window without any gives 0 and a hole in the updated mask.
    The paper does not say how Global-Net's max pooling treats the mask; this is the choice that
    keeps hole pixels from ever influencing the output.

    Args:
        kernel_size: Window size.
        stride: Stride. Defaults to ``kernel_size``.
    """

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.stride = int(stride) if stride is not None else int(kernel_size)

    def mask_update(self, mask: torch.Tensor) -> torch.Tensor:
        """Updated mask: 1 where the window holds a valid pixel."""
        return F.max_pool2d(mask, self.kernel_size, self.stride)

    def apply_mask(self, x: torch.Tensor, mask: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` ignoring pixels where ``mask`` is 0, with a precomputed updated mask."""
        pooled = F.max_pool2d(torch.where(mask > 0, x, _NEG), self.kernel_size, self.stride)
        return torch.where(updated > 0, pooled, 0.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool ``x`` under ``mask``; returns ``(output, updated_mask)``."""
        updated = self.mask_update(mask)
        return self.apply_mask(x, mask, updated), updated

    def extra_repr(self) -> str:
        """Kernel and stride."""
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
