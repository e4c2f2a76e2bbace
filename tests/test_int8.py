"""INT8 ignored scope (``anomalib_dskd.components.int8``) on small hand-built OpenVINO graphs."""

from __future__ import annotations

import numpy as np
import pytest

from anomalib_dskd.components.int8 import (
    F32_ELEMENTWISE_OPS,
    Int8Export,
    int8_ignored_scope,
    map_resampling_matmuls,
    map_smoothing_convolutions,
    map_smoothing_ops,
)


def _graph():
    """image -> conv 3->4 -> conv 4->1 -> (1, 1, 5, 1) conv -> (1, 1, 1, 5) conv -> max: a model's tail."""
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter([1, 3, 16, 16], np.float32, name="image")

    def conv(x, shape, name, pads):
        weights = ops.constant(np.random.default_rng(0).random(shape, dtype=np.float32))
        node = ops.convolution(x, weights, [1, 1], pads, pads, [1, 1])
        node.set_friendly_name(name)
        return node

    features = conv(image, (4, 3, 3, 3), "learned_1", [1, 1])
    raw_map = conv(features, (1, 4, 1, 1), "learned_to_one_channel", [0, 0])
    smooth = conv(conv(raw_map, (1, 1, 5, 1), "blur_y", [2, 0]), (1, 1, 1, 5), "blur_x", [0, 2])
    score = ops.reduce_max(smooth, ops.constant(np.array([2, 3])), keep_dims=False)
    return ov.Model([smooth, score], [image])


def test_map_smoothing_convolutions_are_the_one_to_one_channel_filters() -> None:
    # the 4->1 projection is learned (4 input channels) and must be quantised; only 1->1 filters are kept f32
    assert map_smoothing_convolutions(_graph()) == ["blur_y", "blur_x"]


def test_resampling_matmuls_are_the_constant_interpolation_products_only() -> None:
    """UpsampleSmooth's constant, non-negative, rows-sum-to-1 factors are found; learned or data products are not."""
    import openvino as ov
    from openvino import opset13 as ops

    from anomalib_dskd.components.rd.anomaly_map import bilinear_matrix

    raw = ops.parameter([1, 1, 8, 8], np.float32, name="map")
    rows = ops.constant(bilinear_matrix(8, 32).astype(np.float32))
    cols = ops.constant(bilinear_matrix(8, 32).T.astype(np.float32).copy())
    left = ops.matmul(rows, raw, False, False)
    left.set_friendly_name("resize_rows")
    resized = ops.matmul(left, ops.convert(cols, np.float32), False, False)  # through a Convert, as f16 weights
    resized.set_friendly_name("resize_cols")
    learned = ops.matmul(raw, ops.constant(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)), False, False)
    learned.set_friendly_name("learned")
    data = ops.matmul(raw, raw, False, True)
    data.set_friendly_name("affinity")
    model = ov.Model([resized, learned, data], [raw])
    assert map_resampling_matmuls(model) == ["resize_rows", "resize_cols"]
    assert map_smoothing_ops(_graph()) == ["blur_y", "blur_x"]


def test_scoring_tail_is_what_feeds_no_convolution() -> None:
    """The residual Add between two convolutions is the network's; the Add / Multiply after the last one are scoring."""
    import openvino as ov
    from openvino import opset13 as ops

    from anomalib_dskd.components.int8 import scoring_tail_ops

    image = ops.parameter([1, 3, 8, 8], np.float32, name="image")
    weights = ops.constant(np.ones((3, 3, 1, 1), dtype=np.float32))
    first = ops.convolution(image, weights, [1, 1], [0, 0], [0, 0], [1, 1])
    residual = ops.add(first, image)
    residual.set_friendly_name("residual")
    second = ops.convolution(residual, weights, [1, 1], [0, 0], [0, 0], [1, 1])
    difference = ops.add(second, ops.negative(residual))
    difference.set_friendly_name("difference")
    squared = ops.multiply(difference, difference)
    squared.set_friendly_name("squared")
    model = ov.Model([squared], [image])
    assert scoring_tail_ops(model, ("Add", "Multiply")) == ["difference", "squared"]
    assert scoring_tail_ops(model, ("Multiply",)) == ["squared"]


