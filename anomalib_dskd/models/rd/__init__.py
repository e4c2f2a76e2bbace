"""Plain reverse distillation over any timm CNN teacher (the package's baseline, ``Rd``)."""

from .lightning_model import Rd
from .torch_model import RdModel

__all__ = ["Rd", "RdModel"]
