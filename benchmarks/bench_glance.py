"""Benchmark Glance against the package's plain Rd on real data (not a test).

Glance: Wang, Wu, Cui, Shen, "Glancing at the Patch: Anomaly Localization with Global and Local
Feature Comparison", CVPR 2021. Rd: Deng & Li, CVPR 2022 (``anomalib_dskd.Rd``). For every
(dataset, model) the script trains on the CPU, then prints and saves image AUROC, pixel AUROC, AU-PRO
(anomalib ``AUPRO``, fpr_limit 0.3), training seconds, inference throughput (images/s) and batch-1
latency.

Protocol (identical for every model):

* data: ``train/good`` for training and ``test`` + ground truth for evaluation (``validation/good`` is
  not used). MVTec AD layout through anomalib's ``MVTecAD``, MVTec LOCO layout through ``MVTecLOCO``.
  Each image goes through the model's own pre-processor transform (resize to 256x256, ImageNet
  normalisation; masks resized nearest) once and is kept in memory: images are transformed one by one
  because the battery-weld images differ in height (anomalib's collate needs equal sizes).
* Glance: the stage lengths and batch sizes of ``configs/model/glance.yaml`` (the "small" config) unless
  overridden; every iteration draws its patches / (image, patch) pairs uniformly from all training
  images (``Glance.local_stage_losses`` / ``global_stage_losses``, the methods ``training_step`` calls),
  with the model's own Adam (``configure_optimizers``).
* Rd: its loss and Adam (lr 0.005, betas (0.5, 0.999)), batch ``--rd-batch-size``, ``--rd-epochs``
  epochs, shuffled with a seeded generator.
* evaluation: raw ``pred_score`` / ``anomaly_map`` of the torch model in eval mode (no post-processor
  normalisation), anomalib's metrics at the model resolution, as ``Engine.test`` computes them.
* speed: ``--threads`` torch threads (1 by default). Throughput = test images / seconds of the whole
  test pass (batches of ``--eval-batch-size``); latency = median of batch-1 forwards.

Example (the command behind ``docs/models/glance.md``)::

    CI=true nohup python benchmarks/bench_glance.py \\
        --dataset tire=/work/shared/datasets/mvtec3d_tire_rgb:tire \\
        --dataset weld=/work/shared/datasets/battery_weld:weld \\
        --dataset juice_bottle=loco:/work/shared/datasets/mvtec_loco_juice_bottle:juice_bottle \\
        --weights /work/shared/weights/mobilenet_v2-b0353104.pth \\
        --models glance rd --threads 1 \\
        --out benchmarks/results/glance.json > benchmarks/results/glance.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

import torch  # noqa: E402
from _common import raw_metrics, train_epochs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=[loco:]ROOT:CATEGORY",
        help="dataset, e.g. tire=/data/mvtec3d_tire_rgb:tire or juice=loco:/data/loco:juice_bottle (repeatable)",
    )
    parser.add_argument("--weights", default="false", help="teacher checkpoint (mobilenet_v2-b0353104.pth) or 'false'")
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--models", nargs="+", default=["glance", "rd"], choices=["glance", "rd"])
    parser.add_argument("--config", type=Path, default=REPO / "configs/model/glance.yaml",
                        help="Glance config whose init_args are used (default: the small config)")
    parser.add_argument("--local-steps", type=int, help="override the config's local_steps")
    parser.add_argument("--global-steps", type=int, help="override the config's global_steps")
    parser.add_argument("--rd-epochs", type=int, default=20)
    parser.add_argument("--rd-batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/glance.json")
    parser.add_argument("--save-models", type=Path, help="folder to save each trained model's state_dict in")
    parser.add_argument("--extra-lambda-s", type=float, nargs="*", default=[],
                        help="also score each trained Glance with these lambda_s (inference only, no retraining)")
    parser.add_argument("--rescore-from", type=Path,
                        help="do not train: load Glance models saved by --save-models and score them with "
                             "--extra-lambda-s (rows 'glance(lambda_s=X)', training time copied)")
    parser.add_argument("--speed-only", action="store_true",
                        help="only time Glance's inference paths (reference per-patch vs fast) on random images")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def parse_dataset(spec: str) -> tuple[str, str, str, str]:
    """``NAME=[loco:]ROOT:CATEGORY`` -> (name, layout, root, category)."""
    name, rest = spec.split("=", 1)
    layout = "mvtec"
    if rest.startswith("loco:"):
        layout, rest = "loco", rest[len("loco:"):]
    root, category = rest.rsplit(":", 1)
    return name, layout, root, category


def load_split(layout: str, root: str, category: str, transform: Any) -> dict[str, dict[str, torch.Tensor]]:  # noqa: ANN401
    """Pre-processed train images and test images / labels / masks of one category."""
    from anomalib.data import MVTecAD, MVTecLOCO
    from torchvision import tv_tensors

    cls = MVTecLOCO if layout == "loco" else MVTecAD
    datamodule = cls(root=root, category=category, num_workers=0)
    datamodule.setup()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, dataset in (("train", datamodule.train_data), ("test", datamodule.test_data)):
        images, masks, labels = [], [], []
        for index in range(len(dataset)):
            item = dataset[index]
            mask = item.gt_mask if item.gt_mask is not None else torch.zeros(item.image.shape[-2:], dtype=torch.bool)
            mask = torch.as_tensor(mask)
            if mask.dim() == 3:  # LOCO: one channel per defect -> union
                mask = mask.any(dim=0)
            image, mask = transform(torch.as_tensor(item.image).unsqueeze(0), tv_tensors.Mask(mask.unsqueeze(0)))
            images.append(image[0])
            masks.append(mask[0].bool())
            labels.append(int(item.gt_label))
        out[name] = {"image": torch.stack(images), "mask": torch.stack(masks), "label": torch.tensor(labels)}
    return out


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def glance_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load(args.config.read_text())
    kwargs = dict(config.get("model", config).get("init_args", {}))
    if args.local_steps is not None:
        kwargs["local_steps"] = args.local_steps
    if args.global_steps is not None:
        kwargs["global_steps"] = args.global_steps
    return kwargs


def build_model(name: str, args: argparse.Namespace, pre_trained: bool | str) -> Any:  # noqa: ANN401
    from anomalib_dskd import Glance, Rd

    common = {"backbone": args.backbone, "pre_trained": pre_trained, "evaluator": False, "visualizer": False}
    if name == "rd":
        return Rd(**common)
    kwargs = glance_kwargs(args)
    kwargs.update(common)
    return Glance(**kwargs)


def train_glance(model: Any, images: torch.Tensor) -> dict[str, Any]:  # noqa: ANN401
    optimizer = model.configure_optimizers()
    model.train()
    log_every = max(model.total_steps // 20, 1)
    history = []
    for step in range(model.total_steps):
        stage = model.stage(step)
        losses = model.local_stage_losses(images) if stage == 1 else model.global_stage_losses(images)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        if step % log_every == 0 or step == model.total_steps - 1 or step == model.local_steps:
            row = {"step": step, "stage": stage, **{k: round(float(v), 5) for k, v in losses.items()}}
            history.append(row)
            print(f"    {row}", flush=True)
    return {"history": history}


def train_rd(model: Any, images: torch.Tensor, epochs: int, batch_size: int, seed: int) -> dict[str, Any]:  # noqa: ANN401
    return {"history": train_epochs(model, images, epochs, batch_size, seed)[1]}


@torch.no_grad()
def evaluate(model: Any, data: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:  # noqa: ANN401
    """Image AUROC, pixel AUROC, AU-PRO (fpr_limit 0.3) and throughput from raw torch outputs."""
    model.eval()
    model.model.eval()
    scores, maps = [], []
    model.model(data["image"][:1])  # warm-up (caches, allocator)
    start = time.perf_counter()
    for begin in range(0, len(data["image"]), batch_size):
        out = model.model(data["image"][begin : begin + batch_size])
        scores.append(out.pred_score)
        maps.append(out.anomaly_map)
    seconds = time.perf_counter() - start
    metrics = raw_metrics(torch.cat(scores), torch.cat(maps), data["label"], data["mask"])
    return {"images_per_s": len(data["image"]) / seconds, **metrics}


@torch.no_grad()
def latency_ms(model: Any, image: torch.Tensor, repeats: int) -> float:  # noqa: ANN401
    model.model.eval()
    model.model(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.model(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def speed_breakdown(repeats: int = 3, batch: int = 4) -> dict[str, float]:
    """Seconds per image of each inference part, reference (per patch) vs fast path, 20x20 grid at 256x256."""
    from anomalib_dskd.models.glance import GlanceModel

    model = GlanceModel(backbone="mobilenetv2_100", pre_trained=False, teacher_input_size=33).eval()
    images = torch.randn(batch, 3, 256, 256)

    def timed(fn: Any, n: int = repeats) -> float:  # noqa: ANN401
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) / batch

    out = {
        "local_reference_s": timed(lambda: model.grid_local_features(images, fast=False), 1),
        "local_fast_s": timed(lambda: model.grid_local_features(images, fast=True)),
        "global_reference_s": timed(lambda: model.grid_global_features(images, fast=False), 1),
        "global_fast_s": timed(lambda: model.grid_global_features(images, fast=True)),
        "full_fast_s": timed(lambda: model(images)),
    }
    windowed, naive = model.global_grid.multiply_adds()
    out["global_macs_windowed_G"] = windowed / 1e9
    out["global_macs_reference_G"] = naive / 1e9
    out["full_fast_images_per_s"] = 1 / out["full_fast_s"]
    out["full_reference_images_per_s"] = 1 / (out["local_reference_s"] + out["global_reference_s"])
    return {k: round(v, 4) for k, v in out.items()}


def score_with_lambda_s(
    model: Any, data: dict[str, dict[str, torch.Tensor]], row: dict[str, Any], lambda_s: float, args: argparse.Namespace,  # noqa: ANN401
) -> dict[str, Any]:
    """Evaluate a trained Glance again with another ``lambda_s`` (the weight only acts at inference)."""
    original = model.model.lambda_s
    model.model.lambda_s = float(lambda_s)
    try:
        metrics = evaluate(model, data["test"], args.eval_batch_size)
    finally:
        model.model.lambda_s = original
    new_row = {
        "dataset": row["dataset"],
        "model": f"glance(lambda_s={lambda_s:g})",
        "train_seconds": row["train_seconds"],
        **{k: round(v, 4) for k, v in metrics.items()},
        "latency_ms_batch1": row.get("latency_ms_batch1"),
        "settings": {**row.get("settings", {}), "lambda_s": float(lambda_s)},
        "train_log": [],
    }
    print(f"   {json.dumps({k: v for k, v in new_row.items() if k not in ('train_log', 'settings')})}", flush=True)
    return new_row


def rescore(args: argparse.Namespace, name: str, data: dict[str, Any], results: list[dict[str, Any]],  # noqa: ANN401
            pre_trained: bool | str) -> None:
    """Score the saved Glance model of dataset ``name`` with every ``--extra-lambda-s``."""
    path = args.rescore_from / f"{name}_glance.pt"
    row = next((r for r in results if r["dataset"] == name and r["model"] == "glance"), None)
    if row is None or not path.is_file():
        print(f"-- rescore: no glance row for {name} or no {path}; skipped", flush=True)
        return
    model = build_model("glance", args, pre_trained)
    model.load_state_dict(torch.load(path, weights_only=True))
    for lambda_s in args.extra_lambda_s:
        label = f"glance(lambda_s={lambda_s:g})"
        results[:] = [r for r in results if not (r["dataset"] == name and r["model"] == label)]
        results.append(score_with_lambda_s(model, data, row, lambda_s, args))
    args.out.write_text(json.dumps({**json.loads(args.out.read_text()), "results": results}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.speed_only:
        speed = speed_breakdown()
        print(json.dumps(speed, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path = args.out.with_name(args.out.stem + "_speed.json")
        path.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]), "threads": args.threads,
                                    "speed": speed}, indent=1))
        return 0
    pre_trained: bool | str = False if args.weights.lower() == "false" else args.weights
    from anomalib_dskd import Rd

    transform = Rd.configure_pre_processor((256, 256)).transform
    results: list[dict[str, Any]] = []
    if args.out.exists():
        results = json.loads(args.out.read_text()).get("results", [])
    done = {(r["dataset"], r["model"]) for r in results}
    for spec in args.dataset:
        name, layout, root, category = parse_dataset(spec)
        print(f"== {name} ({layout}: {root} / {category})", flush=True)
        data = load_split(layout, root, category, transform)
        print(f"   train {len(data['train']['image'])}, test {len(data['test']['image'])} "
              f"({int(data['test']['label'].sum())} anomalous)", flush=True)
        if args.rescore_from is not None:
            rescore(args, name, data, results, pre_trained)
            continue
        for model_name in args.models:
            if (name, model_name) in done:
                print(f"-- {model_name}: already in {args.out}, skipped", flush=True)
                continue
            torch.manual_seed(args.seed)
            model = build_model(model_name, args, pre_trained)
            print(f"-- {model_name}", flush=True)
            start = time.perf_counter()
            if model_name == "glance":
                info = train_glance(model, data["train"]["image"])
            else:
                info = train_rd(model, data["train"]["image"], args.rd_epochs, args.rd_batch_size, args.seed)
            train_seconds = time.perf_counter() - start
            if args.save_models is not None:
                args.save_models.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), args.save_models / f"{name}_{model_name}.pt")
            metrics = evaluate(model, data["test"], args.eval_batch_size)
            metrics["latency_ms_batch1"] = latency_ms(model, data["test"]["image"][:1], args.latency_repeats)
            row = {
                "dataset": name,
                "model": model_name,
                "train_seconds": round(train_seconds, 1),
                **{k: round(v, 4) for k, v in metrics.items()},
                "settings": (
                    {k: v for k, v in glance_kwargs(args).items()} if model_name == "glance"
                    else {"epochs": args.rd_epochs, "batch_size": args.rd_batch_size}
                ),
                "train_log": info["history"],
            }
            print(f"   {json.dumps({k: v for k, v in row.items() if k != 'train_log'})}", flush=True)
            results.append(row)
            if model_name == "glance":
                for lambda_s in args.extra_lambda_s:
                    results.append(score_with_lambda_s(model, data, row, lambda_s, args))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "command": " ".join([sys.executable, *sys.argv]),
                "threads": args.threads,
                "seed": args.seed,
                "results": results,
            }, indent=1))
    print("\n| dataset | model | image AUROC | pixel AUROC | AU-PRO | train s | images/s | latency ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        latency = r.get("latency_ms_batch1")
        print(f"| {r['dataset']} | {r['model']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} "
              f"| {r['train_seconds']:.0f} | {r['images_per_s']:.2f} | {latency:.0f} |" if latency else "| - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
