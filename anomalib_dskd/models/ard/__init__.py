"""ARD: reverse distillation with attention in the one-class embedding (``Ard``)."""

from .lightning_model import Ard
from .torch_model import ArdModel

__all__ = ["Ard", "ArdModel"]
