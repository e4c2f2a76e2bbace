"""Build hooks that install ``anomalib_dskd-autoload.pth`` next to the package.

Everything declarative lives in ``setup.cfg``. This file only adds the ``.pth`` file that
makes ``anomalib`` see this package's models without a manual import (see
``anomalib_dskd/_autoload.py`` and ``docs/architecture.md``). It is added to regular wheels
(``pip install .``) through ``build_py`` and to PEP 660 editable wheels
(``pip install -e .``) through ``editable_wheel``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "anomalib_dskd-autoload.pth"
PTH_TEXT = (Path(__file__).parent / "anomalib_dskd" / "_autoload.pth").read_text(encoding="utf-8")


class BuildPyWithPth(build_py):
    """``build_py`` that also places the autoload ``.pth`` at the root of the wheel."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            Path(self.build_lib, PTH_NAME).write_text(PTH_TEXT, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib, PTH_NAME)))
        return outputs


cmdclass = {"build_py": BuildPyWithPth}

try:  # setuptools >= 64 (PEP 660 editable installs)
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        """``editable_wheel`` that also writes the autoload ``.pth`` into the editable wheel."""

        def _select_strategy(self, *args, **kwargs):  # noqa: ANN202
            strategy = super()._select_strategy(*args, **kwargs)

            class _WithPth:
                def __enter__(self):  # noqa: ANN204
                    strategy.__enter__()
                    return self

                def __exit__(self, *exc):  # noqa: ANN204
                    return strategy.__exit__(*exc)

                def __call__(self, wheel, files, mapping) -> None:  # noqa: ANN001
                    strategy(wheel, files, mapping)
                    wheel.writestr(PTH_NAME, PTH_TEXT.encode("utf-8"))

            return _WithPth()

    cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:  # pragma: no cover - very old setuptools
    pass

setup(cmdclass=cmdclass)
