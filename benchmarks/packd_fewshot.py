"""Cross-dataset few-shot benchmark: Packd vs PatchCore (k-image memory bank) vs Rd trained on the k images.

Packd: "Prototype-Aware Contrastive Knowledge Distillation for Few-Shot Anomaly Detection" (Gu, Yang,
Ma; BMVC 2023). Not a test. Protocol:

* Packd is trained once per ``k`` on the training sources (and ``--generated`` synthetic MVTec AD
  categories), in groups of a query and ``k`` supports (``FewShotDataModule``'s sampler), never on the
  target. For each support draw it adapts to the target with ``set_support`` (one teacher pass over
  the ``k`` images; no training).
* PatchCore (anomalib) gets the same teacher (timm model with the same weights, anomalib's default
  MobileNetV2 layers of ``anomalib_dskd.benchmark.models``) and a memory bank of *all* patches of the
  same ``k`` images (no coreset: the bank is already tiny).
* Rd (this package) is trained from scratch on the same ``k`` images only (``--rd-steps`` Adam steps,
  batch = the ``k`` images).
* Support draws: ``FewShotDataModule.support_paths(draw)`` (seeded, identical for the three models).
* Metrics on the target's test set, raw scores / maps of the torch models at the model resolution:
  image AUROC, pixel AUROC, AU-PRO (anomalib ``AUPRO``, fpr_limit 0.3); adaptation time = wall seconds
  from the k raw images to a ready model (Packd: ``set_support``; PatchCore: feature extraction and
  memory bank; Rd: training).

Example (the command behind ``docs/models/packd.md``, "Measured")::

    CI=true OMP_NUM_THREADS=2 python benchmarks/packd_fewshot.py \\
        --train-source mvtec_loco:/work/shared/datasets/mvtec_loco_juice_bottle:juice_bottle \\
        --train-source mvtec_ad:/work/shared/datasets/battery_weld:weld \\
        --generated 2 --target mvtec_ad:/work/shared/datasets/mvtec3d_tire_rgb:tire \\
        --weights /work/shared/weights/mobilenet_v2-b0353104.pth --k 2 4 8 --draws 2 --epochs 1 \\
        --out benchmarks/results/packd_fewshot.json
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

import torch
from _common import raw_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--train-source",
        action="append",
        default=[],
        metavar="FORMAT:ROOT:CATEGORY",
        help="training category (repeatable), e.g. mvtec_ad:/data/battery_weld:weld",
    )
    parser.add_argument("--generated", type=int, default=2, help="synthetic MVTec AD categories added to training")
    parser.add_argument("--target", metavar="FORMAT:ROOT:CATEGORY", help="the unseen category (required unless --summary-from)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--train-k", type=int, default=None,
                        help="train Packd once with this k and adapt it to every --k (default: one training per k)")
    parser.add_argument("--latency", action="store_true",
                        help="export each model of the first draw at the first k to OpenVINO and time it (batch 1, f32)")
    parser.add_argument("--summary-from", type=Path, nargs="+", default=None,
                        help="only write the summary (--summary-out) from these result files of earlier runs")
    parser.add_argument("--summary-out", type=Path, default=None)
    parser.add_argument("--draws", type=int, default=3, help="support draws per k")
    parser.add_argument("--epochs", type=int, default=1, help="Packd training epochs")
    parser.add_argument("--max-batches", type=int, default=0, help="cap on Packd batches per epoch (0: none)")
    parser.add_argument("--groups", type=int, default=4, help="Packd groups (queries) per batch")
    parser.add_argument("--rd-steps", type=int, default=30, help="Adam steps of Rd on the k images")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default="/work/shared/weights/mobilenet_v2-b0353104.pth")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["packd", "patchcore", "rd"],
        help="packd, patchcore, rd; packd-foreign = control: Packd given k normal images of the\n"
        "first training category instead of the target's; packd-distill = the same weights and supports\n"
        "scored with the distillation map alone (support_score_weight 0, the paper's score)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def load_test_set(target: dict, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target test images ``(N, 3, S, S)`` in ``[0, 1]``, masks ``(N, S, S)`` and labels, in memory."""
    from torchvision.transforms.v2 import Resize

    from anomalib_dskd.data.few_shot import build_dataset

    dataset = build_dataset(target, "test", Resize((size, size), antialias=True))
    images, masks, labels = [], [], []
    for index in range(len(dataset)):
        item = dataset[index]
        images.append(torch.as_tensor(item.image))
        mask = item.gt_mask if item.gt_mask is not None else torch.zeros(size, size)
        masks.append(torch.as_tensor(mask).reshape(size, size).bool().int())
        labels.append(int(item.gt_label))
    return torch.stack(images), torch.stack(masks), torch.tensor(labels)


