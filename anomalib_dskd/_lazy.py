"""Module-level lazy attributes (PEP 562) shared by the package's ``__init__`` modules (standard library only)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(module_name: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a module whose public names live in submodules imported on first access.

    Args:
        module_name: the package's ``__name__`` (for the error message and ``dir()``).
        exports: public name -> module that defines it.
    """

    def __getattr__(name: str) -> Any:  # noqa: ANN401, N807
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        msg = f"module {module_name!r} has no attribute {name!r}"
        raise AttributeError(msg)

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(vars(sys.modules[module_name])) | set(exports))

    return __getattr__, __dir__
