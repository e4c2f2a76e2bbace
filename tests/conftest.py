"""Shared pytest fixtures.

Real data in ``../shared`` (beside the checkout) is used only when present; tests that need it
skip cleanly otherwise. Set ``ANOMALIB_DSKD_SHARED`` to point elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Never send OpenVINO / anomalib telemetry from tests (also covers subprocesses).
os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n auto``: one worker per core), one torch thread per worker and per subprocess:
    two workers with two spinning threads each on a 2-core machine are slower than one thread each."""
    del config
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread inside the block (faster than two spinning threads on a shared 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def shared_path() -> Path:
    """Location of the read-only ``shared`` folder (may not exist)."""
    return Path(os.environ.get("ANOMALIB_DSKD_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder; skips the test when it is absent."""
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not present (set ANOMALIB_DSKD_SHARED)")
    return path


@pytest.fixture(scope="session")
def tiny_loco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small synthetic MVTec LOCO category at 64x64: ``(root, category)``."""
    from anomalib_dskd.data import generate_loco_category

    root = tmp_path_factory.mktemp("loco")
    generate_loco_category(
        root, "parts", seed=0, image_size=(64, 64), n_train=8, n_validation=2, n_test_good=4, n_logical=3, n_structural=3,
    )
    return root, "parts"


@pytest.fixture(scope="session")
def tiny_mvtec_ad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small synthetic MVTec AD category at 64x64: ``(root, category)``."""
    from anomalib_dskd.data import generate_mvtec_ad_category

    root = tmp_path_factory.mktemp("mvtec_ad")
    generate_mvtec_ad_category(root, "parts", seed=0, image_size=(64, 64), n_train=8, n_test_good=4, n_per_defect=2)
    return root, "parts"
