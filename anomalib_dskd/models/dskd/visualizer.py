"""Visualiser showing DSKD's local, global and final anomaly maps side by side (paper Fig. 4).

:class:`~anomalib_dskd.models.dskd.Dskd` attaches each student's smoothed, standardised map to
test / predict batches (``anomaly_map_local``, ``anomaly_map_global``; they add up to the final
map before anomalib's normalisation). :class:`DskdVisualizer` draws, per image::

    image (+ ground-truth contour) | local student | global student | final map | prediction mask

All three maps use the colour scale of the final map after anomalib's post-processing (the
post-processor's pixel threshold sits at 0.5), so a student's panel shows its share of the final
score; without post-processor statistics each map is min-max scaled per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.functional import (
    add_text_to_image,
    create_image_grid,
    get_visualize_function,
    overlay_images,
)
from PIL import Image

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

#: batch attribute -> panel title
STUDENT_PANELS = {"anomaly_map_local": "Local student", "anomaly_map_global": "Global student"}


def display_scale(maps: torch.Tensor, post_processor: Any) -> torch.Tensor:  # noqa: ANN401
    """Scale raw (z-unit) maps to ``[0, 1]`` as anomalib's post-processor scales the final map.

    ``((x - threshold) / (max - min) + 0.5).clamp(0, 1)`` with the post-processor's pixel
    statistics; per-image min-max when they are missing.
    """
    minimum = getattr(post_processor, "pixel_min", None)
    maximum = getattr(post_processor, "pixel_max", None)
    if minimum is not None and maximum is not None and torch.isfinite(minimum) and torch.isfinite(maximum):
        threshold = post_processor.pixel_threshold
        threshold = torch.where(torch.isnan(threshold), (maximum + minimum) / 2, threshold)
        span = (maximum - minimum).clamp_min(1e-12)
        return ((maps - threshold.to(maps)) / span.to(maps) + 0.5).clamp(0, 1)
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, *[1] * (maps.dim() - 1))
    high = flat.max(dim=1).values.view(-1, *[1] * (maps.dim() - 1))
    return (maps - low) / (high - low).clamp_min(1e-12)


class DskdVisualizer(ImageVisualizer):
    """:class:`~anomalib.visualization.ImageVisualizer` with the two students' maps added.

    Args:
        show_students: draw the local and global student panels (when the batch carries them).
        **kwargs: passed to :class:`~anomalib.visualization.ImageVisualizer` (``field_size``,
            ``output_dir``, ``text_config``, ...).

    Batches without per-student maps are drawn exactly as by ``ImageVisualizer``.
    """

    def __init__(self, show_students: bool = True, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(**kwargs)
        self.show_students = show_students

    def visualize_with_students(self, item: Any, student_maps: dict[str, torch.Tensor]) -> Image.Image | None:  # noqa: ANN401
        """One item's panels: image (+ gt contour), each student map, final map, prediction mask."""
        text = {key: value for key, value in self.text_config.items() if key != "enable"}
        add_text = self.text_config.get("enable", True)
        image_path = getattr(item, "image_path", None)
        if image_path:
            base = Image.open(image_path).convert("RGB")
        elif getattr(item, "image", None) is not None:
            base = get_visualize_function("image")(item.image)
        else:
            return None
        base = base.resize(self.field_size)

        def panel(overlay: Image.Image | None, title: str, alpha: float = 0.5) -> Image.Image:
            picture = base.copy()
            if overlay is not None:
                picture = overlay_images(picture, overlay.resize(self.field_size), alpha=alpha)
            return add_text_to_image(picture, title, **text) if add_text else picture

        def heat(values: torch.Tensor) -> Image.Image:
            return get_visualize_function("anomaly_map")(values.squeeze().float().cpu(), colormap=True, normalize=False)

        panels: list[Image.Image] = []
        gt_mask = getattr(item, "gt_mask", None)
        gt_overlay = None
        if gt_mask is not None and bool(torch.as_tensor(gt_mask).any()):
            gt_overlay = get_visualize_function("gt_mask")(gt_mask, **self.overlay_fields_config.get("gt_mask", {}))
        panels.append(panel(gt_overlay, "Image + Gt Mask" if gt_overlay is not None else "Image", alpha=1.0))
        for title, values in student_maps.items():
            panels.append(panel(heat(values), title))
        if getattr(item, "anomaly_map", None) is not None:
            panels.append(panel(heat(item.anomaly_map), "Final (Eq. 8)"))
        if getattr(item, "pred_mask", None) is not None:
            mask = get_visualize_function("pred_mask")(item.pred_mask, **self.overlay_fields_config.get("pred_mask", {}))
            panels.append(panel(mask, "Pred Mask", alpha=1.0))
        return create_image_grid(panels, nrow=len(panels))

    def student_maps_of(self, batch: Any, pl_module: Any = None) -> list[dict[str, torch.Tensor]] | None:  # noqa: ANN401
        """Per-item ``{title: map in [0, 1]}`` from a batch, or ``None`` if it has no student maps."""
        present = {attr: title for attr, title in STUDENT_PANELS.items() if getattr(batch, attr, None) is not None}
        if not self.show_students or not present:
            return None
        post_processor = getattr(pl_module, "post_processor", None)
        scaled = {title: display_scale(getattr(batch, attr), post_processor) for attr, title in present.items()}
        return [{title: values[index] for title, values in scaled.items()} for index in range(len(batch))]

    def visualize(self, predictions: Any) -> Image.Image | list[Image.Image | None] | None:  # noqa: ANN401
        """Like ``ImageVisualizer.visualize``, with the student panels when ``predictions`` carries them."""
        per_item = self.student_maps_of(predictions)
        if per_item is None:
            return super().visualize(predictions)
        images = [self.visualize_with_students(item, maps) for item, maps in zip(predictions, per_item, strict=True)]
        return images[0] if len(images) == 1 else images

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Save one picture per image (under ``<root>/images`` unless ``output_dir`` is set)."""
        per_item = self.student_maps_of(batch, pl_module)
        if per_item is None:
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            return
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        datamodule = getattr(trainer, "datamodule", None)
        for item, maps in zip(batch, per_item, strict=True):
            image = self.visualize_with_students(item, maps)
            if image is None:
                continue
            filename = generate_output_filename(
                input_path=item.image_path or "",
                output_path=self.output_dir,
                dataset_name=getattr(datamodule, "name", None) if datamodule else None,
                category=getattr(datamodule, "category", None) if datamodule else None,
            )
            image.save(filename)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """As for test batches."""
        self.on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
