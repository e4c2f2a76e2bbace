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
* Glance: the init args of ``configs/model/glance.yaml`` (the "small" config) unless overridden
  (``--set``, ``--local-steps`` ...); every iteration draws its patches / (image, patch) pairs uniformly
  from all training images (``Glance.stage_losses``, the method ``training_step`` calls),
  with the model's own Adam (``configure_optimizers``).
* Rd: its loss and Adam (lr 0.005, betas (0.5, 0.999)), batch ``--rd-batch-size``, ``--rd-epochs``
  epochs, shuffled with a seeded generator.
* evaluation: raw ``pred_score`` / ``anomaly_map`` of the torch model in eval mode (no post-processor
  normalisation), anomalib's metrics at the model resolution, as ``Engine.test`` computes them.
* speed: ``--threads`` torch threads (1 by default). Throughput = test images / seconds of the whole
  test pass (batches of ``--eval-batch-size``); latency = median of batch-1 forwards.

Glance's schedule: with ``local_steps`` / ``global_steps`` null in the config (the default), the budget is
``--total-steps`` iterations split by ``local_fraction`` (what ``Engine(max_steps=N)`` does). After
training the score statistics (mean / std of ``s_IAD`` and ``1 - P_match`` over the grid patches of up to
``score_statistics_images`` training images) are computed as ``Glance.on_train_end`` does, and every
``--score-modes`` entry is scored from the same weights (rows ``glance[mixed]``, ``glance[iad]``,
``glance[dad]``; ``glance`` alone when one mode is given).

Short detection check on generated data (``--synthetic DIR`` writes a generated MVTec AD category at
256x256 and benchmarks on it; the commands behind ``docs/benchmarks/glance/synthetic_check.json``)::

    CI=true python benchmarks/bench_glance.py --synthetic /tmp/glance_synthetic \\
        --weights ../shared/weights/mobilenet_v2-b0353104.pth --models glance --total-steps 400 \\
        --set local_fraction=0.6 --score-modes mixed iad dad --save-models /tmp/gl/models \\
        --out docs/benchmarks/glance/synthetic_check.json
    # then, on the same weights, global vs per-position score statistics:
    CI=true python benchmarks/bench_glance.py --synthetic /tmp/glance_synthetic \\
        --weights ../shared/weights/mobilenet_v2-b0353104.pth --models glance --rescore-from /tmp/gl/models \\
        --extra-normalisations global position --score-modes mixed iad dad \\
        --out docs/benchmarks/glance/synthetic_check.json

