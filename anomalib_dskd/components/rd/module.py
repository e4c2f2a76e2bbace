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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore anomalib's components (the pre-processor first), then fit the model to its input size.

        ``load_from_checkpoint`` builds the model with the default 256x256 pre-processor; anomalib
        restores the checkpoint's pre-processor here, and the anomaly map (Dskd: the GCCB kernel)
        must follow its size, or a model trained at 128x128 would return 256x256 maps.
        """
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        size = self.input_size  # type: ignore[attr-defined]
        setter = getattr(self.model, "set_input_size", None)  # type: ignore[attr-defined]
        if size is not None and setter is not None:
            setter(size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping (RD's official code); no sanity validation (it would set thresholds early)."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
