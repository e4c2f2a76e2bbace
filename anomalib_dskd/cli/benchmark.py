"""``anomalib-dskd benchmark``: the package's models against anomalib's, on equal terms.

Examples::

    anomalib-dskd benchmark --config configs/benchmark/quick.yaml --output results/quick --shared ../shared
    anomalib-dskd benchmark --config configs/benchmark/quick.yaml --output results/quick   # resume
    anomalib-dskd benchmark --config configs/benchmark/quick.yaml --output results/quick --dry-run
    anomalib-dskd benchmark --output results/quick --report-only

See ``docs/benchmark.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-dskd benchmark``."""
    parser.add_argument("--config", type=Path, help="benchmark config (e.g. configs/benchmark/quick.yaml)")
    parser.add_argument("--output", type=Path, default=None, help="results folder (default: results/<profile name>)")
    parser.add_argument(
        "--shared", type=Path, default=None,
        help="folder with datasets/ and weights/ (sets the config variable ${shared}; default: $ANOMALIB_DSKD_SHARED)",
    )
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a config variable ${NAME}")
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
        help="override a config value, e.g. --set budgets.distillation.epochs=2 (value read as YAML)",
    )
    parser.add_argument("--model", action="append", default=None, dest="models", help="only this model label (repeatable)")
    parser.add_argument("--dataset", action="append", default=None, dest="datasets", help="only this dataset (repeatable)")
    parser.add_argument("--force", action="store_true", help="recompute every cell (default: resume)")
    parser.add_argument("--retry-failed", action="store_true", help="recompute failed cells, keep finished ones")
    parser.add_argument("--max-cells", type=int, default=None, help="run at most N cells, leave the rest for later")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and list the cells, run nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the cell files in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _variables(args: argparse.Namespace) -> dict[str, str]:
    from anomalib_dskd.benchmark.config import ConfigError

    variables: dict[str, str] = {}
    for item in args.var:
        if "=" not in item:
            msg = f"--var {item!r} must look like NAME=VALUE"
            raise ConfigError(msg)
        key, value = item.split("=", 1)
        variables[key.strip()] = value
    if args.shared is not None:
        if not args.shared.expanduser().is_dir():
            msg = f"--shared {str(args.shared)!r} is not a folder"
            raise ConfigError(msg)
        variables["shared"] = str(args.shared.expanduser().resolve())
    return variables


def run(args: argparse.Namespace) -> int:
    """Validate the config, run or resume the grid, write the report."""
    os.environ.setdefault("CI", "true")  # no OpenVINO / anomalib telemetry
    os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")
    from anomalib_dskd.benchmark.config import ConfigError, load_config

    if args.report_only:
        if args.output is None:
            print("anomalib-dskd benchmark: --report-only needs --output", file=sys.stderr)
            return 2
        from anomalib_dskd.benchmark.report import write_report

        for kind, path in write_report(args.output).items():
            print(f"{kind:>20}: {path}")
        return 0
    if args.config is None:
        print("anomalib-dskd benchmark: --config is required (e.g. configs/benchmark/quick.yaml)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, variables=_variables(args), overrides=args.overrides)
        cells = config.cells()  # full validation before anything runs
    except ConfigError as err:
        print(f"anomalib-dskd benchmark: invalid configuration: {err}", file=sys.stderr)
        return 2
    output = args.output or Path("results") / config.name
    for text in config.notes:
        print(f"[benchmark] note: {text}")
    if args.dry_run:
        from anomalib_dskd.benchmark.runner import select_cells

        try:
            cells = select_cells(cells, models=args.models, datasets=args.datasets)
        except ConfigError as err:
            print(f"anomalib-dskd benchmark: invalid configuration: {err}", file=sys.stderr)
            return 2
        print(f"[benchmark] {config.name}: {len(cells)} cells -> {output}")
        print(f"[benchmark] teacher: {config.teacher.description}")
        from anomalib_dskd.benchmark.models import availability

        for cell in cells:
            budget = cell.model.budget_text()
            speed = ", speed" if cell.measure_speed else ""
            reason = availability(cell.model)
            skipped = f"  [skipped: {reason}]" if reason else ""
            print(f"  {cell.cell_id:<50} {cell.model.class_name:<20} {budget}{speed}{skipped}")
        return 0

    from anomalib_dskd.benchmark.runner import run_benchmark

    command = shlex.join(["anomalib-dskd", "benchmark", *sys.argv[2:]]) if len(sys.argv) > 1 else None
    try:
        summary = run_benchmark(
            config,
            output,
            force=args.force,
            retry_failed=args.retry_failed,
            models=args.models,
            datasets=args.datasets,
            max_cells=args.max_cells,
            progress=not args.no_progress,
            command=command,
        )
    except ConfigError as err:
        print(f"anomalib-dskd benchmark: invalid configuration: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[benchmark] interrupted: finished cells are kept; run the same command again to resume.")
        return 130
    print(
        f"[benchmark] ran {len(summary['ran'])}, reused {len(summary['reused'])}, failed {len(summary['failed'])}, "
        f"skipped {len(summary['skipped'])}, pending {len(summary['pending'])}",
    )
    for kind, path in summary["report"].items():
        print(f"{kind:>20}: {path}")
    return 0
