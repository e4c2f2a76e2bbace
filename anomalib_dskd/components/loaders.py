"""The dataloaders a Lightning module's trainer has for a split, for statistics computed inside training.

Dskd's Eq. 8 statistics and Glance's score standardisation are computed from normal images while the
trainer runs; both need the trainer's loaders of a split, or the datamodule's when the trainer has not
built them (e.g. no validation loop).
"""

from __future__ import annotations

from typing import Any


def trainer_loaders(module: Any, split: str) -> list:  # noqa: ANN401
    """The ``"train"`` or ``"val"`` dataloaders of ``module``'s trainer (empty without a trainer or data)."""
    trainer = module._trainer  # noqa: SLF001 - Lightning's attribute; ``module.trainer`` raises when detached
    if trainer is None:
        return []
    loaders = trainer.val_dataloaders if split == "val" else trainer.train_dataloader
    if loaders is None:
        datamodule = getattr(trainer, "datamodule", None)
        data = getattr(datamodule, f"{split}_data", None) if datamodule is not None else None
        if data is not None and len(data):
            loaders = getattr(datamodule, f"{split}_dataloader")()
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if not isinstance(loaders, list | tuple):
        loaders = [loaders]
    return [loader for loader in loaders if loader is not None]
