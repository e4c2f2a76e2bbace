"""Make anomalib-dskd models visible to anomalib's model lookup and CLI.

Called automatically right after ``anomalib.models`` is imported (see
:mod:`anomalib_dskd._autoload`), or by hand with ``import anomalib_dskd.registration as r; r.register()``.

What it does, and why each step is needed in anomalib 2.7:

* imports every model class, so that it is a direct subclass of
  :class:`~anomalib.models.AnomalibModule` at parse time: jsonargparse resolves
  ``--model Dskd`` among imported subclasses, and ``get_model("dskd")`` /
  ``list_models()`` scan ``AnomalibModule.__subclasses__()``;
* sets each class as an attribute of ``anomalib.models``, so that configs with
  ``class_path: Dskd`` (no dots) resolve in ``get_model``;
* adds ``anomalib_dskd`` and each model's public module to ``anomalib.models.ALLOWED_MODULES``,
  so that ``get_model({"class_path": "anomalib_dskd.Dskd"})`` and ``anomalib benchmark`` accept them.
"""

from __future__ import annotations

import importlib

#: public name -> module that defines it. Classes are defined (``__module__``) in these modules,
#: which is the path pickled in checkpoints and torch exports: keep it stable.
MODELS: dict[str, str] = {
    "Rd": "anomalib_dskd.models.rd.lightning_model",
    "Dskd": "anomalib_dskd.models.dskd.lightning_model",
    "Ard": "anomalib_dskd.models.ard.lightning_model",
    "Glance": "anomalib_dskd.models.glance.lightning_model",
    "Packd": "anomalib_dskd.models.packd.lightning_model",
}

_registered = False


def model_classes() -> dict[str, type]:
    """Import and return every model class of the package, by public name."""
    return {name: getattr(importlib.import_module(module), name) for name, module in MODELS.items()}


def register_class(cls: type) -> None:
    """Expose one model class to anomalib's lookups (called by each model module at import)."""
    import anomalib.models as anomalib_models

    setattr(anomalib_models, cls.__name__, cls)
    anomalib_models.ALLOWED_MODULES.update({
        "anomalib_dskd",
        "anomalib_dskd.models",
        cls.__module__,
        cls.__module__.rsplit(".", 1)[0],
    })


def register() -> dict[str, type]:
    """Register all the package's models with anomalib (idempotent). Returns them by name."""
    global _registered  # noqa: PLW0603
    classes = model_classes()
    if not _registered:
        for cls in classes.values():
            register_class(cls)
        _registered = True
    return classes


def register_on_first_lookup() -> None:
    """Make anomalib's model lookups register this package's models before they search.

    Used when ``anomalib.models`` is first imported from inside this package, where importing
    the models at once would be circular.
    """
    import functools

    import anomalib.models as anomalib_models

    for name in ("get_model", "list_models", "_get_model_class_by_name"):
        original = getattr(anomalib_models, name)
        if getattr(original, "_anomalib_dskd_wrapped", False):
            continue

        def wrapper(*args, _original=original, **kwargs):  # noqa: ANN002, ANN003, ANN202
            register()
            return _original(*args, **kwargs)

        functools.update_wrapper(wrapper, original)
        wrapper._anomalib_dskd_wrapped = True  # type: ignore[attr-defined]  # noqa: SLF001
        setattr(anomalib_models, name, wrapper)
