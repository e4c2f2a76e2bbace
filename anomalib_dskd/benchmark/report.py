"""The report: ``results.json``, ``results.csv``, ``results.md`` and PNG plots, from the cell files.

* ``results.json``: ``{"meta": run.json (versions, machine, command, config, runs), "cells": [...]}``,
  every cell's full result document.
* ``results.csv``: one row per cell, columns :data:`CSV_COLUMNS` (empty = not measured / not applicable).
* ``results.md``: accuracy per dataset (mean +- sample std over seeds when there are several),
  speed / size / memory per model, notes (teachers that differ from the shared one, failures with
  their errors, skipped models).
* ``accuracy_vs_latency.png``: mean image AUROC over the datasets against batch-1 latency;
  ``per_category.png``: image AUROC, pixel AUROC and AU-PRO per dataset and model.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CSV_COLUMNS", "METRIC_COLUMNS", "flatten", "write_report"]

#: CSV column -> metric name logged by the evaluator
METRIC_COLUMNS = {
    "image_auroc": "image_AUROC",
    "pixel_auroc": "pixel_AUROC",
    "aupro": "AUPRO",
    "image_auroc_logical": "image_AUROC_logical",
    "image_auroc_structural": "image_AUROC_structural",
    "image_auroc_loco_mean": "image_AUROC_mean",
    "auspro_005_mean": "AUSPRO_mean_0.05",
    "auspro_005_logical": "AUSPRO_logical_0.05",
    "auspro_005_structural": "AUSPRO_structural_0.05",
}
#: columns of ``results.csv``
CSV_COLUMNS = (
    "cell_id", "model", "model_class", "source", "dataset", "dataset_format", "seed", "status", "error",
    "family", "epochs_budget", "steps_budget", "epochs_run", "steps_run", "teacher", "teacher_note", *METRIC_COLUMNS,
    "fit_s", "epoch_s", "test_s", "latency_torch_ms", "latency_openvino_f32_ms", "latency_openvino_int8_ms",
    "latency_torch_min_ms", "latency_openvino_f32_min_ms", "latency_openvino_int8_min_ms",
    "peak_rss_mb", "peak_rss_train_test_mb", "params_m", "openvino_f32_mb", "openvino_int8_mb",
    "train_images", "test_images", "cell_s", "cell_cpu_s", "load_avg_start", "load_avg_end", "started_at", "finished_at",
)  # fmt: skip


def _get(data: dict[str, Any], *keys: str) -> Any:  # noqa: ANN401
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _subset_mean(metrics: dict[str, Any], mean_key: str, subset_keys: Sequence[str]) -> float | None:
    """The logged LOCO mean, or the mean of the subsets present (a dataset without structural anomalies)."""
    value = metrics.get(mean_key)
    if _numbers([value]):
        return float(value)
    present = _numbers(metrics.get(k) for k in subset_keys)
    return statistics.fmean(present) if present else None


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """One CSV row of a cell result."""
    metrics = dict(result.get("metrics") or {})
    metrics["AUSPRO_mean_0.05"] = _subset_mean(metrics, "AUSPRO_mean_0.05", ["AUSPRO_logical_0.05", "AUSPRO_structural_0.05"])
    metrics["image_AUROC_mean"] = _subset_mean(metrics, "image_AUROC_mean", ["image_AUROC_logical", "image_AUROC_structural"])
    params = _get(result, "size", "params")
    row = {
        "cell_id": result.get("cell_id"),
        "model": result.get("model"),
        "model_class": result.get("model_class"),
        "source": result.get("source"),
        "dataset": result.get("dataset"),
        "dataset_format": result.get("dataset_format"),
        "seed": result.get("seed"),
        "status": result.get("status"),
        "error": result.get("error"),
        "family": result.get("family"),
        "epochs_budget": result.get("epochs_budget"),
        "steps_budget": result.get("steps_budget"),
        "steps_run": _get(result, "timing", "global_steps"),
        "epochs_run": _get(result, "timing", "epochs_run"),
        "teacher": result.get("teacher"),
        "teacher_note": result.get("teacher_note"),
        **{column: metrics.get(name) for column, name in METRIC_COLUMNS.items()},
        "fit_s": _get(result, "timing", "fit_s"),
        "epoch_s": _get(result, "timing", "epoch_s_mean"),
        "test_s": _get(result, "timing", "test_s"),
        "latency_torch_ms": _get(result, "latency_ms", "torch", "median"),
        "latency_openvino_f32_ms": _get(result, "latency_ms", "openvino_f32", "median"),
        "latency_openvino_int8_ms": _get(result, "latency_ms", "openvino_int8", "median"),
        "latency_torch_min_ms": _get(result, "latency_ms", "torch", "min"),
        "latency_openvino_f32_min_ms": _get(result, "latency_ms", "openvino_f32", "min"),
        "latency_openvino_int8_min_ms": _get(result, "latency_ms", "openvino_int8", "min"),
        "peak_rss_mb": _get(result, "memory_mb", "peak_rss"),
        "peak_rss_train_test_mb": _get(result, "memory_mb", "peak_rss_train_test"),
        "params_m": None if params is None else params / 1e6,
        "openvino_f32_mb": _get(result, "size", "openvino_f32_mb"),
        "openvino_int8_mb": _get(result, "size", "openvino_int8_mb"),
        "train_images": _get(result, "data", "train_images"),
        "test_images": _get(result, "data", "test_images"),
        "cell_s": _get(result, "timing", "cell_s"),
        "cell_cpu_s": _get(result, "timing", "cell_cpu_s"),
        "load_avg_start": (_get(result, "load_average", "start") or [None])[0],
        "load_avg_end": (_get(result, "load_average", "end") or [None])[0],
        "started_at": result.get("started_at"),
        "finished_at": result.get("finished_at"),
    }
    return {key: row.get(key) for key in CSV_COLUMNS}


# ==================================================================================================
# Formatting
# ==================================================================================================
def _numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _fmt_stat(values: Sequence[Any], digits: int = 3) -> str:
    numbers = _numbers(values)
    if not numbers:
        return "–"
    mean = statistics.fmean(numbers)
    if len(numbers) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(numbers):.{digits}f}"


def _fmt(value: Any, digits: int = 1) -> str:  # noqa: ANN401
    numbers = _numbers([value])
    return f"{numbers[0]:.{digits}f}" if numbers else "–"


def _unique(values: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _epochs_equivalent(result: dict[str, Any], default_batch: int | None) -> float | None:
    """Passes over the training images made by a step-budgeted model (batches / batches per epoch)."""
    value = _get(result, "timing", "epochs_equivalent")
    if _numbers([value]):
        return float(value)
    batches = _get(result, "timing", "train_batches") or _get(result, "timing", "global_steps")
    images = _get(result, "data", "train_images")
    batch = _get(result, "data", "train_batch_size") or default_batch
    if not (batches and images and batch):
        return None
    return batches / math.ceil(images / batch)


def _markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:  # noqa: C901, PLR0912, PLR0915
    rows = [flatten(r) for r in results]
    default_batch = _get(meta, "config", "data", "train_batch_size") or 8
    models = _unique(r["model"] for r in rows)
    datasets = _unique(r["dataset"] for r in rows)
    seeds = _unique(r["seed"] for r in rows)
    footnotes: list[str] = []

    def note(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    env = meta.get("environment") or {}
    versions = env.get("versions") or {}
    machine = env.get("machine") or {}
    runs = meta.get("runs") or []
    lines = [f"# Benchmark `{meta.get('profile', '')}`", ""]
    if runs:
        lines.append(f"Command: `{runs[-1].get('command')}`" + (f" (run {len(runs)} times, resumed)" if len(runs) > 1 else ""))
    lines.append(
        f"Machine: {machine.get('cpu', '?')}, {machine.get('usable_cpus', '?')} usable CPU cores, "
        f"{machine.get('memory_gb', '?')} GiB RAM, no GPU. Seeds: {', '.join(str(s) for s in seeds)}.",
    )
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    git = env.get("git") or {}
    if git.get("commit"):
        lines.append(f"Code: commit {git['commit'][:12]}{' + uncommitted changes' if git.get('dirty') else ''}.")
    lines.append("")

    # ---------------------------------------------------------------- accuracy per dataset
    teachers = [r["teacher"] for r in rows if r["teacher"]]
    shared_teacher = max(set(teachers), key=teachers.count) if teachers else None
    lines += ["## Accuracy", ""]
    if shared_teacher:
        lines.append(f"Shared teacher (`shared` in the tables): {shared_teacher}.")
        lines.append("")
    lines.append(
        "Image AUROC, pixel AUROC and AU-PRO (anomalib `AUPRO`, FPR limit 0.3) on each dataset's test set; "
        "for MVTec LOCO data also AU-sPRO at FPR 0.05 (mean of the anomaly subsets present) and image AUROC per "
        "subset (package LOCO evaluator). "
        + ("Mean ± sample standard deviation over seeds. " if len(seeds) > 1 else "One seed: no error bars. ")
        + "– = not applicable or not measured.",
    )
    lines.append("")
    for dataset in datasets:
        drows = [r for r in rows if r["dataset"] == dataset]
        loco = any(r["dataset_format"] in ("mvtec_loco", "synthetic_loco") for r in drows)
        note_text = next((x.get("dataset_note") for x in results if x.get("dataset") == dataset and x.get("dataset_note")), None)
        lines.append(f"### {dataset}" + (f" ({note_text})" if note_text else ""))
        lines.append("")
        columns = ["model", "image AUROC", "pixel AUROC", "AU-PRO"]
        keys = ["image_auroc", "pixel_auroc", "aupro"]
        if loco:
            columns += ["AU-sPRO@0.05", "img AUROC logical", "img AUROC structural"]
            keys += ["auspro_005_mean", "image_auroc_logical", "image_auroc_structural"]
        columns += ["training", "teacher"]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for model in models:
            mrows = [r for r in drows if r["model"] == model]
            if not mrows:
                continue
            ok = [r for r in mrows if r["status"] == "ok"]
            teacher = mrows[0]["teacher"] or "–"
            if shared_teacher and teacher.startswith(shared_teacher):
                teacher = "shared" + teacher[len(shared_teacher):]
            teacher_note = next((r["teacher_note"] for r in mrows if r["teacher_note"]), None)
            if teacher_note:
                teacher += " " + note(teacher_note)
            if not ok:
                status = mrows[0]["status"]
                error = str(mrows[0]["error"] or "")
                marker = note(f"{model} on {dataset}: {status}: {error}")
                cells = [f"**{status}** {marker}"] + ["–"] * (len(keys) - 1)
                lines.append("| " + " | ".join([model, *cells, "–", teacher]) + " |")
                continue
            values = [_fmt_stat([r[k] for r in ok]) for k in keys]
            epochs = _unique(r["epochs_run"] for r in ok)
            epochs_text = "/".join(str(e) for e in epochs if e is not None) or "–"
            mresults = [x for x in results if x.get("model") == model and x.get("dataset") == dataset and x.get("status") == "ok"]
            steps = _unique(_get(x, "timing", "global_steps") for x in mresults)
            budget_steps = _unique(x.get("steps_budget") for x in mresults)
            own_steps = _unique(_get(x, "timing", "max_steps_effective") for x in mresults)
            if any(budget_steps) or any(own_steps):
                passes = _unique(_epochs_equivalent(x, default_batch) for x in mresults)
                passes_text = "/".join(f"{p:.1f}" for p in passes if p is not None)
                epochs_text = "/".join(f"{s} steps" for s in steps if s) + (f" ({passes_text} ep.)" if passes_text else "")
            if any(own_steps) and own_steps != budget_steps:
                epochs_text += " " + note(
                    f"{model} trains for a number of iterations set by the model (its kwargs), not by the family budget",
                )
            if not any(own_steps) and any(
                r["epochs_run"] is not None and r["epochs_budget"] and r["epochs_run"] < r["epochs_budget"] for r in ok
            ):
                epochs_text += " " + note("stopped before the epoch budget (wall-clock budget or model's own limit)")
            if any(x.get("budget_override") for x in results if x.get("model") == model):
                epochs_text += " " + note(f"{model}: the model entry overrides its family's budget")
            failed = [r for r in mrows if r["status"] != "ok"]
            if failed:
                values[0] += " " + note(f"{model} on {dataset}: {len(failed)} of {len(mrows)} seeds failed: {failed[0]['error']}")
            lines.append("| " + " | ".join([model, *values, epochs_text, teacher]) + " |")
        lines.append("")

    # ---------------------------------------------------------------- summary over datasets
    if len(datasets) > 1:
        lines += ["### Mean over datasets", ""]
        lines.append("Mean of the per-dataset values (seeds averaged first); only models that ran on every dataset.")
        lines.append("")
        lines.append("| model | image AUROC | pixel AUROC | AU-PRO |")
        lines.append("|---|---|---|---|")
        for model in models:
            per_dataset = []
            for dataset in datasets:
                ok = [r for r in rows if r["model"] == model and r["dataset"] == dataset and r["status"] == "ok"]
                if not ok:
                    break
                per_dataset.append([statistics.fmean(_numbers([r[k] for r in ok]) or [math.nan]) for k in ("image_auroc", "pixel_auroc", "aupro")])
            if len(per_dataset) != len(datasets):
                continue
            means = [_fmt_stat([d[i] for d in per_dataset]).split(" ± ")[0] for i in range(3)]
            lines.append(f"| {model} | " + " | ".join(means) + " |")
        lines.append("")

    # ---------------------------------------------------------------- speed
    lines += ["## Speed, memory and size", ""]
    speed_rows = [
        r for r in rows
        if r["status"] == "ok" and (r["latency_torch_ms"] is not None or r["latency_openvino_f32_ms"] is not None)
    ]
    speed_datasets = _unique(r["dataset"] for r in speed_rows)
    settings = next((x["latency_ms"].get("settings") for x in results if (x.get("latency_ms") or {}).get("settings")), {}) or {}
    lines.append(
        f"Latency: batch 1, {settings.get('threads', '?')} threads, median of {settings.get('runs', '?')} runs after "
        f"{settings.get('warmup', '?')} warm-up runs, whole pipeline (pre-processing, model, post-processing) on the CPU; "
        "OpenVINO with f32 inference precision, INT8 = NNCF post-training quantisation calibrated on training images. "
        "Training: s / epoch = time of one pass over the training images (validation excluded; for a step budget, "
        "time per batch x batches per epoch), fit s = wall time of `Engine.fit` (validation and memory-bank "
        "building included). "
        "Peak memory: maximum resident set size of the cell's process during training and testing. "
        "Parameters include the frozen teacher; memory banks are buffers, counted in the exported size."
        + (f" Measured on the {', '.join(speed_datasets)} cell(s)." if speed_datasets else ""),
    )
    lines.append("")
    lines.append("| model | torch ms | OpenVINO f32 ms | OpenVINO INT8 ms | s / epoch | fit s | peak RSS MiB | params M | OV f32 MiB | OV INT8 MiB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        mrows = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        if not mrows:
            continue
        measured = [r for r in mrows if r["latency_torch_ms"] is not None or r["latency_openvino_f32_ms"] is not None]
        base = measured or mrows
        cells = [
            _fmt_stat([r["latency_torch_ms"] for r in measured], 1),
            _fmt_stat([r["latency_openvino_f32_ms"] for r in measured], 1),
            _fmt_stat([r["latency_openvino_int8_ms"] for r in measured], 1),
            _fmt_stat([r["epoch_s"] for r in base], 1),
            _fmt_stat([r["fit_s"] for r in base], 0),
            _fmt_stat([r["peak_rss_train_test_mb"] for r in base], 0),
            _fmt_stat([r["params_m"] for r in base], 2),
            _fmt_stat([r["openvino_f32_mb"] for r in measured], 1),
            _fmt_stat([r["openvino_int8_mb"] for r in measured], 1),
        ]
        errors = next(((x.get("errors") or {}) for x in results if x.get("model") == model and x.get("errors")), {})
        if errors:
            cells[0] += " " + note(f"{model}: measurement errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")

    # ---------------------------------------------------------------- notes
    run_notes = _unique(n for run in runs for n in (run.get("notes") or []))
    if footnotes or run_notes:
        lines += ["## Notes", ""]
        for index, text in enumerate(footnotes, 1):
            lines.append(f"{index}. {text}")
        for text in run_notes:
            lines.append(f"- {text}")
        lines.append("")
    wall = _numbers(r["cell_s"] for r in rows)
    cpu = _numbers(r["cell_cpu_s"] for r in rows)
    if wall:
        run_walls = _numbers(run.get("wall_s") for run in runs)
        lines.append(
            f"Time: {len(rows)} cells, {sum(wall) / 60:.1f} min of cell wall time"
            + (f" ({sum(run_walls) / 60:.1f} min for the whole run{'s' if len(run_walls) > 1 else ''})" if run_walls else "")
            + (f", {sum(cpu) / 60:.1f} min of CPU time (all threads) in the cells" if cpu else "")
            + ".",
        )
        lines.append("")
    loads = _numbers(r["load_avg_start"] for r in rows) + _numbers(r["load_avg_end"] for r in rows)
    if loads:
        lines.append(
            f"Machine load (1-min load average at cell start / end): {min(loads):.1f} to {max(loads):.1f} "
            f"on {machine.get('usable_cpus', '?')} cores. Timings taken while other processes used the CPU are slower "
            "and noisier than on an idle machine.",
        )
        lines.append("")
    return "\n".join(lines)


# ==================================================================================================
# Plots
# ==================================================================================================
def _plots(results: list[dict[str, Any]], output: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [flatten(r) for r in results if r.get("status") == "ok"]
    files: dict[str, str] = {}
    if not rows:
        return files
    models = _unique(r["model"] for r in rows)
    datasets = _unique(r["dataset"] for r in rows)
    not_ok = {(r.get("model"), r.get("dataset")): r.get("status") for r in results if r.get("status") != "ok"}
    source = {r["model"]: r["source"] for r in rows}

    # accuracy vs latency
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    plotted = False
    for ax, key, title in zip(
        axes,
        ("latency_torch_ms", "latency_openvino_f32_ms", "latency_openvino_int8_ms"),
        ("torch", "OpenVINO f32", "OpenVINO INT8"),
        strict=True,
    ):
        for model in models:
            mrows = [r for r in rows if r["model"] == model]
            latency = _numbers(r[key] for r in mrows)
            per_dataset = [
                statistics.fmean(_numbers(r["image_auroc"] for r in mrows if r["dataset"] == d) or [math.nan])
                for d in datasets
            ]
            if not latency or any(math.isnan(v) for v in per_dataset):
                continue
            x, y = statistics.median(latency), statistics.fmean(per_dataset)
            marker = "o" if source.get(model) == "package" else "s"
            ax.scatter([x], [y], marker=marker, s=60, color="tab:blue" if marker == "o" else "tab:orange")
            ax.annotate(model, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            plotted = True
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} latency, batch 1, ms (log)")
        ax.set_title(f"accuracy vs {title} latency")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"image AUROC, mean over {len(datasets)} dataset(s)")
    fig.text(0.5, -0.02, "circles: anomalib-dskd models; squares: anomalib built-ins", ha="center", fontsize=8)
    fig.tight_layout()
    if plotted:
        path = output / "accuracy_vs_latency.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        files["accuracy_vs_latency"] = str(path)
    plt.close(fig)

    # per-category bars
    keys = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AU-PRO")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(7, 1.6 * len(datasets) * max(1, len(models)) / 3), 3 * len(keys)))
    width = 0.8 / max(1, len(models))
    for ax, (key, label) in zip(axes, keys, strict=True):
        for index, model in enumerate(models):
            means, errors = [], []
            for dataset in datasets:
                values = _numbers(r[key] for r in rows if r["model"] == model and r["dataset"] == dataset)
                means.append(statistics.fmean(values) if values else math.nan)
                errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            xs = [d + (index - (len(models) - 1) / 2) * width for d in range(len(datasets))]
            ax.bar(xs, means, width=width, yerr=errors if any(errors) else None, label=model, capsize=2)
            for x, mean, dataset in zip(xs, means, datasets, strict=True):
                if math.isnan(mean) and (model, dataset) in not_ok:
                    ax.text(x, 0.02, not_ok[(model, dataset)], rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(datasets)))
        ax.set_xticklabels(datasets)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.0)
        if "auroc" in key:
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="model")
    axes[0].set_title("accuracy per dataset (dotted: chance level for AUROC)")
    fig.tight_layout()
    path = output / "per_category.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    files["per_category"] = str(path)
    plt.close(fig)
    return files


def write_report(output: str | Path, cells: Sequence[Any] | None = None) -> dict[str, str]:
    """Build the report in ``output`` from the cell result files.

    Args:
        output: the results folder (with ``cells/`` and ``run.json``).
        cells: the grid's :class:`~anomalib_dskd.benchmark.config.CellSpec` objects, to report them
            in grid order (pending ones left out); default: every result in ``cells/``.

    Returns:
        Report file kind -> path.
    """
    output = Path(output)
    cells_dir = output / "cells"
    meta_path = output / "run.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if cells is not None:
        paths = [cells_dir / f"{c.cell_id}.json" for c in cells]
    else:
        paths = sorted(p for p in cells_dir.glob("*.json") if not p.name.endswith(".spec.json"))
    results = []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "cell_id" in data:
            results.append(data)
    files: dict[str, str] = {}
    json_path = output / "results.json"
    json_path.write_text(json.dumps({"meta": meta, "cells": results}, indent=2, default=str) + "\n", encoding="utf-8")
    files["json"] = str(json_path)
    csv_path = output / "results.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for result in results:
            writer.writerow(flatten(result))
    files["csv"] = str(csv_path)
    md_path = output / "results.md"
    md_path.write_text(_markdown(results, meta) + "\n", encoding="utf-8")
    files["markdown"] = str(md_path)
    files.update(_plots(results, output))
    return files