def test_scoring_tail_reaches_through_a_map_smoothing_convolution() -> None:
    """anomalib's built-ins (Padim, Patchcore) blur the map with 1->1 convolutions: the arithmetic before the blur
    is still scoring, not network (with every convolution counted, their tail was empty)."""
    import openvino as ov
    from openvino import opset13 as ops

    from anomalib_dskd.components.int8 import scoring_tail_ops

    image = ops.parameter([1, 3, 8, 8], np.float32, name="image")
    features = ops.convolution(image, ops.constant(np.ones((3, 3, 1, 1), dtype=np.float32)), [1, 1], [0, 0], [0, 0], [1, 1])
    squared = ops.multiply(features, features)
    squared.set_friendly_name("squared")
    distance = ops.reduce_sum(squared, ops.constant(np.array([1])), keep_dims=True)
    distance.set_friendly_name("distance")
    blur = ops.convolution(distance, ops.constant(np.full((1, 1, 3, 3), 1 / 9, dtype=np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
    model = ov.Model([blur], [image])
    assert scoring_tail_ops(model, ("Multiply", "ReduceSum")) == ["squared", "distance"]


def test_exported_rd_map_resampling_is_kept_f32(tmp_path) -> None:
    """The exported graph of a package model holds the resampling products the INT8 scope must keep."""
    import openvino as ov
    from anomalib.post_processing import PostProcessor

    from anomalib_dskd.benchmark.measure import export_openvino
    from anomalib_dskd.models.rd import Rd

    model = Rd(backbone="mobilenetv2_100", pre_trained=False, post_processor=PostProcessor(enable_normalization=False),
               visualizer=False, evaluator=False)
    xml = export_openvino(model, tmp_path, (64, 64))
    names = map_smoothing_ops(ov.Core().read_model(str(xml)))
    assert len(names) == 6  # three scales, a left and a right factor each


def test_rd_family_keeps_its_scoring_arithmetic_f32() -> None:
    from anomalib_dskd.models.dskd import Dskd
    from anomalib_dskd.models.rd import Rd

    assert issubclass(Rd, Int8Export)
    assert Rd.int8_ignored_types == Dskd.int8_ignored_types == ()
    assert Rd.int8_scoring_tail_types == Dskd.int8_scoring_tail_types == F32_ELEMENTWISE_OPS


def test_glance_keeps_its_idw_products_f32(tmp_path) -> None:
    """Glance's separable IDW is a chain of MatMuls with constant factors the smoothing rule does not catch: the
    model's own scope keeps every MatMul f32, and its exported graph has them (the fusion runs in the graph)."""
    import openvino as ov
    from anomalib.post_processing import PostProcessor

    from anomalib_dskd.benchmark.measure import export_openvino, model_int8_types
    from anomalib_dskd.models.glance import Glance

    assert model_int8_types(Glance) == {"ignored_types": ("MatMul",), "tail_types": ()}
    model = Glance(backbone="mobilenetv2_100", pre_trained=False, patches_per_side=4, teacher_input_size=33,
                   post_processor=PostProcessor(enable_normalization=False), visualizer=False, evaluator=False)
    graph = ov.Core().read_model(str(export_openvino(model, tmp_path, (256, 256))))
    matmuls = [op for op in graph.get_ops() if op.get_type_name() == "MatMul"]
    assert len(matmuls) >= 3  # the IDW's two quadrature products and its at-a-centre selection
    assert int8_ignored_scope(graph, model_int8_types(Glance)["ignored_types"]).types == ["MatMul"]


def test_benchmark_quantisation_takes_each_models_own_scope() -> None:
    """The benchmarks' INT8 (``quantize_int8``) gets the scope ``anomalib export`` uses, not smoothing only."""
    from anomalib.models import Padim

    from anomalib_dskd.benchmark.measure import model_int8_types
    from anomalib_dskd.models.dskd import Dskd
    from anomalib_dskd.models.rd import Rd

    assert model_int8_types(Rd) == model_int8_types(Dskd) == {"ignored_types": (), "tail_types": F32_ELEMENTWISE_OPS}
    assert model_int8_types(Padim) == {"ignored_types": (), "tail_types": ()}


def test_int8_ptq_without_a_datamodule_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="Datamodule must be provided"):
        Int8Export()._post_training_quantization_ov(_graph(), None)
