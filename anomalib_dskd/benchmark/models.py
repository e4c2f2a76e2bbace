"""Model builders: every model of a cell gets the same teacher, input size and evaluator.

* The package's models (``anomalib_dskd.registration.MODELS``, discovered at run time) take the teacher
  as ``backbone`` + ``pre_trained`` (a timm name and a local checkpoint, the hub or random init).
* anomalib's feature-extractor models (:class:`~anomalib.models.Patchcore`, :class:`~anomalib.models.Padim`,
  :class:`~anomalib.models.Stfpm`) get the teacher as a ready ``nn.Module``: the timm model built by
  :func:`anomalib_dskd.weights.create_timm_model` with the same weights, and torch-FX node names as
  layers (:data:`FEATURE_LAYERS`). For MobileNetV2 these nodes are exactly torchvision's
  ``features.3/6/10/13`` used in ``BASELINES.md``. Stfpm's student is replaced by an untrained copy of
  the teacher architecture (otherwise teacher and student would share the module).
* Models that cannot take the teacher are built with their own and *flagged* in the tables:
  anomalib's :class:`~anomalib.models.ReverseDistillation` builds its teacher from a timm ResNet name
  (here ``resnet18`` with random weights unless a ResNet teacher with hub weights is configured);
  :class:`~anomalib.models.EfficientAd` needs its own pretrained PDN weights and ImageNette
  (:func:`availability` reports it as skipped when they are not on disk); any other anomalib model is
  built from its name with the config's ``kwargs``.
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from anomalib_dskd.benchmark.config import CellSpec, ModelSpec, TeacherSpec

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_LAYERS",
    "BuiltModel",
    "availability",
    "build_model",
    "package_model_classes",
    "resolve_model_class",
]

_RESNETS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet101_2", "resnet101", "resnet152")
_LITE0 = {
    "Patchcore": ["blocks.3.2", "blocks.4.2"],
    "Padim": ["blocks.1.1", "blocks.2.1", "blocks.4.2"],
    "Stfpm": ["blocks.1.1", "blocks.2.1", "blocks.4.2"],
}
_RESNET_LAYERS = {
    "Patchcore": ["layer2", "layer3"],
    "Padim": ["layer1", "layer2", "layer3"],
    "Stfpm": ["layer1", "layer2", "layer3"],
}
#: torch-FX node names of the teacher given to anomalib's feature-extractor models, per teacher.
#: MobileNetV2: blocks.1.1 / 2.2 / 3.3 / 4.2 = torchvision features.3 / 6 / 10 / 13 (strides 4, 8, 16, 16).
FEATURE_LAYERS: dict[str, dict[str, list[str]]] = {
    "mobilenetv2_100": {
        "Patchcore": ["blocks.3.3", "blocks.4.2"],
        "Padim": ["blocks.1.1", "blocks.2.2", "blocks.4.2"],
        "Stfpm": ["blocks.1.1", "blocks.2.2", "blocks.4.2"],
    },
    "tf_efficientnet_lite0": _LITE0,
    "efficientnet_lite0": _LITE0,
    **{name: _RESNET_LAYERS for name in _RESNETS},
}
#: anomalib models that take the shared teacher as an nn.Module
TEACHER_MODULE_MODELS = ("Patchcore", "Padim", "Stfpm")


@dataclass
class BuiltModel:
    """A model ready for ``Engine.fit`` and how its teacher relates to the shared one.

    Attributes:
        module: the Lightning module.
        teacher: what teacher it has (for the tables).
        teacher_note: why it does not have the shared teacher; ``None`` when it does.
    """

    module: Any
    teacher: str
    teacher_note: str | None = None
    notes: list[str] = field(default_factory=list)


def package_model_classes() -> tuple[dict[str, type], dict[str, str]]:
    """The package's model classes that import, and the import errors of the others.

    Returns:
        ``(classes, problems)``: name -> class, name -> error text.
    """
    from anomalib_dskd.registration import MODELS

    classes: dict[str, type] = {}
    problems: dict[str, str] = {}
    for name, module in MODELS.items():
        try:
            classes[name] = getattr(importlib.import_module(module), name)
        except Exception as err:  # noqa: BLE001 - a teammate's model that does not import yet
            problems[name] = f"{type(err).__name__}: {err}"
    return classes, problems


def resolve_model_class(name: str) -> tuple[type, str]:
    """Find a model class by name: the package's first, then anomalib's (case-insensitive).

    Args:
        name: class name (``Rd``, ``Patchcore``), or ``anomalib_dskd.Rd`` / ``anomalib.models.Padim``.

    Returns:
        ``(class, source)`` with source ``"package"`` or ``"anomalib"``.

    Raises:
        LookupError: no such model (the message lists the available ones).
    """
    import anomalib.models as anomalib_models
    from anomalib.models.components import AnomalibModule

    from anomalib_dskd.registration import MODELS

    short = name.rsplit(".", 1)[-1]
    if short in MODELS or name.startswith("anomalib_dskd."):
        classes, problems = package_model_classes()
        if short in classes:
            return classes[short], "package"
        if short in problems:
            msg = f"package model {short!r} is registered but does not import: {problems[short]}"
            raise LookupError(msg)
    lowered = {n.lower(): n for n in MODELS}
    if short.lower() in lowered and short not in MODELS:
        return resolve_model_class(lowered[short.lower()])
    candidates = {
        n: getattr(anomalib_models, n)
        for n in getattr(anomalib_models, "__all__", dir(anomalib_models))
        if isinstance(getattr(anomalib_models, n, None), type)
        and issubclass(getattr(anomalib_models, n), AnomalibModule)
        and getattr(anomalib_models, n).__module__.startswith("anomalib.")
    }
    for candidate, cls in candidates.items():
        if candidate.lower() == short.lower():
            return cls, "anomalib"
    msg = (
        f"unknown model {name!r}. Package models: {sorted(MODELS)} (or `@package` for all); "
        f"anomalib models: {sorted(candidates)}"
    )
    raise LookupError(msg)


def availability(spec: ModelSpec) -> str | None:
    """Why a model cannot run on this machine (checked before the cell starts), or ``None``.

    Only EfficientAd is checked: it needs anomalib's pretrained PDN teacher and ImageNette on disk,
    which are downloads.
    """
    if spec.class_name != "EfficientAd":
        return None
    from anomalib.utils.path import get_pretrained_weights_dir

    size = str(spec.kwargs.get("model_size", "small"))
    size = {"EfficientAdModelSize.S": "small", "EfficientAdModelSize.M": "medium", "s": "small", "m": "medium"}.get(
        size, size,
    )
    weights = get_pretrained_weights_dir() / "efficientad_pretrained_weights" / f"pretrained_teacher_{size}.pth"
    imagenet = Path(str(spec.kwargs.get("imagenet_dir", "./datasets/imagenette"))).expanduser()
    missing = []
    if not weights.is_file():
        missing.append(f"its pretrained PDN teacher {weights}")
    if not imagenet.is_dir():
        missing.append(f"ImageNette at {imagenet} (kwargs.imagenet_dir)")
    if missing:
        return (
            "not run: EfficientAd needs " + " and ".join(missing) + ", downloads that are not available here; "
            "it cannot take the shared teacher"
        )
    return None


def build_teacher_module(teacher: TeacherSpec) -> nn.Module:
    """The shared teacher as a timm classification model, in eval mode (weights via the package's loader)."""
    from anomalib_dskd.weights import create_timm_model

    return create_timm_model(teacher.backbone, pre_trained=teacher.weights).eval()


def feature_layers(class_name: str, backbone: str) -> list[str]:
    """Default FX layers of ``class_name`` for ``backbone`` (see :data:`FEATURE_LAYERS`)."""
    try:
        return list(FEATURE_LAYERS[backbone][class_name])
    except KeyError:
        msg = (
            f"no default layers of {class_name} for teacher {backbone!r}: give them as model kwargs "
            f"(`kwargs: {{layers: [...]}}`, torch-FX node names of the timm model)"
        )
        raise KeyError(msg) from None


def build_model(spec: CellSpec, evaluator: Any) -> BuiltModel:  # noqa: ANN401
    """Build the cell's model with the shared teacher, input size and evaluator.

    Args:
        spec: the cell.
        evaluator: the evaluator every model gets.

    Returns:
        The model and a description of its teacher.
    """
    model_spec = spec.model
    cls, source = resolve_model_class(model_spec.class_name)
    kwargs = copy.deepcopy(model_spec.kwargs)
    kwargs.setdefault("visualizer", False)
    kwargs["evaluator"] = evaluator
    kwargs["pre_processor"] = cls.configure_pre_processor(tuple(spec.image_size))
    teacher = spec.teacher
    shared = teacher.description

    if source == "package":
        own = "backbone" in kwargs or "pre_trained" in kwargs
        kwargs.setdefault("backbone", teacher.backbone)
        kwargs.setdefault("pre_trained", teacher.weights)
        note = None if not own else f"own teacher from kwargs: {kwargs['backbone']} (pre_trained={kwargs['pre_trained']})"
        return BuiltModel(cls(**kwargs), shared if not own else str(kwargs["backbone"]), note)

    name = cls.__name__
    if name in TEACHER_MODULE_MODELS and "backbone" not in kwargs:
        return _build_with_teacher_module(cls, kwargs, teacher)
    if name == "ReverseDistillation":
        return _build_reverse_distillation(cls, kwargs, teacher)
    if name == "EfficientAd":
        return BuiltModel(cls(**kwargs), "own PDN teacher (EfficientAd)", "EfficientAd cannot take the shared teacher")
    backbone = kwargs.get("backbone", "its default backbone")
    return BuiltModel(cls(**kwargs), str(backbone), f"{name} is not given the shared teacher (built from its kwargs)")


def _build_with_teacher_module(cls: type, kwargs: dict[str, Any], teacher: TeacherSpec) -> BuiltModel:
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    from anomalib_dskd.weights import create_timm_model

    name = cls.__name__
    module = build_teacher_module(teacher)
    layers = list(kwargs.pop("layers", None) or feature_layers(name, teacher.backbone))
    if name == "Stfpm":
        model = cls(backbone=module, layers=layers, **kwargs)
        student = create_timm_model(teacher.backbone, pre_trained=False)
        model.model.student_model = TimmFeatureExtractor(
            backbone=student, layers=layers, pre_trained=False, requires_grad=True,
        )
        return BuiltModel(model, teacher.description + " (student: untrained copy)")
    if name == "Padim" and kwargs.get("n_features") is None:
        # anomalib has default n_features only for its named backbones (resnet18: 100, wide_resnet50_2: 550);
        # for other teachers keep every channel (MobileNetV2 features.3 + 6 + 13: 24 + 32 + 96 = 152).
        from anomalib.models.image.padim.torch_model import _N_FEATURES_DEFAULTS

        kwargs["n_features"] = _N_FEATURES_DEFAULTS.get(teacher.backbone) or _channels(module, layers)
    model = cls(backbone=module, layers=layers, pre_trained=False, **kwargs)
    built = BuiltModel(model, teacher.description)
    if name == "Padim":
        _retry_single_threaded(model.model.gaussian, built.notes)
    return built


def _retry_single_threaded(module: Any, notes: list[str]) -> None:  # noqa: ANN401
    """Work around a multi-threaded MKL failure of torch's batched ``linalg.inv`` in Padim's fit.

    With torch 2.14's CPU build, inverting Padim's per-patch covariances with 2 threads sometimes fails
    ("Intel oneMKL ERROR: Parameter 6 was incorrect on entry to SLASWP", then "Pivots given to lu_solve
    must all be greater or equal to 1"); the same inversion succeeds with one thread. The retry is
    recorded in the cell's notes.
    """
    import torch

    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        try:
            return original(*args, **kwargs)
        except RuntimeError as err:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                out = original(*args, **kwargs)
            finally:
                torch.set_num_threads(threads)
            notes.append(
                f"Padim covariance inversion failed with {threads} threads ({str(err).splitlines()[0]}); "
                "it succeeded single-threaded (torch/MKL issue, not a model property)",
            )
            return out

    module.forward = forward


def _channels(module: nn.Module, layers: list[str]) -> int:
    from anomalib.models.components.feature_extractors import dryrun_find_featuremap_dims
    from torchvision.models.feature_extraction import create_feature_extractor

    extractor = create_feature_extractor(copy.deepcopy(module), return_nodes={layer: layer for layer in layers})
    dims = dryrun_find_featuremap_dims(extractor, (256, 256), layers=layers)
    return int(sum(info["num_features"] for info in dims.values()))


def _build_reverse_distillation(cls: type, kwargs: dict[str, Any], teacher: TeacherSpec) -> BuiltModel:
    if "backbone" not in kwargs and teacher.backbone in _RESNETS and teacher.weights is True:
        model = cls(backbone=teacher.backbone, pre_trained=True, **kwargs)
        return BuiltModel(model, teacher.description)
    kwargs.setdefault("backbone", "resnet18")
    kwargs.setdefault("pre_trained", False)
    backbone, pre_trained = kwargs["backbone"], kwargs["pre_trained"]
    model = cls(**kwargs)
    weights = "ImageNet weights from the timm hub" if pre_trained else "random init"
    note = (
        f"{backbone} teacher, {weights}: anomalib's ReverseDistillation builds its teacher from a timm ResNet "
        f"name and cannot take the shared {teacher.backbone}"
    )
    return BuiltModel(model, f"{backbone}, {weights}", note)
