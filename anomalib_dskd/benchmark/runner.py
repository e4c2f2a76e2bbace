"""Run the grid: one subprocess per cell, one JSON per finished cell, resumable.

Output folder layout::

    <output>/
      results.json  results.csv  results.md  accuracy_vs_latency.png  per_category.png   (the report)
      run.json                       # versions, machine, command, config of every (resumed) run
      data/<dataset>/...             # generated synthetic datasets
      cells/<cell_id>.json           # one result per finished cell (the resume state)
      cells/<cell_id>.spec.json      # what the cell was asked to do
      cells/<cell_id>.log            # its stdout / stderr
      cells/<cell_id>/               # its working folder (engine output, LOCO evaluation, exports)

Resume: a cell whose JSON exists with the same spec hash and status ``ok``, ``failed`` or ``skipped``
is not recomputed (``retry_failed`` re-runs failed ones, ``force`` all). A cell whose spec changed
(other epochs, other kwargs, ...) is recomputed. An interrupted cell left no JSON and is run again.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_dskd.benchmark.cell import empty_result, run_cell, write_json
from anomalib_dskd.benchmark.config import BenchmarkConfig, CellSpec, ConfigError

__all__ = ["FINISHED", "collect_environment", "load_cell_result", "run_benchmark", "select_cells"]

#: statuses of a finished cell (not recomputed on resume)
FINISHED = ("ok", "failed", "skipped")
_VERSION_PACKAGES = (
    "anomalib_dskd", "anomalib", "torch", "torchvision", "lightning", "timm", "openvino", "nncf", "onnx",
    "onnxscript", "numpy",
)  # fmt: skip


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def collect_environment() -> dict[str, Any]:
    """Versions, machine and git state for the report."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        memory_gb = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        usable = os.cpu_count()
    machine = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": memory_gb,
        "gpu": "none used (CPU benchmark)",
    }
    git = {}
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=False)  # noqa: S607
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10, check=False)  # noqa: S607
        if commit.returncode == 0:
            git = {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "machine": machine, "git": git}


