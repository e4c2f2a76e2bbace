"""anomalib-dskd: knowledge-distillation anomaly detection models for anomalib.

Models (registered with anomalib, so ``anomalib train --model Rd`` works after installation):

* :class:`Rd` - reverse distillation (Deng & Li, CVPR 2022) over any timm CNN teacher;
* :class:`Dskd` - dual-student distillation with contextual affinity (Zhang et al., WACV 2024);
* :class:`Ard` - attention in RD's one-class embedding (ARD);
* :class:`Glance` - "Glancing at the Patch" (Wang et al., CVPR 2021);
* :class:`Packd` - few-shot prototype-aware contrastive distillation (Gu et al., BMVC 2023).

Importing this package is cheap: model classes are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from anomalib_dskd.models.ard.lightning_model import Ard
    from anomalib_dskd.models.dskd.lightning_model import Dskd
    from anomalib_dskd.models.glance.lightning_model import Glance
    from anomalib_dskd.models.packd.lightning_model import Packd
    from anomalib_dskd.models.rd.lightning_model import Rd

__all__ = ["Ard", "Dskd", "Glance", "Packd", "Rd", "__version__"]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    from anomalib_dskd.registration import MODELS

    if name in MODELS:
        return getattr(importlib.import_module(MODELS[name]), name)
    msg = f"module 'anomalib_dskd' has no attribute {name!r}"
    raise AttributeError(msg)
