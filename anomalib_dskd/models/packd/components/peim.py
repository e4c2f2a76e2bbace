"""Prototype extraction and integration module (PEIM) of Packd.

"Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang, Ma;
BMVC 2023) extracts prototypes from the support images' teacher features and integrates them into
the query's student features (supplementary, Fig. 1(b)). The paper does not publish the module's
form; this is the package's design:

* :class:`PrototypeExtractor` - ``M`` learned query vectors cross-attend (single head, in a small
  ``attention_dim``) over *all* positions of *all* ``k`` support feature maps of one level. The ``k``
  images are pooled into one token set, so the prototypes do not depend on the order of the supports
  and have the same shape ``(M, attention_dim)`` for any ``k``: they can be cached as fixed-shape
  buffers, stored in checkpoints and exported as constants.
* :class:`PrototypeIntegrator` - every student position cross-attends over the ``M`` prototypes and
  the attended value, projected back to the student's channels, is added to the student feature
  (residual). The output projection starts at zero, so an untrained Packd is exactly RD.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PrototypeExtractor(nn.Module):
    """``M`` prototypes of one feature level, from learned queries attending over support features.

    Args:
        in_channels: channels of the support (teacher) features of this level.
        num_prototypes: ``M``, the number of prototypes.
        attention_dim: dimension of keys, values and prototypes.

    Input ``(G, k, C, h, w)`` (``G`` support sets of ``k`` images); output ``(G, M, attention_dim)``.
    """

    def __init__(self, in_channels: int, num_prototypes: int = 8, attention_dim: int = 64) -> None:
        super().__init__()
        if num_prototypes < 1 or attention_dim < 1:
            msg = f"num_prototypes and attention_dim must be positive, got {num_prototypes}, {attention_dim}."
            raise ValueError(msg)
        self.norm = nn.LayerNorm(in_channels)
        self.key = nn.Linear(in_channels, attention_dim, bias=False)
        self.value = nn.Linear(in_channels, attention_dim, bias=False)
        self.queries = nn.Parameter(torch.randn(num_prototypes, attention_dim) / math.sqrt(attention_dim))
        self.scale = attention_dim**-0.5

    @property
    def num_prototypes(self) -> int:
        """``M``."""
        return self.queries.shape[0]

    def forward(self, support_features: torch.Tensor) -> torch.Tensor:
        """Return ``(G, M, attention_dim)`` prototypes for ``(G, k, C, h, w)`` support features."""
        if support_features.dim() != 5:
            msg = f"support features must be (G, k, C, h, w), got shape {tuple(support_features.shape)}."
            raise ValueError(msg)
        groups, shots, channels, height, width = support_features.shape
        tokens = support_features.permute(0, 1, 3, 4, 2).reshape(groups, shots * height * width, channels)
        tokens = self.norm(tokens)
        keys, values = self.key(tokens), self.value(tokens)
        attention = torch.softmax(torch.einsum("md,gnd->gmn", self.queries, keys) * self.scale, dim=-1)
        return torch.einsum("gmn,gnd->gmd", attention, values)


class PrototypeIntegrator(nn.Module):
    """Residual cross-attention from student positions to the prototypes of the same level.

    Args:
        channels: channels of the student features of this level.
        attention_dim: dimension of the prototypes (and of the attention).

    ``forward(features (B, C, h, w), prototypes (B, M, d)) -> (B, C, h, w)``. The output projection is
    zero-initialised: at initialisation the module is the identity.
    """

    def __init__(self, channels: int, attention_dim: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, attention_dim, bias=False)
        self.key = nn.Linear(attention_dim, attention_dim, bias=False)
        self.value = nn.Linear(attention_dim, attention_dim, bias=False)
        self.out = nn.Linear(attention_dim, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.scale = attention_dim**-0.5

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Add the prototype read-out to every position of ``features``."""
        batch, channels, height, width = features.shape
        tokens = self.norm(features.flatten(2).transpose(1, 2))  # (B, hw, C)
        queries = self.query(tokens)
        keys, values = self.key(prototypes), self.value(prototypes)  # (B, M, d)
        attention = torch.softmax(torch.bmm(queries, keys.transpose(1, 2)) * self.scale, dim=-1)
        update = self.out(torch.bmm(attention, values))  # (B, hw, C)
        return features + update.transpose(1, 2).reshape(batch, channels, height, width)


class Peim(nn.Module):
    """One extractor and one integrator per PEIM level.

    Args:
        support_channels: channels of the support (teacher) features per PEIM level.
        student_channels: channels of the student features per PEIM level (same order).
        num_prototypes: ``M`` per level.
        attention_dim: attention / prototype dimension.
    """

    def __init__(
        self,
        support_channels: list[int],
        student_channels: list[int],
        num_prototypes: int = 8,
        attention_dim: int = 64,
    ) -> None:
        super().__init__()
        if len(support_channels) != len(student_channels):
            msg = "support_channels and student_channels need one entry per PEIM level."
            raise ValueError(msg)
        self.extractors = nn.ModuleList(
            PrototypeExtractor(channels, num_prototypes, attention_dim) for channels in support_channels
        )
        self.integrators = nn.ModuleList(PrototypeIntegrator(channels, attention_dim) for channels in student_channels)
        self.num_prototypes = num_prototypes
        self.attention_dim = attention_dim

    def extract(self, support_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Prototypes ``(G, M, d)`` per level from ``(G, k, C, h, w)`` support features per level."""
        return [extractor(features) for extractor, features in zip(self.extractors, support_features, strict=True)]


__all__ = ["Peim", "PrototypeExtractor", "PrototypeIntegrator"]
