"""Distortion Anomaly Detection (DAD) head.

Glance (Wang, Wu, Cui, Shen, CVPR 2021, supplementary Table 3): the global and local features (128-d
each) are concatenated to 256-d and an MLP ``256 -> 128 -> 2`` with leaky ReLUs of slope 1e-2 (after
both layers, the last one included, as in the table) and a softmax decides whether they match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

#: Negative slope of the DAD head's leaky ReLUs (supplementary Table 3).
DAD_SLOPE = 1e-2
#: Index of the "match" class in the DAD head's two outputs (0 = no match, i.e. distorted patch).
MATCH = 1


class DADHead(nn.Module):
    """MLP on ``cat(global, local)`` -> two logits (index 0: no match, index 1: match).

    Args:
        feature_dim: Dimension of each feature. Defaults to ``128`` (input 256).
        hidden_dim: Hidden width. Defaults to ``128``.
    """

    def __init__(self, feature_dim: int = 128, hidden_dim: int = 128) -> None:
        super().__init__()
        self.fc0 = nn.Linear(2 * feature_dim, hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, 2)

    def forward(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., 2)`` (before the softmax) for features ``(..., D)``."""
        x = torch.cat([global_features, local_features], dim=-1)
        x = F.leaky_relu(self.fc0(x), DAD_SLOPE)
        return F.leaky_relu(self.fc1(x), DAD_SLOPE)

    def match_probability(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        """``P(match)`` ``(...)`` from the softmax of the logits."""
        return torch.softmax(self.forward(global_features, local_features), dim=-1)[..., MATCH]
