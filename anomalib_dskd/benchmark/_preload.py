"""Modules the ``forkserver`` isolation imports once, so that every forked cell starts warm.

Imported only by the fork server (``runner.isolation: forkserver``), which never computes anything:
the cells forked from it start without paying the several seconds of importing torch, Lightning and
anomalib again. OpenVINO and NNCF are left to the cells (imported only when a cell measures speed).
"""

from __future__ import annotations

import os

os.environ.setdefault("CI", "true")

import anomalib.data  # noqa: E402, F401
import anomalib.engine  # noqa: E402, F401
import anomalib.metrics  # noqa: E402, F401
import anomalib.models  # noqa: E402, F401
import lightning.pytorch  # noqa: E402, F401
import timm  # noqa: E402, F401
import torch  # noqa: E402, F401

import anomalib_dskd.benchmark.cell  # noqa: E402, F401
import anomalib_dskd.benchmark.data  # noqa: E402, F401
import anomalib_dskd.benchmark.models  # noqa: E402, F401
