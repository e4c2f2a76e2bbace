"""``anomalib-dskd generate``: write a synthetic dataset in the MVTec LOCO AD or MVTec AD layout.

Examples::

    anomalib-dskd generate --root datasets/synthetic --layout loco --seed 0 --image-size 256 256
    anomalib-dskd generate --root datasets/synthetic_ad --layout mvtec_ad --n-per-defect 10 --overwrite

The LOCO output is read by ``anomalib.data.MVTecLOCO(root=ROOT, category=CATEGORY)``, the MVTec AD
output by ``anomalib.data.MVTecAD(root=ROOT, category=CATEGORY)``.
"""

from __future__ import annotations

import argparse
import sys

_LOCO_ONLY = ("n_logical", "n_structural", "preset")
_AD_ONLY = ("n_per_defect", "defect_types")


def _count(text: str) -> int:
    """Argparse type for a non-negative integer count."""
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a whole number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 0:
        msg = f"expected a number >= 0, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser``.

    Args:
        parser: The sub-parser of the ``generate`` subcommand.
    """
    parser.add_argument("--root", required=True, help="dataset root folder; the category is written to ROOT/CATEGORY")
    parser.add_argument("--category", default="synthetic_parts", help="category folder name (default: %(default)s)")
    parser.add_argument(
        "--layout",
        choices=("loco", "mvtec_ad"),
        default="loco",
        help="folder layout: MVTec LOCO AD (per-defect masks, defects_config.json) or MVTec AD (default: %(default)s)",
    )
    parser.add_argument("--seed", type=_count, default=0, help="random seed; same seed, same files (default: 0)")
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        default=(256, 256),
        help="image height and width in pixels, each >= 64 (default: 256 256)",
    )
    counts = parser.add_argument_group("image counts (defaults: those of the Python functions)")
    counts.add_argument("--n-train", type=_count, help="normal training images (default: 16)")
    counts.add_argument(
        "--n-validation",
        type=_count,
        help="normal validation images (validation/good; default: 4 for loco, 0 for mvtec_ad)",
    )
    counts.add_argument("--n-test-good", type=_count, help="normal test images (default: 8)")
    counts.add_argument("--n-logical", type=_count, help="loco only: logical-anomaly test images (default: 8)")
    counts.add_argument("--n-structural", type=_count, help="loco only: structural-anomaly test images (default: 8)")
    counts.add_argument("--n-per-defect", type=_count, help="mvtec_ad only: test images per defect type (default: 4)")
    parser.add_argument(
        "--defect-types",
        nargs="+",
        metavar="NAME",
        help="mvtec_ad only: defect types to write (default: scratch contamination dent); also accepts "
        "missing_object extra_object swapped_objects misplaced_object",
    )
    parser.add_argument(
        "--preset",
        choices=("parts", "arrangement"),
        help="loco only: 'parts' (default: missing / extra / swapped / misplaced parts) or 'arrangement' (harder: "
        "every part and neighbourhood looks normal, only counts and the row rule are wrong)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty category folder")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset described by ``args``.

    Args:
        args: Parsed arguments (see :func:`add_arguments`).

    Returns:
        ``0`` on success, ``2`` when the options are invalid or the category folder already exists.
    """
    from anomalib_dskd.data.synthetic import generate_loco_category, generate_mvtec_ad_category

    wrong = _AD_ONLY if args.layout == "loco" else _LOCO_ONLY
    given = [f"--{name.replace('_', '-')}" for name in wrong if getattr(args, name) is not None]
    if given:
        print(f"error: {', '.join(given)} do(es) not apply to --layout {args.layout}", file=sys.stderr)
        return 2

    names = ("n_train", "n_validation", "n_test_good", *(_LOCO_ONLY if args.layout == "loco" else _AD_ONLY))
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    generate = generate_loco_category if args.layout == "loco" else generate_mvtec_ad_category
    try:
        path = generate(
            args.root,
            args.category,
            seed=args.seed,
            image_size=tuple(args.image_size),
            overwrite=args.overwrite,
            **kwargs,
        )
    except (ValueError, TypeError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    n_images = sum(1 for p in path.rglob("*.png") if "ground_truth" not in p.relative_to(path).parts)
    reader = "MVTecLOCO" if args.layout == "loco" else "MVTecAD"
    print(f"wrote {n_images} images ({args.layout} layout) to {path}")
    print(f"read it with anomalib.data.{reader}(root={str(path.parent)!r}, category={path.name!r})")
    return 0
