"""Benchmark configuration: YAML with variables, validated before anything is trained.

A config file describes the grid (see ``configs/benchmark/quick.yaml`` for a commented example)::

    name: quick
    variables:
      shared: ${env:ANOMALIB_DSKD_SHARED}   # empty unless set; `--shared DIR` overrides it
    image_size: [256, 256]
    seeds: [42]
    teacher:                                # the one teacher every teacher-based model gets
      backbone: mobilenetv2_100
      weights: ${shared}/weights/mobilenet_v2-b0353104.pth    # a file, `hub` or `random`
      fallback: resolve                     # when `weights` uses an unset variable: resolve | random | error
    budgets:                                # the same budget for every model of a family
      distillation: {epochs: 5}
      memory_bank: {epochs: 1}
    trainer: {accelerator: cpu, devices: 1} # passed to anomalib's Engine (Lightning Trainer arguments)
    data: {train_batch_size: 8, eval_batch_size: 16, num_workers: 0}
    models:
      - name: "@package"                    # every model in anomalib_dskd.registration.MODELS that imports
        kwargs_by_model: {Dskd: {gccb_channels: 256}}
      - name: Patchcore
        kwargs: {coreset_sampling_ratio: 0.1}
    datasets:
      - name: juice_bottle
        format: mvtec_loco                  # mvtec_loco | mvtec_ad | folder | synthetic_loco | synthetic_mvtec_ad
        root: ${shared}/datasets/mvtec_loco_juice_bottle
        category: juice_bottle
        fallback: {format: synthetic_loco, category: synthetic_loco}   # used only when ${shared} is unset
    measure: {runtimes: [torch, openvino_f32, openvino_int8], warmup: 5, runs: 30, threads: 2}

Variables: ``${name}`` refers to ``variables`` (overridden by :func:`load_config`'s ``variables``, i.e.
``--shared`` / ``--var`` on the command line), ``${env:NAME}`` to an environment variable. A value that
refers to an unset variable is *unresolved*: a dataset whose root is unresolved uses its ``fallback``
(or is an error), a teacher whose weights are unresolved uses ``teacher.fallback``. A path that is set
but does not exist is always an error: nothing silently falls back.

:meth:`BenchmarkConfig.cells` expands the grid into :class:`CellSpec` objects, each a plain,
JSON-serialisable description of one cell that the cell subprocess rebuilds everything from.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DATASET_FORMATS",
    "LOCO_FORMATS",
    "MEMORY_BANK_MODELS",
    "RUNTIMES",
    "BenchmarkConfig",
    "CellSpec",
    "ConfigError",
    "DatasetSpec",
    "ModelSpec",
    "TeacherSpec",
    "load_config",
]

#: dataset formats understood by :mod:`anomalib_dskd.benchmark.data`
DATASET_FORMATS = ("mvtec_loco", "mvtec_ad", "folder", "synthetic_loco", "synthetic_mvtec_ad")
#: formats scored with the MVTec LOCO protocol (AU-sPRO, per-subset image AUROC)
LOCO_FORMATS = ("mvtec_loco", "synthetic_loco")
#: runtimes whose latency can be measured
RUNTIMES = ("torch", "openvino_f32", "openvino_int8")
#: anomalib models that fit in one pass over the training set (family ``memory_bank`` by default)
MEMORY_BANK_MODELS = frozenset({"Patchcore", "Padim", "Dfkde", "Dfm"})
#: the entry in ``models`` that stands for every model of the package
PACKAGE_MODELS = "@package"

_VAR = re.compile(r"\$\{([^}]+)\}")
_CELL_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ConfigError(ValueError):
    """The benchmark configuration is invalid (raised before any training starts)."""


class _Unresolved(str):
    """A string that refers to variables that are not set (kept to explain the problem)."""

    missing: tuple[str, ...] = ()


# ==================================================================================================
# Specs
# ==================================================================================================
@dataclass
class TeacherSpec:
    """The teacher backbone and weights that every teacher-based model is given.

    Attributes:
        backbone: timm name of the teacher (``mobilenetv2_100``, ``tf_efficientnet_lite0``, ...).
        weights: a checkpoint path, ``True`` (timm model hub) or ``False`` (random init).
        description: human-readable summary for the tables.
    """

    backbone: str
    weights: str | bool
    description: str = ""


@dataclass
class ModelSpec:
    """One model of the grid.

    Attributes:
        label: unique name in tables and cell ids (defaults to the class name).
        class_name: the model class (``Rd``, ``Patchcore``, ...).
        source: ``"package"`` (``anomalib_dskd``) or ``"anomalib"`` (a built-in).
        kwargs: constructor arguments given in the config (the builder adds the teacher,
            pre-processor and evaluator).
        family: budget family (``distillation``, ``memory_bank`` or any name in ``budgets``).
        epochs: epoch budget (from the family unless the model entry overrides it), or ``None``.
        steps: optimiser-step budget (Lightning ``max_steps``; the same number of updates on every
            dataset), or ``None``.
        max_time: wall-clock budget (Lightning ``max_time``), or ``None``.
        budget_override: the model entry overrides its family's budget (flagged in tables).
    """

    label: str
    class_name: str
    source: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "distillation"
    epochs: int | None = None
    max_time: str | None = None
    budget_override: bool = False
    steps: int | None = None

    def budget_text(self) -> str:
        """The budget in words (``3 epochs``, ``40 steps``, ``max_time 00:00:05:00``)."""
        parts = []
        if self.epochs is not None:
            parts.append(f"{self.epochs} epochs")
        if self.steps is not None:
            parts.append(f"{self.steps} steps")
        if self.max_time is not None:
            parts.append(f"max_time {self.max_time}")
        return ", ".join(parts)


@dataclass
class DatasetSpec:
    """One dataset (category) of the grid.

    Attributes:
        name: unique name in tables and cell ids.
        format: one of :data:`DATASET_FORMATS`.
        root: dataset root (for synthetic formats: filled in by the runner when generated).
        category: category folder under ``root`` (MVTec layouts, synthetic data).
        datamodule: extra keyword arguments for the anomalib datamodule.
        generate: keyword arguments of the synthetic generator (synthetic formats).
        max_train_images: keep at most this many training images (seeded subset); ``None``: all.
        note: how the dataset was chosen (e.g. a synthetic fallback), shown in the report.
    """

    name: str
    format: str
    root: str | None = None
    category: str | None = None
    datamodule: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    max_train_images: int | None = None
    note: str | None = None

    @property
    def is_loco(self) -> bool:
        """Whether the dataset is scored with the MVTec LOCO protocol."""
        return self.format in LOCO_FORMATS

    @property
    def is_synthetic(self) -> bool:
        """Whether the runner generates the dataset."""
        return self.format.startswith("synthetic_")


@dataclass
class CellSpec:
    """Everything one cell needs, as plain data (serialised to JSON for the cell subprocess).

    Attributes:
        cell_id: unique, file-name-safe id ``<model>__<dataset>__seed<seed>``.
        model: the model.
        dataset: the dataset.
        seed: the seed (Lightning ``seed_everything`` and the datamodule).
        image_size: model input size ``(height, width)``.
        teacher: the shared teacher.
        trainer: extra ``Engine`` / Lightning ``Trainer`` arguments.
        data: datamodule loader settings (batch sizes, workers).
        measure: measurement settings (runtimes, runs, threads, ...).
        evaluation: evaluation settings (raw predictions, AUPRO limit, LOCO).
        threads: torch threads for training and testing.
        measure_speed: measure latency, exports and sizes in this cell.
    """

    cell_id: str
    model: ModelSpec
    dataset: DatasetSpec
    seed: int
    image_size: tuple[int, int]
    teacher: TeacherSpec
    trainer: dict[str, Any]
    data: dict[str, Any]
    measure: dict[str, Any]
    evaluation: dict[str, Any]
    threads: int | None
    measure_speed: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellSpec:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["model"] = ModelSpec(**data["model"])
        data["dataset"] = DatasetSpec(**data["dataset"])
        data["teacher"] = TeacherSpec(**data["teacher"])
        data["image_size"] = tuple(data["image_size"])
        return cls(**data)

    def spec_hash(self) -> str:
        """Short hash of everything that determines the cell's result (a changed config re-runs it)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ==================================================================================================
