"""One cell of the grid: train, test and measure one model on one dataset with one seed.

Run by the runner in a fresh subprocess (``python -m anomalib_dskd.benchmark.cell SPEC.json
RESULT.json``), so that a crash cannot stop the grid and the peak memory (``ru_maxrss``) is the cell's
own. The result is one JSON document (:data:`RESULT_KEYS`); training or testing errors make the cell
``failed`` (with the error and traceback), measurement errors are recorded under ``errors`` and leave
the accuracy numbers in place.

Evaluation: image AUROC, pixel AUROC and AU-PRO (anomalib ``AUPRO``, ``fpr_limit`` 0.3) for every
dataset; for MVTec LOCO data also the package's LOCO evaluation (per-subset image AUROC and AU-sPRO
at every official limit, headline 0.05) when :mod:`anomalib_dskd.metrics` is available. With
``evaluation.raw_predictions`` (default) the metrics see the model's raw maps and scores, before
anomalib's post-processor normalises and clamps them (clamping turns the highest scores into ties);
all metrics used are rank-based, so this changes nothing else.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from anomalib_dskd.benchmark.config import CellSpec

logger = logging.getLogger(__name__)

__all__ = ["RESULT_KEYS", "SCHEMA_VERSION", "build_evaluator", "main", "run_cell", "write_json"]

SCHEMA_VERSION = 1
#: keys of every cell result
RESULT_KEYS = (
    "schema_version", "cell_id", "spec_hash", "status", "error", "traceback",
    "model", "model_class", "source", "family", "dataset", "dataset_format", "dataset_note", "seed",
    "image_size", "epochs_budget", "steps_budget", "max_time", "budget_override", "teacher", "teacher_note",
    "metrics", "timing", "latency_ms", "memory_mb", "size", "data", "errors", "notes",
    "load_average", "started_at", "finished_at",
)  # fmt: skip


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:  # noqa: ANN401
    """Write JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def empty_result(spec: CellSpec, status: str = "pending", error: str | None = None) -> dict[str, Any]:
    """A result document with every key, filled from the spec."""
    return {
        "schema_version": SCHEMA_VERSION,
        "cell_id": spec.cell_id,
        "spec_hash": spec.spec_hash(),
        "status": status,
        "error": error,
        "traceback": None,
        "model": spec.model.label,
        "model_class": spec.model.class_name,
        "source": spec.model.source,
        "family": spec.model.family,
        "dataset": spec.dataset.name,
        "dataset_format": spec.dataset.format,
        "dataset_note": spec.dataset.note,
        "seed": spec.seed,
        "image_size": list(spec.image_size),
        "epochs_budget": spec.model.epochs,
        "steps_budget": spec.model.steps,
        "max_time": spec.model.max_time,
        "budget_override": spec.model.budget_override,
        "teacher": None,
        "teacher_note": None,
        "metrics": {},
        "timing": {},
        "latency_ms": {},
        "memory_mb": {},
        "size": {},
        "data": {},
        "errors": {},
        "notes": [],
        "load_average": {},
        "started_at": None,
        "finished_at": None,
    }


def _stage(cell_dir: Path, text: str) -> None:
    logger.info("[cell] %s", text)
    print(f"[cell {_now()}] {text}", flush=True)
    try:
        (cell_dir / "stage").write_text(text)
    except OSError:  # pragma: no cover - progress display only
        pass


# ==================================================================================================
# Evaluator
# ==================================================================================================
def _raw_first(evaluator: Any, trainer: Any) -> None:  # noqa: ANN401
    """Move ``evaluator`` before anomalib's post-processor among the trainer's callbacks."""
    from anomalib.post_processing import PostProcessor

    callbacks = trainer.callbacks
    if evaluator not in callbacks:
        return
    mine = callbacks.index(evaluator)
    post = next((i for i, cb in enumerate(callbacks) if isinstance(cb, PostProcessor)), None)
    if post is not None and post < mine:
        callbacks.insert(post, callbacks.pop(mine))


