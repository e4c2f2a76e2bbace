"""Lazy registration of anomalib-dskd models with anomalib.

anomalib 2.7 has no plugin discovery: ``anomalib train --model Dskd`` resolves a bare class
name only among :class:`~anomalib.models.AnomalibModule` subclasses that are already imported
when the CLI parses its arguments, and :func:`anomalib.models.get_model` only imports from
``anomalib.models.ALLOWED_MODULES``.

The package installs ``anomalib_dskd-autoload.pth`` into ``site-packages``. Python runs its one
line at start-up, which calls :func:`install`. :func:`install` only puts a small finder on
:data:`sys.meta_path`; it imports neither torch nor anomalib. The finder waits until some code
imports ``anomalib.models`` and, right after that module has executed, calls
:func:`anomalib_dskd.registration.register`, which imports this package's models and makes them
visible to anomalib. Processes that never import ``anomalib.models`` are unaffected.

Switch it off with the environment variable ``ANOMALIB_DSKD_AUTOLOAD=0`` (then
``import anomalib_dskd`` by hand registers the models), or remove it with
``pip uninstall anomalib-dskd``.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_TARGET = "anomalib.models"


class _RegisterAfterExec(importlib.abc.Loader):
    """Loader proxy: executes ``anomalib.models`` then registers our models."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str):  # noqa: ANN204 - delegate everything else (get_resource_reader...)
        return getattr(self._loader, name)


class AnomalibModelsFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of ``anomalib.models`` once."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname != _TARGET:
            return None
        # Find the real spec with the remaining finders, then remove ourselves: one shot.
        uninstall()
        spec = None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


_FINDER = AnomalibModelsFinder()


def _package_is_mid_import() -> bool:
    """True while some ``anomalib_dskd`` module is still executing (it imported anomalib.models)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("anomalib_dskd.") and name not in {"anomalib_dskd._autoload", "anomalib_dskd.registration"}:
            spec = getattr(module, "__spec__", None)
            if spec is not None and getattr(spec, "_initializing", False):
                return True
    return False


def _register() -> None:
    if _package_is_mid_import():
        # Our own code imported anomalib.models (e.g. ``import anomalib_dskd.components.rd`` first):
        # importing the models now would be circular. Register on first use of anomalib's lookups
        # instead; model modules also register themselves when they are imported.
        from anomalib_dskd.registration import register_on_first_lookup

        register_on_first_lookup()
        return
    try:
        from anomalib_dskd.registration import register

        register()
    except Exception as err:  # noqa: BLE001 - never break anomalib itself; say what happened instead
        warnings.warn(
            f"anomalib-dskd could not register its models with anomalib ({type(err).__name__}: {err}). "
            "anomalib works, but `--model Dskd` and friends are unavailable; "
            "run `python -c 'import anomalib_dskd.registration as r; r.register()'` to see the full error.",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> None:
    """Put the finder on :data:`sys.meta_path` (or register at once if anomalib.models is loaded)."""
    if _TARGET in sys.modules:
        _register()
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the finder from :data:`sys.meta_path` (models already registered stay registered)."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
