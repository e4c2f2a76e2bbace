"""Anomaly map of :class:`~anomalib_dskd.models.packd.Packd`: the shared RD map (cosine distance, separable blur).

Packd scores the query with RD's multi-scale ``1 - cos`` between its teacher features and its
prototype-conditioned student features; the generator is the same as Rd's.
"""

from anomalib_dskd.components.rd.anomaly_map import AnomalyMapGenerator

__all__ = ["AnomalyMapGenerator"]
