"""Benchmark of the MVTec LOCO evaluation (sPRO) on a full-size synthetic category.

A full LOCO category has about 330 test images of up to 1600 x 800 pixels (over 400 million
pixels). This script writes such a category (ground-truth PNGs, ``defects_config.json`` and float32
TIFF anomaly maps at full resolution, in the official layout), then measures, each in a fresh
child process:

``cli``     ``anomalib-dskd evaluate-loco`` on the full-resolution TIFF maps (the official
            script's use case);
``metric``  the anomalib metric path: :class:`~anomalib_dskd.metrics.LocoEvaluator`'s metrics fed
            with 256 x 256 maps in batches of 32 (as a model would produce them), upsampled to
            the ground truth's resolution at compute time.

It prints wall time, peak resident memory (RSS) of the child, the evaluation method (exact or
binned) and the certified error bound of the binned curve.

    python benchmarks/bench_spro.py                      # 330 maps of 800 x 1600
    python benchmarks/bench_spro.py --images 60 --height 400 --width 800   # quick run

Set ``--threads 1`` (default) to use one core (OpenCV and BLAS threads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATEGORY = "bench"


def generate(root: Path, n_images: int, height: int, width: int, seed: int = 0) -> dict:
    """Write ground truth, defects config and full-resolution TIFF maps; return counts."""
    import cv2
    import numpy as np
    import tifffile

    from anomalib_dskd.metrics.testing import TINY_DEFECTS

    rng = np.random.default_rng(seed)
    category = root / "dataset" / CATEGORY
    maps = root / "maps" / CATEGORY / "test"
    category.mkdir(parents=True, exist_ok=True)
    config = [dict(d) for d in TINY_DEFECTS]
    config[0]["saturation_threshold"] = 20000  # absolute saturation in pixels at this resolution
    config[3]["saturation_threshold"] = 3000
    (category / "defects_config.json").write_text(json.dumps(config, indent=4))
    # proportions of the real juice_bottle category: 94 good, 142 logical, 94 structural
    n_good = round(n_images * 94 / 330)
    n_logical = round(n_images * 142 / 330)
    counts = {"good": n_good, "logical_anomalies": n_logical, "structural_anomalies": n_images - n_good - n_logical}
    values = {"logical_anomalies": (255, 254), "structural_anomalies": (253, 252)}
    n_defects = 0
    for subset, count in counts.items():
        (maps / subset).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            coarse = rng.normal(0.0, 1.0, (height // 16, width // 16)).astype(np.float32)
            score = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
            score += rng.normal(0.0, 0.3, (height, width)).astype(np.float32)
            if subset != "good":
                for k in range(1 + (i % 3 == 0)):
                    mask = np.zeros((height, width), np.uint8)
                    cy, cx = int(rng.integers(height // 6, 5 * height // 6)), int(rng.integers(width // 6, 5 * width // 6))
                    big = subset == "logical_anomalies"
                    ry = int(rng.integers(height // 20, height // (5 if big else 12)))
                    rx = int(rng.integers(width // 40, width // (10 if big else 24)))
                    cv2.ellipse(mask, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
                    value = values[subset][(i + k) % 2]
                    out = category / "ground_truth" / subset / f"{i:03d}" / f"{k:03d}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(out), mask * value)
                    score[mask.astype(bool)] += float(rng.uniform(0.5, 3.0))
                    n_defects += 1
            tifffile.imwrite(maps / subset / f"{i:03d}.tiff", score)
    return {"images": counts, "defects": n_defects, "pixels": n_images * height * width}


def _child(mode: str, root: Path, model_size: int, batch_size: int) -> None:
    """Run one evaluation in this (fresh) process and print a JSON line with the result."""
    start = time.perf_counter()
    cpu_start = time.process_time()
    if mode == "cli":
        from anomalib_dskd.cli.evaluate_loco import collect_items
        from anomalib_dskd.metrics.spro_core import compute_loco_metrics

        items = collect_items(CATEGORY, root / "dataset", root / "maps")
        result = compute_loco_metrics(items)
    else:
        import cv2
        import tifffile
        import torch

        from anomalib.data import ImageBatch
        from anomalib_dskd.metrics import LocoEvaluator
        from anomalib_dskd.metrics import spro as _  # noqa: F401 - import before the clock starts

        start, cpu_start = time.perf_counter(), time.process_time()
        evaluator = LocoEvaluator(pixel_auroc=False, image_score="max", save_results=False)
        files = sorted((root / "maps" / CATEGORY / "test").glob("*/*.tiff"))
        load_time = load_cpu = 0.0
        for i in range(0, len(files), batch_size):
            t0, c0 = time.perf_counter(), time.process_time()
            chunk = files[i : i + batch_size]
            maps = torch.stack([
                torch.from_numpy(cv2.resize(tifffile.imread(f), (model_size, model_size), interpolation=cv2.INTER_AREA))
                for f in chunk
            ])
            # producing the maps stands in for the model: not counted
            load_time += time.perf_counter() - t0
            load_cpu += time.process_time() - c0
            paths = [str(root / "dataset" / CATEGORY / "test" / f.parent.name / f"{f.stem}.png") for f in chunk]
            batch = ImageBatch(image=torch.zeros(len(chunk), 3, 8, 8), anomaly_map=maps, image_path=paths)
            for metric in evaluator.test_metrics:
                metric.update(batch)
        result = evaluator.loco_state.compute_result()
        start += load_time
        cpu_start += load_cpu
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    print(json.dumps({
        "wall_s": elapsed,
        "cpu_s": cpu,
        "method": result.method,
        "refinement_passes": result.refinement_passes,
        "error_bound": max(v for d in result.error_bound.values() for v in d.values()),
        "auc_spro_mean_0.05": result.auc_spro["mean"]["0.05"],
        "image_auroc_mean": result.image_auroc["mean"],
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=330)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--threads", type=int, default=1, help="OpenCV / BLAS threads of the evaluation")
    parser.add_argument("--modes", nargs="+", default=["cli", "metric"], choices=["cli", "metric"])
    parser.add_argument("--model-size", type=int, default=256, help="map size of the metric path")
    parser.add_argument("--data-dir", default=None, help="reuse / keep the generated data here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import cv2

        cv2.setNumThreads(args.threads)
        _child(args.child, Path(args.data_dir), args.model_size, 32)
        return 0

    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="bench_spro_"))
    try:
        marker = root / "generated.json"
        wanted = {"images": args.images, "height": args.height, "width": args.width}
        if marker.is_file() and json.loads(marker.read_text()).get("args") == wanted:
            info = json.loads(marker.read_text())["info"]
            print(f"reusing data in {root}")
        else:
            t0 = time.perf_counter()
            info = generate(root, args.images, args.height, args.width)
            marker.write_text(json.dumps({"args": wanted, "info": info}))
            print(f"generated {root} in {time.perf_counter() - t0:.1f} s")
        print(f"data: {args.images} maps of {args.height} x {args.width} ({info['pixels'] / 1e6:.0f} M pixels), "
              f"subsets {info['images']}, {info['defects']} defects; threads: {args.threads}")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        for mode in args.modes:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--data-dir", str(root), "--threads", str(args.threads),
                 "--model-size", str(args.model_size)],
                env=env, capture_output=True, text=True, check=False,
            )
            total = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                return proc.returncode
            line = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[{mode}] evaluation {line['wall_s']:.1f} s wall, {line['cpu_s']:.1f} s CPU (process incl. imports "
                  f"{total:.1f} s), "
                  f"peak RSS {line['peak_rss_kib'] / 1024**2:.2f} GiB; {line['method']}, "
                  f"{line['refinement_passes']} refinement passes, error bound {line['error_bound']:.1e}; "
                  f"AU-sPRO@0.05 mean {line['auc_spro_mean_0.05']:.4f}, image AUROC mean {line['image_auroc_mean']:.4f}")
    finally:
        if not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
