"""``anomalib-dskd`` console script.

Each subcommand lives in its own module of :mod:`anomalib_dskd.cli` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports (torch, anomalib)
happen inside ``run`` so that ``anomalib-dskd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("anomalib_dskd.cli.demo", "generate synthetic LOCO data, train, test and export a model"),
    "generate": ("anomalib_dskd.cli.generate", "write a synthetic dataset in MVTec LOCO or MVTec AD layout"),
    "evaluate-loco": ("anomalib_dskd.cli.evaluate_loco", "score anomaly maps with the MVTec LOCO sPRO protocol"),
    "benchmark": ("anomalib_dskd.cli.benchmark", "run a models x datasets x seeds benchmark grid and write tables and plots"),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-parser per available subcommand."""
    parser = argparse.ArgumentParser(
        prog="anomalib-dskd",
        description="Knowledge-distillation anomaly detection models and LOCO evaluation for anomalib.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # subcommand not shipped in this version
                continue
            raise
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``anomalib-dskd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        # bad input (paths, weights, sizes): the message says what was wrong and what to do
        if os.environ.get("ANOMALIB_DSKD_DEBUG"):
            raise
        print(f"anomalib-dskd {args.command}: error: {err}", file=sys.stderr)
        print("(set ANOMALIB_DSKD_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