def build_evaluator(spec: CellSpec, cell_dir: Path) -> tuple[Any, list[str]]:
    """The evaluator of a cell (same metrics for every model of a dataset).

    Returns:
        ``(evaluator, notes)``; a note says when the LOCO metrics could not be set up.
    """
    from anomalib.metrics import AUPRO, AUROC, Evaluator

    from anomalib_dskd.metrics.raw import raw_auroc

    evaluation = spec.evaluation
    raw = bool(evaluation["raw_predictions"])

    # raw scores are not in [0, 1]: torchmetrics' default sigmoid would turn them into ties
    auroc = raw_auroc if raw else AUROC

    def common(pixel_auroc: bool) -> list[Any]:
        metrics = [auroc(fields=["pred_score", "gt_label"], prefix="image_")]
        if pixel_auroc:
            metrics.append(auroc(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False))
        metrics.append(AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=float(evaluation["aupro_fpr_limit"]), strict=False))
        return metrics

    notes: list[str] = []
    if spec.dataset.is_loco and evaluation["loco"] == "auto":
        try:
            from anomalib_dskd.metrics import LocoEvaluator

            limit = float(evaluation["spro_limit"])
            limits = tuple(sorted({0.01, 0.05, 0.1, 0.3, 1.0, limit}))
            evaluator = LocoEvaluator(
                dataset_root=spec.dataset.root,
                integration_limits=limits,
                raw_predictions=raw,
                pixel_auroc=True,
                save_dir=cell_dir / "loco_evaluation",
            )
            for metric in common(pixel_auroc=False):
                evaluator.test_metrics.append(metric)
            return evaluator, notes
        except Exception as err:  # noqa: BLE001 - the LOCO metrics are a teammate's module
            notes.append(f"LOCO metrics unavailable ({type(err).__name__}: {err}); AU-sPRO and per-subset AUROC missing")

    class BenchmarkEvaluator(Evaluator):
        """anomalib's Evaluator, optionally scoring raw (un-normalised) predictions."""

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
            del pl_module
            if raw and trainer is not None:
                _raw_first(self, trainer)

    return BenchmarkEvaluator(test_metrics=common(pixel_auroc=True)), notes


# ==================================================================================================
# The cell
# ==================================================================================================
def _epoch_timer() -> Any:  # noqa: ANN401
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        """Wall time of every training epoch, validation excluded (Lightning validates inside the epoch)."""

        def __init__(self) -> None:
            self.durations: list[float] = []
            self.validation: list[float] = []
            self.batches = 0
            self.batches_per_epoch: int | None = None
            self.last_validation_step: int | None = None
            self.losses: list[dict[str, float]] = []
            self._start = 0.0
            self._val_start = 0.0
            self._val_in_epoch = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
            self._start = time.perf_counter()
            self._val_in_epoch = 0.0

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
            self._val_start = time.perf_counter()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
            elapsed = time.perf_counter() - self._val_start
            self._val_in_epoch += elapsed
            self.validation.append(elapsed)
            if not trainer.sanity_checking:
                self.last_validation_step = trainer.global_step

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:  # noqa: ANN401
            self.batches += 1

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401
            self.durations.append(time.perf_counter() - self._start - self._val_in_epoch)
            # the epoch means of the logged training losses (``train_loss_epoch`` and its parts), the
            # curve the budget is chosen from (training data only, never the test set)
            self.losses.append({
                name.removesuffix("_epoch"): round(float(value), 6)
                for name, value in trainer.callback_metrics.items()
                if name.startswith("train_") and name.endswith("_epoch") and getattr(value, "numel", lambda: 1)() == 1
            })
            batches = getattr(trainer, "num_training_batches", None)
            if isinstance(batches, int) and batches > 0:
                self.batches_per_epoch = batches

    return EpochTimer()


def _keep_checkpoint(engine: Any, path: Path) -> None:  # noqa: ANN401
    """Save the model's weights, hyperparameters and pre/post-processor state, without the optimiser or
    the cell's evaluator (its metric states hold the whole test set's maps: hundreds of MiB).

    Load it with ``<Model>.load_from_checkpoint(path, strict=False)`` (the fresh model's default
    evaluator has keys the saved one did not keep).
    """
    import torch

    engine.trainer.save_checkpoint(path, weights_only=True)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("evaluator.")}
    torch.save(checkpoint, path)


