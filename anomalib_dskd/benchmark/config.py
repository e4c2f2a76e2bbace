"""Benchmark configuration: YAML with variables, validated before anything is trained.

A config file describes the grid: ``name``, ``variables``, ``image_size``, ``seeds``, ``teacher``,
``budgets`` (one training budget per model family), ``trainer``, ``data``, ``models``, ``datasets``,
``measure``, ``evaluation``, ``runner``. ``configs/benchmark/quick.yaml`` is a commented example and
``docs/benchmark.md`` lists every key with its default.

Variables are OmegaConf interpolations: ``${name}`` refers to ``variables`` (overridden by
:func:`load_config`'s ``variables``, i.e. ``--shared`` / ``--var`` on the command line), ``${env:NAME}``
to an environment variable (``${env:NAME,default}`` with a default; OmegaConf's own ``${oc.env:NAME}``
works too but is an error when unset). A value that refers to an unset variable is *unresolved*: a
dataset whose root is unresolved uses its ``fallback`` (or is an error), a teacher whose weights are
unresolved uses ``teacher.fallback``. A path that is set but does not exist is always an error: nothing
silently falls back. Overrides (``--set dotted.key=value``) are applied with ``OmegaConf.update``
before interpolation; list items are addressed by index (``datasets.0.root=...``).

:meth:`BenchmarkConfig.cells` expands the grid into :class:`CellSpec` objects, each a plain,
JSON-serialisable description of one cell that the cell subprocess rebuilds everything from.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import omegaconf
import yaml
from omegaconf import OmegaConf
from omegaconf.basecontainer import BaseContainer
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

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

_BUDGET_KEYS = ("epochs", "steps", "max_time")
_MODEL_KEYS = {"name", "label", "kwargs", "kwargs_by_model", "family", "skip", *_BUDGET_KEYS}
_FOLDER_KEYS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")
_DATASET_KEYS = {"name", "format", "root", "category", "datamodule", "generate", "max_train_images", "fallback"}
_GENERATE_KEYS = {
    "synthetic_loco": {
        "seed", "image_size", "n_train", "n_validation", "n_test_good", "n_logical", "n_structural", "preset",
    },
    "synthetic_mvtec_ad": {
        "seed", "image_size", "n_train", "n_test_good", "n_per_defect", "defect_types", "n_validation",
    },
}
#: defaults of the simple mapping sections
_DEFAULTS: dict[str, dict[str, Any]] = {
    "measure": {
        "runtimes": list(RUNTIMES), "warmup": 5, "runs": 30, "threads": 2, "speed_on": "first_dataset",
        "int8_calibration_images": 32, "keep_exports": False, "opset_version": 18,
    },
    "evaluation": {
        "raw_predictions": True, "aupro_fpr_limit": 0.3, "loco": "auto", "spro_limit": 0.05, "keep_checkpoint": False,
    },
    "runner": {"isolation": "subprocess", "cell_timeout_s": 3600, "threads": None},
    "trainer": {"accelerator": "cpu", "devices": 1},
    "data": {"train_batch_size": 8, "eval_batch_size": 16, "num_workers": 0},
}
_CELL_ID_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TREE = "__benchmark_config__"  # the config's key in the OmegaConf root (the variables sit beside it)
_UNSET = re.compile("\x00([^\x00]*)\x00")  # what an unset variable resolves to (turned back into ${name})


class ConfigError(ValueError):
    """The benchmark configuration is invalid (raised before any training starts)."""


class _Unresolved(str):
    """A string that refers to variables that are not set (kept to explain the problem)."""

    missing: tuple[str, ...] = ()


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def _no_unknown(where: str, keys: Iterable[Any], allowed: Iterable[str], hint: str = "") -> None:
    unknown = set(keys) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}{hint}")


def _duplicates(values: Iterable[str]) -> list[str]:
    values = list(values)
    return sorted({v for v in values if values.count(v) > 1})


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
# Variables and overrides (OmegaConf)
# ==================================================================================================
def _unset(name: str) -> str:
    return f"\x00{name}\x00"


def _env(name: str, default: Any = None) -> Any:
    """``${env:NAME}`` / ``${env:NAME,default}``: an unset or empty variable stays unresolved."""
    return os.environ.get(str(name)) or (_unset(f"env:{name}") if default is None else default)


# omegaconf 2.4 renamed register_new_resolver (deprecated there) to register_resolver (before 2.4: the legacy API)
_register_resolver = (
    OmegaConf.register_resolver if tuple(map(int, re.findall(r"\d+", omegaconf.__version__)[:2])) >= (2, 4)
    else OmegaConf.register_new_resolver
)


@contextlib.contextmanager
def _env_resolver() -> Iterator[None]:
    """Register the ``env`` resolver while a config is resolved (OmegaConf's resolvers are global)."""
    previous = BaseContainer._resolvers.get("env")
    _register_resolver("env", _env, replace=True)
    try:
        yield
    finally:
        OmegaConf.clear_resolver("env")
        if previous is not None:
            BaseContainer._resolvers["env"] = previous


def _where(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", None) or "").replace(f"{_TREE}.", "").replace(_TREE, "")


def _raw_value(root: Mapping[str, Any], where: str) -> Any:
    """The uninterpolated value at an OmegaConf ``full_key`` (``datasets[0].root``), else ``where``."""
    node: Any = root
    try:
        for part in re.findall(r"[^.\[\]]+", where):
            node = node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, ValueError, TypeError):
        return where
    return node


def _mark_unresolved(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mark_unresolved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_unresolved(v) for v in value]
    if isinstance(value, str) and "\x00" in value:
        out = _Unresolved(_UNSET.sub(lambda m: f"${{{m.group(1)}}}", value))
        out.missing = tuple(_UNSET.findall(value))
        return out
    return value


def _interpolate(tree: dict[str, Any], variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """Resolve the OmegaConf interpolations of ``tree``.

    ``variables`` are the root keys that ``${name}`` finds beside the tree (an unset one, ``None``, leaves
    an unresolved value); ``None``: the tree's own keys are the root (for ``variables:`` itself).
    """
    own = variables is None
    names = tree if own else variables
    root: dict[str, Any] = {str(k): _unset(str(k)) if v is None else v for k, v in names.items()}
    if not own:
        root[_TREE] = tree
    try:
        with _env_resolver():
            out = OmegaConf.to_container(OmegaConf.create(root), resolve=True)
    except InterpolationKeyError as err:
        found = re.search(r"Interpolation key '(.+?)' not found", str(err))
        key = found.group(1) if found else _where(err)
        raise ConfigError(
            f"unknown variable ${{{key}}} in {_raw_value(tree, _where(err))!r}: define it under `variables:` in the "
            f"config or pass --var {key}=VALUE (environment variables are written ${{env:NAME}})"
        ) from None
    except OmegaConfBaseException as err:
        where = _where(err)
        raise ConfigError(
            f"cannot read {where or 'the config'} ({_raw_value(tree, where)!r}): {str(err).splitlines()[0]}"
        ) from None
    return _mark_unresolved(out if own else out[_TREE])


def _resolve_variables(declared: Any, given: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """The config's ``variables`` with ``given`` over them (they may use ``${env:...}`` and each other)."""
    if not isinstance(declared, Mapping):
        raise ConfigError("`variables` must be a mapping of names to values")
    merged = {str(k): v for k, v in declared.items()}
    merged.update({str(k): None if v in (None, "") else str(v) for k, v in (given or {}).items()})
    resolved = _interpolate(merged, None)
    return {k: None if v is None or isinstance(v, _Unresolved) else str(v) for k, v in resolved.items()}


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value`` (the value is read as YAML: numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value (e.g. budgets.distillation.epochs=2)")
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

    # ---------------------------------------------------------------- simple settings
    @property
    def image_size(self) -> tuple[int, int]:
        """Model input size ``(height, width)``."""
        value = self.raw.get("image_size", [256, 256])
        value = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(value, list) or len(value) != 2 or not all(_positive_int(v) for v in value):
            raise ConfigError(f"image_size must be [height, width] with positive integers, got {value!r}")
        return int(value[0]), int(value[1])

    @property
    def seeds(self) -> list[int]:
        """Seeds of the grid."""
        seeds = self.raw.get("seeds", [42])
        seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}")
        return [int(s) for s in seeds]

    def section(self, name: str) -> dict[str, Any]:
        """A mapping section of the config (empty if absent), over its defaults (``measure``, ``runner``, ...)."""
        value = self.raw.get(name) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{name}` must be a mapping, got {type(value).__name__}")
        return {**copy.deepcopy(_DEFAULTS.get(name, {})), **value}

    @property
    def measure(self) -> dict[str, Any]:
        """Measurement settings with defaults."""
        out = self.section("measure")
        unknown = [r for r in out["runtimes"] if r not in RUNTIMES]
        if unknown:
            raise ConfigError(f"measure.runtimes: unknown runtime(s) {unknown}; choose from {list(RUNTIMES)}")
        _one_of("measure.speed_on", out["speed_on"], ("all", "first_dataset", "none"))
        return out

    @property
    def evaluation(self) -> dict[str, Any]:
        """Evaluation settings with defaults."""
        out = self.section("evaluation")
        _one_of("evaluation.loco", out["loco"], ("auto", "off"))
        if not isinstance(out["keep_checkpoint"], bool):
            raise ConfigError(f"evaluation.keep_checkpoint must be true or false, got {out['keep_checkpoint']!r}")
        return out

    @property
    def runner(self) -> dict[str, Any]:
        """Runner settings with defaults."""
        out = self.section("runner")
        # OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other
        # processes, spinning torch threads stall each other (measured: 2-thread RD training 5x slower).
        out["env"] = {"OMP_WAIT_POLICY": "PASSIVE", **{str(k): str(v) for k, v in (out.get("env") or {}).items()}}
        _one_of("runner.isolation", out["isolation"], ("subprocess", "forkserver", "none"))
        return out

    @property
    def trainer(self) -> dict[str, Any]:
        """Extra Engine / Trainer arguments (``max_epochs`` / ``max_time`` come from the budgets)."""
        trainer = self.section("trainer")
        for key in ("max_epochs", "max_steps", "max_time"):
            if key in trainer:
                raise ConfigError(
                    f"trainer.{key}: set the training budget under `budgets` (per model family), not `trainer`"
                )
        return trainer

    # ---------------------------------------------------------------- teacher
    @functools.cached_property
    def teacher(self) -> TeacherSpec:
        """The shared teacher (weights resolved; see ``teacher.fallback``)."""
        section = self.section("teacher")
        backbone = section.get("backbone", "mobilenetv2_100")
        weights = section.get("weights", "hub")
        fallback = section.get("fallback", "error")
        _one_of("teacher.fallback", fallback, ("resolve", "random", "error"))
        if isinstance(weights, _Unresolved):
            missing = ", ".join(f"${{{m}}}" for m in weights.missing)
            if fallback == "error":
                raise ConfigError(
                    f"teacher.weights {str(weights)!r} uses {missing}, which is not set: pass --shared DIR / "
                    f"--var NAME=VALUE, or set teacher.weights to a file, `hub` or `random`"
                )
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
            raise ConfigError(
                f"teacher.weights: file {str(path)!r} does not exist (see docs/weights.md for how to get it)"
            )
        return TeacherSpec(backbone, str(path.resolve()), f"{backbone}, ImageNet weights {path.name}")

    def _resolve_demo_weights(self, backbone: str, missing: str) -> str:
        from anomalib_dskd.weights import DEMO_BACKBONE, TeacherWeightsError, resolve_mobilenet_v2_weights

        if backbone != DEMO_BACKBONE:
            raise ConfigError(
                f"teacher.weights uses {missing}, which is not set, and fallback `resolve` only knows {DEMO_BACKBONE}"
            )
        try:
            resolved = resolve_mobilenet_v2_weights()
        except (TeacherWeightsError, FileNotFoundError) as err:
            raise ConfigError(
                f"teacher.weights uses {missing}, which is not set, and no weights could be resolved: {err}"
            ) from err
        self.notes.append(f"teacher weights: {missing} not set, resolved {resolved}")
        return "hub" if resolved is True else str(resolved)

    # ---------------------------------------------------------------- models

    def _budget(self, family: str) -> dict[str, Any]:
        budgets = self.section("budgets")
        if family not in budgets:
            raise ConfigError(
                f"no budget for model family {family!r}: add `budgets: {{{family}: {{epochs: N}}}}` to the config"
            )
        budget = budgets[family] or {}
        if not isinstance(budget, Mapping) or not (set(_BUDGET_KEYS) & set(budget)):
            raise ConfigError(f"budgets.{family} must give `epochs`, `steps` and/or `max_time`, got {budget!r}")
        _no_unknown(f"budgets.{family}", budget, _BUDGET_KEYS, " (epochs, steps, max_time)")
        return dict(budget)

    @functools.cached_property
    def models(self) -> list[ModelSpec]:
        """The models of the grid (``@package`` expanded)."""
        entries = self.raw.get("models")
        if not isinstance(entries, list) or not entries:
            raise ConfigError("`models` must be a non-empty list of model entries (`- name: Rd`)")
        specs: list[ModelSpec] = []
        for index, entry in enumerate(entries):
            entry = {"name": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ConfigError(f"models[{index}] must be a mapping with a `name`, got {entry!r}")
            _no_unknown(f"models[{index}] ({entry['name']})", entry, _MODEL_KEYS)
            if entry["name"] == PACKAGE_MODELS:
                specs.extend(self._package_models(entry))
            else:
                specs.append(self._model_spec(entry, entry.get("kwargs") or {}))
        if duplicates := _duplicates(s.label for s in specs):
            raise ConfigError(f"models: duplicate label(s) {duplicates}; give repeated models distinct `label`s")
        return specs

    def _package_models(self, entry: Mapping[str, Any]) -> list[ModelSpec]:
        from anomalib_dskd.benchmark.models import package_model_classes

        classes, problems = package_model_classes()
        for name, problem in problems.items():
            self.notes.append(f"package model {name} not benchmarked: it does not import ({problem})")
        skip = set(entry.get("skip") or [])
        by_model = entry.get("kwargs_by_model") or {}
        common = dict(entry.get("kwargs") or {})
        return [
            self._model_spec({**entry, "name": name, "label": name}, {**common, **(by_model.get(name) or {})})
            for name in classes
            if name not in skip
        ]

    def _model_spec(self, entry: Mapping[str, Any], kwargs: Mapping[str, Any]) -> ModelSpec:
        from anomalib_dskd.benchmark.models import resolve_model_class

        name = str(entry["name"])
        try:
            cls, source = resolve_model_class(name)
        except LookupError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"model {name}: `kwargs` must be a mapping")
        _check_kwargs(cls, dict(kwargs), name)
        family = entry.get("family") or ("memory_bank" if cls.__name__ in MEMORY_BANK_MODELS else "distillation")
        budget = self._budget(family)
        override = bool(set(_BUDGET_KEYS) & set(entry))
        if override:  # a model entry's budget replaces its family's
            budget = {k: entry[k] for k in _BUDGET_KEYS if k in entry}
        for key in ("epochs", "steps"):
            if budget.get(key) is not None and not _positive_int(budget[key]):
                raise ConfigError(f"model {name}: {key} must be a positive integer, got {budget[key]!r}")
        max_time = budget.get("max_time")
        return ModelSpec(
            label=str(entry.get("label") or cls.__name__),
            class_name=cls.__name__,
            source=source,
            kwargs=copy.deepcopy(dict(kwargs)),
            family=family,
            epochs=budget.get("epochs"),
            steps=budget.get("steps"),
            max_time=None if max_time is None else str(max_time),
            budget_override=override,
        )

    # ---------------------------------------------------------------- datasets
    @functools.cached_property
    def datasets(self) -> list[DatasetSpec]:
        """The datasets of the grid (fallbacks applied, paths checked)."""
        entries = self.raw.get("datasets")
        if not isinstance(entries, list) or not entries:
            raise ConfigError("`datasets` must be a non-empty list of dataset entries")
        specs = [self._dataset_spec(entry, index) for index, entry in enumerate(entries)]
        if duplicates := _duplicates(s.name for s in specs):
            raise ConfigError(f"datasets: duplicate name(s) {duplicates}")
        return specs

    def _dataset_spec(self, entry: Any, index: int) -> DatasetSpec:
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigError(f"datasets[{index}] must be a mapping with a `name`, got {entry!r}")
        entry = dict(entry)
        name = str(entry["name"])
        unresolved = [k for k, v in entry.items() if isinstance(v, _Unresolved)]
        note = None
        if unresolved:
            missing = sorted({m for k in unresolved for m in entry[k].missing})
            shown = ", ".join(f"${{{m}}}" for m in missing)
            if not entry.get("fallback"):
                raise ConfigError(
                    f"dataset {name}: {', '.join(unresolved)} use(s) {shown}, which is not set; pass "
                    + " ".join(f"--var {m}=VALUE" if m != "shared" else "--shared DIR" for m in missing)
                )
            note = f"synthetic stand-in: {shown} not set"
            self.notes.append(f"dataset {name}: {shown} not set, using its synthetic fallback")
            entry = {"name": name, **dict(entry["fallback"])}
        _no_unknown(f"dataset {name}", entry, {*_DATASET_KEYS, *_FOLDER_KEYS})
        fmt = entry.get("format")
        if fmt not in DATASET_FORMATS:
            raise ConfigError(f"dataset {name}: format must be one of {list(DATASET_FORMATS)}, got {fmt!r}")
        datamodule = dict(entry.get("datamodule") or {})
        if fmt == "folder":
            datamodule.update({k: entry[k] for k in _FOLDER_KEYS if entry.get(k) is not None})
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

    def cells(self) -> list[CellSpec]:
        """Expand the grid, model-major: for each model, each dataset, each seed."""
        self.validate()
        measure, data = self.measure, self.section("data")
        first = (self.datasets[0].name, self.seeds[0])
        speed_on = measure["speed_on"]
        return [
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
                measure_speed=speed_on == "all" or (speed_on == "first_dataset" and (dataset.name, seed) == first),
            )
            for model in self.models
            for dataset in self.datasets
            for seed in self.seeds
        ]


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
        raise ConfigError(f"model {name}: unknown argument(s) {unknown}; {cls.__name__} accepts {accepted}")


def _check_dataset(spec: DatasetSpec) -> None:
    """Check that a real dataset's folders exist (synthetic ones are generated later)."""
    if spec.is_synthetic:
        if spec.root is not None:
            raise ConfigError(
                f"dataset {spec.name}: synthetic datasets are generated under the output folder; remove `root`"
            )
        allowed = _GENERATE_KEYS[spec.format]
        unknown = set(spec.generate) - allowed
        if unknown:
            raise ConfigError(
                f"dataset {spec.name}: unknown `generate` key(s) {sorted(unknown)}; accepted {sorted(allowed)}"
            )
        spec.category = spec.category or spec.name
        return
    if not spec.root:
        raise ConfigError(f"dataset {spec.name}: `root` is required for format {spec.format}")
    root = Path(spec.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"dataset {spec.name}: root folder {str(root)!r} does not exist")
    spec.root = str(root.resolve())
    if spec.format in {"mvtec_loco", "mvtec_ad"}:
        if not spec.category:
            raise ConfigError(f"dataset {spec.name}: `category` is required for format {spec.format}")
        required = [root / spec.category / "train" / "good", root / spec.category / "test"]
        missing = [str(p) for p in required if not p.is_dir()]
        if missing:
            raise ConfigError(f"dataset {spec.name}: not an {spec.format} category, missing folder(s) {missing}")
    else:  # folder
        if not spec.datamodule.get("normal_dir"):
            raise ConfigError(f"dataset {spec.name}: format folder needs `normal_dir` (relative to root)")
        for key in _FOLDER_KEYS:
            value = spec.datamodule.get(key)
            if value and not (root / value).is_dir():
                raise ConfigError(f"dataset {spec.name}: {key} {str(root / value)!r} does not exist")
        spec.datamodule.setdefault("name", spec.name)
    if spec.max_train_images is not None and not _positive_int(spec.max_train_images):
        raise ConfigError(
            f"dataset {spec.name}: max_train_images must be a positive integer, got {spec.max_train_images!r}"
        )


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
            (``--set budgets.distillation.epochs=2``); a mapping value replaces the mapping there.

    Returns:
        The configuration.

    Raises:
        ConfigError: the file is missing or not valid YAML, a variable is unknown, an override is malformed.
    """
    path = None
    if isinstance(source, Mapping):
        raw: Any = copy.deepcopy(dict(source))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"benchmark config {str(path)!r} does not exist (see configs/benchmark/ for examples)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"benchmark config {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"benchmark config {path} must be a mapping at the top level")
    if overrides:
        try:
            tree = OmegaConf.create(raw)
        except OmegaConfBaseException as err:
            raise ConfigError(
                f"benchmark config {path or ''}: {str(err).splitlines()[0]}".replace(" : ", ": ")
            ) from None
        for text in overrides:
            key, value = parse_override(text)
            try:
                OmegaConf.update(tree, key, value, merge=False)
            except (OmegaConfBaseException, IndexError, ValueError, TypeError) as err:
                raise ConfigError(f"override {text!r} does not fit the config: {str(err).splitlines()[0]}") from None
        raw = OmegaConf.to_container(tree)
    declared = raw.pop("variables", None)
    resolved = _resolve_variables(declared or {}, variables)
    tree = _interpolate(raw, resolved)
    if declared is not None:
        tree["variables"] = declared
    return BenchmarkConfig(path=path, raw=tree, variables=resolved, name=str(tree.get("name") or "benchmark"))
