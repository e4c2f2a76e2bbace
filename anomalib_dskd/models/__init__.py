"""anomalib-dskd models. Import lazily: ``from anomalib_dskd.models import Rd``."""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:  # noqa: ANN401
    from anomalib_dskd.registration import MODELS

    if name in MODELS:
        return getattr(importlib.import_module(MODELS[name]), name)
    msg = f"module 'anomalib_dskd.models' has no attribute {name!r}"
    raise AttributeError(msg)
