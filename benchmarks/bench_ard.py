"""Benchmark Ard (SE / ECA / CBAM attention) against the package's plain Rd on real data.

ARD: "Attention One-Class Embedding in Reverse Distillation for Anomaly Detection" (supplementary
only); RD: Deng & Li, CVPR 2022. Not a test: it trains every (dataset, model, seed) of the grid on
the CPU and prints / saves a table of image AUROC, pixel AUROC, AU-PRO (anomalib ``AUPRO``,
fpr_limit 0.3), training seconds per epoch and batch-1 inference latency.

Protocol (kept identical for every model):

* data: anomalib's ``MVTecAD`` datasets (``train/good`` for training, ``test`` + ``ground_truth``
  for evaluation; ``validation/good`` is not used). Each image goes through the model's own
  pre-processor transform (resize to ``--image-size``, ImageNet normalisation; masks resized
  nearest), exactly as anomalib's pre-processor does it, once, and is kept in memory. Images are
  transformed one by one because the battery-weld images have different heights (anomalib's
  collate needs equal sizes).
* training: the model's loss and Adam optimiser (``configure_optimizers``), ``--lr`` for all models,
  batch ``--batch-size``, shuffled with a seeded generator, ``--epochs`` epochs, no augmentation.
* evaluation: raw ``pred_score`` / ``anomaly_map`` of the torch model in eval mode (no
  post-processor normalisation, which clamps and would only add ties), metrics from anomalib at
  the model resolution, as ``Engine.test`` computes them.
* latency: batch 1, median of 30 forward passes after 5 warm-ups, ``--threads`` threads, torch
  (``model.model``) and, with ``--openvino``, the OpenVINO f32 export of the whole Lightning module.

Example (the command behind ``docs/models/ard.md``)::

    CI=true nohup python benchmarks/bench_ard.py \\
        --dataset tire=/work/shared/datasets/mvtec3d_tire_rgb:tire \\
        --dataset weld=/work/shared/datasets/battery_weld:weld \\
        --weights /work/shared/weights/mobilenet_v2-b0353104.pth \\
        --models rd ard-se ard-eca ard-cbam --epochs 10 --seeds 0 1 --threads 2 \\
        --out benchmarks/results/ard.json > benchmarks/results/ard.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

import torch  # noqa: E402
from _common import raw_metrics, train_epochs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=ROOT:CATEGORY",
        help="MVTec AD layout dataset, e.g. tire=/data/mvtec3d_tire_rgb:tire (repeatable)",
    )
    parser.add_argument(
        "--weights", default="false", help="teacher checkpoint (e.g. mobilenet_v2-b0353104.pth) or 'false'"
    )
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument(
        "--models", nargs="+", default=["rd", "ard-se", "ard-eca", "ard-cbam"],
        help="rd, or ard-<se|eca|cbam>[-<fused|blocks|both>] (position default: the model default)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=0.005, help="Adam lr, the same for every model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is far faster than 2 on a busy 2-core machine)"
    )
    parser.add_argument("--openvino", action="store_true", help="also time the OpenVINO f32 export (once per model)")
    parser.add_argument(
        "--latency-only", action="store_true",
        help="only time inference (untrained models, all in one process, interleaved --repeats rounds)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the latency-only measurement")
    parser.add_argument(
        "--report", type=Path, nargs="+", metavar="JSON",
        help="no training: merge the runs of these result files and print the tables (with paired deltas vs rd)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ard.json"))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def load_split(root: str, category: str, transform: Any) -> dict[str, dict[str, torch.Tensor]]:  # noqa: ANN401
    """Pre-processed train images and test images / labels / masks of one MVTec-AD-layout category."""
    from anomalib.data import MVTecAD
    from torchvision import tv_tensors

    datamodule = MVTecAD(root=root, category=category, num_workers=0)
    datamodule.setup()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, dataset in (("train", datamodule.train_data), ("test", datamodule.test_data)):
        images, masks, labels = [], [], []
        for index in range(len(dataset)):
            item = dataset[index]
            mask = item.gt_mask if item.gt_mask is not None else torch.zeros(item.image.shape[-2:], dtype=torch.bool)
            image, mask = transform(torch.as_tensor(item.image).unsqueeze(0), tv_tensors.Mask(mask.unsqueeze(0)))
            images.append(image[0])
            masks.append(mask[0].bool())
            labels.append(int(item.gt_label))
        out[name] = {"image": torch.stack(images), "mask": torch.stack(masks), "label": torch.tensor(labels)}
    return out


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def build_model(spec: str, args: argparse.Namespace, pre_trained: bool | str) -> Any:  # noqa: ANN401
    from anomalib_dskd.models.ard import Ard
    from anomalib_dskd.models.rd import Rd

    common = {
        "backbone": args.backbone,
        "pre_trained": pre_trained,
        "lr": args.lr,
        "pre_processor": Rd.configure_pre_processor((args.image_size, args.image_size)),
        "evaluator": False,
        "visualizer": False,
    }
    if spec == "rd":
        return Rd(**common)
    parts = spec.split("-")
    if parts[0] != "ard" or len(parts) not in {2, 3}:
        msg = f"model spec {spec!r}: use rd or ard-<type>[-<position>]"
        raise ValueError(msg)
    kwargs = {"attention_type": parts[1]}
    if len(parts) == 3:
        kwargs["attention_position"] = parts[2]
    return Ard(**common, **kwargs)


def train(
    model: Any,  # noqa: ANN401
    data: dict[str, torch.Tensor],
    epochs: int,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Plain training loop with the model's own loss and optimiser; returns seconds per epoch."""
    return train_epochs(model, data["image"], epochs, batch_size, seed)[0]


