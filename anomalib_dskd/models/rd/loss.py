"""Loss of the package's plain reverse-distillation model (:class:`~anomalib_dskd.models.rd.Rd`)."""

from anomalib_dskd.components.rd.loss import CosineDistillationLoss

RdLoss = CosineDistillationLoss

__all__ = ["RdLoss"]
