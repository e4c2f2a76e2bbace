"""Global-Net: partial convolutions over the image with the patch masked out.

Glance (Wang, Wu, Cui, Shen, CVPR 2021, supplementary Table 2) describes the surroundings of a patch
by running partial convolutions (:class:`~.partial_conv.PartialConv2d`) over the whole 256x256 image
with a mask that is 0 on the patch and 1 elsewhere; the mask is updated by every layer and pooling,
and the last layer gives a 1x1x128 "global" feature, trained to predict the patch's Local-Net feature.

Inference needs one Global-Net pass per patch (400 per image). :class:`GlobalGridEvaluator` makes that
cheap without changing the result: a partial convolution whose window contains no hole pixel is an
ordinary convolution, so outside the region a hole can reach, every layer's output equals that of the
unmasked image. The unmasked image is run once; for each patch only a window around the hole is
recomputed at every layer, reading values outside the window from the unmasked maps. The windows grow
with the receptive field until, in the last layers, they are the whole (small) map. At 256x256 and a
33x33 hole this is 7x fewer multiply-adds than 400 full passes, with the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .errors import GlanceInputSizeError
from .partial_conv import PartialConv2d, PartialMaxPool2d

#: (name, kind, in_channels, out_channels, kernel, stride, relu) of supplementary Table 2.
#: ``out_channels`` of the last layer is replaced by ``feature_dim``.
GLOBAL_LAYERS: tuple[tuple[str, str, int, int, int, int, bool], ...] = (
    ("pconv0", "conv", 3, 16, 7, 2, True),
    ("pool0", "pool", 16, 16, 3, 2, False),
    ("pconv1_1", "conv", 16, 32, 3, 2, True),
    ("pconv1_2", "conv", 32, 32, 3, 1, True),
    ("pconv2_1", "conv", 32, 64, 3, 2, True),
    ("pconv2_2", "conv", 64, 64, 3, 1, True),
    ("pconv3_1", "conv", 64, 128, 3, 2, True),
    ("pconv3_2", "conv", 128, 128, 3, 1, True),
    ("pconv4", "conv", 128, 128, 3, 1, False),
)


def global_output_size(size: int) -> int:
    """Spatial side of Global-Net's output for an input side ``size`` (<= 0: too small)."""
    for _, _, _, _, kernel, stride, _ in GLOBAL_LAYERS:
        if size < kernel:
            return 0
        size = (size - kernel) // stride + 1
    return size


def valid_global_input_sizes(low: int = 1, high: int = 1024) -> list[int]:
    """Input sides in ``[low, high]`` that Global-Net reduces to exactly 1 (243..274 for Table 2)."""
    return [size for size in range(low, high + 1) if global_output_size(size) == 1]


def check_global_input_size(input_size: tuple[int, int]) -> None:
    """Raise :class:`GlanceInputSizeError` unless both sides reduce to a 1x1 global feature."""
    valid = valid_global_input_sizes()
    bad = [side for side in input_size if side not in valid]
    if bad:
        msg = (
            f"Glance's Global-Net (supplementary Table 2, no padding) reduces an image to a 1x1 feature only "
            f"for sides {valid[0]}..{valid[-1]}; the pre-processor gives {tuple(input_size)}. Resize the images "
            f"to 256x256 (the paper's size), e.g. pre_processor=Glance.configure_pre_processor((256, 256))."
        )
        raise GlanceInputSizeError(msg)


