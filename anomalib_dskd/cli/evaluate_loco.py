"""``anomalib-dskd evaluate-loco``: MVTec LOCO evaluation of anomaly maps stored as TIFF files.

A drop-in for MVTec's official ``evaluate_experiment.py`` (v2.0): same inputs, same
``metrics.json`` schema (``localization/auc_spro``, ``localization/per_threshold`` with
``thresholds``, ``mean_spros``, ``fp_rates``, ``classification/auc_roc``)::

    anomalib-dskd evaluate-loco --object-name pushpins --dataset-base-dir /data/mvtec_loco \\
        --anomaly-maps-dir /results/maps --output-dir /results/eval

reads ``<anomaly-maps-dir>/<object>/test/<subset>/<id>.tiff`` for every test image
``<dataset-base-dir>/<object>/test/<subset>/<id>.png`` (or, when the dataset has no ``test``
folder, for every map found), the ground truth ``<dataset-base-dir>/<object>/ground_truth/...``
and ``defects_config.json``, and writes ``<output-dir>/metrics.json`` plus one sPRO-curve PNG per
anomalous subset. The official option spellings (``--object_name`` ...) are accepted too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MAP_SUFFIXES = (".tiff", ".tif")
IMAGE_SUFFIXES = (".png", ".PNG")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the subcommand (official spellings with underscores are aliases)."""
    parser.add_argument("--object-name", "--object_name", dest="object_name", required=True,
                        help="category, e.g. pushpins")
    parser.add_argument("--dataset-base-dir", "--dataset_base_dir", dest="dataset_base_dir", required=True,
                        help="directory holding <object>/ground_truth, <object>/defects_config.json (and test/)")
    parser.add_argument("--anomaly-maps-dir", "--anomaly_maps_dir", dest="anomaly_maps_dir", required=True,
                        help="directory holding <object>/test/<subset>/<id>.tiff float anomaly maps")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                        help="where metrics.json and the sPRO-curve plots are written (default: print only)")
    parser.add_argument("--integration-limits", dest="integration_limits", type=float, nargs="+",
                        default=[0.01, 0.05, 0.1, 0.3, 1.0], help="FPR limits of AU-sPRO (default: the official ones)")
    parser.add_argument("--mode", choices=("auto", "exact", "binned"), default="auto",
                        help="exact curve, binned curve with certified error bound, or auto (exact for small test sets)")
    parser.add_argument("--num-bins", dest="num_bins", type=int, default=2**20, help="score bins of the binned mode")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="error bound of the binned mode")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="do not write sPRO-curve PNGs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--curve-max-distance", "--curve_max_distance", dest="curve_max_distance", type=float,
                        default=None, help="largest distance between consecutive points of metrics.json's "
                        "localization/per_threshold listing (default 0.01, the official default); AU-sPRO does not "
                        "depend on it (the curve is computed exactly, or binned with an error bound)")
    parser.add_argument("--num-parallel-workers", "--num_parallel_workers", dest="num_parallel_workers", type=int,
                        default=None, help="accepted for compatibility; ignored")
    parser.add_argument("--niceness", type=int, default=None, help="accepted for compatibility; ignored")


