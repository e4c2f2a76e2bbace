"""Streaming mean / standard deviation of the students' anomaly maps over normal images (DSKD Eq. 8).

Each student's map is standardised with the mean and standard deviation of its values over all
pixels of all normal images of the calibration set (Eq. 8). They are accumulated as streaming
sums - pixel count, sum and sum of squares, in float64 - so any number of images fits in
constant memory, and so that a multi-process (DDP) run gives the one-process result: each
process sums its own share of the images and the sums are added across processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StreamingMoments:
    """Float64 count / sum / sum of squares for several maps (one row per student).

    Args:
        num_maps: number of maps tracked (students).
        device: device of the accumulators.
    """

    def __init__(self, num_maps: int, device: torch.device | str | None = None) -> None:
        self.totals = torch.zeros(num_maps, 3, dtype=torch.float64, device=device)
        self.images = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, maps: list[torch.Tensor] | tuple[torch.Tensor, ...], normal: torch.Tensor | None = None) -> None:
        """Add the pixels of the normal images.

        Args:
            maps: one ``(B, ...)`` tensor per tracked map.
            normal: boolean ``(B,)`` mask of the images to use (``gt_label == 0``); ``None`` = all.
        """
        for index, values in enumerate(maps):
            selected = values if normal is None else values[normal.to(values.device).bool()]
            selected = selected.detach().to(self.totals.device, torch.float64)
            self.totals[index, 0] += selected.numel()
            self.totals[index, 1] += selected.sum()
            self.totals[index, 2] += selected.square().sum()
        count = maps[0].shape[0] if normal is None else int(normal.bool().sum())
        self.images += count

    def reduce(self, sum_across_processes: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the local sums by their sum over processes (``all_reduce`` / ``all_gather``)."""
        packed = torch.cat([self.totals.flatten(), self.images.reshape(1)])
        packed = sum_across_processes(packed)
        self.totals = packed[:-1].reshape(self.totals.shape).clone()
        self.images = packed[-1].clone()

    @property
    def count(self) -> torch.Tensor:
        """Pixels accumulated per map."""
        return self.totals[:, 0]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (population) standard deviation per map, float64.

        Raises:
            ValueError: nothing was accumulated, or a map is constant (zero deviation).
        """
        if bool((self.count == 0).any()):
            msg = "No normal image was seen: cannot compute the map statistics."
            raise ValueError(msg)
        mean = self.totals[:, 1] / self.count
        variance = (self.totals[:, 2] / self.count - mean.square()).clamp_min(0)
        std = variance.sqrt()
        if bool((std <= 0).any()):
            msg = f"A student's anomaly map is constant over the normal images (std {std.tolist()}): cannot standardise."
            raise ValueError(msg)
        return mean, std
