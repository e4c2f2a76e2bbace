"""Accuracy of Dskd against its local student alone (the package's ``Rd`` with the per-pixel loss) on real data.

Trains each model with the same teacher, epochs, batch and seed on an MVTec LOCO category, tests
it, and prints image AUROC, pixel AUROC and AU-PRO (anomalib ``AUPRO``, FPR limits 0.3 and 0.05),
the epochs and the wall time. For Dskd it also scores the test set with each of its two students
alone (their standardised maps), to show what each contributes.

Metrics are computed on the raw scores and maps: the post-processor's min-max normalisation is
disabled. With a validation set of normal images only (MVTec LOCO's), anomalib's normalisation
clamps every score above ``max_normal + (max_normal - min_normal) / 2`` to 1, and the resulting
ties lower the AUROC of any model (thresholds are still computed, for the predicted labels).

``--checkpoints name=path,...`` re-tests trained checkpoints instead of training.

Usage (CPU, in the background)::

    CI=true nohup python benchmarks/dskd_accuracy.py \\
        --root /work/shared/datasets/mvtec_loco_juice_bottle --category juice_bottle \\
        --weights /work/shared/weights/mobilenet_v2-b0353104.pth --epochs 15 --batch 8 --threads 2 \\
        > dskd_accuracy.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("CI", "true")
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def evaluator():  # noqa: ANN201
    from anomalib.metrics import AUPRO, Evaluator

    from anomalib_dskd.metrics import raw_auroc

    return Evaluator(
        test_metrics=[
            raw_auroc(["pred_score", "gt_label"], prefix="image_"),
            raw_auroc(["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel05_", strict=False, fpr_limit=0.05),
        ]
    )


class EpochLog:
    """Print one line per training epoch (time, loss) - the run is long and has no progress bar."""

    def __init__(self, name: str) -> None:
        from lightning.pytorch import Callback

        outer = self
        self.losses: list[dict[str, float]] = []

        class _Log(Callback):
            def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
                outer.start = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
                losses = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("train_loss")}
                outer.losses.append(losses)
                elapsed = time.perf_counter() - outer.start
                print(f"[{name}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {elapsed:.0f}s {losses}", flush=True)

        self.callback = _Log()


def raw_post_processor():  # noqa: ANN201
    from anomalib.post_processing import PostProcessor

    return PostProcessor(enable_normalization=False)


def binary_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of raw scores (ties count one half; no sigmoid)."""
    from anomalib_dskd.metrics.spro_core import image_auroc

    scores, labels = scores.double().numpy(), labels.bool().numpy()
    return image_auroc(scores[labels], scores[~labels])


def run(name: str, args: argparse.Namespace) -> dict:
    from anomalib.data import MVTecLOCO
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_dskd.models.dskd import Dskd
    from anomalib_dskd.models.rd import Rd

    seed_everything(args.seed, workers=True)
    datamodule = MVTecLOCO(
        root=args.root,
        category=args.category,
        train_batch_size=args.batch,
        eval_batch_size=args.batch,
        num_workers=args.workers,
        seed=args.seed,
    )
    components = {"evaluator": evaluator(), "post_processor": raw_post_processor(), "visualizer": False}
    common = {"backbone": args.backbone, "pre_trained": args.weights, **components}
    checkpoint = dict(item.split("=", 1) for item in args.checkpoints.split(",") if item).get(name)
    model_class = {"dskd": Dskd, "rd": Rd}[name]
    scales = {"global_map_scales": args.global_map_scales} if name == "dskd" and args.global_map_scales else {}
    if checkpoint:
        model = model_class.load_from_checkpoint(checkpoint, map_location="cpu", **components, **scales)
    elif name == "dskd":
        model = Dskd(
            gccb_channels=args.gccb_channels,
            affinity_chunk_size=args.chunk,
            global_embedding=args.global_embedding,
            **common,
            **scales,
        )
    else:
        model = Rd(loss_mode="pixel", **common)
    out = Path(args.out) / name
    log = EpochLog(name)
    engine = Engine(
        max_epochs=args.epochs,
        default_root_dir=out,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[log.callback],
    )
    start = time.perf_counter()
    if not checkpoint:
        engine.fit(model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    if checkpoint and scales:  # the checkpoint's Eq. 8 statistics belong to its own map scales
        engine.validate(model, datamodule=datamodule, verbose=False)
    start = time.perf_counter()
    metrics = engine.test(model, datamodule=datamodule, verbose=False)[0]
    test_s = time.perf_counter() - start
    result = {
        "seed": args.seed,
        "model": name,
        **scales,
        **({"global_embedding": model.model.global_embedding} if name == "dskd" else {}),
        "train_loss_per_epoch": log.losses,
        "epochs": args.epochs,
        "fit_s": round(fit_s, 1),
        "test_s": round(test_s, 1),
        **metrics,
    }
    if name == "dskd":
        result["statistics_mean"] = model.model.map_mean.tolist()
        result["statistics_std"] = model.model.map_std.tolist()
        result["statistics_images"] = float(model.model.statistics_images)
        predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
        labels = torch.cat([batch.gt_label for batch in predictions])
        for student in model.model.students:
            scores = torch.cat([getattr(batch, f"anomaly_map_{student}").amax(dim=(-3, -2, -1)) for batch in predictions])
            result[f"image_AUROC_{student}_student_only"] = binary_auroc(scores, labels)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--weights", required=True, help="teacher checkpoint (e.g. mobilenet_v2-b0353104.pth)")
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--models", default="dskd,rd")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gccb-channels", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="results/dskd_accuracy")
    parser.add_argument(
        "--global-embedding", default="teacher_stage", choices=["teacher_stage", "fused"], help="Dskd's OCBE_glo"
    )
    parser.add_argument("--checkpoints", default="", help="name=path,... : test these instead of training")
    parser.add_argument(
        "--global-map-scales",
        type=lambda text: [int(item) for item in text.split(",")],
        default=None,
        help="Dskd's global_map_scales, e.g. 1,2 (with --checkpoints: statistics are recomputed on validation)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run(name, args) for name in args.models.split(",")]
    keys = ["image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel05_AUPRO", "fit_s"]
    print(f"\n{args.category}, {args.backbone} teacher, {args.epochs} epochs, batch {args.batch}, seed {args.seed}")
    print(f"{'model':8} " + " ".join(f"{k:>14}" for k in keys))
    for result in results:
        print(f"{result['model']:8} " + " ".join(f"{result.get(k, float('nan')):14.3f}" for k in keys))
    for result in results:
        extra = {k: round(v, 3) for k, v in result.items() if k.endswith("_student_only")}
        if extra:
            print(f"{result['model']} per-student image AUROC: {extra}")


if __name__ == "__main__":
    main()
