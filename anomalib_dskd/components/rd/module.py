"""Lightning defaults shared by the reverse-distillation models (Rd, Ard, Dskd)."""

from __future__ import annotations

from typing import Any

from anomalib import LearningType


class ReverseDistillationDefaults:
    """Mixin for an :class:`~anomalib.models.components.AnomalibModule` trained by reverse distillation.

    List it *before* ``AnomalibModule`` (``class Rd(ReverseDistillationDefaults, AnomalibModule)``):
    the model class stays a direct subclass of ``AnomalibModule``, which anomalib's ``get_model`` and
    ``list_models`` require.
    """

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping (RD's official code); no sanity validation (it would set thresholds early)."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