# Variables
# ==================================================================================================
def _substitute(value: Any, variables: Mapping[str, str | None]) -> Any:  # noqa: ANN401
    """Replace ``${name}`` / ``${env:NAME}`` in every string of a YAML tree."""
    if isinstance(value, Mapping):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        key = match.group(1).strip()
        if key.startswith("env:"):
            resolved = os.environ.get(key[4:]) or None
        else:
            if key not in variables:
                msg = (
                    f"unknown variable ${{{key}}} in {value!r}: define it under `variables:` in the config or pass "
                    f"--var {key}=VALUE (environment variables are written ${{env:NAME}})"
                )
                raise ConfigError(msg)
            resolved = variables[key]
        if resolved in (None, ""):
            missing.append(key)
            return match.group(0)
        return str(resolved)

    text = _VAR.sub(replace, value)
    if missing:
        out = _Unresolved(text)
        out.missing = tuple(missing)
        return out
    return text


def _resolve_variables(raw: Mapping[str, Any], given: Mapping[str, str | None] | None) -> dict[str, str | None]:
    declared = raw.get("variables") or {}
    if not isinstance(declared, Mapping):
        msg = "`variables` must be a mapping of names to values"
        raise ConfigError(msg)
    variables: dict[str, str | None] = {}
    for key, value in declared.items():
        value = _substitute(value, {}) if isinstance(value, str) and "${env:" in value else value
        variables[str(key)] = None if value is None or isinstance(value, _Unresolved) else str(value)
    for key, value in (given or {}).items():
        variables[str(key)] = None if value in (None, "") else str(value)
    return variables


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:  # noqa: ANN401
    keys = dotted.split(".")
    node: Any = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or not isinstance(node[key], (dict, list)):
            node[key] = {}
        node = node[key]
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value`` (the value is read as YAML: numbers, lists, booleans)."""
    if "=" not in text:
        msg = f"override {text!r} must look like dotted.key=value (e.g. budgets.distillation.epochs=2)"
        raise ConfigError(msg)
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


# ==================================================================================================
# The config
# ==================================================================================================
@dataclass
class BenchmarkConfig:
    """A loaded, variable-substituted benchmark configuration.

    Build it with :func:`load_config`; :meth:`validate` checks it (also done by :meth:`cells`).

    Attributes:
        path: the YAML file (``None`` when built from a dict).
        raw: the substituted YAML tree.
        variables: the variables in effect.
        name: profile name.
        notes: warnings collected while loading (unavailable package models, fallbacks, ...).
    """

    path: Path | None
    raw: dict[str, Any]
    variables: dict[str, str | None]
    name: str = "benchmark"
    notes: list[str] = field(default_factory=list)
    _models: list[ModelSpec] | None = None
    _datasets: list[DatasetSpec] | None = None
    _teacher: TeacherSpec | None = None

    # ---------------------------------------------------------------- simple settings
    @property
    def image_size(self) -> tuple[int, int]:
        """Model input size ``(height, width)``."""
        value = self.raw.get("image_size", [256, 256])
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
            msg = f"image_size must be [height, width] with positive integers, got {value!r}"
            raise ConfigError(msg)
        return int(value[0]), int(value[1])

    @property
    def seeds(self) -> list[int]:
        """Seeds of the grid."""
        seeds = self.raw.get("seeds", [42])
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            msg = f"seeds must be a non-empty list of integers, got {seeds!r}"
            raise ConfigError(msg)
        return [int(s) for s in seeds]

    def section(self, name: str) -> dict[str, Any]:
        """A mapping section of the config (empty if absent)."""
        value = self.raw.get(name) or {}
        if not isinstance(value, Mapping):
            msg = f"`{name}` must be a mapping, got {type(value).__name__}"
            raise ConfigError(msg)
        return dict(value)

    @property
    def measure(self) -> dict[str, Any]:
        """Measurement settings with defaults."""
        out = {
            "runtimes": list(RUNTIMES),
            "warmup": 5,
            "runs": 30,
            "threads": 2,
            "speed_on": "first_dataset",
            "int8_calibration_images": 32,
            "keep_exports": False,
            "opset_version": 18,
        }
        out.update(self.section("measure"))
        unknown = [r for r in out["runtimes"] if r not in RUNTIMES]
        if unknown:
            msg = f"measure.runtimes: unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}"
            raise ConfigError(msg)
        if out["speed_on"] not in {"all", "first_dataset", "none"}:
            msg = f"measure.speed_on must be all, first_dataset or none, got {out['speed_on']!r}"
            raise ConfigError(msg)
        return out

    @property
    def evaluation(self) -> dict[str, Any]:
        """Evaluation settings with defaults."""
        out = {"raw_predictions": True, "aupro_fpr_limit": 0.3, "loco": "auto", "spro_limit": 0.05}
        out.update(self.section("evaluation"))
        if out["loco"] not in {"auto", "off"}:
            msg = f"evaluation.loco must be auto or off, got {out['loco']!r}"
            raise ConfigError(msg)
        return out

    @property
    def runner(self) -> dict[str, Any]:
        """Runner settings with defaults."""
        out: dict[str, Any] = {"isolation": "subprocess", "cell_timeout_s": 3600, "threads": None}
        out.update(self.section("runner"))
        # OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other
        # processes, spinning torch threads stall each other (measured: 2-thread RD training 5x slower).
        env = {"OMP_WAIT_POLICY": "PASSIVE"}
        env.update({str(k): str(v) for k, v in (out.get("env") or {}).items()})
        out["env"] = env
        if out["isolation"] not in {"subprocess", "forkserver", "none"}:
            msg = f"runner.isolation must be subprocess, forkserver or none, got {out['isolation']!r}"
            raise ConfigError(msg)
        return out

    # ---------------------------------------------------------------- teacher
    @property
    def teacher(self) -> TeacherSpec:
        """The shared teacher (weights resolved; see ``teacher.fallback``)."""
        if self._teacher is None:
            self._teacher = self._load_teacher()
        return self._teacher

    def _load_teacher(self) -> TeacherSpec:
        section = self.section("teacher")
        backbone = section.get("backbone", "mobilenetv2_100")
        weights = section.get("weights", "hub")
        fallback = section.get("fallback", "error")
        if fallback not in {"resolve", "random", "error"}:
            msg = f"teacher.fallback must be resolve, random or error, got {fallback!r}"
            raise ConfigError(msg)
        if isinstance(weights, _Unresolved):
            missing = ", ".join(f"${{{m}}}" for m in weights.missing)
            if fallback == "error":
                msg = (
                    f"teacher.weights {str(weights)!r} uses {missing}, which is not set: pass --shared DIR / "
                    f"--var NAME=VALUE, or set teacher.weights to a file, `hub` or `random`"
                )
                raise ConfigError(msg)
            if fallback == "random":
                self.notes.append(f"teacher weights: {missing} not set, random-init teacher (scores are meaningless)")
                weights = "random"
            else:
                weights = self._resolve_demo_weights(backbone, missing)
        if isinstance(weights, bool):
            weights = "hub" if weights else "random"
        if weights in {"hub", "imagenet", "true"}:
            return TeacherSpec(backbone, True, f"{backbone}, ImageNet weights from the timm hub")
        if weights in {"random", "none", "false"}:
            return TeacherSpec(backbone, False, f"{backbone}, random init")
        path = Path(str(weights)).expanduser()
        if not path.is_file():
            msg = f"teacher.weights: file {str(path)!r} does not exist (see docs/weights.md for how to get it)"
            raise ConfigError(msg)
        return TeacherSpec(backbone, str(path.resolve()), f"{backbone}, ImageNet weights {path.name}")

    def _resolve_demo_weights(self, backbone: str, missing: str) -> str:
        from anomalib_dskd.weights import DEMO_BACKBONE, TeacherWeightsError, resolve_mobilenet_v2_weights

        if backbone != DEMO_BACKBONE:
            msg = f"teacher.weights uses {missing}, which is not set, and fallback `resolve` only knows {DEMO_BACKBONE}"
            raise ConfigError(msg)
        try:
            resolved = resolve_mobilenet_v2_weights()
        except (TeacherWeightsError, FileNotFoundError) as err:
            msg = f"teacher.weights uses {missing}, which is not set, and no weights could be resolved: {err}"
            raise ConfigError(msg) from err
        self.notes.append(f"teacher weights: {missing} not set, resolved {resolved}")
        return "hub" if resolved is True else str(resolved)

    # ---------------------------------------------------------------- models
    @property
    def models(self) -> list[ModelSpec]:
        """The models of the grid (``@package`` expanded)."""
        if self._models is None:
            self._models = self._load_models()
        return self._models

    def _budget(self, family: str) -> dict[str, Any]:
        budgets = self.section("budgets")
        if family not in budgets:
            msg = f"no budget for model family {family!r}: add `budgets: {{{family}: {{epochs: N}}}}` to the config"
            raise ConfigError(msg)
        budget = budgets[family] or {}
        if not isinstance(budget, Mapping) or not ({"epochs", "steps", "max_time"} & set(budget)):
            msg = f"budgets.{family} must give `epochs`, `steps` and/or `max_time`, got {budget!r}"
            raise ConfigError(msg)
        unknown = set(budget) - {"epochs", "steps", "max_time"}
        if unknown:
            msg = f"budgets.{family}: unknown key(s) {sorted(unknown)} (epochs, steps, max_time)"
            raise ConfigError(msg)
        return dict(budget)

    def _load_models(self) -> list[ModelSpec]:
        entries = self.raw.get("models")
        if not isinstance(entries, list) or not entries:
            msg = "`models` must be a non-empty list of model entries (`- name: Rd`)"
            raise ConfigError(msg)
        specs: list[ModelSpec] = []
        for index, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, Mapping) or "name" not in entry:
                msg = f"models[{index}] must be a mapping with a `name`, got {entry!r}"
                raise ConfigError(msg)
            unknown = set(entry) - {
                "name", "label", "kwargs", "kwargs_by_model", "family", "epochs", "steps", "max_time", "skip",
            }
            if unknown:
                msg = f"models[{index}] ({entry['name']}): unknown key(s) {sorted(unknown)}"
                raise ConfigError(msg)
            if entry["name"] == PACKAGE_MODELS:
                specs.extend(self._package_models(entry))
            else:
                specs.append(self._model_spec(entry, entry.get("kwargs") or {}))
        labels = [s.label for s in specs]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            msg = f"models: duplicate label(s) {duplicates}; give repeated models distinct `label`s"
            raise ConfigError(msg)
        return specs

    def _package_models(self, entry: Mapping[str, Any]) -> list[ModelSpec]:
        from anomalib_dskd.benchmark.models import package_model_classes

        classes, problems = package_model_classes()
        for name, problem in problems.items():
            self.notes.append(f"package model {name} not benchmarked: it does not import ({problem})")
        skip = set(entry.get("skip") or [])
        by_model = entry.get("kwargs_by_model") or {}
        common = dict(entry.get("kwargs") or {})
        specs = []
        for name in classes:
            if name in skip:
                continue
            kwargs = {**common, **(by_model.get(name) or {})}
            specs.append(self._model_spec({**entry, "name": name, "label": name}, kwargs))
        return specs

    def _model_spec(self, entry: Mapping[str, Any], kwargs: Mapping[str, Any]) -> ModelSpec:
        from anomalib_dskd.benchmark.models import resolve_model_class

        name = str(entry["name"])
        try:
            cls, source = resolve_model_class(name)
        except LookupError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(kwargs, Mapping):
            msg = f"model {name}: `kwargs` must be a mapping"
            raise ConfigError(msg)
        _check_kwargs(cls, dict(kwargs), name)
        family = entry.get("family") or ("memory_bank" if cls.__name__ in MEMORY_BANK_MODELS else "distillation")
        budget = self._budget(family)
        override = bool({"epochs", "steps", "max_time"} & set(entry))
        if override:  # a model entry's budget replaces its family's
            budget = {k: entry[k] for k in ("epochs", "steps", "max_time") if k in entry}
        epochs = budget.get("epochs")
        steps = budget.get("steps")
        max_time = budget.get("max_time")
        for key, value in (("epochs", epochs), ("steps", steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                msg = f"model {name}: {key} must be a positive integer, got {value!r}"
                raise ConfigError(msg)
        return ModelSpec(
            label=str(entry.get("label") or cls.__name__),
            class_name=cls.__name__,
            source=source,
            kwargs=copy.deepcopy(dict(kwargs)),
            family=family,
            epochs=epochs,
            steps=steps,
            max_time=None if max_time is None else str(max_time),
            budget_override=override,
        )

    # ---------------------------------------------------------------- datasets
    @property
    def datasets(self) -> list[DatasetSpec]:
        """The datasets of the grid (fallbacks applied, paths checked)."""
        if self._datasets is None:
            self._datasets = self._load_datasets()
        return self._datasets

    def _load_datasets(self) -> list[DatasetSpec]:
        entries = self.raw.get("datasets")
        if not isinstance(entries, list) or not entries:
            msg = "`datasets` must be a non-empty list of dataset entries"
            raise ConfigError(msg)
        specs = [self._dataset_spec(entry, index) for index, entry in enumerate(entries)]
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            msg = f"datasets: duplicate name(s) {duplicates}"
            raise ConfigError(msg)
        return specs

    def _dataset_spec(self, entry: Any, index: int) -> DatasetSpec:  # noqa: ANN401
        if not isinstance(entry, Mapping) or "name" not in entry:
            msg = f"datasets[{index}] must be a mapping with a `name`, got {entry!r}"
            raise ConfigError(msg)
        entry = dict(entry)
        name = str(entry["name"])
        unresolved = [k for k, v in entry.items() if isinstance(v, _Unresolved)]
        note = None
        if unresolved:
            fallback = entry.get("fallback")
            missing = sorted({m for k in unresolved for m in entry[k].missing})
            shown = ", ".join(f"${{{m}}}" for m in missing)
            if not fallback:
                msg = (
                    f"dataset {name}: {', '.join(unresolved)} use(s) {shown}, which is not set; pass "
                    + " ".join(f"--var {m}=VALUE" if m != "shared" else "--shared DIR" for m in missing)
                )
                raise ConfigError(msg)
            note = f"synthetic stand-in: {shown} not set"
            self.notes.append(f"dataset {name}: {shown} not set, using its synthetic fallback")
            entry = {"name": name, **dict(fallback)}
        known = {"name", "format", "root", "category", "datamodule", "generate", "max_train_images", "fallback"}
        unknown = set(entry) - known - {"normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir"}
        if unknown:
            msg = f"dataset {name}: unknown key(s) {sorted(unknown)}"
            raise ConfigError(msg)
        fmt = entry.get("format")
        if fmt not in DATASET_FORMATS:
            msg = f"dataset {name}: format must be one of {list(DATASET_FORMATS)}, got {fmt!r}"
            raise ConfigError(msg)
        datamodule = dict(entry.get("datamodule") or {})
        if fmt == "folder":
            for key in ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir"):
                if entry.get(key) is not None:
                    datamodule[key] = entry[key]
        spec = DatasetSpec(
            name=name,
            format=fmt,
            root=None if entry.get("root") is None else str(entry["root"]),
            category=entry.get("category"),
            datamodule=datamodule,
            generate=dict(entry.get("generate") or {}),
            max_train_images=entry.get("max_train_images"),
            note=note,
        )
        _check_dataset(spec)
        return spec

    # ---------------------------------------------------------------- grid
    def validate(self) -> None:
        """Check every part of the config; raises :class:`ConfigError` with a clear message."""
        _ = self.image_size, self.seeds, self.measure, self.evaluation, self.runner, self.trainer
        _ = self.teacher, self.models, self.datasets

    @property
    def trainer(self) -> dict[str, Any]:
        """Extra Engine / Trainer arguments (``max_epochs`` / ``max_time`` come from the budgets)."""
        trainer = {"accelerator": "cpu", "devices": 1}
        trainer.update(self.section("trainer"))
        for key in ("max_epochs", "max_steps", "max_time"):
            if key in trainer:
                msg = f"trainer.{key}: set the training budget under `budgets` (per model family), not `trainer`"
                raise ConfigError(msg)
        return trainer

    def cells(self) -> list[CellSpec]:
        """Expand the grid, model-major: for each model, each dataset, each seed."""
        self.validate()
        measure = self.measure
        data = {"train_batch_size": 8, "eval_batch_size": 16, "num_workers": 0}
        data.update(self.section("data"))
        first_dataset = self.datasets[0].name
        first_seed = self.seeds[0]
        cells = []
        for model in self.models:
            for dataset in self.datasets:
                for seed in self.seeds:
                    speed_on = measure["speed_on"]
                    measure_speed = speed_on == "all" or (
                        speed_on == "first_dataset" and dataset.name == first_dataset and seed == first_seed
                    )
                    cells.append(
                        CellSpec(
                            cell_id=cell_id(model.label, dataset.name, seed),
                            model=model,
                            dataset=dataset,
                            seed=seed,
                            image_size=self.image_size,
                            teacher=self.teacher,
                            trainer=self.trainer,
                            data=data,
                            measure=measure,
                            evaluation=self.evaluation,
                            threads=self.runner["threads"],
                            measure_speed=measure_speed,
                        ),
                    )
        return cells


def cell_id(model: str, dataset: str, seed: int) -> str:
    """File-name-safe id of a cell."""
    return "__".join(_CELL_ID_SAFE.sub("-", part) for part in (model, dataset, f"seed{seed}"))


def _check_kwargs(cls: type, kwargs: dict[str, Any], name: str) -> None:
    """Refuse constructor arguments the model class does not take (before any training)."""
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signature
        return
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        accepted = sorted(p for p in params if p not in {"self", "args", "kwargs"})
        msg = f"model {name}: unknown argument(s) {unknown}; {cls.__name__} accepts {accepted}"
        raise ConfigError(msg)


def _check_dataset(spec: DatasetSpec) -> None:
    """Check that a real dataset's folders exist (synthetic ones are generated later)."""
    if spec.is_synthetic:
        if spec.root is not None:
            msg = f"dataset {spec.name}: synthetic datasets are generated under the output folder; remove `root`"
            raise ConfigError(msg)
        if spec.format == "synthetic_loco":
            allowed = {"seed", "image_size", "n_train", "n_validation", "n_test_good", "n_logical", "n_structural"}
        else:
            allowed = {"seed", "image_size", "n_train", "n_test_good", "n_per_defect", "defect_types", "n_validation"}
        unknown = set(spec.generate) - allowed
        if unknown:
            msg = f"dataset {spec.name}: unknown `generate` key(s) {sorted(unknown)}; accepted {sorted(allowed)}"
            raise ConfigError(msg)
        spec.category = spec.category or spec.name
        return
    if not spec.root:
        msg = f"dataset {spec.name}: `root` is required for format {spec.format}"
        raise ConfigError(msg)
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        msg = f"dataset {spec.name}: root folder {str(root)!r} does not exist"
        raise ConfigError(msg)
    spec.root = str(root.resolve())
    if spec.format in {"mvtec_loco", "mvtec_ad"}:
        if not spec.category:
            msg = f"dataset {spec.name}: `category` is required for format {spec.format}"
            raise ConfigError(msg)
        category_dir = root / spec.category
        required = [category_dir / "train" / "good", category_dir / "test"]
        missing = [str(p) for p in required if not p.is_dir()]
        if missing:
            msg = f"dataset {spec.name}: not an {spec.format} category, missing folder(s) {missing}"
            raise ConfigError(msg)
    else:  # folder
        normal_dir = spec.datamodule.get("normal_dir")
        if not normal_dir:
            msg = f"dataset {spec.name}: format folder needs `normal_dir` (relative to root)"
            raise ConfigError(msg)
        for key in ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir"):
            value = spec.datamodule.get(key)
            if value and not (root / value).is_dir():
                msg = f"dataset {spec.name}: {key} {str(root / value)!r} does not exist"
                raise ConfigError(msg)
        spec.datamodule.setdefault("name", spec.name)
    if spec.max_train_images is not None and (not isinstance(spec.max_train_images, int) or spec.max_train_images < 1):
        msg = f"dataset {spec.name}: max_train_images must be a positive integer, got {spec.max_train_images!r}"
        raise ConfigError(msg)


