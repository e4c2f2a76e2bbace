"""Backbone-generic reverse-distillation core (teacher, one-class embedding, student decoder, maps)."""

from .anomaly_map import (
    AnomalyMapGenerator,
    SeparableGaussianBlur2d,
    UpsampleSmooth,
    cosine_distance_maps,
    upsample_and_sum,
)
from .core import InputSizeError, RdArchitecture, ReverseDistillationCore, require_input_size
from .decoder import StudentDecoder
from .loss import CosineDistillationLoss
from .ocbe import OneClassEmbedding
from .teacher import TESTED_BACKBONES, Teacher, TeacherBackboneError

__all__ = [
    "TESTED_BACKBONES",
    "AnomalyMapGenerator",
    "CosineDistillationLoss",
    "InputSizeError",
    "OneClassEmbedding",
    "RdArchitecture",
    "ReverseDistillationCore",
    "SeparableGaussianBlur2d",
    "StudentDecoder",
    "Teacher",
    "TeacherBackboneError",
    "UpsampleSmooth",
    "cosine_distance_maps",
    "require_input_size",
    "upsample_and_sum",
]
