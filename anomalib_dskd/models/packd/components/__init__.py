"""Components of Packd: the PEIM and the prototype-conditioned student decoder."""

from .decoder import EMBEDDING_LEVEL, PrototypeConditionedDecoder
from .peim import Peim, PrototypeExtractor, PrototypeIntegrator

__all__ = ["EMBEDDING_LEVEL", "Peim", "PrototypeConditionedDecoder", "PrototypeExtractor", "PrototypeIntegrator"]