def load_config(
    source: str | Path | Mapping[str, Any],
    variables: Mapping[str, str | None] | None = None,
    overrides: list[str] | None = None,
) -> BenchmarkConfig:
    """Read a benchmark config and substitute its variables (validation is lazy: see ``validate``).

    Args:
        source: a YAML file, or an already-parsed mapping.
        variables: values for ``${name}`` variables; they override the config's ``variables:``
            (``--shared DIR`` is ``{"shared": DIR}``).
        overrides: ``dotted.key=value`` settings applied before substitution
            (``--set budgets.distillation.epochs=2``).

    Returns:
        The configuration.

    Raises:
        ConfigError: the file is missing or not valid YAML, a variable is unknown, an override is malformed.
    """
    path = None
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            msg = f"benchmark config {str(path)!r} does not exist (see configs/benchmark/ for examples)"
            raise ConfigError(msg)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            msg = f"benchmark config {path} is not valid YAML: {err}"
            raise ConfigError(msg) from err
        if not isinstance(raw, dict):
            msg = f"benchmark config {path} must be a mapping at the top level"
            raise ConfigError(msg)
    for text in overrides or []:
        key, value = parse_override(text)
        try:
            _set_dotted(raw, key, value)
        except (IndexError, ValueError, TypeError) as err:
            msg = f"override {text!r} does not fit the config: {err}"
            raise ConfigError(msg) from err
    resolved_vars = _resolve_variables(raw, variables)
    tree = {k: (_substitute(v, resolved_vars) if k != "variables" else v) for k, v in raw.items()}
    return BenchmarkConfig(path=path, raw=tree, variables=resolved_vars, name=str(tree.get("name") or "benchmark"))
