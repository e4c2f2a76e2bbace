"""Building blocks of :class:`~anomalib_dskd.models.rd.Rd` (all shared with the other RD-based models)."""

from anomalib_dskd.components.rd import OneClassEmbedding, StudentDecoder, Teacher

__all__ = ["OneClassEmbedding", "StudentDecoder", "Teacher"]
