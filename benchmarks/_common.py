"""Helpers shared by the benchmark scripts (``bench_ard.py``, ``bench_glance.py``, ``packd_fewshot.py``, ``edge_*.py``).

Scripts in this folder import it as ``from _common import ...`` (Python puts the script's folder on
``sys.path``).
"""

from __future__ import annotations

import os
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch


def train_epochs(
    model: Any,  # noqa: ANN401
    images: torch.Tensor,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[list[float], list[float]]:
    """Plain loop with the Lightning module's own loss and optimiser over in-memory images.

    Shuffled with a seeded generator; batches of one image are skipped (BatchNorm needs two).
    Returns ``(seconds per epoch, mean loss per epoch)`` and prints one line per epoch.
    """
    optimizer = model.configure_optimizers()
    generator = torch.Generator().manual_seed(seed)
    model.model.train()
    seconds, losses = [], []
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(images), generator=generator)
        total, count = 0.0, 0
        for begin in range(0, len(images), batch_size):
            batch = images[order[begin : begin + batch_size]]
            if len(batch) < 2:
                continue
            loss = model.loss(*model.model(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss) * len(batch)
            count += len(batch)
        seconds.append(time.perf_counter() - start)
        losses.append(round(total / max(count, 1), 5))
        print(f"    epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f} ({seconds[-1]:.1f} s)", flush=True)
    return seconds, losses


def raw_metrics(scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Image AUROC, pixel AUROC and AU-PRO (anomalib ``AUPRO``, fpr_limit 0.3) of raw scores and maps.

    AUROCs rank the raw values as given (:func:`anomalib_dskd.metrics.raw_auroc`, no sigmoid).
    """
    from anomalib.metrics import AUPRO

    from anomalib_dskd.metrics import raw_auroc

    batch = SimpleNamespace(
        pred_score=scores,
        anomaly_map=maps.squeeze(1) if maps.dim() == 4 else maps,
        gt_label=labels,
        gt_mask=masks.squeeze(1) if masks.dim() == 4 else masks,
    )
    metrics = (
        ("image_auroc", raw_auroc(["pred_score", "gt_label"])),
        ("pixel_auroc", raw_auroc(["anomaly_map", "gt_mask"])),
        ("aupro", AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)),
    )
    results = {}
    for name, metric in metrics:
        metric.update(batch)
        results[name] = float(metric.compute())
    return results


def interleaved_latency(
    requests: dict[str, tuple[Any, Any]], rounds: int, calls: int, warmup: int
) -> dict[str, list[float]]:
    """Per-round median latency (ms) of OpenVINO infer requests timed in turn, so that load weighs on all alike.

    ``requests`` maps a name to ``(infer_request, inputs)``. Each request first runs ``warmup`` times; then,
    ``rounds`` times, every request runs ``calls`` times in turn and the round keeps its median. Prints a line per
    round with the load average.
    """
    for request, inputs in requests.values():
        for _ in range(warmup):
            request.infer(inputs)
    medians: dict[str, list[float]] = {name: [] for name in requests}
    for index in range(rounds):
        for name, (request, inputs) in requests.items():
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                request.infer(inputs)
                times.append((time.perf_counter() - start) * 1000)
            medians[name].append(statistics.median(times))
        print(f"round {index + 1}/{rounds} load {os.getloadavg()[0]:.2f}", flush=True)
    return medians


def command_line(script: str, args: Any, skip: tuple[str, ...] = ("output",)) -> str:  # noqa: ANN401
    """The command that reproduces a run: ``python <script>`` and every parsed option but ``skip``."""
    return f"python {script} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in skip)


def add_support_draw_args(parser: Any) -> None:  # noqa: ANN401
    """The few-shot memory benchmarks' shared arguments: k, draws, size, teacher, threads, draw seed."""
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default="../shared/weights/mobilenet_v2-b0353104.pth")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the support-draw seed (packd_fewshot.py's --seed)")
