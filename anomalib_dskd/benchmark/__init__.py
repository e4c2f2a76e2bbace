"""Benchmark grid: the package's models against anomalib's built-ins, on equal terms.

One YAML file (``configs/benchmark/*.yaml``) describes a grid {models} x {datasets} x {seeds}. Every
cell trains a model with anomalib's :class:`~anomalib.engine.Engine`, tests it and measures it
(accuracy, training time, CPU latency in torch / OpenVINO f32 / OpenVINO INT8, peak memory, size),
in its own subprocess, and writes one JSON file. Finished cells are not recomputed when the run is
resumed; a failing cell is reported with its error and the grid goes on. The report (JSON, CSV,
markdown, PNG plots) is rebuilt from the cell files.

Command line: ``anomalib-dskd benchmark --config configs/benchmark/quick.yaml --output results/quick``
(see ``docs/benchmark.md``).

Python::

    from anomalib_dskd.benchmark import load_config, run_benchmark

    config = load_config("configs/benchmark/quick.yaml", variables={"shared": "/data/shared"})
    summary = run_benchmark(config, output="results/quick")

Modules: :mod:`~anomalib_dskd.benchmark.config` (YAML, variables, validation, the grid),
:mod:`~anomalib_dskd.benchmark.models` (model builders, the shared teacher),
:mod:`~anomalib_dskd.benchmark.data` (datamodules, synthetic data),
:mod:`~anomalib_dskd.benchmark.measure` (latency, size, memory),
:mod:`~anomalib_dskd.benchmark.cell` (one cell, run as ``python -m anomalib_dskd.benchmark.cell``),
:mod:`~anomalib_dskd.benchmark.runner` (the grid, resume, progress),
:mod:`~anomalib_dskd.benchmark.report` (tables and plots).

Attributes are imported on first access, so importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_dskd._lazy import lazy_exports

if TYPE_CHECKING:  # pragma: no cover
    from anomalib_dskd.benchmark.config import BenchmarkConfig, CellSpec, ConfigError, load_config
    from anomalib_dskd.benchmark.report import write_report
    from anomalib_dskd.benchmark.runner import run_benchmark

_EXPORTS = {
    "BenchmarkConfig": "anomalib_dskd.benchmark.config",
    "CellSpec": "anomalib_dskd.benchmark.config",
    "ConfigError": "anomalib_dskd.benchmark.config",
    "load_config": "anomalib_dskd.benchmark.config",
    "run_benchmark": "anomalib_dskd.benchmark.runner",
    "write_report": "anomalib_dskd.benchmark.report",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