class GlobalNet(nn.Module):
    """Global-Net (supplementary Table 2): masked image -> ``feature_dim`` global feature.

    ========== ============ ====== ======
    layer      output       kernel stride
    ========== ============ ====== ======
    PConv0     125x125x16   7x7    2
    MaxPool    62x62x16     3x3    2
    PConv1_1   30x30x32     3x3    2
    PConv1_2   28x28x32     3x3    1
    PConv2_1   13x13x64     3x3    2
    PConv2_2   11x11x64     3x3    1
    PConv3_1   5x5x128      3x3    2
    PConv3_2   3x3x128      3x3    1
    PConv4     1x1x128      3x3    1
    ========== ============ ====== ======

    ReLU after every partial convolution but the last; no padding; the max pooling is mask aware
    (:class:`~.partial_conv.PartialMaxPool2d`).

    Args:
        feature_dim: Output dimension (must equal Local-Net's). Defaults to ``128``.
    """

    def __init__(self, feature_dim: int = 128) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.layer_specs = []
        for index, (name, kind, c_in, c_out, kernel, stride, relu) in enumerate(GLOBAL_LAYERS):
            if index == len(GLOBAL_LAYERS) - 1:
                c_out = self.feature_dim
            module = PartialConv2d(c_in, c_out, kernel, stride) if kind == "conv" else PartialMaxPool2d(kernel, stride)
            self.add_module(name, module)
            self.layer_specs.append((name, kind, kernel, stride, relu))

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Global features of masked images.

        Args:
            images: ``(B, 3, H, W)``.
            masks: ``(B, 1, H, W)``, 0 on the patch (hole), 1 elsewhere.

        Returns:
            ``(B, feature_dim)``.
        """
        check_global_input_size(tuple(images.shape[-2:]))
        x, mask = images, masks.to(images.dtype)
        for name, _, _, _, relu in self.layer_specs:
            x, mask = getattr(self, name)(x, mask)
            if relu:
                x = F.relu(x)
        return x.flatten(1)

    def forward_unmasked(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's (activated) output for images without a hole (ordinary convolutions)."""
        maps, x = [], images
        for name, kind, kernel, stride, relu in self.layer_specs:
            module = getattr(self, name)
            if kind == "conv":
                x = F.conv2d(x, module.weight, module.bias, module.stride)
            else:
                x = F.max_pool2d(x, kernel, stride)
            if relu:
                x = F.relu(x)
            maps.append(x)
        return maps