def _per_student_metrics(engine: Any, model: Any, datamodule: Any, students: tuple[str, ...]) -> dict[str, float]:  # noqa: ANN401
    """Image AUROC of the fused score and of each student's map alone, per LOCO subset, on raw outputs.

    Keys ``image_AUROC_<subset>_fused`` and ``image_AUROC_<subset>_<student>_student`` (subset ``all``,
    ``logical``, ``structural`` where the test set has it), scored by
    :func:`anomalib_dskd.benchmark.detection.score_predictions` on predictions with the post-processor's
    normalisation off.
    """
    from anomalib_dskd.benchmark.detection import score_predictions

    post = model.post_processor
    saved = getattr(post, "enable_normalization", None)
    if saved is not None:
        post.enable_normalization = False
    try:
        predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader(), return_predictions=True)
    finally:
        if saved is not None:
            post.enable_normalization = saved
    scored = score_predictions(list(predictions or []), extra_maps=tuple(f"anomaly_map_{s}" for s in students))
    out: dict[str, float] = {}
    for key, value in scored.items():
        if not key.startswith("image_auroc_") or key.endswith("_inverted"):
            continue
        rest = key.removeprefix("image_auroc_")
        subset, _, student = rest.partition("_")
        name = f"image_AUROC_{subset}_{student}_student" if student else f"image_AUROC_{subset}_fused"
        out[name] = value
    return out


