"""Building blocks of :class:`~anomalib_dskd.models.ard.Ard`.

The attention modules (timm's SE, ECA and CBAM) and the attention ResNet blocks of the one-class
embedding live in :mod:`anomalib_dskd.components.rd.attention`; teacher, embedding and decoder are
the shared reverse-distillation core.
"""

from anomalib_dskd.components.rd import OneClassEmbedding, StudentDecoder, Teacher
from anomalib_dskd.components.rd.attention import (
    ATTENTION_POSITIONS,
    ATTENTION_TYPES,
    AttentionBasicBlock,
    AttentionBottleneck,
    AttentionConfigError,
    create_attention,
)

__all__ = [
    "ATTENTION_POSITIONS",
    "ATTENTION_TYPES",
    "AttentionBasicBlock",
    "AttentionBottleneck",
    "AttentionConfigError",
    "OneClassEmbedding",
    "StudentDecoder",
    "Teacher",
    "create_attention",
]