@torch.no_grad()
def evaluate(model: Any, data: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:  # noqa: ANN401
    """Image AUROC, pixel AUROC and AU-PRO (fpr_limit 0.3) from anomalib's metrics on raw outputs."""
    model.model.eval()
    scores, maps = [], []
    for begin in range(0, len(data["image"]), batch_size):
        out = model.model(data["image"][begin : begin + batch_size])
        scores.append(out.pred_score)
        maps.append(out.anomaly_map)
    return raw_metrics(torch.cat(scores), torch.cat(maps), data["label"], data["mask"])


@torch.no_grad()
def torch_latency_ms(model: Any, size: int, repeats: int = 30) -> float:  # noqa: ANN401
    model.model.eval()
    image = torch.rand(1, 3, size, size)
    for _ in range(5):
        model.model(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.model(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def openvino_latency_ms(model: Any, size: int, threads: int, repeats: int = 30) -> float:  # noqa: ANN401
    import numpy as np
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        xml = model.to_openvino(tmp, input_size=(size, size), onnx_kwargs={"opset_version": 18})
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
        image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        for _ in range(5):
            compiled(image)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            compiled(image)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> str:
    """Markdown table: mean (and per-seed values) per dataset and model."""
    lines = [
        "| dataset | model | seeds | image AUROC | pixel AUROC | AU-PRO | train s/epoch | torch ms | OpenVINO ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["dataset"], r["model"]) for r in runs}, key=lambda k: (k[0], k[1] != "rd", k[1]))
    for dataset, model in keys:
        group = [r for r in runs if r["dataset"] == dataset and r["model"] == model]

        def fmt(name: str, group: list[dict[str, Any]] = group) -> str:
            values = [r[name] for r in group]
            mean = statistics.mean(values)
            if len(values) == 1:
                return f"{mean:.3f}"
            return f"{mean:.3f} ({' / '.join(f'{v:.3f}' for v in values)})"

        train_s = statistics.mean(statistics.median(r["epoch_seconds"]) for r in group)
        torch_ms = statistics.median(r["torch_ms"] for r in group)
        ov_values = [r["openvino_ms"] for r in group if r.get("openvino_ms") is not None]
        ov_ms = f"{statistics.median(ov_values):.1f}" if ov_values else "-"
        lines.append(
            f"| {dataset} | {model} | {len(group)} | {fmt('image_auroc')} | {fmt('pixel_auroc')} | {fmt('aupro')} "
            f"| {train_s:.1f} | {torch_ms:.1f} | {ov_ms} |"
        )
    return "\n".join(lines)


def paired_deltas(runs: list[dict[str, Any]]) -> str:
    """Markdown table of model - rd differences over the seeds both were run with (mean +- sample std)."""
    lines = [
        "| dataset | model | paired seeds | d image AUROC | d pixel AUROC | d AU-PRO | wins (image AUROC) |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["dataset"], r["model"], r["seed"]): r for r in runs}
    for dataset, model in sorted({(r["dataset"], r["model"]) for r in runs if r["model"] != "rd"}):
        seeds = sorted(s for (d, m, s) in by_key if d == dataset and m == model and (d, "rd", s) in by_key)
        if not seeds:
            continue
        cells = []
        for name in ("image_auroc", "pixel_auroc", "aupro"):
            deltas = [by_key[(dataset, model, s)][name] - by_key[(dataset, "rd", s)][name] for s in seeds]
            std = statistics.stdev(deltas) if len(deltas) > 1 else float("nan")
            cells.append(f"{statistics.mean(deltas):+.3f} +- {std:.3f}")
        wins = sum(
            by_key[(dataset, model, s)]["image_auroc"] > by_key[(dataset, "rd", s)]["image_auroc"] for s in seeds
        )
        lines.append(f"| {dataset} | {model} | {len(seeds)} | {' | '.join(cells)} | {wins}/{len(seeds)} |")
    return "\n".join(lines)


def latency_only(args: argparse.Namespace, pre_trained: bool | str) -> int:
    """Time every model's inference and training step in one process, interleaving the models.

    Speed does not depend on the trained weights, and timing all models side by side, in
    alternation over several rounds, makes the comparison fairer on a machine shared with other jobs.
    Training: median seconds of one optimiser step on a batch of ``--batch-size`` images.
    """
    models = {spec: build_model(spec, args, pre_trained) for spec in args.models}
    timings: dict[str, dict[str, list[float]]] = {
        spec: {"torch": [], "openvino": [], "train_step": []} for spec in models
    }
    batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    for round_index in range(args.repeats):
        for spec, model in models.items():
            timings[spec]["train_step"].append(statistics.median(train(model, {"image": batch}, 6, args.batch_size, 0)))
            timings[spec]["torch"].append(torch_latency_ms(model, args.image_size))
            if args.openvino:
                timings[spec]["openvino"].append(openvino_latency_ms(model, args.image_size, args.threads))
            print(f"round {round_index + 1} {spec}: {timings[spec]}", flush=True)
    lines = [
        "| model | parameters | train s / step (batch) | torch ms (batch 1) | OpenVINO f32 ms (batch 1) |",
        "|---|---|---|---|---|",
    ]
    for spec, model in models.items():
        ov = f"{statistics.median(timings[spec]['openvino']):.1f}" if timings[spec]["openvino"] else "-"
        count = sum(p.numel() for p in model.model.parameters())
        step = statistics.median(timings[spec]["train_step"])
        lines.append(f"| {spec} | {count:,} | {step:.2f} | {statistics.median(timings[spec]['torch']):.1f} | {ov} |")
    table = "\n".join(lines)
    print(table, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "latency": timings}, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from lightning.pytorch import seed_everything

    if args.report:
        runs = [run for path in args.report for run in json.loads(path.read_text())["runs"]]
        print(summarise(runs) + "\n\n" + paired_deltas(runs), flush=True)
        return 0
    pre_trained: bool | str = False if args.weights.lower() == "false" else args.weights
    if args.latency_only:
        return latency_only(args, pre_trained)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    if args.out.exists():  # resume: keep finished runs of the same grid
        runs = json.loads(args.out.read_text()).get("runs", [])
    done = {(r["dataset"], r["model"], r["seed"]) for r in runs}
    timed_openvino = {r["model"] for r in runs if r.get("openvino_ms") is not None}
    print(f"command: {' '.join([sys.executable, *sys.argv])}", flush=True)
    for entry in args.dataset:
        name, _, location = entry.partition("=")
        root, _, category = location.rpartition(":")
        transform = build_model("rd", args, False).pre_processor.transform
        data = load_split(root, category, transform)
        print(f"{name}: train {len(data['train']['image'])}, test {len(data['test']['image'])} "
              f"({int(data['test']['label'].sum())} anomalous)", flush=True)
        for seed in args.seeds:
            for spec in args.models:
                if (name, spec, seed) in done:
                    continue
                seed_everything(seed, verbose=False)
                model = build_model(spec, args, pre_trained)
                print(f"  {name} {spec} seed {seed}", flush=True)
                epoch_seconds = train(model, data["train"], args.epochs, args.batch_size, seed)
                metrics = evaluate(model, data["test"], args.batch_size)
                run = {
                    "dataset": name, "model": spec, "seed": seed, **metrics,
                    "epoch_seconds": epoch_seconds,
                    "torch_ms": torch_latency_ms(model, args.image_size),
                    "openvino_ms": None,
                    "parameters": sum(p.numel() for p in model.model.parameters()),
                    "trainable": sum(p.numel() for p in model.model.parameters() if p.requires_grad),
                }
                if args.openvino and spec not in timed_openvino:
                    run["openvino_ms"] = openvino_latency_ms(model, args.image_size, args.threads)
                    timed_openvino.add(spec)
                print(f"    -> {json.dumps({k: v for k, v in run.items() if k != 'epoch_seconds'})}", flush=True)
                runs.append(run)
                settings = {k: str(v) for k, v in vars(args).items()}
                args.out.write_text(json.dumps({"args": settings, "runs": runs}, indent=1))
    table = summarise(runs)
    print(table, flush=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
