"""Global Context Condensing Block (GCCB) of DSKD (Zhang et al., WACV 2024, Sec. 3.4, suppl. Table 9).

The GCCB sits between the global student's one-class embedding (OCBE_glo) and its decoder. It
condenses the whole ``C x h x w`` embedding into a single ``g``-dimensional vector with a
convolution whose kernel covers the entire embedding, and expands it back with the matching
transposed convolution, so every position of the decoder's input depends on every position of
the image::

    (B, C, h, w) -1x1 conv-> (B, g, h, w) -ReLU- -hxw conv-> (B, g, 1, 1) -ReLU-
                 -hxw transposed conv-> (B, g, h, w) -ReLU- -1x1 conv-> (B, C, h, w) -ReLU-

Biases on, no BatchNorm (the paper found biases better than BatchNorm here). For the paper's
WideResNet50-2 teacher at 256x256, ``C = 2048`` and ``h = w = 8``; the two ``h x w`` layers then
hold ``2 * g^2 * h * w`` weights (134M for ``g = 1024``), which is why ``g`` is configurable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_dskd.components.rd import InputSizeError


class GlobalContextCondensingBlock(nn.Module):
    """Condense an embedding to one ``g``-vector with a full-size convolution and expand it back.

    Args:
        in_channels: channels ``C`` of the one-class embedding (``2 *`` the teacher's deepest channels).
        spatial_size: ``(h, w)`` of the embedding; the condensing kernel has exactly this size, so
            the block only accepts embeddings of this size (the model's input size is fixed).
        channels: the condensed width ``g``. Defaults to ``1024`` (paper default, Table 6).
        project: use the 1x1 convolutions ``C -> g`` and ``g -> C``. ``None`` (default) uses them
            unless ``g == C``; the paper drops them for ``g = C = 2048`` (Table 6).

    Raises:
        InputSizeError: ``spatial_size`` is not a pair of positive integers.
        ValueError: ``channels`` is not positive, or ``project=False`` with ``channels != in_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_size: Sequence[int],
        channels: int = 1024,
        project: bool | None = None,
    ) -> None:
        super().__init__()
        size = tuple(int(v) for v in spatial_size)
        if len(size) != 2 or min(size) < 1:
            msg = (
                f"The GCCB needs the embedding's spatial size (h, w) with h, w >= 1, got {tuple(spatial_size)}; "
                "the input image must be at least twice the teacher's deepest stride on each side."
            )
            raise InputSizeError(msg)
        if int(channels) < 1 or int(in_channels) < 1:
            msg = f"GCCB channels must be positive, got in_channels={in_channels}, channels={channels}."
            raise ValueError(msg)
        in_channels, channels = int(in_channels), int(channels)
        project = channels != in_channels if project is None else bool(project)
        if not project and channels != in_channels:
            msg = f"project=False needs channels == in_channels ({in_channels}), got channels={channels}."
            raise ValueError(msg)
        self.in_channels = in_channels
        self.channels = channels
        self.spatial_size: tuple[int, int] = (size[0], size[1])
        self.project = project
        layers: list[nn.Module] = []
        if project:
            layers += [nn.Conv2d(in_channels, channels, kernel_size=1), nn.ReLU(inplace=True)]
        layers += [
            nn.Conv2d(channels, channels, kernel_size=self.spatial_size),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(channels, channels, kernel_size=self.spatial_size),
            nn.ReLU(inplace=True),
        ]
        if project:
            layers += [nn.Conv2d(channels, in_channels, kernel_size=1), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal weights (fan-in, ReLU gain) and zero biases: keeps the signal scale through the ReLUs."""
        for module in self.layers:
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                # ConvTranspose2d weights are (in, out, kh, kw): its fan-in per output is in * kh * kw
                # only for a 1x1 input, which is exactly our case (condensed vector -> h x w map).
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                if isinstance(module, nn.ConvTranspose2d):
                    fan_in = module.weight.shape[0]
                nn.init.normal_(module.weight, std=(2.0 / fan_in) ** 0.5)
                nn.init.zeros_(module.bias)

    @staticmethod
    def expected_parameters(in_channels: int, spatial_size: Sequence[int], channels: int, project: bool = True) -> int:
        """Number of parameters of a GCCB with these settings (for sizing ``g``)."""
        kernel = int(spatial_size[0]) * int(spatial_size[1])
        count = 2 * (channels * channels * kernel + channels)
        if project:
            count += 2 * in_channels * channels + channels + in_channels
        return count

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C, h, w)`` to ``(B, C, h, w)`` through a ``(B, g, 1, 1)`` global vector."""
        return self.layers(embedding)

    def extra_repr(self) -> str:
        return f"C={self.in_channels}, g={self.channels}, kernel={self.spatial_size}, project={self.project}"