def _float_metrics(results: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, value in sorted(results.items()):
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[name] = number if number == number else None  # NaN (e.g. an empty LOCO subset) -> missing
    return out


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def run_cell(spec: CellSpec, cell_dir: Path) -> dict[str, Any]:  # noqa: C901, PLR0915
    """Train, test and measure one cell. Never raises for errors inside the cell: they go in the result.

    Args:
        spec: the cell.
        cell_dir: working folder of the cell (engine outputs, exports, LOCO evaluation).

    Returns:
        The result document (keys :data:`RESULT_KEYS`).
    """
    os.environ.setdefault("CI", "true")
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    result = empty_result(spec, status="running")
    result["started_at"] = _now()
    result["load_average"]["start"] = list(os.getloadavg())
    started = time.perf_counter()

    from anomalib_dskd.benchmark.measure import cpu_seconds, peak_rss_mb

    try:
        _stage(cell_dir, "setup")
        import torch
        from anomalib.callbacks.checkpoint import ModelCheckpoint
        from anomalib.engine import Engine
        from lightning.pytorch import seed_everything

        from anomalib_dskd.benchmark.data import build_datamodule
        from anomalib_dskd.benchmark.models import build_model

        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        result["notes"].append(
            f"torch threads: {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        )
        seed_everything(spec.seed, workers=True)
        datamodule = build_datamodule(spec.dataset, spec.data, spec.seed)
        evaluator, notes = build_evaluator(spec, cell_dir)
        result["notes"].extend(notes)
        built = build_model(spec, evaluator)
        model = built.module
        result["teacher"], result["teacher_note"] = built.teacher, built.teacher_note

        timer = _epoch_timer()
        trainer_args: dict[str, Any] = {
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **spec.trainer,
        }
        trainer_args["max_epochs"] = spec.model.epochs if spec.model.epochs is not None else -1
        if spec.model.steps is not None:
            trainer_args["max_steps"] = spec.model.steps
        if spec.model.max_time is not None:
            trainer_args["max_time"] = spec.model.max_time
        engine = Engine(
            callbacks=[timer, ModelCheckpoint(dirpath=cell_dir / "checkpoints", save_top_k=0, save_last=False)],
            logger=False,
            default_root_dir=cell_dir / "engine",
            **trainer_args,
        )
        _stage(cell_dir, f"train ({spec.model.budget_text()})")
        fit_start, fit_cpu_start = time.perf_counter(), cpu_seconds()
        engine.fit(model=model, datamodule=datamodule)
        if timer.last_validation_step is None or timer.last_validation_step != engine.trainer.global_step:
            # A step or time budget can stop training before the epoch-end validation: validate the final
            # weights, so that anomalib's normalisation statistics and thresholds (and model calibrations
            # such as Dskd's) exist in the tested and exported model.
            _stage(cell_dir, "validate final weights")
            engine.validate(model=model, datamodule=datamodule, verbose=False)
            result["notes"].append("validated after fit (training stopped between epoch-end validations)")
        fit_seconds = time.perf_counter() - fit_start
        result["timing"]["fit_cpu_s"] = cpu_seconds() - fit_cpu_start
        result["memory_mb"]["peak_rss_fit"] = peak_rss_mb()
        result["notes"].extend(built.notes)
        trainer = engine.trainer
        result["timing"]["max_epochs_effective"] = getattr(trainer, "max_epochs", None)
        max_steps = getattr(trainer, "max_steps", -1)
        result["timing"]["max_steps_effective"] = max_steps if max_steps and max_steps > 0 else None
        result["timing"]["global_steps"] = getattr(trainer, "global_step", None)
        result["data"] = {
            "train_batch_size": int(spec.data.get("train_batch_size") or 0) or None,
            "train_images": len(datamodule.train_data),
            "val_images": len(getattr(datamodule, "val_data", []) or []),
            "test_images": len(datamodule.test_data),
        }

        _stage(cell_dir, "test")
        test_start, test_cpu_start = time.perf_counter(), cpu_seconds()
        results = engine.test(model=model, datamodule=datamodule, verbose=False)
        result["timing"]["test_cpu_s"] = cpu_seconds() - test_cpu_start
        result["timing"] = {
            **result["timing"],
            "fit_s": fit_seconds,
            "epochs_run": len(timer.durations),
            "train_s": sum(timer.durations),
            "train_batches": timer.batches,
            "epochs_equivalent": (timer.batches / timer.batches_per_epoch) if timer.batches_per_epoch else None,
            "epoch_s_mean": _epoch_seconds(timer),
            "epoch_s": timer.durations,
            "validation_s": timer.validation,
            "test_s": time.perf_counter() - test_start,
        }
        result["metrics"] = _float_metrics(results[0] if results else {})
        if any(timer.losses):
            result["train_loss_per_epoch"] = timer.losses
        students = tuple(getattr(getattr(model, "model", None), "students", ()) or ())
        if len(students) > 1:  # Dskd: each student's map scored alone as well as the fused one (paper Table 4)
            _stage(cell_dir, "score each student alone")
            result["metrics"].update(_per_student_metrics(engine, model, datamodule, students))
        if spec.evaluation.get("keep_checkpoint"):
            # the trained, validated and tested model (post-processor statistics included), loadable with
            # ``<Model>.load_from_checkpoint``: later studies (INT8, scoring options) re-use it without retraining
            _keep_checkpoint(engine, cell_dir / "model.ckpt")
            result["notes"].append(f"checkpoint kept: {cell_dir.name}/model.ckpt")
        result["memory_mb"]["peak_rss_train_test"] = peak_rss_mb()
        result["size"]["params"] = _count(model)
        result["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - a failing cell is reported, the grid continues
        result["status"] = "failed"
        result["error"] = _error_text(err)
        result["traceback"] = traceback.format_exc()
        _stage(cell_dir, f"failed: {result['error'][:200]}")
        return _finish(result, started)

    if spec.measure_speed:
        _measure(spec, model, datamodule, cell_dir, result)
    else:
        result["notes"].append("speed not measured in this cell (measure.speed_on)")
    return _finish(result, started)


def _epoch_seconds(timer: Any) -> float | None:  # noqa: ANN401
    """Training time of one full pass over the training images (validation excluded).

    With a step budget the last epoch is usually partial: the time per batch times the number of
    batches in an epoch is reported instead of the mean over (partial) epochs.
    """
    durations = timer.durations
    if not durations:
        return None
    per_epoch = timer.batches_per_epoch
    if per_epoch and timer.batches and timer.batches != per_epoch * len(durations):
        return sum(durations) / timer.batches * per_epoch
    return sum(durations) / len(durations)


def _count(model: Any) -> int | None:  # noqa: ANN401
    from anomalib_dskd.benchmark.measure import count_parameters

    try:
        return count_parameters(model.model)
    except Exception:  # noqa: BLE001
        return None


def _measure(spec: CellSpec, model: Any, datamodule: Any, cell_dir: Path, result: dict[str, Any]) -> None:  # noqa: ANN401
    """Latency in every runtime, exported sizes; errors are recorded per measurement."""
    from anomalib_dskd.benchmark import measure as m

    settings = spec.measure
    runtimes = list(settings["runtimes"])
    size = tuple(spec.image_size)
    timing = {"warmup": int(settings["warmup"]), "runs": int(settings["runs"]), "threads": settings["threads"]}
    errors = result["errors"]
    result["latency_ms"]["settings"] = {**timing, "batch": 1}

    if "torch" in runtimes:
        _stage(cell_dir, "latency torch")
        try:
            result["latency_ms"]["torch"] = m.torch_latency(model, size, **timing)
        except Exception as err:  # noqa: BLE001
            errors["torch"] = _error_text(err)

    export_dir = cell_dir / "export"
    f32_xml = None
    if "openvino_f32" in runtimes or "openvino_int8" in runtimes:
        _stage(cell_dir, "export openvino")
        try:
            start = time.perf_counter()
            f32_xml = m.export_openvino(model, export_dir / "f32", size, int(settings["opset_version"]))
            result["timing"]["export_s"] = time.perf_counter() - start
            result["size"]["openvino_f32_mb"] = m.openvino_size_mb(f32_xml)
        except Exception as err:  # noqa: BLE001
            errors["export"] = _error_text(err)
    if f32_xml is not None and "openvino_f32" in runtimes:
        _stage(cell_dir, "latency openvino f32")
        try:
            result["latency_ms"]["openvino_f32"] = m.openvino_latency(f32_xml, size, **timing)
        except Exception as err:  # noqa: BLE001
            errors["openvino_f32"] = _error_text(err)
    if f32_xml is not None and "openvino_int8" in runtimes:
        _stage(cell_dir, "quantise int8 (nncf)")
        try:
            start = time.perf_counter()
            images = m.calibration_images(datamodule, int(settings["int8_calibration_images"]), size)
            int8_xml = m.quantize_int8(f32_xml, images, export_dir / "int8", **m.model_int8_types(model))
            result["timing"]["quantize_s"] = time.perf_counter() - start
            result["size"]["openvino_int8_mb"] = m.openvino_size_mb(int8_xml)
            result["size"]["int8_calibration_images"] = len(images)
            _stage(cell_dir, "latency openvino int8")
            result["latency_ms"]["openvino_int8"] = m.openvino_latency(int8_xml, size, **timing)
        except Exception as err:  # noqa: BLE001
            errors["openvino_int8"] = _error_text(err)
    if not settings.get("keep_exports"):
        shutil.rmtree(export_dir, ignore_errors=True)


def _finish(result: dict[str, Any], started: float) -> dict[str, Any]:
    from anomalib_dskd.benchmark.measure import cpu_seconds, peak_rss_mb

    result["memory_mb"]["peak_rss"] = peak_rss_mb()
    result["timing"]["cell_s"] = time.perf_counter() - started
    result["timing"]["cell_cpu_s"] = cpu_seconds()
    result["load_average"]["end"] = list(os.getloadavg())
    result["finished_at"] = _now()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m anomalib_dskd.benchmark.cell SPEC.json RESULT.json [CELL_DIR]``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m anomalib_dskd.benchmark.cell SPEC.json RESULT.json [CELL_DIR]", file=sys.stderr)
        return 2
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    cell_dir = Path(argv[2]) if len(argv) == 3 else result_path.with_suffix("")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = CellSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
    result = run_cell(spec, cell_dir)
    write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
