"""Data utilities of anomalib-dskd.

* :func:`generate_loco_category` - deterministic synthetic category in the MVTec LOCO AD layout
  (per-defect ground-truth channels and ``defects_config.json``), readable by ``anomalib.data.MVTecLOCO``.
* :func:`generate_mvtec_ad_category` - the same scenes in the MVTec AD layout, readable by
  ``anomalib.data.MVTecAD``.
* :func:`loco_defects_config` - the ``defects_config.json`` entries of the synthetic category.

Importing this package is cheap: :mod:`anomalib_dskd.data.synthetic` (numpy, OpenCV) is imported on first
attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_dskd._lazy import lazy_exports

if TYPE_CHECKING:  # pragma: no cover
    from anomalib_dskd.data.synthetic import (
        DEFECT_TYPES,
        LOGICAL_DEFECTS,
        STRUCTURAL_DEFECTS,
        DefectType,
        generate_loco_category,
        generate_mvtec_ad_category,
        loco_defects_config,
    )

_LAZY: dict[str, str] = {
    "DEFECT_TYPES": "anomalib_dskd.data.synthetic",
    "LOGICAL_DEFECTS": "anomalib_dskd.data.synthetic",
    "STRUCTURAL_DEFECTS": "anomalib_dskd.data.synthetic",
    "DefectType": "anomalib_dskd.data.synthetic",
    "generate_loco_category": "anomalib_dskd.data.synthetic",
    "generate_mvtec_ad_category": "anomalib_dskd.data.synthetic",
    "loco_defects_config": "anomalib_dskd.data.synthetic",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