def collect_items(object_name: str, dataset_base_dir: str | Path, anomaly_maps_dir: str | Path) -> list:
    """One :class:`~anomalib_dskd.metrics.spro_core.LocoItem` per test image (official file layout)."""
    import tifffile

    from anomalib_dskd.metrics.loco_data import (
        GOOD,
        LocoDataError,
        LocoSample,
        load_sample_ground_truth,
        read_defects_config,
    )
    from anomalib_dskd.metrics.spro_core import LocoItem

    category_root = Path(dataset_base_dir) / object_name
    if not category_root.is_dir():
        msg = f"dataset directory {category_root} not found (--dataset-base-dir/--object-name)"
        raise FileNotFoundError(msg)
    read_defects_config(category_root / "defects_config.json")  # fail early with a clear message
    maps_root = Path(anomaly_maps_dir) / object_name / "test"
    if not maps_root.is_dir():
        msg = f"anomaly map directory {maps_root} not found (expected <anomaly-maps-dir>/<object>/test/<subset>/<id>.tiff)"
        raise FileNotFoundError(msg)

    def find_map(subset: str, image_id: str) -> Path | None:
        for suffix in MAP_SUFFIXES:
            candidate = maps_root / subset / f"{image_id}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    test_root = category_root / "test"
    entries: list[tuple[str, str, Path | None, Path]] = []  # subset, id, image, map
    if test_root.is_dir():
        missing = []
        for subset_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            for image in sorted(p for p in subset_dir.iterdir() if p.suffix in IMAGE_SUFFIXES):
                map_path = find_map(subset_dir.name, image.stem)
                if map_path is None:
                    missing.append(maps_root / subset_dir.name / f"{image.stem}.tiff")
                else:
                    entries.append((subset_dir.name, image.stem, image, map_path))
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            msg = f"{len(missing)} anomaly maps missing, e.g. {shown}"
            raise FileNotFoundError(msg)
    else:  # the test images are not shipped (as in MVTec's evaluation fixtures): evaluate every map
        for subset_dir in sorted(p for p in maps_root.iterdir() if p.is_dir()):
            for map_path in sorted(p for p in subset_dir.iterdir() if p.suffix in MAP_SUFFIXES):
                entries.append((subset_dir.name, map_path.stem, None, map_path))
    if not entries:
        msg = f"no anomaly maps found under {maps_root}"
        raise FileNotFoundError(msg)
    if not any(subset == GOOD for subset, *_ in entries):
        where = test_root / GOOD if test_root.is_dir() else maps_root / GOOD
        msg = f"no good test images: {where} is missing or empty; the false positive rate needs defect-free images"
        raise LocoDataError(msg)

    items = []
    for subset, image_id, image, map_path in entries:
        sample = LocoSample(category_root=category_root, subset=subset, image_id=image_id, image_path=image)

        def load_map(path: Path = map_path):  # noqa: ANN202
            try:
                return tifffile.imread(path)
            except Exception as err:  # noqa: BLE001
                msg = f"cannot read anomaly map {path}: {err}"
                raise LocoDataError(msg) from err

        def load_gt(shape: tuple[int, int], sample: LocoSample = sample):  # noqa: ANN202
            return load_sample_ground_truth(sample, fallback_shape=shape)

        items.append(LocoItem(subset=subset, name=str(map_path), load_map=load_map, load_ground_truth=load_gt))
    return items


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write ``metrics.json`` and plots."""
    import json
    import sys

    from anomalib_dskd.metrics.loco_data import LocoDataError
    from anomalib_dskd.metrics.spro_core import PER_THRESHOLD_DISTANCE, compute_loco_metrics

    progress = None
    if args.progress:
        from tqdm import tqdm

        def progress(iterable, desc, total):  # noqa: ANN001, ANN202
            return tqdm(iterable, desc=desc, total=total, unit="map", file=sys.stderr)

    try:
        items = collect_items(args.object_name, args.dataset_base_dir, args.anomaly_maps_dir)
        result = compute_loco_metrics(
            items,
            integration_limits=args.integration_limits,
            mode=args.mode,
            num_bins=args.num_bins,
            tolerance=args.tolerance,
            per_threshold_distance=args.curve_max_distance or PER_THRESHOLD_DISTANCE,
            progress=progress,
        )
    except (LocoDataError, FileNotFoundError) as err:
        print(f"evaluate-loco: error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    if args.output_dir is not None:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = output_dir / "metrics.json"
        metrics_path.write_text(json.dumps(result.to_official_json(), indent=4, sort_keys=True) + "\n")
        print(f"wrote {metrics_path}")
        if args.plots:
            from anomalib_dskd.metrics.plotting import save_spro_curves

            for path in save_spro_curves(result, output_dir, title=args.object_name):
                print(f"wrote {path}")
    return 0
