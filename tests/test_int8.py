"""INT8 ignored scope (``anomalib_dskd.components.int8``) on small hand-built OpenVINO graphs."""

from __future__ import annotations

import numpy as np
import pytest

from anomalib_dskd.components.int8 import (
    F32_ELEMENTWISE_OPS,
    Int8Export,
    batch_splitting_convolutions,
    convolutions_before_batch_splitting,
    first_convolutions,
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


def test_batch_splitting_convolutions_are_those_reshaped_across_the_batch() -> None:
    """A convolution whose output goes (through elementwise ops) into a reshape that splits the dynamic batch is
    found; one reached through a Transpose first, or reshaped within the batch, is not."""
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter([-1, 3, 4, 4], np.float32, name="image")
    weights = ops.constant(np.ones((8, 3, 4, 4), dtype=np.float32))

    def conv(name: str) -> object:
        node = ops.convolution(image, weights, [1, 1], [0, 0], [0, 0], [1, 1])  # (?, 8, 1, 1)
        node.set_friendly_name(name)
        return node

    split = ops.reshape(ops.relu(conv("split")), ops.constant(np.array([-1, 4, 1, 1, 8])), special_zero=False)
    transposed = ops.reshape(ops.transpose(conv("transposed"), ops.constant(np.array([0, 2, 3, 1]))),
                             ops.constant(np.array([-1, 4, 1, 1, 8])), special_zero=False)
    within = ops.reshape(conv("within"), ops.constant(np.array([-1, 8])), special_zero=False)
    model = ov.Model([split, transposed, within], [image])
    assert batch_splitting_convolutions(model) == ["split"]
    assert batch_splitting_convolutions(_graph()) == []  # static batch, no reshape
    with pytest.raises(ValueError, match="unknown INT8 f32 rules"):
        int8_ignored_scope(model, rules=("no_such_rule",))


def test_convolutions_before_batch_splitting_are_the_nearest_upstream_ones() -> None:
    """From a batch-splitting convolution back through any non-convolution op (bias, activation, reshapes) to the
    first convolution on each path; a convolution further up, or one on another branch, is not taken."""
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter([-1, 3, 6, 6], np.float32, name="image")

    def conv(source: object, channels_in: int, channels_out: int, kernel: int, name: str) -> object:
        weights = ops.constant(np.ones((channels_out, channels_in, kernel, kernel), dtype=np.float32))
        node = ops.convolution(source, weights, [1, 1], [0, 0], [0, 0], [1, 1])
        node.set_friendly_name(name)
        return node

    first = conv(image, 3, 4, 1, "first")  # (?, 4, 6, 6)
    penultimate = conv(ops.relu(first), 4, 4, 3, "penultimate")  # (?, 4, 4, 4)
    moved = ops.reshape(ops.transpose(penultimate, ops.constant(np.array([0, 1, 3, 2]))),
                        ops.constant(np.array([-1, 4, 4, 4])), special_zero=False)
    last = conv(ops.add(moved, ops.constant(np.float32(1.0))), 4, 8, 4, "last")  # (?, 8, 1, 1)
    split = ops.reshape(last, ops.constant(np.array([-1, 2, 1, 1, 8])), special_zero=False)
    other = conv(image, 3, 2, 1, "other_branch")  # not upstream of the batch-splitting convolution
    model = ov.Model([split, other], [image])
    assert batch_splitting_convolutions(model) == ["last"]
    assert convolutions_before_batch_splitting(model) == ["penultimate"]
    assert convolutions_before_batch_splitting(_graph()) == []  # no batch-splitting convolution


def test_first_convolutions_are_each_networks_first_layer() -> None:
    """The convolutions that read the input with no learned convolution before them (not the map filters)."""
    assert first_convolutions(_graph()) == ["learned_1"]
    import openvino as ov
    from openvino import opset13 as ops

    image = ops.parameter([1, 3, 8, 8], np.float32, name="image")
    weights = ops.constant(np.ones((3, 3, 1, 1), dtype=np.float32))
    scaled = ops.multiply(image, ops.constant(np.float32(2.0)))  # pre-processing between input and first layer
    branches = []
    for name in ("first_a", "first_b"):
        node = ops.convolution(scaled, weights, [1, 1], [0, 0], [0, 0], [1, 1])
        node.set_friendly_name(name)
        branches.append(ops.convolution(ops.relu(node), weights, [1, 1], [0, 0], [0, 0], [1, 1]))
    model = ov.Model([ops.add(*branches)], [image])
    assert first_convolutions(model) == ["first_a", "first_b"]


def test_glance_int8_scope_compiles_and_keeps_its_scoring_f32(tmp_path) -> None:
    """Glance's scope: every MatMul (the separable IDW products, which the smoothing rule does not catch, and the
    DAD head), the scoring tail, its two batch-splitting last layers, the convolutions just before them and the
    first layers stay f32, and OpenVINO compiles the result
    (at the default 20 x 20 grid, without the rule, OpenVINO 2026.4's low-precision ReshapeTransformation refuses the
    graph; with a 4 x 4 grid it compiles either way, so this test uses the default grid)."""
    import openvino as ov
    from anomalib.post_processing import PostProcessor

    from anomalib_dskd.benchmark.measure import export_openvino, model_int8_types, quantize_int8
    from anomalib_dskd.models.glance import Glance

    types = model_int8_types(Glance)
    assert types == {"ignored_types": ("MatMul",), "tail_types": F32_ELEMENTWISE_OPS,
                     "rules": ("batch_splitting_convolutions", "convolutions_before_batch_splitting",
                               "first_convolutions")}
    import torch

    torch.manual_seed(0)
    model = Glance(backbone="mobilenetv2_100", pre_trained=False, teacher_input_size=33,
                   post_processor=PostProcessor(enable_normalization=False), visualizer=False, evaluator=False)
    xml = export_openvino(model, tmp_path / "f32", (256, 256))
    graph = ov.Core().read_model(str(xml))
    assert len([op for op in graph.get_ops() if op.get_type_name() == "MatMul"]) >= 3  # the IDW runs in the graph
    last_layers = batch_splitting_convolutions(graph)
    assert len(last_layers) == 2  # Local-Net's and Global-Net's last convolutions, (batch * patches, 128, 1, 1)
    kernels = {op.get_friendly_name(): tuple(op.input_value(1).get_partial_shape().to_shape())
               for op in graph.get_ops() if op.get_type_name() == "Convolution"}
    before = convolutions_before_batch_splitting(graph)
    assert (256, 256, 2, 2) in {kernels[name] for name in before}  # Local-Net's conv3
    assert not set(before) & set(last_layers)
    images = np.random.default_rng(0).random((4, 3, 256, 256), dtype=np.float32)
    int8 = quantize_int8(xml, images, tmp_path / "int8", **types)
    request = ov.Core().compile_model(str(int8), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    outputs = request.infer({0: images[:1]})
    assert all(np.isfinite(value).all() for value in outputs.values())


def test_benchmark_quantisation_takes_each_models_own_scope() -> None:
    """The benchmarks' INT8 (``quantize_int8``) gets the scope ``anomalib export`` uses, not smoothing only."""
    from anomalib.models import Padim

    from anomalib_dskd.benchmark.measure import model_int8_types
    from anomalib_dskd.models.dskd import Dskd
    from anomalib_dskd.models.rd import Rd

    assert model_int8_types(Rd) == model_int8_types(Dskd) == {
        "ignored_types": (), "tail_types": F32_ELEMENTWISE_OPS, "rules": ()}
    assert model_int8_types(Padim) == {"ignored_types": (), "tail_types": (), "rules": ()}


def test_int8_ptq_without_a_datamodule_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="Datamodule must be provided"):
        Int8Export()._post_training_quantization_ov(_graph(), None)


def test_int8_ptq_calibrates_on_training_images_too_when_validation_is_small(monkeypatch, caplog) -> None:
    """Fewer than MIN_CALIBRATION_IMAGES validation images: the training images join the calibration (warned);
    enough validation images: only those, as anomalib does."""
    import nncf
    import torch

    from anomalib_dskd.components import int8

    def loader(images: int) -> object:
        class Loader(list):
            dataset = range(images)

        return Loader([{"image": torch.zeros(1, 3, 8, 8)} for _ in range(images)])

    class Data:
        train_batch_size = 8

        def __init__(self, val: int, train: int) -> None:
            self.val, self.train = val, train

        def setup(self, stage: str) -> None:
            pass

        def val_dataloader(self) -> object:
            return loader(self.val)

        def train_dataloader(self) -> object:
            return loader(self.train)

    seen = []
    monkeypatch.setattr(nncf, "quantize", lambda model, dataset, **kwargs: seen.append(
        sum(1 for _ in dataset.get_inference_data())))
    with caplog.at_level("WARNING", logger=int8.__name__):
        Int8Export()._post_training_quantization_ov(_graph(), Data(val=3, train=40))
    assert seen == [43]
    assert "training images calibrate too" in caplog.text
    Int8Export()._post_training_quantization_ov(_graph(), Data(val=int8.MIN_CALIBRATION_IMAGES, train=40))
    assert seen[-1] == int8.MIN_CALIBRATION_IMAGES
