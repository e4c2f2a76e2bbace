"""Errors raised by Glance for configurations it cannot run."""

from __future__ import annotations

from anomalib_dskd.components.rd.core import InputSizeError
from anomalib_dskd.components.rd.teacher import TeacherBackboneError


class GlanceInputSizeError(InputSizeError):
    """The image size is one that Global-Net (supplementary Table 2) cannot reduce to a 1x1 feature."""


class PatchGridError(ValueError):
    """The inference patch grid does not fit the image (too many patches, or patches larger than the image)."""


class GlanceConfigError(ValueError):
    """Another invalid Glance setting (loss weights, stage lengths, stain sizes, ...)."""


__all__ = ["GlanceConfigError", "GlanceInputSizeError", "PatchGridError", "TeacherBackboneError"]
