"""Loss of :class:`~anomalib_dskd.models.ard.Ard`: reverse distillation's cosine loss.

ARD ("Attention One-Class Embedding in Reverse Distillation for Anomaly Detection") trains the
attention one-class embedding and the student decoder with RD's multi-scale cosine distillation
loss (Deng & Li, CVPR 2022, Eq. 2); the public supplementary describes no additional term, and
none was added (see ``docs/models/ard.md``).
"""

from anomalib_dskd.components.rd.loss import CosineDistillationLoss

ArdLoss = CosineDistillationLoss

__all__ = ["ArdLoss"]
