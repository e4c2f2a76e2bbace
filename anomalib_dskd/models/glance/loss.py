"""Losses of Glance's two training stages.

Glance (Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly Localization with Global and Local
Feature Comparison", CVPR 2021; supplementary C.1):

* Stage 1, Local-Net: knowledge distillation ``L_k`` (squared L2 distance between the decoded Local-Net
  feature and the standardised teacher feature) plus compactness ``L_c`` (sum of the off-diagonal
  entries of the correlation matrix of the Local-Net features over the batch), both as defined in
  Bergmann et al., "Uninformed Students" (CVPR 2020); ``L = lambda_k L_k + lambda_c L_c``, with
  ``lambda_k = lambda_c = 1``. Here ``lambda_c`` can be warmed up over stage 1 (``Glance``'s
  ``lambda_c_warmup``): ``L_c`` is scale invariant, its gradient grows as ``1 / std`` of the
  features, and at the start of training it dominates ``L_k`` by orders of magnitude.
* Stage 2, Global-Net and DAD head (Local-Net frozen): the IAD loss ``||g - l(p)||^2`` (squared L2
  distance between the global and the local feature, which trains Global-Net), and the DAD loss, the
  cross-entropy of the DAD head on the matching pair ``(g, l(p))`` (label "match") and on the pair
  with the stained patch ``(g, l(p-))`` (label "no match"); ``L = L_IAD + lambda_t L_DAD`` with
  ``lambda_t = 0.01``. The supplementary gives the value of ``lambda_t`` but not the equation it
  appears in; weighting the DAD term against the IAD term is this package's reading (the DAD head's
  own update is unaffected by the weight under Adam, which is scale invariant; the weight sets how much
  the DAD task shapes Global-Net).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .components.dad import MATCH


def knowledge_distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_k``: mean over the batch of ``||decoded - target||^2``."""
    return ((decoded - target) ** 2).sum(dim=-1).mean()


def compactness_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``L_c``: sum of the off-diagonal entries of the batch correlation matrix of ``(N, D)`` features."""
    if features.shape[0] < 2:
        return features.new_zeros(())
    centered = features - features.mean(dim=0, keepdim=True)
    cov = centered.transpose(0, 1) @ centered / (features.shape[0] - 1)
    std = torch.sqrt(torch.diagonal(cov).clamp(min=0) + eps)
    corr = cov / (std[:, None] * std[None, :])
    return corr.sum() - torch.diagonal(corr).sum()


def iad_distance(global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
    """``s_IAD``: squared L2 distance ``(...)`` between global and local features ``(..., D)``."""
    return ((global_features - local_features) ** 2).sum(dim=-1)


class GlanceLoss(nn.Module):
    """The two stage losses with their weights.

    Args:
        lambda_k: Weight of the distillation loss. Defaults to ``1``.
        lambda_c: Weight of the compactness loss. Defaults to ``1``.
        lambda_t: Weight of the DAD loss against the IAD loss. Defaults to ``0.01``.
    """

    def __init__(self, lambda_k: float = 1.0, lambda_c: float = 1.0, lambda_t: float = 0.01) -> None:
        super().__init__()
        self.lambda_k = float(lambda_k)
        self.lambda_c = float(lambda_c)
        self.lambda_t = float(lambda_t)

    def local(
        self,
        decoded: torch.Tensor,
        target: torch.Tensor,
        features: torch.Tensor,
        lambda_c: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Stage-1 loss terms; ``"loss"`` is the weighted total.

        Args:
            decoded: ``(N, D_teacher)`` decoded Local-Net features.
            target: ``(N, D_teacher)`` standardised teacher features.
            features: ``(N, D)`` Local-Net features (for ``L_c``).
            lambda_c: Compactness weight of this iteration (the warm-up schedule); default ``self.lambda_c``.
        """
        weight = self.lambda_c if lambda_c is None else float(lambda_c)
        l_k = knowledge_distillation_loss(decoded, target)
        l_c = compactness_loss(features)
        return {"loss": self.lambda_k * l_k + weight * l_c, "loss_k": l_k, "loss_c": l_c}

    def global_(
        self,
        global_features: torch.Tensor,
        local_positive: torch.Tensor,
        logits_positive: torch.Tensor,
        logits_negative: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Stage-2 loss terms; ``"loss"`` is the weighted total.

        Args:
            global_features: ``(N, D)`` Global-Net features of the masked images.
            local_positive: ``(N, D)`` Local-Net features of the true patches (no gradient needed).
            logits_positive: ``(N, 2)`` DAD logits of ``(g, l(p))``.
            logits_negative: ``(N, 2)`` DAD logits of ``(g, l(p-))``.
        """
        l_iad = iad_distance(global_features, local_positive).mean()
        n = logits_positive.shape[0]
        match = torch.full((n,), MATCH, dtype=torch.long, device=logits_positive.device)
        logits = torch.cat([logits_positive, logits_negative])
        labels = torch.cat([match, 1 - match])
        l_dad = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": l_iad + self.lambda_t * l_dad, "loss_iad": l_iad, "loss_dad": l_dad, "dad_accuracy": accuracy}
