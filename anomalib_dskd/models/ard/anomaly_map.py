"""Anomaly map of :class:`~anomalib_dskd.models.ard.Ard`.

ARD ("Attention One-Class Embedding in Reverse Distillation for Anomaly Detection") changes only
the one-class embedding, so its map is reverse distillation's (Deng & Li, CVPR 2022): per-scale
``1 - cos(teacher, student)``, bilinearly upsampled to the input size, summed, Gaussian-smoothed
(sigma 4, as a separable blur).
"""

from anomalib_dskd.components.rd.anomaly_map import AnomalyMapGenerator

__all__ = ["AnomalyMapGenerator"]