Stage-1 study (``--stage1-study``: Local-Net distillation alone, one variant of the compactness weighting
per run - paper, no_lc, warmup, balanced - held-out distillation fraction every 10 % of the run; the
commands behind ``docs/benchmarks/glance/stage1_study.json``)::

    CI=true python benchmarks/bench_glance.py --synthetic /tmp/glance_synthetic \\
        --weights ../shared/weights/mobilenet_v2-b0353104.pth --stage1-study warmup \\
        --stage1-steps 300 --stage1-lr 1e-3 --out docs/benchmarks/glance/stage1_study.json
    # tire with the committed run's settings, plain vs floored teacher standardisation:
    CI=true python benchmarks/bench_glance.py --dataset tire=../shared/datasets/mvtec3d_tire_rgb:tire \\
        --weights ../shared/weights/mobilenet_v2-b0353104.pth --stage1-study paper --stage1-steps 250 \\
        --stage1-lr 2e-4 --teacher-std-floor 0 --out docs/benchmarks/glance/stage1_study.json

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
    parser.add_argument("--total-steps", type=int, default=900,
                        help="training budget in iterations when the config's schedule follows the trainer "
                             "(local_steps / global_steps null), split by local_fraction (default 900)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="override a Glance init arg, e.g. --set lr_local=1e-3 (repeatable)")
    parser.add_argument("--score-modes", nargs="+", default=["mixed"], choices=["mixed", "iad", "dad"],
                        help="score each trained Glance with these heads (inference only)")
    parser.add_argument("--synthetic", type=Path,
                        help="generate an MVTec AD category (256x256) in this folder and add it as dataset 'synthetic'")
    parser.add_argument("--synthetic-sizes", type=int, nargs=3, default=[32, 10, 5],
                        metavar=("N_TRAIN", "N_TEST_GOOD", "N_PER_DEFECT"))
    parser.add_argument("--stage1-study", nargs="*", metavar="VARIANT",
                        choices=["paper", "no_lc", "warmup", "balanced"],
                        help="only run stage 1 with these compactness variants on the first dataset")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--stage1-batch-size", type=int, default=32)
    parser.add_argument("--stage1-init", choices=["default", "kaiming"], default="default",
                        help="Local-Net initialisation in the stage-1 study (kaiming: fan-in normal for leaky ReLU)")
    parser.add_argument("--stage1-decoder", choices=["linear", "standardised"], default="linear",
                        help="stage-1 study: the decoder as built, or Local-Net's features standardised per channel "
                             "(BatchNorm1d without affine) before it")
    parser.add_argument("--teacher-std-floor", type=float, help="override teacher_std_floor (stage-1 study too)")
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
    parser.add_argument("--extra-normalisations", nargs="*", default=[], choices=["position", "global"],
                        help="with --rescore-from: recompute the score statistics with these score_normalisation "
                             "values and score every --score-modes entry (rows 'glance[MODE,NORM]')")
    parser.add_argument("--rescore-from", type=Path,
                        help="do not train: load Glance models saved by --save-models and score them with "
                             "--extra-lambda-s (rows 'glance(lambda_s=X)', training time copied)")
    parser.add_argument("--summary-from", type=Path, nargs="+",
                        help="only write the summary (--summary-out) from these result files (one per seed)")
    parser.add_argument("--summary-cells", type=Path,
                        help="standard-profile cells folder for the Rd / Padim rows of the summary")
    parser.add_argument("--summary-out", type=Path, default=REPO / "docs/benchmarks/glance/summary.json")
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
    if args.teacher_std_floor is not None:
        kwargs["teacher_std_floor"] = args.teacher_std_floor
    for item in args.set:
        key, value = item.split("=", 1)
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def build_model(name: str, args: argparse.Namespace, pre_trained: bool | str) -> Any:  # noqa: ANN401
    from anomalib_dskd import Glance, Rd

    common = {"backbone": args.backbone, "pre_trained": pre_trained, "evaluator": False, "visualizer": False}
    if name == "rd":
        return Rd(**common)
    kwargs = glance_kwargs(args)
    kwargs.update(common)
    return Glance(**kwargs)


def train_glance(model: Any, images: torch.Tensor, total_steps: int) -> dict[str, Any]:  # noqa: ANN401
    """The Lightning training loop of Glance without Lightning: ``stage_losses`` per iteration, then calibration.

    ``Glance.stage_losses`` is what ``training_step`` calls (stage switch, held-out distillation fraction,
    the warning when stage 2 starts undistilled); afterwards the score statistics are computed from the
    training images as ``on_train_end`` / ``on_validation_epoch_start`` do.
    """
    local, global_ = model.set_schedule(total_steps)
    total = local + global_
    optimizer = model.configure_optimizers()
    model.train()
    log_every = max(total // 20, 1)
    history = []
    for step in range(total):
        losses = model.stage_losses(images, step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        if step % log_every == 0 or step == total - 1 or step == local or "local_distillation_fraction" in losses:
            row = {"step": step, "stage": model.stage(step), **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
            history.append(row)
            print(f"    {row}", flush=True)
    if global_ == 0:
        model.finish_local_stage()
    mean, std = model.compute_score_statistics(images)
    return {"history": history, "local_steps": local, "global_steps": global_,
            "local_distillation_fraction": round(model.local_distillation_fraction, 5),
            "score_normalisation": model.score_normalisation,
            "score_mean_median": [round(float(v), 6) for v in mean.median(dim=-1).values],
            "score_std_median": [round(float(v), 6) for v in std.median(dim=-1).values]}


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
def evaluate_score_modes(model: Any, data: dict[str, torch.Tensor], batch_size: int,  # noqa: ANN401
                         modes: list[str]) -> dict[str, dict[str, float]]:
    """Metrics of each score mode from one pass of the networks (the heads are computed once per image)."""
    glance = model.model.eval()
    glance.head_scores(data["image"][:1])  # warm-up (caches, allocator), as evaluate()
    start = time.perf_counter()
    heads = [glance.head_scores(data["image"][begin : begin + batch_size])
             for begin in range(0, len(data["image"]), batch_size)]
    s_iad = torch.cat([h[0] for h in heads])
    s_dad = torch.cat([h[1] for h in heads])
    glance.maps_from_patch_scores(glance.combine_scores(s_iad, s_dad, glance.score_mode))
    seconds = time.perf_counter() - start  # heads + fusion of the model's own score mode: a full inference pass
    out = {}
    for mode in modes:
        result = glance.maps_from_patch_scores(glance.combine_scores(s_iad, s_dad, mode))
        out[mode] = {"images_per_s": len(data["image"]) / seconds,
                     **raw_metrics(result.pred_score, result.anomaly_map, data["label"], data["mask"])}
    return out


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
    """Score the saved Glance model of dataset ``name`` with every ``--extra-lambda-s`` / ``--extra-normalisations``."""
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
    for normalisation in args.extra_normalisations:
        model.score_normalisation = normalisation
        model.compute_score_statistics(data["train"]["image"])
        for mode, metrics in evaluate_score_modes(model, data["test"], args.eval_batch_size, args.score_modes).items():
            label = f"glance[{mode},{normalisation}]"
            results[:] = [r for r in results if not (r["dataset"] == name and r["model"] == label)]
            results.append({"dataset": name, "model": label, "train_seconds": row["train_seconds"],
                            **{k: round(v, 4) for k, v in metrics.items()},
                            "local_distillation_fraction": row.get("local_distillation_fraction")})
            print(f"   {json.dumps(results[-1])}", flush=True)
    previous = json.loads(args.out.read_text())
    rescores = [*previous.get("rescore_commands", []), " ".join([sys.executable, *sys.argv])]
    args.out.write_text(json.dumps({**previous, "rescore_commands": rescores, "results": results}, indent=1))


@torch.no_grad()
def linear_rank_bound(model: Any, images: torch.Tensor, n_patches: int = 4096) -> float:  # noqa: ANN401
    """Held-out fraction left by the best rank-``feature_dim`` linear reconstruction of the teacher targets.

    Local-Net's ``feature_dim``-d feature reaches the targets only through the linear decoder, so no
    Local-Net can do better than the targets' own top principal components: fitted on ``n_patches``
    fresh training patches, applied to the held-out patches, as a fraction of the zero-predictor baseline.
    """
    teacher = model.model.teacher
    patches = model._sample_patches(images, n_patches)  # noqa: SLF001
    targets = torch.cat([teacher(chunk) for chunk in patches.split(256)])
    mean = targets.mean(0)
    rank = min(model.model.local_net.feature_dim, targets.shape[1])
    basis = torch.linalg.svd(targets - mean, full_matrices=False)[2][:rank].T
    heldout = model._heldout[1]  # noqa: SLF001
    reconstructed = (heldout - mean) @ basis @ basis.T + mean
    return float((reconstructed - heldout).square().sum(-1).mean()) / float(heldout.square().sum(-1).mean())


def stage1_study(args: argparse.Namespace, pre_trained: bool | str) -> int:
    """Stage 1 alone (Local-Net distillation) with each compactness variant; held-out fraction over time.

    Variants: ``paper`` (``lambda_c = 1`` from the first step), ``no_lc`` (``lambda_c = 0``), ``warmup``
    (the default ``lambda_c_warmup = (0.25, 0.5)``), ``balanced`` (``lambda_c = 1`` on ``L_c`` scaled by the
    detached mean feature std, which makes its gradient independent of the feature scale). Everything else
    is shared: same seed, teacher statistics, held-out patches (``Glance``'s own, 256 patches drawn at the
    first step) and batches of ``--stage1-batch-size`` patches. ``--set KEY=VALUE`` overrides Glance arguments
    (e.g. ``--set teacher_features=head --set standardise_local_input=false``, the settings before issue #15's
    second round). Each row also gives ``rank_bound_fraction`` (:func:`linear_rank_bound`): the held-out
    fraction no Local-Net of that feature dimension can beat through a linear decoder.
    """
    import yaml

    from anomalib_dskd import Glance, Rd
    from anomalib_dskd.models.glance.loss import compactness_loss, knowledge_distillation_loss

    name, layout, root, category = parse_dataset(args.dataset[0])
    images = load_split(layout, root, category, Rd.configure_pre_processor((256, 256)).transform)["train"]["image"]
    rows = []
    for variant in args.stage1_study:
        torch.manual_seed(args.seed)
        kwargs = {"backbone": args.backbone, "pre_trained": pre_trained, "evaluator": False, "visualizer": False,
                  "local_steps": args.stage1_steps, "global_steps": 0, "lr_local": args.stage1_lr,
                  "local_batch_size": args.stage1_batch_size,
                  "lambda_c": 0.0 if variant == "no_lc" else 1.0,
                  "lambda_c_warmup": (0.25, 0.5) if variant == "warmup" else (0.0, 0.0)}
        if args.teacher_std_floor is not None:
            kwargs["teacher_std_floor"] = args.teacher_std_floor
        kwargs["standardise_decoder_input"] = args.stage1_decoder == "standardised"
        overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
        kwargs.update(overrides)
        model = Glance(**kwargs)
        if args.stage1_init == "kaiming":
            for conv in (model.model.local_net.conv1, model.model.local_net.conv2, model.model.local_net.conv3,
                         model.model.local_net.conv4):
                torch.nn.init.kaiming_normal_(conv.weight, a=5e-3, mode="fan_in", nonlinearity="leaky_relu")
                torch.nn.init.zeros_(conv.bias)
        model.set_schedule(args.stage1_steps)
        optimizer = model.configure_optimizers()
        history, start, batch_losses = [], time.perf_counter(), []
        every = max(args.stage1_steps // 10, 1)
        for step in range(args.stage1_steps):
            if variant == "balanced":
                model._init_teacher_and_heldout(images)  # noqa: SLF001
                patches = model._sample_patches(images, model.local_batch_size)  # noqa: SLF001
                features = model.model.local_net(patches)
                l_k = knowledge_distillation_loss(model.model.decoder(features), model.model.teacher(patches))
                l_c = compactness_loss(features)
                losses = {"loss": l_k + l_c * features.std(0).mean().detach(), "loss_k": l_k, "loss_c": l_c}
            else:
                losses = model.local_stage_losses(images, step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            batch_losses.append(float(losses["loss_k"].detach()))
            if step % every == 0 or step == args.stage1_steps - 1:
                with torch.no_grad():
                    std = float(model.model.local_net(model._heldout[0]).std(0).median())  # noqa: SLF001
                row = {"step": step, "loss_k": round(float(losses["loss_k"]), 2), "loss_c": round(float(losses["loss_c"]), 3),
                       "heldout_fraction": round(model.measure_local_distillation(), 4), "feature_std_median": round(std, 4)}
                history.append(row)
                print(f"   {variant}: {row}", flush=True)
        baseline = float(model._heldout[1].square().sum(dim=-1).mean())  # noqa: SLF001
        bound = linear_rank_bound(model, images)
        print(f"   {variant}: best rank-{model.model.local_net.feature_dim} linear reconstruction of the targets "
              f"leaves {bound:.4f} of the held-out baseline", flush=True)
        rows.append({"dataset": name, "variant": variant, "decoder": args.stage1_decoder,
                     "overrides": overrides, "teacher_features": model.model.teacher.feature_layer,
                     "teacher_dim": model.model.teacher.feature_dim,
                     "standardise_local_input": model.standardise_local_input,
                     "rank_bound_fraction": round(bound, 4),
                     "steps": args.stage1_steps, "lr_local": args.stage1_lr,
                     "batch_size": args.stage1_batch_size, "teacher_std_floor": model.teacher_std_floor,
                     "init": args.stage1_init, "heldout_baseline": round(baseline, 1),
                     "max_batch_loss_k": round(max(batch_losses), 1),
                     "batches_over_5x_baseline": sum(v > 5 * baseline for v in batch_losses),
                     "final_heldout_fraction": history[-1]["heldout_fraction"], "final_loss_c": history[-1]["loss_c"],
                     "seconds": round(time.perf_counter() - start, 1), "history": history})
        print(f"== {variant}: held-out fraction {history[-1]['heldout_fraction']}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(args.out.read_text()).get("results", []) if args.out.exists() else []
        key = ("dataset", "variant", "decoder", "steps", "lr_local", "teacher_std_floor", "init", "teacher_features",
               "standardise_local_input")
        previous = [r for r in previous if tuple(r.get(k) for k in key) != tuple(rows[-1][k] for k in key)]
        commands = json.loads(args.out.read_text()).get("commands", []) if args.out.exists() else []
        command = " ".join([sys.executable, *sys.argv])
        args.out.write_text(json.dumps({"commands": [*[c for c in commands if c != command], command],
                                        "threads": args.threads, "seed": args.seed, "results": [*previous, rows[-1]]},
                                       indent=1))
    return 0


SUMMARY_MODELS = {"glance": "Glance", "glance[mixed]": "Glance", "glance[iad]": "Glance-IAD",
                  "glance[dad]": "Glance-DAD", "rd": "Rd"}


def _mean_or_none(values: list[float | None], digits: int) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.mean(known), digits) if known else None


def write_summary(paths: list[Path], cells: Path | None, out: Path) -> None:
    """``docs/benchmarks/glance/summary.json``: mean / std over seeds per (model, dataset).

    Glance rows (and ``rd`` rows, if any) come from this script's result files, one per seed; Rd and
    Padim rows from the standard profile's cells (``--summary-cells``, ``<Model>__<dataset>__seed<N>.json``)
    when the result files have no Rd row for a dataset.
    """
    per_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        for row in result["results"]:
            model = SUMMARY_MODELS.get(row["model"])
            if model is None or row["model"] == "glance" and any(
                    r["dataset"] == row["dataset"] and r["model"] == "glance[mixed]" for r in result["results"]):
                continue  # the main row duplicates glance[mixed] (same weights, same mode)
            per_key.setdefault((model, row["dataset"]), []).append(
                {"seed": result["seed"], "image_auroc": row["image_auroc"], "pixel_auroc": row["pixel_auroc"],
                 "aupro": row["aupro"], "fraction": row.get("local_distillation_fraction"),
                 "images_per_s": row.get("images_per_s"), "train_seconds": row.get("train_seconds"),
                 "source": str(path)})
    if cells is not None:
        datasets = sorted({dataset for _, dataset in per_key})
        for model in ("Rd", "Padim"):
            for dataset in datasets:
                if (model, dataset) in per_key:
                    continue
                for cell in sorted(cells.glob(f"{model}__{dataset}__seed*.json")):
                    if cell.name.endswith(".spec.json"):
                        continue
                    data = json.loads(cell.read_text())
                    metrics = data["metrics"]
                    per_key.setdefault((model, dataset), []).append(
                        {"seed": data["seed"], "image_auroc": metrics["image_AUROC"],
                         "pixel_auroc": metrics["pixel_AUROC"], "aupro": metrics["AUPRO"], "fraction": None,
                         # the whole Engine.test pass (data loading, post-processing, metrics included)
                         "images_per_s": data["data"]["test_images"] / data["timing"]["test_s"],
                         "train_seconds": data["timing"]["train_s"], "source": str(cell)})
    rows = []
    for (model, dataset), entries in sorted(per_key.items()):
        values = [e["image_auroc"] for e in entries]
        fractions = [e["fraction"] for e in entries if e["fraction"] is not None]
        rows.append({
            "model": model, "dataset": dataset,
            "image_auroc_mean": round(statistics.mean(values), 4),
            "image_auroc_std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "seeds": sorted(e["seed"] for e in entries),
            "local_distillation_fraction": round(statistics.mean(fractions), 4) if model.startswith("Glance") else None,
            "local_distillation_fraction_max": round(max(fractions), 4) if model.startswith("Glance") else None,
            "pixel_auroc_mean": round(statistics.mean(e["pixel_auroc"] for e in entries), 4),
            "aupro_mean": round(statistics.mean(e["aupro"] for e in entries), 4),
            "images_per_s_mean": _mean_or_none([e["images_per_s"] for e in entries], 3),
            "train_seconds_mean": _mean_or_none([e["train_seconds"] for e in entries], 1),
            "sources": sorted({e["source"] for e in entries}),
        })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(f"{row['model']:12s} {row['dataset']:13s} {row['image_auroc_mean']:.3f} +- {row['image_auroc_std']:.3f} "
              f"fraction {row['local_distillation_fraction']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary_from:
        write_summary(args.summary_from, args.summary_cells, args.summary_out)
        return 0
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

    if args.synthetic is not None:
        from anomalib_dskd.data import generate_mvtec_ad_category

        n_train, n_good, n_defect = args.synthetic_sizes
        folder = generate_mvtec_ad_category(args.synthetic, "parts", seed=args.seed, image_size=(256, 256),
                                            n_train=n_train, n_test_good=n_good, n_per_defect=n_defect, overwrite=True)
        args.dataset.insert(0, f"synthetic={args.synthetic}:{folder.name}")
    if args.stage1_study is not None:
        return stage1_study(args, pre_trained)

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
                info = train_glance(model, data["train"]["image"], args.total_steps)
            else:
                info = train_rd(model, data["train"]["image"], args.rd_epochs, args.rd_batch_size, args.seed)
            train_seconds = time.perf_counter() - start
            if args.save_models is not None:
                args.save_models.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), args.save_models / f"{name}_{model_name}.pt")
            extra_rows = []
            if model_name == "glance" and (len(args.score_modes) > 1 or args.score_modes != ["mixed"]):
                # one inference pass serves every score mode; the model's own mode is the main row
                by_mode = evaluate_score_modes(model, data["test"], args.eval_batch_size,
                                               sorted({*args.score_modes, model.model.score_mode}))
                metrics = dict(by_mode[model.model.score_mode])
            else:
                by_mode = {}
                metrics = evaluate(model, data["test"], args.eval_batch_size)
            metrics["latency_ms_batch1"] = latency_ms(model, data["test"]["image"][:1], args.latency_repeats)
            if by_mode:
                for mode, mode_metrics in by_mode.items():
                    if mode not in args.score_modes:
                        continue
                    extra_rows.append({"dataset": name, "model": f"glance[{mode}]", "train_seconds": round(train_seconds, 1),
                                       **{k: round(v, 4) for k, v in mode_metrics.items()},
                                       "local_distillation_fraction": info.get("local_distillation_fraction")})
                    print(f"   {json.dumps(extra_rows[-1])}", flush=True)
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
                **{k: v for k, v in info.items() if k != "history"},
            }
            print(f"   {json.dumps({k: v for k, v in row.items() if k != 'train_log'})}", flush=True)
            results.append(row)
            results.extend(extra_rows)
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
        speed = f"{r['images_per_s']:.2f} | {latency:.0f}" if latency else "- | -"
        print(f"| {r['dataset']} | {r['model']} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} "
              f"| {r['train_seconds']:.0f} | {speed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