def hole_masks(image_size: tuple[int, int], corners: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, 1, H, W)`` masks with 0 on each ``patch_size`` square at ``corners`` ``(N, 2)`` and 1 elsewhere."""
    rows = torch.arange(image_size[0], device=corners.device)
    cols = torch.arange(image_size[1], device=corners.device)
    in_rows = (rows[None] >= corners[:, :1]) & (rows[None] < corners[:, :1] + patch_size)
    in_cols = (cols[None] >= corners[:, 1:]) & (cols[None] < corners[:, 1:] + patch_size)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return (~hole).float().unsqueeze(1)


@dataclass
class _AxisWindows:
    """Per-patch windows along one axis for one layer."""

    out_start: torch.Tensor  # (P,) first output position recomputed
    out_len: int  # window length in the output map
    in_start: torch.Tensor  # (P,) first input position read
    in_len: int  # input window length


def _axis_windows(affected: tuple[torch.Tensor, torch.Tensor], size_in: int, kernel: int, stride: int) -> tuple[
    _AxisWindows, tuple[torch.Tensor, torch.Tensor], int]:
    """Output positions a hole can reach through one layer, padded to a common window length."""
    start, stop = affected
    size_out = (size_in - kernel) // stride + 1
    out_lo = torch.clamp(torch.div(start - kernel + 1 + stride - 1, stride, rounding_mode="floor"), min=0)
    out_hi = torch.clamp(torch.div(stop - 1, stride, rounding_mode="floor") + 1, max=size_out)
    length = int((out_hi - out_lo).max())
    window_start = torch.minimum(out_lo, torch.full_like(out_lo, size_out - length))
    windows = _AxisWindows(window_start, length, window_start * stride, (length - 1) * stride + kernel)
    return windows, (out_lo, out_hi), size_out


class GlobalGridEvaluator(nn.Module):
    """Global features of one image for many holes at fixed positions, recomputing only near the holes.

    All index tensors and masks depend only on the image size and the hole positions, so they are
    built once here (non-persistent buffers; they are not saved in checkpoints).

    Args:
        net: The Global-Net whose weights are used (not copied).
        image_size: ``(H, W)``.
        corners: ``(P, 2)`` top-left ``(y, x)`` of the holes.
        patch_size: Hole side.
    """

    def __init__(self, net: GlobalNet, image_size: tuple[int, int], corners: torch.Tensor, patch_size: int) -> None:
        super().__init__()
        check_global_input_size(image_size)
        self._net = [net]  # not a submodule: no duplicate parameters in state_dict
        self.n_patches = int(corners.shape[0])
        corners = corners.long().cpu()
        affected_rows = (corners[:, 0], corners[:, 0] + patch_size)
        affected_cols = (corners[:, 1], corners[:, 1] + patch_size)
        size_rows, size_cols = image_size
        self.shapes: list[tuple[int, int, int, int]] = []  # (in_rows, in_cols, out_rows, out_cols) per layer
        self.full_sizes: list[tuple[int, int]] = []  # output map size per layer
        prev: tuple[_AxisWindows, _AxisWindows] | None = None
        prev_mask: torch.Tensor | None = None  # (P, 1, out_rows, out_cols) updated masks of the previous windows
        for index, (name, kind, kernel, stride, _) in enumerate(net.layer_specs):
            win_r, affected_rows, out_rows = _axis_windows(affected_rows, size_rows, kernel, stride)
            win_c, affected_cols, out_cols = _axis_windows(affected_cols, size_cols, kernel, stride)
            gather = self._gather_index(win_r, win_c, prev, size_rows, size_cols)
            if prev is None:  # input layer: the mask is the hole itself
                in_mask = self._window_hole_mask(win_r, win_c, corners, patch_size)
            else:
                ones = torch.ones(size_rows * size_cols)
                source = torch.cat([ones, prev_mask.reshape(-1)])
                in_mask = source[gather].reshape(self.n_patches, 1, win_r.in_len, win_c.in_len)
            module = getattr(net, name)
            if kind == "conv":
                ratio, updated = module.mask_update(in_mask)
            else:
                updated = module.mask_update(in_mask)
                ratio = updated
            self.register_buffer(f"gather_{index}", gather, persistent=False)
            self.register_buffer(f"in_mask_{index}", in_mask, persistent=False)
            self.register_buffer(f"ratio_{index}", ratio, persistent=False)
            self.register_buffer(f"updated_{index}", updated, persistent=False)
            self.shapes.append((win_r.in_len, win_c.in_len, win_r.out_len, win_c.out_len))
            self.full_sizes.append((out_rows, out_cols))
            prev, prev_mask = (win_r, win_c), updated
            size_rows, size_cols = out_rows, out_cols
        if (size_rows, size_cols) != (1, 1):  # pragma: no cover - excluded by check_global_input_size
            msg = f"Global-Net output is {size_rows}x{size_cols}, not 1x1"
            raise GlanceInputSizeError(msg)

    def _gather_index(
        self,
        win_r: _AxisWindows,
        win_c: _AxisWindows,
        prev: tuple[_AxisWindows, _AxisWindows] | None,
        size_rows: int,
        size_cols: int,
    ) -> torch.Tensor:
        """Flat index of every input-window pixel into ``cat(full map, previous windows)``."""
        rows = win_r.in_start[:, None] + torch.arange(win_r.in_len)  # (P, Tr)
        cols = win_c.in_start[:, None] + torch.arange(win_c.in_len)  # (P, Tc)
        index = rows[:, :, None] * size_cols + cols[:, None, :]  # (P, Tr, Tc) into the full map
        if prev is not None:
            prev_r, prev_c = prev
            rel_r = rows - prev_r.out_start[:, None]
            rel_c = cols - prev_c.out_start[:, None]
            in_r = (rel_r >= 0) & (rel_r < prev_r.out_len)
            in_c = (rel_c >= 0) & (rel_c < prev_c.out_len)
            patch = torch.arange(self.n_patches)[:, None, None]
            window_index = (
                size_rows * size_cols
                + patch * (prev_r.out_len * prev_c.out_len)
                + rel_r.clamp(min=0)[:, :, None] * prev_c.out_len
                + rel_c.clamp(min=0)[:, None, :]
            )
            index = torch.where(in_r[:, :, None] & in_c[:, None, :], window_index, index)
        return index.reshape(-1)

    def _window_hole_mask(
        self,
        win_r: _AxisWindows,
        win_c: _AxisWindows,
        corners: torch.Tensor,
        patch_size: int,
    ) -> torch.Tensor:
        rows = win_r.in_start[:, None] + torch.arange(win_r.in_len)
        cols = win_c.in_start[:, None] + torch.arange(win_c.in_len)
        in_r = (rows >= corners[:, :1]) & (rows < corners[:, :1] + patch_size)
        in_c = (cols >= corners[:, 1:]) & (cols < corners[:, 1:] + patch_size)
        return (~(in_r[:, :, None] & in_c[:, None, :])).float().unsqueeze(1)

    @property
    def net(self) -> GlobalNet:
        """The Global-Net whose weights are used."""
        return self._net[0]

    def multiply_adds(self) -> tuple[int, int]:
        """Convolution multiply-adds per image: ``(windowed, naive)`` (naive = one full pass per hole)."""
        windowed = naive = 0
        for index, (name, kind, kernel, _, _) in enumerate(self.net.layer_specs):
            if kind != "conv":
                continue
            module = getattr(self.net, name)
            per_output = module.in_channels * module.out_channels * kernel * kernel
            _, _, out_r, out_c = self.shapes[index]
            full_r, full_c = self.full_sizes[index]
            windowed += per_output * (out_r * out_c * self.n_patches + full_r * full_c)
            naive += per_output * full_r * full_c * self.n_patches
        return windowed, naive

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Global features of every hole of every image.

        Args:
            images: ``(B, 3, H, W)``.

        Returns:
            ``(B, P, feature_dim)``, equal (up to float rounding) to ``net(image, hole_mask)`` for
            each hole.
        """
        net, n_patches = self.net, self.n_patches
        full_maps = net.forward_unmasked(images)
        batch = images.shape[0]
        # Channels-last throughout: gathers copy whole pixel rows of C values, convolutions take the
        # permuted views without copies.
        windows: torch.Tensor | None = None  # (B, P * Sr * Sc, C) values of the previous layer's windows
        full = images
        for index, (name, kind, _, _, relu) in enumerate(net.layer_specs):
            in_r, in_c, out_r, out_c = self.shapes[index]
            channels = full.shape[1]
            source = full.permute(0, 2, 3, 1).reshape(batch, -1, channels)
            if windows is not None:
                source = torch.cat([source, windows], dim=1)
            x = source.index_select(1, getattr(self, f"gather_{index}"))  # (B, P * Tr * Tc, C)
            in_mask = getattr(self, f"in_mask_{index}").reshape(-1, 1)  # (P * Tr * Tc, 1)
            updated = getattr(self, f"updated_{index}").reshape(n_patches, out_r, out_c, 1)
            module = getattr(net, name)
            if kind == "conv":
                x = (x * in_mask).reshape(batch * n_patches, in_r, in_c, channels).permute(0, 3, 1, 2)
                raw = F.conv2d(x, module.weight, None, module.stride)
                y = raw.permute(0, 2, 3, 1).reshape(batch, n_patches, out_r, out_c, -1)
                y = y * getattr(self, f"ratio_{index}").reshape(n_patches, out_r, out_c, 1)
                if module.bias is not None:
                    # equals y + b * updated exactly (updated is 0 / 1 and the ratio is 0 where it is 0), without the
                    # constant product b * updated, which OpenVINO folds into a (P, out_r, out_c, C) constant (~33 MiB
                    # over the layers at the default grid; a Multiply after the Add is distributed back into it)
                    y = torch.where(updated > 0, y + module.bias, 0.0)
            else:
                x = torch.where(in_mask > 0, x, -3.0e38).reshape(batch * n_patches, in_r, in_c, channels)
                pooled = F.max_pool2d(x.permute(0, 3, 1, 2), module.kernel_size, module.stride)
                pooled = pooled.permute(0, 2, 3, 1).reshape(batch, n_patches, out_r, out_c, -1)
                y = torch.where(updated > 0, pooled, 0.0)
            if relu:
                y = F.relu(y)
            windows = y.reshape(batch, n_patches * out_r * out_c, -1)
            full = full_maps[index]
        return windows.reshape(batch, n_patches, -1)
