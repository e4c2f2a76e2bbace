"""Packd: prototype-aware contrastive knowledge distillation for few-shot anomaly detection.

"Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang, Ma; BMVC 2023).
"""

from .lightning_model import Packd, load_support_images
from .torch_model import PackdModel, SupportError

__all__ = ["Packd", "PackdModel", "SupportError", "load_support_images"]
