"""Glance: "Glancing at the Patch" (Wang, Wu, Cui, Shen, CVPR 2021) - local vs. global patch features."""

from .lightning_model import Glance
from .torch_model import GlanceModel

__all__ = ["Glance", "GlanceModel"]
