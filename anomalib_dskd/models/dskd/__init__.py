"""DSKD: dual-student knowledge distillation with contextual affinity (Zhang et al., WACV 2024), ``Dskd``."""

from .components import GlobalContextCondensingBlock
from .lightning_model import Dskd
from .loss import ContextualAffinityLoss, DskdLoss, PerPixelCosineLoss
from .torch_model import DskdModel
from .visualizer import DskdVisualizer

__all__ = [
    "ContextualAffinityLoss",
    "Dskd",
    "DskdLoss",
    "DskdModel",
    "DskdVisualizer",
    "GlobalContextCondensingBlock",
    "PerPixelCosineLoss",
]