@torch.no_grad()
def predict(
    torch_model: torch.nn.Module, transform: Any, images: torch.Tensor, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores and maps of an eval-mode torch model."""
    torch_model.eval()
    scores, maps = [], []
    for start in range(0, len(images), chunk):
        out = torch_model(transform(images[start : start + chunk]))
        scores.append(out.pred_score.reshape(-1))
        maps.append(out.anomaly_map.reshape(-1, 1, *images.shape[-2:]))
    return torch.cat(scores), torch.cat(maps)


def bare_model(cls: type, args: argparse.Namespace) -> Any:  # noqa: ANN401
    """``cls`` with the benchmark's teacher and input size, no visualiser, evaluator or post-processor (seeded)."""
    torch.manual_seed(args.seed)
    return cls(
        backbone=args.backbone,
        pre_trained=args.weights,
        pre_processor=cls.configure_pre_processor((args.image_size, args.image_size)),
        visualizer=False,
        evaluator=False,
        post_processor=False,
    )


def train_packd(args: argparse.Namespace, k: int, sources: list[str], target: str) -> tuple[Any, Any, float]:
    from anomalib_dskd.data.few_shot import FewShotDataModule
    from anomalib_dskd.models.packd import Packd

    size = (args.image_size, args.image_size)
    model = bare_model(Packd, args)
    datamodule = FewShotDataModule(
        train_sources=sources,
        target=target,
        k_shot=k,
        seed=args.seed,
        image_size=size,
        train_batch_size=args.groups,
        num_support_draws=args.draws,
    )
    datamodule.setup()
    loader = datamodule.train_dataloader()
    model.configure_few_shot(k, loader.batch_sampler.categories_per_batch)
    optimizer = model.configure_optimizers()
    transform = model.pre_processor.transform
    start = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        for step, batch in enumerate(loader):
            if args.max_batches and step >= args.max_batches:
                break
            images = transform(batch.image)
            groups = images.reshape(-1, 1 + k, *images.shape[1:])
            out = model.model(groups[:, 0], groups[:, 1:])
            category = torch.arange(groups.shape[0]) % model.categories_per_batch
            loss, parts = model.loss(
                out["teacher"], out["student"], out["prototypes"], category[:, None] != category[None], out["support"]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(
            f"  packd k={k} epoch {epoch}: loss {loss.item():.4f} { {n: round(v.item(), 4) for n, v in parts.items()} }",
            flush=True,
        )
    return model, datamodule, time.perf_counter() - start


def adapt_patchcore(args: argparse.Namespace, supports: torch.Tensor) -> tuple[Any, float]:
    from anomalib.models import Patchcore

    from anomalib_dskd.benchmark.models import feature_layers
    from anomalib_dskd.weights import create_timm_model

    size = (args.image_size, args.image_size)
    model = Patchcore(
        backbone=create_timm_model(args.backbone, pre_trained=args.weights).eval(),
        layers=feature_layers("Patchcore", args.backbone),
        pre_trained=False,
        pre_processor=Patchcore.configure_pre_processor(size),
        visualizer=False,
        evaluator=False,
        post_processor=False,
    )
    start = time.perf_counter()
    model.model.train()
    with torch.no_grad():
        bank = model.model(model.pre_processor.transform(supports))
    model.model.memory_bank = bank
    model.model.embedding_store.clear() if hasattr(model.model.embedding_store, "clear") else None
    return model, time.perf_counter() - start


def adapt_rd(args: argparse.Namespace, supports: torch.Tensor) -> tuple[Any, float]:
    from anomalib_dskd.models.rd import Rd

    model = bare_model(Rd, args)
    start = time.perf_counter()
    optimizer = model.configure_optimizers()
    images = model.pre_processor.transform(supports)
    model.model.train()
    for _ in range(args.rd_steps):
        loss = model.loss(*model.model(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary_from:
        write_summary(args.summary_from, args.summary_out or Path("docs/benchmarks/packd/summary.json"))
        return 0
    if not args.target:
        raise SystemExit("packd_fewshot.py: --target FORMAT:ROOT:CATEGORY is required (unless --summary-from)")
    torch.set_num_threads(args.threads)
    from anomalib_dskd.data import generate_mvtec_ad_category
    from anomalib_dskd.data.few_shot import parse_specs

    target = parse_specs(args.target)[0]
    work = Path(tempfile.mkdtemp(prefix="packd_bench_"))
    sources = list(args.train_source)
    for index in range(args.generated):
        name = f"generated_{index}"
        generate_mvtec_ad_category(
            work,
            name,
            seed=100 + index,
            image_size=(args.image_size, args.image_size),
            n_train=max(args.k) + 8,
            n_test_good=2,
            n_per_defect=1,
        )
        sources.append(f"mvtec_ad:{work}:{name}")
    images, masks, labels = load_test_set(target, args.image_size)
    print(
        f"target {target['category']}: {len(images)} test images ({int(labels.sum())} anomalous); sources {sources}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    latencies: dict[str, Any] = {}
    uses_packd = any(name.startswith("packd") for name in args.models)
    trained = None
    if uses_packd and args.train_k is not None:
        trained = train_packd(args, args.train_k, sources, args.target)
    for k in args.k:
        packd = datamodule = None
        packd_train = None
        if uses_packd:
            if trained is None:
                packd, datamodule, packd_train = train_packd(args, k, sources, args.target)
            else:
                from anomalib_dskd.data.few_shot import FewShotDataModule

                packd, _, packd_train = trained
                datamodule = FewShotDataModule(train_sources=sources, target=args.target, k_shot=k, seed=args.seed,
                                               image_size=(args.image_size,) * 2, train_batch_size=args.groups,
                                               num_support_draws=args.draws)
                datamodule.setup()
        else:
            from anomalib_dskd.data.few_shot import FewShotDataModule

            datamodule = FewShotDataModule(
                train_sources=[],
                target=args.target,
                k_shot=k,
                seed=args.seed,
                image_size=(args.image_size,) * 2,
                num_support_draws=args.draws,
            )
            datamodule.setup()
        for draw in range(args.draws):
            supports = datamodule.support_images(draw)
            for name in args.models:
                if name == "packd-foreign":  # control: supports of a training category, not of the target
                    train_data = datamodule.train_data
                    foreign = torch.stack(
                        [torch.as_tensor(train_data[i].image) for i in train_data.category_indices[0][draw : draw + k]]
                    )
                    packd.eval()
                    start = time.perf_counter()
                    packd.set_support(foreign)
                    model, adapt = packd, time.perf_counter() - start
                elif name in {"packd", "packd-distill"}:
                    start = time.perf_counter()
                    packd.eval()
                    packd.set_support(supports)
                    model, adapt = packd, time.perf_counter() - start
                elif name == "patchcore":
                    model, adapt = adapt_patchcore(args, supports)
                elif name == "rd":
                    model, adapt = adapt_rd(args, supports)
                else:
                    raise SystemExit(f"unknown model {name}")
                saved = (packd.model.support_score_weight, packd.model.image_score) if packd is not None else None
                if name == "packd-distill":
                    packd.model.support_score_weight, packd.model.image_score = 0.0, "map"
                try:
                    scores, maps = predict(model.model, model.pre_processor.transform, images)
                finally:
                    if packd is not None:
                        packd.model.support_score_weight, packd.model.image_score = saved
                metrics = raw_metrics(scores, maps, labels, masks)
                row = {"model": name, "k": k, "draw": draw, "adapt_s": adapt, **metrics}
                if name.startswith("packd"):
                    row["train_s"] = packd_train
                    row["train_k"] = args.train_k or k
                if args.latency and k == args.k[0] and draw == 0 and name in {"packd", "patchcore", "rd"}:
                    latencies[name] = openvino_timing(model, args, name)
                    print(f"  {name} OpenVINO: {latencies[name]}", flush=True)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarise(rows, args.models, args.k)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                        "args": {k: str(v) for k, v in vars(args).items()}, "target": target["category"],
                        "rows": rows, "summary": summary, "openvino": latencies}, indent=2)
        )
    return 0


def summarise(rows: list[dict[str, Any]], models: list[str], ks: list[int]) -> list[dict[str, Any]]:
    """Mean and population std over the draws per (model, k); prints the markdown table."""
    summary = []
    print("\n| model | k | image AUROC | pixel AUROC | AU-PRO | adapt s |\n|---|---|---|---|---|---|")
    for name in models:
        for k in ks:
            sel = [r for r in rows if r["model"] == name and r["k"] == k]
            if not sel:
                continue
            entry = {"model": name, "k": k, "draws": len(sel)}
            for key in ("image_auroc", "pixel_auroc", "aupro", "adapt_s"):
                values = [r[key] for r in sel]
                entry[key] = statistics.mean(values)
                entry[key + "_std"] = statistics.pstdev(values)
            summary.append(entry)
            print(
                f"| {name} | {k} | {100 * entry['image_auroc']:.1f} ± {100 * entry['image_auroc_std']:.1f} | "
                f"{100 * entry['pixel_auroc']:.1f} ± {100 * entry['pixel_auroc_std']:.1f} | "
                f"{100 * entry['aupro']:.1f} ± {100 * entry['aupro_std']:.1f} | {entry['adapt_s']:.2f} |"
            )
    return summary


def read_result(path: Path) -> dict[str, Any]:
    """A result file, or the printed log of a run stopped before it wrote one (its per-draw JSON lines)."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith('{"model"')]
    target = next(line.split()[1].rstrip(":") for line in lines if line.startswith("target "))
    models = list(dict.fromkeys(r["model"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    return {"target": target, "rows": rows, "summary": summarise(rows, models, ks), "partial_log": True}


SUMMARY_NAMES = {"packd": "Packd", "packd-foreign": "Packd-foreign", "patchcore": "Patchcore-k", "rd": "Rd-k",
                 "packd-distill": "Packd-distill"}


def openvino_timing(model: Any, args: argparse.Namespace, name: str) -> dict[str, float]:  # noqa: ANN401
    """Export ``model`` (its current supports / memory bank) to OpenVINO and time batch-1 f32 inference."""
    from anomalib_dskd.benchmark.measure import export_openvino, openvino_latency, openvino_size_mb

    size = (args.image_size, args.image_size)
    xml = export_openvino(model, Path(tempfile.mkdtemp(prefix=f"packd_ov_{name}_")), size)
    stats = openvino_latency(xml, size, threads=args.threads)
    return {"median_ms": round(stats["median"], 2), "size_mb": round(openvino_size_mb(xml), 2), "threads": args.threads}


def write_summary(paths: list[Path], out: Path) -> None:
    """``docs/benchmarks/packd/summary.json``: one row per (model, target, k) over the result files."""
    rows = []
    for path in paths:
        result = read_result(Path(path))
        for entry in result["summary"]:
            rows.append({"model": SUMMARY_NAMES.get(entry["model"], entry["model"]), "target": result["target"],
                         "k": entry["k"], "image_auroc_mean": round(entry["image_auroc"], 4),
                         "image_auroc_std": round(entry["image_auroc_std"], 4), "draws": entry["draws"],
                         "pixel_auroc_mean": round(entry["pixel_auroc"], 4), "aupro_mean": round(entry["aupro"], 4),
                         "adapt_s_mean": round(entry["adapt_s"], 3), "source": str(path)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    sys.exit(main())
