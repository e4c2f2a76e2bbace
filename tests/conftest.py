"""Shared pytest fixtures.

Real data in ``../shared`` (beside the checkout) is used only when present; tests that need it
skip cleanly otherwise. Set ``ANOMALIB_DSKD_SHARED`` to point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never send OpenVINO / anomalib telemetry from tests (also covers subprocesses).
os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


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
