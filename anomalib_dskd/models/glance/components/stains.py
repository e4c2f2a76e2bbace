"""Random stains painted on a patch: the DAD head's negative examples.

Glance (Wang, Wu, Cui, Shen, CVPR 2021, supplementary C.1) makes the negative patch ``p-`` by adding
"random stains" to ``p``; the stains follow Collin & De Vleeschouwer ("Improved anomaly detection by
training an autoencoder with skip connections on images corrupted with stain-shaped noise", 2020):
irregular ellipse-like blobs of one uniform colour. The paper gives no sizes, so they are arguments.

Shape of one stain of size ``s``: an ellipse with semi-major axis ``s / 2``, axis ratio in
``[min_aspect, 1]`` and a random orientation, whose boundary is pulled inwards by up to ``jitter``
of its radius with a random low-frequency wave that vanishes at the ends of the major axis. The
stain therefore always spans exactly ``s`` pixels along its major axis and fits in a disc of
diameter ``s`` - ``s`` is its size (Feret diameter). Colour: uniform RGB in ``[0, 1]``, normalised
like the images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import GlanceConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StainGenerator:
    """Paint 1..``max_stains`` random stains on each patch.

    Args:
        size_range: ``(min, max)`` stain size (Feret diameter) in pixels. Defaults to ``(4, 16)``.
        max_stains: Maximum number of stains per patch (at least one is always painted). Defaults to ``3``.
        min_aspect: Minimum minor / major axis ratio. Defaults to ``0.3``.
        jitter: Maximum relative inward deformation of the boundary. Defaults to ``0.3``.
        mean: Per-channel mean of the image normalisation. Defaults to ImageNet's.
        std: Per-channel std of the image normalisation. Defaults to ImageNet's.

    Raises:
        GlanceConfigError: Sizes not ``1 <= min <= max``, ``max_stains < 1``, or aspect / jitter
            outside ``(0, 1]`` / ``[0, 1)``.
    """

    def __init__(
        self,
        size_range: Sequence[float] = (4.0, 16.0),
        max_stains: int = 3,
        min_aspect: float = 0.3,
        jitter: float = 0.3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        low, high = (float(v) for v in size_range)
        if not 1.0 <= low <= high:
            msg = f"stain size range must satisfy 1 <= min <= max, got {tuple(size_range)!r}"
            raise GlanceConfigError(msg)
        if int(max_stains) < 1:
            msg = f"max_stains must be >= 1, got {max_stains}"
            raise GlanceConfigError(msg)
        if not 0.0 < min_aspect <= 1.0 or not 0.0 <= jitter < 1.0:
            msg = f"need 0 < min_aspect <= 1 and 0 <= jitter < 1, got {min_aspect}, {jitter}"
            raise GlanceConfigError(msg)
        self.size_range = (low, high)
        self.max_stains = int(max_stains)
        self.min_aspect = float(min_aspect)
        self.jitter = float(jitter)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def stain_masks(
        self,
        n: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        centers: torch.Tensor | None = None,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean masks ``(n, height, width)`` of one random stain each.

        Args:
            n: Number of stains.
            height: Canvas height.
            width: Canvas width.
            generator: Random generator.
            centers: ``(n, 2)`` centres ``(y, x)``; default uniform in the canvas.
            sizes: ``(n,)`` sizes; default uniform in ``size_range``.
        """
        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator)

        low, high = self.size_range
        if sizes is None:
            sizes = low + (high - low) * rand(n)
        if centers is None:
            centers = rand(n, 2) * torch.tensor([height - 1, width - 1], dtype=torch.float32)
        semi_major = sizes.float() / 2
        semi_minor = semi_major * (self.min_aspect + (1 - self.min_aspect) * rand(n))
        angle = math.pi * rand(n)
        frequency = torch.randint(2, 6, (n,), generator=generator).float()
        phase = 2 * math.pi * rand(n)
        ys = torch.arange(height, dtype=torch.float32).view(1, -1, 1) - centers[:, 0].view(-1, 1, 1)
        xs = torch.arange(width, dtype=torch.float32).view(1, 1, -1) - centers[:, 1].view(-1, 1, 1)
        cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
        u = xs * cos + ys * sin  # along the major axis
        v = -xs * sin + ys * cos
        radius = torch.sqrt(u**2 + v**2)
        phi = torch.atan2(v, u)
        a, b = semi_major.view(-1, 1, 1), semi_minor.view(-1, 1, 1)
        boundary = a * b / torch.sqrt((b * torch.cos(phi)) ** 2 + (a * torch.sin(phi)) ** 2).clamp(min=1e-12)
        wave = 0.5 * (1 + torch.sin(frequency.view(-1, 1, 1) * phi + phase.view(-1, 1, 1)))
        boundary = boundary * (1 - self.jitter * torch.sin(phi).abs() * wave)
        return radius <= boundary

    def __call__(
        self,
        patches: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stained copies of normalised patches ``(N, 3, H, W)``.

        Returns:
            ``(stained, mask)``: the patches with 1..``max_stains`` stains and the ``(N, 1, H, W)`` union of
            the stain masks.
        """
        n, _, height, width = patches.shape
        counts = torch.randint(1, self.max_stains + 1, (n,), generator=generator)
        stained = patches.clone()
        union = torch.zeros(n, 1, height, width, dtype=torch.bool)
        for k in range(self.max_stains):
            active = counts > k
            masks = self.stain_masks(n, height, width, generator) & active.view(-1, 1, 1)
            colour = (torch.rand(n, 3, 1, 1, generator=generator) - self.mean) / self.std
            masks = masks.unsqueeze(1).to(patches.device)
            stained = torch.where(masks, colour.to(patches), stained)
            union |= masks.cpu()
        return stained, union.to(patches.device)
