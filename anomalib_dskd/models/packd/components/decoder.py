"""Student decoder of Packd: the shared RD decoder with prototype integration between its stages."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_dskd.components.rd import StudentDecoder

from .peim import Peim

#: PEIM level of the one-class embedding (levels 1-3 are the core's teacher scales, shallow to deep).
EMBEDDING_LEVEL = 4


class PrototypeConditionedDecoder(nn.Module):
    """Run :class:`~anomalib_dskd.components.rd.StudentDecoder` stage by stage, integrating prototypes.

    The shared decoder is not modified: this wrapper calls its ``stages`` in order (deepest first) and
    applies the PEIM integrator of a level to the features of that level, before they feed the next
    stage. Level ``4`` is the one-class embedding (integrated before the first stage), level ``3`` the
    output of the first stage (the teacher's deepest scale), level ``2`` the second, level ``1`` the
    last.

    Args:
        decoder: the student decoder (its parameters are owned by this module).
        peim: the prototype extraction / integration module.
        levels: PEIM levels, in the order of ``peim``'s integrators.
    """

    def __init__(self, decoder: StudentDecoder, peim: Peim, levels: Sequence[int]) -> None:
        super().__init__()
        self.decoder = decoder
        self.peim = peim
        self.levels = tuple(int(level) for level in levels)
        self._slot = {level: index for index, level in enumerate(self.levels)}

    def _integrate(self, level: int, features: torch.Tensor, prototypes: Sequence[torch.Tensor]) -> torch.Tensor:
        slot = self._slot.get(level)
        if slot is None:
            return features
        return self.peim.integrators[slot](features, prototypes[slot])

    def forward(self, embedding: torch.Tensor, prototypes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decode ``embedding`` conditioned on per-level ``(B, M, d)`` prototypes; outputs shallow to deep."""
        features = self._integrate(EMBEDDING_LEVEL, embedding, prototypes)
        outputs = []
        num_stages = len(self.decoder.stages)
        for index, stage in enumerate(self.decoder.stages):
            level = num_stages - index  # stage 0 produces the deepest teacher scale
            features = self._integrate(level, stage(features), prototypes)
            outputs.append(features)
        return outputs[::-1]


__all__ = ["EMBEDDING_LEVEL", "PrototypeConditionedDecoder"]