def load_cell_result(path: Path) -> dict[str, Any] | None:
    """A cell's result, or ``None`` when missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _reusable(result: dict[str, Any] | None, spec: CellSpec, retry_failed: bool) -> bool:
    if not result or result.get("spec_hash") != spec.spec_hash():
        return False
    status = result.get("status")
    return status in FINISHED and not (retry_failed and status == "failed")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill(proc: Any) -> None:  # noqa: ANN401
    """End a cell process that this runner started (its own process group, by its id)."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the cell's own session (it called setsid / start_new_session)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(proc.pid, sig)  # a forked cell that has not reached setsid yet
            except (ProcessLookupError, PermissionError):
                pass

    try:
        send(signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


def _run_subprocess(  # noqa: PLR0913
    spec: CellSpec,
    cells_dir: Path,
    timeout_s: float | None,
    bar: Any,  # noqa: ANN401
    isolation: str = "subprocess",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one cell in its own process (fresh interpreter, or forked from the warm fork server).

    A crash, an out-of-memory kill or a timeout becomes a failed result.
    """
    spec_path = cells_dir / f"{spec.cell_id}.spec.json"
    result_path = cells_dir / f"{spec.cell_id}.json"
    log_path = cells_dir / f"{spec.cell_id}.log"
    work_dir = cells_dir / spec.cell_id
    write_json(spec_path, spec.to_dict())
    result_path.unlink(missing_ok=True)
    env = {**(env or {}), **os.environ, "CI": "true", "OPENVINO_TELEMETRY_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "anomalib_dskd.benchmark.cell", str(spec_path), str(result_path), str(work_dir)]
    started = time.monotonic()
    live = sys.stderr.isatty()  # a log file gets one line per stage, a terminal a ticking clock
    shown = ""
    with log_path.open("w", encoding="utf-8") as log:
        if isolation == "forkserver":
            log.write(f"forked from the fork server: cell {spec_path} -> {result_path}\n")
            log.flush()
            process = _forkserver_context().Process(
                target=_forked_cell, args=(str(spec_path), str(result_path), str(work_dir), str(log_path)),
                name=f"cell-{spec.cell_id}",
            )
            process.start()
            proc: Any = _ForkedProcess(process)
        else:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # noqa: S603
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                elapsed = time.monotonic() - started
                if bar is not None:
                    try:
                        stage = (work_dir / "stage").read_text()[:40]
                    except OSError:
                        stage = "starting"
                    if live or stage != shown:
                        clock = f" ({elapsed:.0f}s)" if live else ""
                        bar.set_postfix_str(f"{spec.cell_id}: {stage}{clock}", refresh=True)
                        shown = stage
                if timeout_s and elapsed > timeout_s:
                    _kill(proc)
                    result = empty_result(spec, status="failed", error=f"timeout: the cell ran longer than {timeout_s:.0f} s")
                    result["traceback"] = _tail(log_path)
                    result["finished_at"] = _now()
                    write_json(result_path, result)
                    return result
        except BaseException:
            _kill(proc)
            raise
    result = load_cell_result(result_path)
    if result is None:
        result = empty_result(
            spec,
            status="failed",
            error=f"the cell process exited with code {proc.returncode} without a result (crash or out of memory?)",
        )
        result["traceback"] = _tail(log_path)
        result["finished_at"] = _now()
        write_json(result_path, result)
    return result


def _forked_cell(spec_path: str, result_path: str, work_dir: str, log_path: str) -> None:
    """Body of a cell forked from the fork server: own session, output to the cell's log."""
    os.setsid()  # its own process group, so that a timeout can end it and anything it started
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    from anomalib_dskd.benchmark.cell import main

    sys.exit(main([spec_path, result_path, work_dir]))


class _ForkedProcess:
    """``subprocess.Popen``-like view of a ``multiprocessing`` process (poll, wait, pid, returncode)."""

    def __init__(self, process: Any) -> None:  # noqa: ANN401
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("cell", timeout or 0)
        return self.process.exitcode


_FORKSERVER: Any = None


def _forkserver_context() -> Any:  # noqa: ANN401
    """The ``forkserver`` multiprocessing context, preloading torch / anomalib once."""
    global _FORKSERVER  # noqa: PLW0603
    if _FORKSERVER is None:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["anomalib_dskd.benchmark._preload"])
        _FORKSERVER = context
    return _FORKSERVER


def _interrupt_on_sigterm() -> Any:  # noqa: ANN401
    """Turn SIGTERM into KeyboardInterrupt while the grid runs, so that the running cell is ended too.

    (A background job started from a non-interactive shell ignores SIGINT; ``kill PID`` sends SIGTERM.)
    Returns the previous handler, or ``None`` when not in the main thread.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:  # noqa: ANN401
        del signum, frame
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def select_cells(
    cells: Sequence[Any],
    *,
    models: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
) -> list[Any]:
    """The cells of the grid that the ``--model`` / ``--dataset`` filters keep (all when a filter is empty).

    Raises:
        ConfigError: a filter names a model label or dataset the config does not have.
    """
    cells = list(cells)
    if models:
        unknown = sorted(set(models) - {c.model.label for c in cells})
        if unknown:
            msg = f"--model {unknown} not in the config's models {sorted({c.model.label for c in cells})}"
            raise ConfigError(msg)
        cells = [c for c in cells if c.model.label in set(models)]
    if datasets:
        unknown = sorted(set(datasets) - {c.dataset.name for c in cells})
        if unknown:
            msg = f"--dataset {unknown} not in the config's datasets {sorted({c.dataset.name for c in cells})}"
            raise ConfigError(msg)
        cells = [c for c in cells if c.dataset.name in set(datasets)]
    return cells


def run_benchmark(  # noqa: C901, PLR0912, PLR0915
    config: BenchmarkConfig,
    output: str | Path,
    *,
    force: bool = False,
    retry_failed: bool = False,
    models: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    max_cells: int | None = None,
    progress: bool = True,
    command: str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the benchmark grid and write the report.

    Args:
        config: the loaded config (validated here, before anything runs).
        output: the results folder.
        force: recompute every cell.
        retry_failed: recompute failed cells (finished ``ok`` / ``skipped`` cells are kept).
        models: only these model labels (default: all).
        datasets: only these dataset names (default: all).
        max_cells: stop after running this many cells (reused cells do not count); the rest is
            left for a later, resumed run.
        progress: show a tqdm progress bar.
        command: the command line to record (default: ``sys.argv``).
        report: write the report at the end.

    Returns:
        Summary: cell ids that ``ran``, were ``reused``, ``failed``, were ``skipped``, were left
        ``pending``, and the ``report`` files.

    Raises:
        ConfigError: the config is invalid, or a ``models`` / ``datasets`` filter matches nothing.
    """
    from tqdm.auto import tqdm

    from anomalib_dskd.benchmark.data import prepare_dataset
    from anomalib_dskd.benchmark.models import availability

    cells = select_cells(config.cells(), models=models, datasets=datasets)  # validates before any training

    output = Path(output).expanduser().resolve()
    cells_dir = output / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)

    # synthetic data is generated once, before the grid (cells share it)
    for dataset in {id(c.dataset): c.dataset for c in cells}.values():
        if dataset.is_synthetic:
            prepare_dataset(dataset, output / "data", config.image_size)
    for cell in cells:  # the dataset objects are shared between cells, but be explicit
        if cell.dataset.is_synthetic and cell.dataset.root is None:  # pragma: no cover
            prepare_dataset(cell.dataset, output / "data", config.image_size)

    run_info = {
        "started_at": _now(),
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cwd": os.getcwd(),
        "config_file": str(config.path) if config.path else None,
        "variables": config.variables,
        "notes": list(config.notes),
        "load_average_start": list(os.getloadavg()),
    }
    meta_path = output / "run.json"
    meta = load_cell_result(meta_path) or {}
    meta.update({"profile": config.name, "config": config.raw, "environment": collect_environment()})
    meta.setdefault("runs", []).append(run_info)
    write_json(meta_path, meta)

    summary: dict[str, Any] = {"ran": [], "reused": [], "failed": [], "skipped": [], "pending": [], "report": {}}
    timeout_s = config.runner["cell_timeout_s"]
    isolation = config.runner["isolation"]
    cell_env = dict(config.runner["env"])  # defaults: a variable already set in the environment wins
    if isolation == "forkserver" and _FORKSERVER is None:
        # the fork server inherits this process's environment when it starts (OpenMP reads it at import)
        for key, value in cell_env.items():
            os.environ.setdefault(key, value)
    run_info["cell_env"] = {key: os.environ.get(key, value) for key, value in cell_env.items()}
    run_info["isolation"] = isolation
    write_json(meta_path, meta)
    bar = tqdm(total=len(cells), desc=f"benchmark {config.name}", unit="cell", disable=not progress, dynamic_ncols=True)
    ran = 0
    wall_start = time.monotonic()
    previous_handler = _interrupt_on_sigterm()
    try:
        for spec in cells:
            result_path = cells_dir / f"{spec.cell_id}.json"
            previous = load_cell_result(result_path)
            if not force and _reusable(previous, spec, retry_failed):
                summary["reused"].append(spec.cell_id)
                if previous.get("status") == "failed":
                    summary["failed"].append(spec.cell_id)
                if previous.get("status") == "skipped":
                    summary["skipped"].append(spec.cell_id)
                bar.update(1)
                continue
            if max_cells is not None and ran >= max_cells:
                summary["pending"].append(spec.cell_id)
                continue
            reason = availability(spec.model)
            if reason is not None:
                result = empty_result(spec, status="skipped", error=reason)
                result["finished_at"] = _now()
                write_json(result_path, result)
                summary["skipped"].append(spec.cell_id)
                bar.update(1)
                continue
            bar.set_postfix_str(spec.cell_id, refresh=True)
            if isolation in {"subprocess", "forkserver"}:
                result = _run_subprocess(spec, cells_dir, timeout_s, bar if progress else None, isolation, cell_env)
            else:
                result = run_cell(spec, cells_dir / spec.cell_id)
                write_json(result_path, result)
            ran += 1
            summary["ran"].append(spec.cell_id)
            if result.get("status") != "ok":
                summary["failed"].append(spec.cell_id)
                bar.write(f"[benchmark] {spec.cell_id} failed: {str(result.get('error'))[:300]}")
            bar.update(1)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        run_info["finished_at"] = _now()
        run_info["wall_s"] = round(time.monotonic() - wall_start, 1)
        run_info["load_average_end"] = list(os.getloadavg())
        run_info["cells_ran"] = list(summary["ran"])
        write_json(meta_path, meta)
        if report:
            from anomalib_dskd.benchmark.report import write_report

            try:
                summary["report"] = write_report(output, cells=cells)
            except Exception as err:  # noqa: BLE001 - never lose the cell results over a plot
                print(f"[benchmark] report failed: {type(err).__name__}: {err}", file=sys.stderr)
    return summary
