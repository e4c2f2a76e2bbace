"""Losses of Packd: RD's cosine distillation, contrastive distillation (CDS) and prototype orthogonality.

"Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang, Ma;
BMVC 2023) names the three terms but publishes none of their forms or weights; the forms below are
the package's design (see ``docs/models/packd.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_dskd.components.rd.loss import CosineDistillationLoss


class ContrastiveDistillationLoss(nn.Module):
    """Per-position InfoNCE between a query's student and teacher features.

    For every level and every position ``p`` of query ``g`` the anchor is the student feature
    ``s_g(p)``, the positive the teacher feature ``t_g(p)`` of the same query at the same position,
    and the negatives the student features ``s_h(p)`` of every query ``h`` of a *different category*
    in the batch (``negative_mask[g, h]``), optionally also the teacher features of ``g``'s support
    images at ``p``. All vectors are L2-normalised along channels; the loss is
    ``-log(exp(<s,t>/tau) / sum(exp(<s,x>/tau) for x in positive + negatives))`` averaged over
    queries and positions, summed over levels.

    Args:
        temperature: ``tau``. Defaults to ``0.1``.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            msg = f"temperature must be positive, got {temperature}."
            raise ValueError(msg)
        self.temperature = float(temperature)

    def forward(
        self,
        teacher_features: Sequence[torch.Tensor],
        student_features: Sequence[torch.Tensor],
        negative_mask: torch.Tensor | None = None,
        support_features: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Return the scalar loss.

        Args:
            teacher_features: per level ``(G, C, h, w)`` teacher features of the queries.
            student_features: per level ``(G, C, h, w)`` student features of the queries.
            negative_mask: ``(G, G)`` bool, ``True`` where query ``h`` is a negative for query ``g``
                (different category). ``None``: no query negatives.
            support_features: optional per level ``(G, k, C, h, w)`` teacher features of the supports,
                used as extra negatives.
        """
        loss = teacher_features[0].new_zeros(())
        for level, (teacher, student) in enumerate(zip(teacher_features, student_features, strict=True)):
            s = F.normalize(student, dim=1).flatten(2)  # (G, C, N)
            t = F.normalize(teacher, dim=1).flatten(2)
            logits = [(s * t).sum(1, keepdim=True)]  # (G, 1, N)
            if negative_mask is not None:
                negatives = torch.einsum("gcn,hcn->ghn", s, s)
                logits.append(negatives.masked_fill(~negative_mask.bool().unsqueeze(-1), float("-inf")))
            if support_features is not None:
                support = F.normalize(support_features[level], dim=2).flatten(3)  # (G, k, C, N)
                logits.append(torch.einsum("gcn,gkcn->gkn", s, support))
            logits = torch.cat(logits, dim=1) / self.temperature
            loss = loss + (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
        return loss


class OrthogonalityLoss(nn.Module):
    """``||P P^T - I||_F^2`` on L2-normalised prototypes, averaged over sets and summed over levels.

    Zero exactly when each level's ``M`` prototypes are orthonormal directions (``M <= d``).
    """

    def forward(self, prototypes: Sequence[torch.Tensor]) -> torch.Tensor:
        """``prototypes``: per level ``(G, M, d)`` or ``(M, d)``."""
        loss = prototypes[0].new_zeros(())
        for level_prototypes in prototypes:
            normalised = F.normalize(
                level_prototypes if level_prototypes.dim() == 3 else level_prototypes[None], dim=-1
            )
            gram = normalised @ normalised.transpose(-1, -2)
            identity = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
            loss = loss + (gram - identity).pow(2).sum(dim=(-2, -1)).mean()
        return loss


class PackdLoss(nn.Module):
    """``L = L_rd + contrastive_weight * L_cds + orthogonality_weight * L_orth``.

    Args:
        loss_mode: mode of RD's :class:`~anomalib_dskd.components.rd.CosineDistillationLoss`
            (``"flatten"`` as Rd, or ``"pixel"``).
        contrastive_weight: weight of :class:`ContrastiveDistillationLoss`.
        orthogonality_weight: weight of :class:`OrthogonalityLoss`.
        temperature: InfoNCE temperature.
        support_negatives: also use the supports' teacher features as negatives.
    """

    def __init__(
        self,
        loss_mode: str = "flatten",
        contrastive_weight: float = 0.1,
        orthogonality_weight: float = 0.1,
        temperature: float = 0.1,
        support_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.distillation = CosineDistillationLoss(loss_mode)
        self.contrastive = ContrastiveDistillationLoss(temperature)
        self.orthogonality = OrthogonalityLoss()
        self.contrastive_weight = float(contrastive_weight)
        self.orthogonality_weight = float(orthogonality_weight)
        self.support_negatives = bool(support_negatives)

    def forward(
        self,
        teacher_features: Sequence[torch.Tensor],
        student_features: Sequence[torch.Tensor],
        prototypes: Sequence[torch.Tensor],
        negative_mask: torch.Tensor | None = None,
        support_features: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the total loss and its detached parts (``rd``, ``cds``, ``orth``)."""
        rd = self.distillation(teacher_features, student_features)
        total = rd
        parts = {"rd": rd.detach()}
        if self.contrastive_weight:
            cds = self.contrastive(
                teacher_features,
                student_features,
                negative_mask,
                support_features if self.support_negatives else None,
            )
            total = total + self.contrastive_weight * cds
            parts["cds"] = cds.detach()
        if self.orthogonality_weight and len(prototypes):
            orth = self.orthogonality(prototypes)
            total = total + self.orthogonality_weight * orth
            parts["orth"] = orth.detach()
        return total, parts


__all__ = ["ContrastiveDistillationLoss", "CosineDistillationLoss", "OrthogonalityLoss", "PackdLoss"]
