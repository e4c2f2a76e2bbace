"""Anomaly map of :class:`~anomalib_dskd.models.rd.Rd`: the shared RD map (cosine distance, separable blur)."""

from anomalib_dskd.components.rd.anomaly_map import AnomalyMapGenerator

__all__ = ["AnomalyMapGenerator"]
