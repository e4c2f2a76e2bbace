"""Ard's lr check: lr 0.001 (ARD supplementary) vs 0.005 (RD) on weld, same seeds, from the committed raw runs.

Reads the JSON files ``benchmarks/bench_ard.py`` wrote (``docs/benchmarks/ard/``) and prints, per model and
metric, the mean over the seeds that both learning rates were run with, and the per-seed values. No training::

    python benchmarks/ard_lr_check.py > docs/benchmarks/ard/lr_check.txt
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RAW = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "ard"
LR_0005 = ("main.json", "weld_more.json")
LR_0001 = ("weld_lr001.json",)
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def load(names: tuple[str, ...]) -> dict[tuple[str, int], dict]:
    runs = {}
    for name in names:
        data = json.loads((RAW / name).read_text())
        for run in data["runs"]:
            if run["dataset"] == "weld":
                runs[(run["model"], run["seed"])] = {**run, "lr": data["args"]["lr"]}
    return runs


def main() -> None:
    high, low = load(LR_0005), load(LR_0001)
    print(
        f"# python benchmarks/ard_lr_check.py  (weld; lr 0.005: {', '.join(LR_0005)}; lr 0.001: {', '.join(LR_0001)})"
    )
    print(
        "| model | metric | seeds | lr 0.005 mean (per seed) | lr 0.001 mean (per seed) | seeds where 0.005 is higher |"
    )
    print("|---|---|---|---|---|---|")
    for model in sorted({m for m, _ in low}, key=lambda m: (m != "rd", m)):
        seeds = sorted(s for m, s in low if m == model and (m, s) in high)
        for metric in METRICS:
            a = [high[(model, s)][metric] for s in seeds]
            b = [low[(model, s)][metric] for s in seeds]
            wins = sum(x > y for x, y in zip(a, b))
            print(
                f"| {model} | {metric} | {' '.join(map(str, seeds))} "
                f"| {statistics.mean(a):.3f} ({' / '.join(f'{x:.3f}' for x in a)}) "
                f"| {statistics.mean(b):.3f} ({' / '.join(f'{x:.3f}' for x in b)}) | {wins}/{len(seeds)} |"
            )


if __name__ == "__main__":
    main()
