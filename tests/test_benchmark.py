"""Tests of the benchmark grid (``anomalib_dskd.benchmark``, ``anomalib-dskd benchmark``).

Fast: config validation (unknown model, missing dataset path, unset variables, interpolation and
override errors), the shipped configs, the report schema, latency measurement in torch / OpenVINO f32 on a
tiny network. Slow: NNCF INT8 quantisation of that network; the real grid on generated data (Rd + Padim
with a random resnet18 teacher at 64x64, one epoch), interrupted after one cell and resumed, with a
deliberately failing cell.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from anomalib_dskd.benchmark.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "benchmark"


def tiny_config() -> dict:
    """The tiny test grid (configs/benchmark/tiny.yaml) as a dict."""
    return yaml.safe_load((CONFIGS / "tiny.yaml").read_text())


def _finite_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ==================================================================================================
# Bad input: clear errors before any training
# ==================================================================================================
def test_unknown_model_is_rejected_before_training(tmp_path: Path) -> None:
    from anomalib_dskd.benchmark.runner import run_benchmark

    raw = tiny_config()
    raw["models"].append({"name": "NoSuchModel"})
    config = load_config(raw)
    with pytest.raises(ConfigError, match="unknown model 'NoSuchModel'.*Package models.*Rd"):
        run_benchmark(config, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("cells/*.json")), "nothing may run when the config is invalid"


def test_missing_dataset_path_is_rejected(tmp_path: Path) -> None:
    raw = tiny_config()
    raw["datasets"] = [{"name": "real", "format": "mvtec_ad", "root": str(tmp_path / "nope"), "category": "x"}]
    with pytest.raises(ConfigError, match=r"dataset real: root folder .*nope.* does not exist"):
        load_config(raw).cells()


def test_missing_category_folder_is_rejected(tmp_path: Path) -> None:
    raw = tiny_config()
    raw["datasets"] = [{"name": "real", "format": "mvtec_loco", "root": str(tmp_path), "category": "juice"}]
    with pytest.raises(ConfigError, match="not an mvtec_loco category"):
        load_config(raw).cells()


def test_unknown_model_argument_is_rejected() -> None:
    raw = tiny_config()
    raw["models"] = [{"name": "Padim", "kwargs": {"no_such_argument": 1}}]
    with pytest.raises(ConfigError, match=r"model Padim: unknown argument\(s\) \['no_such_argument'\]"):
        load_config(raw).cells()


def test_unset_variable_needs_a_value_or_a_fallback(tmp_path: Path) -> None:
    raw = tiny_config()
    raw["variables"] = {"shared": None}
    raw["datasets"] = [{"name": "real", "format": "mvtec_ad", "root": "${shared}/datasets/x", "category": "x"}]
    with pytest.raises(ConfigError, match=r"\$\{shared\}.*not set.*--shared DIR"):
        load_config(raw).cells()
    # with a fallback the generated stand-in is used, and said so
    raw["datasets"][0]["fallback"] = {"format": "synthetic_mvtec_ad", "generate": {"n_train": 4}}
    config = load_config(raw)
    (dataset,) = config.datasets
    assert dataset.format == "synthetic_mvtec_ad"
    assert "not set" in dataset.note
    # a variable that is set but points nowhere is an error, never a silent fallback
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(raw, variables={"shared": str(tmp_path / "missing")}).cells()


def test_budget_in_trainer_section_is_rejected() -> None:
    raw = tiny_config()
    raw["trainer"]["max_epochs"] = 3
    with pytest.raises(ConfigError, match="budgets"):
        load_config(raw).cells()


def test_cli_reports_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_dskd.cli.main import main

    raw = tiny_config()
    raw["models"] = [{"name": "NoSuchModel"}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["benchmark", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "invalid configuration: unknown model 'NoSuchModel'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_only_the_filtered_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_dskd.cli.main import main

    config = str(CONFIGS / "tiny.yaml")
    labels = {c.model.label for c in load_config(CONFIGS / "tiny.yaml").cells()}
    label = min(labels)
    assert main(["benchmark", "--config", config, "--output", str(tmp_path / "out"), "--model", label, "--dry-run"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed and all(cell.startswith(f"{label}__") for cell in listed)
    assert not (tmp_path / "out").exists()
    assert main(["benchmark", "--config", config, "--model", "NoSuchLabel", "--dry-run"]) == 2
    assert "--model ['NoSuchLabel'] not in the config's models" in capsys.readouterr().err


def test_overrides_and_variables() -> None:
    config = load_config(CONFIGS / "tiny.yaml", overrides=["budgets.distillation.epochs=2", "seeds=[1, 2]"])
    cells = config.cells()
    assert {c.seed for c in cells} == {1, 2}
    assert {c.model.epochs for c in cells if c.model.class_name == "Rd"} == {2}
    assert len({c.cell_id for c in cells}) == len(cells)
    assert cells[0].spec_hash() != load_config(CONFIGS / "tiny.yaml").cells()[0].spec_hash()


def test_variable_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``${env:NAME}`` (and a default), variables built from variables, ``--var`` over ``variables:``."""
    monkeypatch.setenv("DSKD_TEST_ROOT", str(tmp_path))
    monkeypatch.delenv("DSKD_TEST_UNSET", raising=False)
    raw = tiny_config()
    raw["variables"] = {
        "root": "${env:DSKD_TEST_ROOT}", "data": "${root}/data", "unset": "${env:DSKD_TEST_UNSET}",
        "fallback_name": "${env:DSKD_TEST_UNSET,generated}",
    }
    raw["name"] = "${fallback_name}-${data}"
    raw["teacher"]["weights"] = "${unset}/w.pth"
    raw["teacher"]["fallback"] = "random"
    config = load_config(raw)
    assert config.variables == {"root": str(tmp_path), "data": f"{tmp_path}/data", "unset": None,
                                "fallback_name": "generated"}
    assert config.name == f"generated-{tmp_path}/data"
    assert config.raw["variables"] == raw["variables"]  # kept as written
    assert config.teacher.weights is False and "random-init teacher" in config.notes[0]
    # --var wins over `variables:`, and variables built from it follow
    config = load_config(raw, variables={"root": "/elsewhere"})
    assert config.variables["data"] == "/elsewhere/data"
    # an unset variable in a teacher path without a fallback names the variable
    raw["teacher"]["fallback"] = "error"
    with pytest.raises(ConfigError, match=r"teacher.weights '\$\{unset\}/w.pth' uses \$\{unset\}, which is not set"):
        load_config(raw).cells()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "${no_such_var}/x"}, r"unknown variable \$\{no_such_var\} in '\$\{no_such_var\}/x'.*--var no_such_var=VALUE"),
        ({"variables": {"a": "${b}"}}, r"unknown variable \$\{b\}"),
        ({"variables": ["shared"]}, r"`variables` must be a mapping"),
        ({"name": "${oc.env:DSKD_TEST_UNSET}"}, r"cannot read name .*DSKD_TEST_UNSET"),
        ({"name": "${}"}, r"cannot read name \('\$\{\}'\)"),
        ({"measure": {"speed_on": "sometimes"}}, r"measure.speed_on must be all, first_dataset or none, got 'sometimes'"),
        ({"runner": {"isolation": "thread"}}, r"runner.isolation must be subprocess, forkserver or none"),
        ({"evaluation": {"loco": "on"}}, r"evaluation.loco must be auto or off"),
        ({"measure": {"runtimes": ["tensorrt"]}}, r"measure.runtimes: unknown runtime\(s\) \['tensorrt'\]"),
        ({"measure": [1]}, r"`measure` must be a mapping, got list"),
        ({"image_size": [64, 0]}, r"image_size must be \[height, width\] with positive integers"),
        ({"seeds": []}, r"seeds must be a non-empty list of integers"),
        ({"models": [{"name": "Rd", "epoch": 2}]}, r"models\[0\] \(Rd\): unknown key\(s\) \['epoch'\]"),
        ({"models": [{"name": "Rd", "epochs": 0}]}, r"model Rd: epochs must be a positive integer, got 0"),
        ({"models": [{"name": "Rd"}, {"name": "Rd"}]}, r"models: duplicate label\(s\) \['Rd'\]"),
        ({"datasets": [{"name": "d", "format": "synthetic_loco", "generate": {"n_images": 3}}]},
         r"dataset d: unknown `generate` key\(s\) \['n_images'\]"),
        ({"datasets": [{"name": "d", "format": "synthetic_loco", "roots": "/x"}]}, r"dataset d: unknown key\(s\) \['roots'\]"),
        ({"datasets": [{"name": "d", "format": "png"}]}, r"dataset d: format must be one of"),
    ],
)
def test_config_errors(change: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSKD_TEST_UNSET", raising=False)
    raw = {**tiny_config(), **change}
    with pytest.raises(ConfigError, match=message):
        load_config(raw).cells()


def test_override_errors_and_semantics() -> None:
    with pytest.raises(ConfigError, match=r"override 'seeds' must look like dotted.key=value"):
        load_config(CONFIGS / "tiny.yaml", overrides=["seeds"])
    for bad in ("datasets.5.name=x", "datasets.first.name=x"):
        with pytest.raises(ConfigError, match=rf"override '{bad}' does not fit the config"):
            load_config(CONFIGS / "tiny.yaml", overrides=[bad])
    config = load_config(CONFIGS / "tiny.yaml", overrides=[
        "budgets.distillation={steps: 3}",  # a mapping replaces the mapping (epochs: 1 is gone)
        "datasets.0.generate.n_train=6",  # list items by index
        "measure.warmup=",  # empty: null
        "runner.env.MY_FLAG=1",  # new keys are created
    ])
    assert config.raw["budgets"]["distillation"] == {"steps": 3}
    assert config.datasets[0].generate["n_train"] == 6
    assert config.raw["measure"]["warmup"] is None
    assert config.runner["env"]["MY_FLAG"] == "1"
    rd = next(m for m in config.models if m.class_name == "Rd")
    assert (rd.steps, rd.epochs) == (3, None)


def test_folder_dataset(tiny_mvtec_ad: tuple[Path, str]) -> None:
    from anomalib_dskd.benchmark.data import build_datamodule

    root, category = tiny_mvtec_ad
    raw = tiny_config()
    raw["datasets"] = [{
        "name": "parts", "format": "folder", "root": str(root / category),
        "normal_dir": "train/good", "abnormal_dir": "test/scratch", "normal_test_dir": "test/good",
        "mask_dir": "ground_truth/scratch",
    }]
    (dataset,) = load_config(raw).datasets
    datamodule = build_datamodule(dataset, {"train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}, seed=0)
    datamodule.setup()
    assert len(datamodule.train_data) == 8
    assert len(datamodule.test_data) > 0
    raw["datasets"][0]["abnormal_dir"] = "test/nothing"
    with pytest.raises(ConfigError, match="abnormal_dir .* does not exist"):
        load_config(raw).cells()


def test_step_budget_and_model_override() -> None:
    raw = tiny_config()
    raw["budgets"]["distillation"] = {"steps": 5}
    raw["models"].append({"name": "Rd", "label": "RdLong", "epochs": 2})
    by_label = {c.model.label: c.model for c in load_config(raw).cells()}
    assert (by_label["Rd"].steps, by_label["Rd"].epochs, by_label["Rd"].budget_override) == (5, None, False)
    assert (by_label["RdLong"].steps, by_label["RdLong"].epochs, by_label["RdLong"].budget_override) == (None, 2, True)
    assert (by_label["Padim"].epochs, by_label["Padim"].family) == (1, "memory_bank")
    raw["budgets"]["distillation"] = {"step": 5}
    with pytest.raises(ConfigError, match="budgets.distillation"):
        load_config(raw).cells()


@pytest.mark.parametrize("name", ["quick", "full"])
def test_shipped_configs_validate(name: str, tmp_path: Path) -> None:
    """The shipped profiles expand into their grids (validation only, nothing is trained or loaded).

    quick: with ``../shared`` when present; without ``../shared/weights`` the teacher is overridden to
    RANDOM weights (``teacher.weights=random``) instead of resolving the ImageNet file. full: the
    official dataset layouts faked as empty folders, hub weights (not downloaded).
    """
    if name == "quick":
        shared = Path(os.environ.get("ANOMALIB_DSKD_SHARED", REPO.parent / "shared"))
        overrides = [] if (shared / "weights").is_dir() else ["teacher.weights=random"]
        variables = {"shared": str(shared)} if shared.is_dir() else {}
    else:  # full: the official dataset layouts, faked as empty folders
        raw = yaml.safe_load((CONFIGS / "full.yaml").read_text())
        variables, overrides = {}, []
        for entry in raw["datasets"]:
            key = entry["root"][2:-1]
            variables[key] = str(tmp_path / key)
            for sub in ("train/good", "test"):
                (tmp_path / key / entry["category"] / sub).mkdir(parents=True, exist_ok=True)
    config = load_config(CONFIGS / f"{name}.yaml", variables=variables, overrides=overrides)
    cells = config.cells()
    classes = {c.model.class_name for c in cells}
    assert {"Rd", "Patchcore", "Padim", "Stfpm", "ReverseDistillation"} <= classes
    assert len(cells) == len(config.models) * len(config.datasets) * len(config.seeds)


# ==================================================================================================
# Report schema (no training)
# ==================================================================================================
def _fake_result(spec, status: str = "ok", error: str | None = None, auroc: float = 0.9) -> dict:
    from anomalib_dskd.benchmark.cell import empty_result

    result = empty_result(spec, status=status, error=error)
    if status == "ok":
        result["metrics"] = {"image_AUROC": auroc, "pixel_AUROC": 0.8, "AUPRO": 0.7, "AUSPRO_mean_0.05": 0.5}
        result["timing"] = {"fit_s": 3.0, "epochs_run": 1, "epoch_s_mean": 3.0, "test_s": 1.0, "cell_s": 9.0}
        result["latency_ms"] = {
            "settings": {"warmup": 1, "runs": 3, "threads": 1, "batch": 1},
            "torch": {"median": 10.0}, "openvino_f32": {"median": 5.0}, "openvino_int8": {"median": 2.0},
        }
        result["memory_mb"] = {"peak_rss": 900.0, "peak_rss_train_test": 800.0}
        result["size"] = {"params": 1_000_000, "openvino_f32_mb": 4.0, "openvino_int8_mb": 1.0}
        result["teacher"] = "resnet18, random init"
    return result


def test_report_schema(tmp_path: Path) -> None:
    from anomalib_dskd.benchmark.cell import RESULT_KEYS, write_json
    from anomalib_dskd.benchmark.report import CSV_COLUMNS, write_report

    cells = load_config(CONFIGS / "tiny.yaml", overrides=["seeds=[0, 1]"]).cells()
    for index, spec in enumerate(cells):
        failed = spec.model.class_name == "Padim" and spec.seed == 1
        result = _fake_result(spec, "failed" if failed else "ok", "RuntimeError: boom" if failed else None, 0.8 + 0.01 * index)
        write_json(tmp_path / "cells" / f"{spec.cell_id}.json", result)
    files = write_report(tmp_path, cells=cells)
    assert {"json", "csv", "markdown", "accuracy_vs_latency", "per_category"} <= set(files)
    for kind in ("accuracy_vs_latency", "per_category"):
        assert Path(files[kind]).read_bytes()[:4] == b"\x89PNG"

    data = json.loads(Path(files["json"]).read_text())
    assert set(data) == {"meta", "cells"}
    assert len(data["cells"]) == len(cells)
    for cell in data["cells"]:
        assert set(RESULT_KEYS) <= set(cell)

    with Path(files["csv"]).open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(cells)
    assert {r["status"] for r in rows} == {"ok", "failed"}

    markdown = Path(files["markdown"]).read_text()
    assert "| Rd | 0.805 ± 0.007 |" in markdown  # two seeds: mean ± sample std
    assert "RuntimeError: boom" in markdown  # the failure is in the report with its error
    assert "OpenVINO INT8 ms" in markdown


# ==================================================================================================
# Latency measurement
# ==================================================================================================
LATENCY_SIZE = (32, 32)


def _tiny_openvino_net(tmp_path: Path) -> tuple[object, Path]:
    import openvino as ov
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1))
    xml = tmp_path / "f32" / "model.xml"
    xml.parent.mkdir()
    example = torch.rand(1, 3, *LATENCY_SIZE)
    ov.save_model(ov.convert_model(net.eval(), example_input=example), str(xml), compress_to_fp16=False)
    return net, xml


def test_latency_torch_and_openvino_f32_are_positive_and_finite(tmp_path: Path) -> None:
    from anomalib_dskd.benchmark import measure

    net, xml = _tiny_openvino_net(tmp_path)
    stats = measure.torch_latency(net, LATENCY_SIZE, warmup=1, runs=3, threads=1)
    assert stats["runs"] == 3
    assert all(_finite_positive(stats[k]) for k in ("median", "p90", "mean", "min"))
    f32 = measure.openvino_latency(xml, LATENCY_SIZE, warmup=1, runs=3, threads=1)
    assert _finite_positive(f32["median"])
    assert measure.openvino_size_mb(xml) > 0
    assert measure.peak_rss_mb() > 0


@pytest.mark.slow  # NNCF post-training quantisation
def test_latency_openvino_int8_quantisation(tmp_path: Path) -> None:
    import numpy as np

    from anomalib_dskd.benchmark import measure

    _, xml = _tiny_openvino_net(tmp_path)
    calibration = np.random.default_rng(0).random((4, 3, *LATENCY_SIZE), dtype=np.float32)
    int8_xml = measure.quantize_int8(xml, calibration, tmp_path / "int8")
    int8 = measure.openvino_latency(int8_xml, LATENCY_SIZE, warmup=1, runs=3, threads=1)
    assert _finite_positive(int8["median"])
    assert measure.openvino_size_mb(int8_xml) > 0


# ==================================================================================================
# The grid, end to end (subprocess per cell)
# ==================================================================================================
@pytest.mark.slow
def test_grid_resume_and_failing_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib_dskd.benchmark.cell import RESULT_KEYS
    from anomalib_dskd.benchmark.report import CSV_COLUMNS
    from anomalib_dskd.benchmark.runner import run_benchmark

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the runner would set for the fork server
    raw = tiny_config()
    # a cell that fails inside its subprocess (resnet18 has no stage 7): it passes validation
    raw["models"].append({"name": "Rd", "label": "RdBroken", "kwargs": {"layers": [7, 8, 9]}})
    output = tmp_path / "grid"

    # run 1, "interrupted" after one cell; a fresh interpreter per cell
    raw["runner"]["isolation"] = "subprocess"
    first = run_benchmark(load_config(copy.deepcopy(raw)), output, max_cells=1, progress=False)
    assert first["ran"] == ["Rd__synthetic_loco__seed0"]
    assert first["pending"] == ["Padim__synthetic_loco__seed0", "RdBroken__synthetic_loco__seed0"]
    rd_path = output / "cells" / "Rd__synthetic_loco__seed0.json"
    rd_before = json.loads(rd_path.read_text())
    mtime_before = rd_path.stat().st_mtime_ns
    assert rd_before["status"] == "ok", rd_before["error"]

    # run 2, resumed: the finished cell is reused, the others run, the broken one fails without stopping the
    # grid; cells forked from the warm fork server (the isolation mode is not part of a cell's settings)
    raw["runner"]["isolation"] = "forkserver"
    second = run_benchmark(load_config(copy.deepcopy(raw)), output, progress=False)
    assert second["reused"] == ["Rd__synthetic_loco__seed0"]
    assert second["ran"] == ["Padim__synthetic_loco__seed0", "RdBroken__synthetic_loco__seed0"]
    assert second["failed"] == ["RdBroken__synthetic_loco__seed0"]
    assert rd_path.stat().st_mtime_ns == mtime_before
    assert json.loads(rd_path.read_text())["started_at"] == rd_before["started_at"]

    results = {c["cell_id"]: c for c in json.loads((output / "results.json").read_text())["cells"]}
    assert len(results) == 3
    for result in results.values():
        assert set(RESULT_KEYS) <= set(result)
    broken = results["RdBroken__synthetic_loco__seed0"]
    assert broken["status"] == "failed" and broken["error"] and broken["traceback"]
    for cell_id in ("Rd__synthetic_loco__seed0", "Padim__synthetic_loco__seed0"):
        result = results[cell_id]
        assert result["status"] == "ok", result["error"]
        assert result["errors"] == {}
        for metric in ("image_AUROC", "pixel_AUROC", "AUPRO"):
            assert 0.0 <= result["metrics"][metric] <= 1.0
        for runtime in ("torch", "openvino_f32", "openvino_int8"):
            assert _finite_positive(result["latency_ms"][runtime]["median"]), (cell_id, runtime)
        assert _finite_positive(result["memory_mb"]["peak_rss"])
        assert _finite_positive(result["size"]["params"])
        assert _finite_positive(result["size"]["openvino_f32_mb"]) and _finite_positive(result["size"]["openvino_int8_mb"])
        assert _finite_positive(result["timing"]["epoch_s_mean"])
        assert result["timing"]["epochs_run"] == 1

    with (output / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        assert len(list(reader)) == 3
    markdown = (output / "results.md").read_text()
    assert "RdBroken" in markdown and "**failed**" in markdown
    meta = json.loads((output / "run.json").read_text())
    assert len(meta["runs"]) == 2 and meta["environment"]["versions"]["anomalib"]


def test_map_agreement_per_image_and_overall() -> None:
    """Per-image Pearson: the worst and the mean image; one image inverted gives -1 and a mean of 0 over two."""
    import numpy as np

    from anomalib_dskd.benchmark.measure import map_agreement

    maps = np.random.default_rng(0).random((2, 1, 8, 8))
    same = map_agreement(maps, maps)
    assert same["pearson"] == pytest.approx(1.0) and same["pearson_min"] == pytest.approx(1.0)
    assert same["pearson_mean"] == pytest.approx(1.0) and same["max_abs_rel"] == 0.0
    flipped = maps.copy()
    flipped[1] = -flipped[1]
    agreement = map_agreement(maps, flipped)
    assert agreement["pearson_min"] == pytest.approx(-1.0)
    assert agreement["pearson_mean"] == pytest.approx(0.0, abs=1e-12)
