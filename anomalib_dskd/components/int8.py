"""INT8 post-training quantisation (NNCF) that keeps the package's models' scores.

Two things NNCF's defaults get wrong on these models, both measured on trained models in
``docs/benchmarks/edge/README.md``:

* **The anomaly-map smoothing.** Every model ends in a Gaussian filter over the one-channel anomaly map
  (two 1-D convolutions), and the image score is that map's maximum. With the filter's convolutions in INT8,
  OpenVINO's CPU plugin (2026.x) returns an image score that is *not* the maximum of the map it returns
  (trained Rd, juice_bottle: off by up to 1.37 on scores of about 1.7; the map itself is right). The image
  AUROC drops (0.910 -> 0.893) and, with anomalib's normalisation inside the graph, every image gets the
  same score (AUROC 0.5). Kept in f32 (:func:`map_smoothing_ops`), scores equal the map's maximum
  again; the filter is a negligible part of the cost. The package's models now run the upsampling and the
  filter as constant matrix products (``UpsampleSmooth``); those ``MatMul``s are kept f32 for the same reason.
* **The scoring arithmetic.** Quantising Dskd's elementwise ops (cosine / affinity / Eq. 8 arithmetic on
  small teacher-student differences) loses about 0.1 image AUROC, and with the matrix-product smoothing
  NNCF also quantises Rd's cosine-distance arithmetic (trained Rd, juice_bottle: 0.910 -> 0.857). Keeping
  :data:`F32_ELEMENTWISE_OPS` f32 *in the scoring tail only* (:func:`scoring_tail_ops`: the ops that feed no
  convolution; ``int8_scoring_tail_types`` of the RD-family models) keeps both within 0.003 image AUROC while
  the networks' own elementwise ops (residual ``Add``s) are quantised as NNCF intends. (Before, Dskd kept
  those op types f32 everywhere: ``int8_ignored_types``, still available.)

* **An OpenVINO compile failure (Glance).** With its scoring tail f32, OpenVINO 2026.4's CPU plugin refuses
  Glance's quantised graph: its low-precision ``ReshapeTransformation`` moves the dequantisation of Global-Net's
  last convolution through the reshape that splits the dynamic batch into ``(batch, patches, ...)`` and fails
  shape inference. Keeping such convolutions f32 (:func:`batch_splitting_convolutions`, the rule a model names in
  ``int8_f32_rules``) lets the graph compile (``docs/benchmarks/edge/README.md``, round 5).

:class:`Int8Export` applies these on anomalib's own path (``Engine.export(..., compression_type=INT8_PTQ)``,
``anomalib export --compression_type INT8_PTQ``), which otherwise calls ``nncf.quantize`` without an
ignored scope.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule

logger = logging.getLogger(__name__)

#: OpenVINO op types that stay f32 for a model whose ``int8_ignored_types`` names them: every elementwise,
#: reduction and matrix-product op, so that INT8 touches the convolutions only.
F32_ELEMENTWISE_OPS = (
    "Multiply", "Add", "Subtract", "Divide", "MatMul", "ReduceSum", "ReduceMean", "Power", "Sqrt", "Exp",
)


def map_smoothing_convolutions(model: Any) -> list[str]:
    """Names of the ``Convolution`` nodes of an OpenVINO model that filter a one-channel map.

    Their weights have shape ``(1, 1, kh, kw)``: one input and one output channel. A learned layer of a CNN
    teacher or student never has that shape (MobileNet's depthwise layers are ``GroupConvolution``s), so
    these are the anomaly-map filters (``SeparableGaussianBlur2d``, anomalib's ``GaussianBlur2d``).
    """
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        weights = op.input_value(1).get_partial_shape()
        if weights.is_static and len(weights) == 4 and weights[0].get_length() == 1 and weights[1].get_length() == 1:
            names.append(op.get_friendly_name())
    return names


def _constant_data(output: Any) -> np.ndarray | None:
    """The values behind a node input if it is a constant, possibly through ``Convert`` / ``Transpose`` (the
    caller's test accepts either orientation)."""
    node = output.get_node()
    while node.get_type_name() in ("Convert", "Transpose") and node.get_input_size() >= 1:
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data())


def map_resampling_matmuls(model: Any) -> list[str]:
    """Names of the ``MatMul`` nodes that upsample or smooth a map with a constant resampling matrix.

    :class:`~anomalib_dskd.components.rd.UpsampleSmooth` writes the map's bilinear upsampling and Gaussian
    filter as products with constant 2-D matrices that are non-negative and whose rows (left factor) or
    columns (right factor) each sum to 1: interpolation and normalised-filter weights. A learned linear layer
    has signed weights, so this rule does not catch it.
    """
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        for index in range(op.get_input_size()):
            data = _constant_data(op.input_value(index))
            if data is None or data.ndim != 2 or data.size == 0 or data.min() < 0:
                continue
            data = data.astype(np.float64)
            if np.allclose(data.sum(1), 1, atol=1e-4) or np.allclose(data.sum(0), 1, atol=1e-4):
                names.append(op.get_friendly_name())
                break
    return names


def map_smoothing_ops(model: Any) -> list[str]:
    """Every op that resamples or smooths the anomaly map: :func:`map_smoothing_convolutions` and
    :func:`map_resampling_matmuls`; INT8 must leave them f32."""
    return map_smoothing_convolutions(model) + map_resampling_matmuls(model)


#: op types of the learned networks: what INT8 is for
CONVOLUTION_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")


def scoring_tail_ops(model: Any, types: tuple[str, ...]) -> list[str]:
    """Names of the ops of ``types`` in the scoring tail: ops from which no convolution can be reached.

    A model's graph is its networks (teacher, students: convolutions with elementwise ops between them, e.g.
    residual ``Add``s) followed by the scoring arithmetic on their features (cosine distances, affinities,
    standardisation, fusion), which feeds no convolution of a network: the map-smoothing convolutions
    (:func:`map_smoothing_convolutions`, e.g. anomalib's ``GaussianBlur2d`` at the end of Padim and Patchcore) are
    part of the tail, not a network. Keeping ``types`` f32 in that tail only lets NNCF
    quantise the networks' elementwise ops as it does for Rd, instead of cutting every INT8 convolution chain
    at each residual ``Add``.
    """
    ops = list(model.get_ordered_ops())
    smoothing = set(map_smoothing_convolutions(model))
    reaches: dict[str, bool] = {}
    for op in reversed(ops):  # topological order reversed: every consumer is visited before its producers
        found = False
        for output in op.outputs():
            for target in output.get_target_inputs():
                child = target.get_node()
                network_conv = child.get_type_name() in CONVOLUTION_OPS and child.get_friendly_name() not in smoothing
                if network_conv or reaches.get(child.get_friendly_name(), False):
                    found = True
                    break
            if found:
                break
        reaches[op.get_friendly_name()] = found
    return [op.get_friendly_name() for op in ops if op.get_type_name() in types and not reaches[op.get_friendly_name()]]


#: elementwise ops between a convolution and a reshape where OpenVINO's dequantisation would sit
_ELEMENTWISE_AFTER_CONV = ("Add", "Multiply", "Subtract", "Relu", "PRelu", "Clamp")


def _splits_dynamic_batch(reshape: Any) -> bool:
    """Whether a ``Reshape`` moves elements between a dynamic first dimension and the others (a batch split / merge)."""
    source, target = reshape.get_input_partial_shape(0), reshape.get_output_partial_shape(0)
    if source.rank.is_dynamic or target.rank.is_dynamic or len(source) < 2 or len(target) < 2:
        return False
    if not (source[0].is_dynamic and all(dim.is_static for dim in list(source)[1:] + list(target)[1:])):
        return False
    inner = int(np.prod([dim.get_length() for dim in list(source)[1:]]))
    outer = int(np.prod([dim.get_length() for dim in list(target)[1:]]))
    return inner != outer


def _feeds_batch_split(conv: Any) -> bool:
    """Whether ``conv``'s output reaches, through elementwise ops only, a reshape that splits the dynamic batch."""
    frontier, seen = [conv], set()
    while frontier:
        node = frontier.pop()
        for output in node.outputs():
            for target in output.get_target_inputs():
                child = target.get_node()
                if child.get_friendly_name() in seen:
                    continue
                seen.add(child.get_friendly_name())
                if child.get_type_name() == "Reshape" and _splits_dynamic_batch(child):
                    return True
                if child.get_type_name() in _ELEMENTWISE_AFTER_CONV:
                    frontier.append(child)
    return False


def batch_splitting_convolutions(model: Any) -> list[str]:
    """Names of the convolutions whose output goes, through elementwise ops only (no ``Transpose``), into a
    ``Reshape`` that splits (or merges) the dynamic batch dimension, e.g. Glance's Global-Net's last layer:
    ``(batch * patches, C, 1, 1) -> (batch, patches, 1, 1, C)``.

    Quantised, OpenVINO 2026.4's low-precision ``ReshapeTransformation`` moves the convolution's dequantisation
    through that reshape and fails shape inference at compile time once the ops after it are kept f32; these
    convolutions stay f32. (Reached through a ``Transpose`` first, as Global-Net's other layers are, it compiles.)
    """
    return [
        op.get_friendly_name() for op in model.get_ordered_ops()
        if op.get_type_name() in CONVOLUTION_OPS and _feeds_batch_split(op)
    ]


def first_convolutions(model: Any) -> list[str]:
    """Names of the convolutions that read the model's input with no other convolution before them (each network's
    first layer), a layer INT8 deployments often keep f32. Glance names this rule: on its tire model, together with
    :func:`convolutions_before_batch_splitting`, it raised the INT8 map's correlation with f32 on held-out training
    images from 0.72 to 0.94 (``docs/benchmarks/edge/README.md``, round 6)."""
    reached: dict[str, bool] = {}  # op name -> a (non-smoothing) convolution lies between the input and it
    smoothing = set(map_smoothing_convolutions(model))
    names = []
    for op in model.get_ordered_ops():
        parents = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        after_conv = any(
            reached.get(parent.get_friendly_name(), False)
            or (parent.get_type_name() in CONVOLUTION_OPS and parent.get_friendly_name() not in smoothing)
            for parent in parents
        )
        reached[op.get_friendly_name()] = after_conv
        is_conv = op.get_type_name() in CONVOLUTION_OPS and op.get_friendly_name() not in smoothing
        if is_conv and not after_conv and any(parent.get_type_name() != "Constant" for parent in parents):
            names.append(op.get_friendly_name())
    return names


def convolutions_before_batch_splitting(model: Any) -> list[str]:
    """Names of the convolutions nearest upstream of each :func:`batch_splitting_convolutions` convolution: walking
    back from its data input through any non-convolution op (activations, bias, reshapes, Glance's window gathers),
    the first convolution met on each path (not those of the map smoothing). In Glance these are each network's
    penultimate layer on the patch path (Local-Net's ``conv3``, Global-Net's last but one), whose quantisation error
    the last layer turns into the patch descriptor the scores compare. Chosen for Glance without labels, by map
    fidelity on held-out training images (``benchmarks/glance_int8_scope_selection.py``,
    ``docs/benchmarks/edge/README.md``, round 6)."""
    smoothing = set(map_smoothing_convolutions(model))
    found: list[str] = []
    by_name = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    for name in batch_splitting_convolutions(model):
        frontier, seen = [by_name[name].input_value(0).get_node()], set()
        while frontier:
            node = frontier.pop()
            node_name = node.get_friendly_name()
            if node_name in seen or node.get_type_name() in ("Parameter", "Constant"):
                continue
            seen.add(node_name)
            if node.get_type_name() in CONVOLUTION_OPS and node_name not in smoothing:
                if node_name not in found:
                    found.append(node_name)
                continue
            if node.get_type_name() == "ShapeOf":  # a shape computation, not the data path
                continue
            frontier.extend(node.input_value(i).get_node() for i in range(node.get_input_size()))
    return found


#: rules a model can name in ``int8_f32_rules``: each returns the names of ops to keep f32
INT8_F32_RULES = {
    "batch_splitting_convolutions": batch_splitting_convolutions,
    "convolutions_before_batch_splitting": convolutions_before_batch_splitting,
    "first_convolutions": first_convolutions,
}


def int8_ignored_scope(
    model: Any, ignored_types: tuple[str, ...] = (), tail_types: tuple[str, ...] = (), rules: tuple[str, ...] = ()
) -> Any:
    """``nncf.IgnoredScope``: the map-smoothing ops of ``model`` (:func:`map_smoothing_ops`), every op of
    ``ignored_types``, the ops of ``tail_types`` in the scoring tail (:func:`scoring_tail_ops`) and the ops the named
    ``rules`` (:data:`INT8_F32_RULES`) find. The keywords are those of ``benchmark.measure.model_int8_types``, so a
    model's own scope is ``int8_ignored_scope(graph, **model_int8_types(model))``."""
    import nncf

    unknown = sorted(set(rules) - set(INT8_F32_RULES))
    if unknown:
        msg = f"unknown INT8 f32 rules {unknown}; known: {sorted(INT8_F32_RULES)}."
        raise ValueError(msg)
    names = set(map_smoothing_ops(model))
    if tail_types:
        names |= set(scoring_tail_ops(model, tuple(tail_types)))
    for rule in rules:
        names |= set(INT8_F32_RULES[rule](model))
    return nncf.IgnoredScope(names=sorted(names), types=list(ignored_types), validate=False)


#: below this many validation images, anomalib's INT8_PTQ path (``Int8Export``) calibrates on the training images too
MIN_CALIBRATION_IMAGES = 32


class Int8Export:
    """Mixin for an ``AnomalibModule``: anomalib's ``INT8_PTQ`` export with the ignored scope above.

    List it before ``AnomalibModule`` (the class stays a direct subclass, as ``get_model`` requires).
    Set ``int8_scoring_tail_types`` on a model whose scoring arithmetic must stay f32, ``int8_ignored_types``
    for op types that must stay f32 everywhere.
    """

    #: OpenVINO op types NNCF must leave in f32 everywhere in this model (besides the map-smoothing ops).
    int8_ignored_types: tuple[str, ...] = ()
    #: OpenVINO op types NNCF must leave in f32 in the scoring tail only (:func:`scoring_tail_ops`).
    int8_scoring_tail_types: tuple[str, ...] = ()
    #: names of :data:`INT8_F32_RULES` whose ops NNCF must leave in f32.
    int8_f32_rules: tuple[str, ...] = ()

    def _post_training_quantization_ov(self, model: Any, datamodule: AnomalibDataModule | None = None) -> Any:
        """anomalib's ``ExportMixin._post_training_quantization_ov`` (calibration on the validation images),
        with :func:`int8_ignored_scope` and the validation images resized to a static model input size
        (anomalib feeds them as they come: datasets whose images are not at the input size fail there).

        When the validation split has fewer than :data:`MIN_CALIBRATION_IMAGES` images, the training images
        calibrate too (logged as a warning): with weld's 3 validation images Glance's INT8 lost 0.199 image AUROC
        against f32 on anomalib's path, while 32 training images kept it within 0.001
        (``docs/benchmarks/edge/README.md``, round 6)."""
        import nncf
        import torch.nn.functional as F

        if datamodule is None:
            msg = "Datamodule must be provided for OpenVINO INT8_PTQ compression (its validation images calibrate)."
            raise ValueError(msg)
        datamodule.setup("fit")
        shape = model.input(0).partial_shape
        if shape[0].is_static:
            datamodule.train_batch_size = shape[0].get_length()
        size = (shape[2].get_length(), shape[3].get_length()) if shape[2].is_static and shape[3].is_static else None
        loaders = [datamodule.val_dataloader()]
        count = len(loaders[0].dataset)
        if count < MIN_CALIBRATION_IMAGES:
            loaders.append(datamodule.train_dataloader())
            logger.warning(
                f"INT8 calibration: the validation split has {count} images, fewer than {MIN_CALIBRATION_IMAGES}; "
                f"its {len(loaders[1].dataset)} training images calibrate too."
            )
            count += len(loaders[1].dataset)
        if count < 300:
            logger.warning(f">300 images recommended for INT8 quantization, found only {count} images")

        def transform(batch: Any) -> Any:
            images = batch["image"]
            if size is not None and tuple(images.shape[-2:]) != size:
                images = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
            return images

        calibration = nncf.Dataset(_Chained(loaders), transform)
        scope = int8_ignored_scope(model, self.int8_ignored_types, self.int8_scoring_tail_types, self.int8_f32_rules)
        return nncf.quantize(model, calibration, ignored_scope=scope)


class _Chained:
    """Re-iterable concatenation of dataloaders (NNCF iterates its calibration data more than once)."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Any:  # noqa: ANN401
        for loader in self.loaders:
            yield from loader

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)
