"""Building blocks of :class:`~anomalib_dskd.models.dskd.Dskd`.

The teacher, one-class embeddings and decoders come from the shared reverse-distillation core
(:mod:`anomalib_dskd.components.rd`); the Global Context Condensing Block and
OCBE_glo (the teacher's next stage, trainable) are DSKD's own.
"""

from anomalib_dskd.components.rd import OneClassEmbedding, StudentDecoder, Teacher

from .gccb import GlobalContextCondensingBlock
from .ocbe_glo import TeacherStageEmbedding

__all__ = ["GlobalContextCondensingBlock", "OneClassEmbedding", "StudentDecoder", "Teacher", "TeacherStageEmbedding"]
