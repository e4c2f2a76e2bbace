"""Building blocks of Glance (Wang, Wu, Cui, Shen, CVPR 2021)."""

from .dad import DADHead
from .errors import GlanceConfigError, GlanceInputSizeError, PatchGridError, TeacherBackboneError
from .global_net import GlobalGridEvaluator, GlobalNet, check_global_input_size, hole_masks, valid_global_input_sizes
from .grid import crop_patches, grid_corners, grid_positions, patch_index
from .local_net import PATCH_SIZE, TEACHER_FEATURE_LAYERS, LocalNet, PatchTeacher
from .partial_conv import PartialConv2d, PartialMaxPool2d
from .stains import StainGenerator

__all__ = [
    "PATCH_SIZE",
    "TEACHER_FEATURE_LAYERS",
    "DADHead",
    "GlanceConfigError",
    "GlanceInputSizeError",
    "GlobalGridEvaluator",
    "GlobalNet",
    "LocalNet",
    "PartialConv2d",
    "PartialMaxPool2d",
    "PatchGridError",
    "PatchTeacher",
    "StainGenerator",
    "TeacherBackboneError",
    "check_global_input_size",
    "crop_patches",
    "grid_corners",
    "grid_positions",
    "hole_masks",
    "patch_index",
    "valid_global_input_sizes",
]
