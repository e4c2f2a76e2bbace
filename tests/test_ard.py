"""Tests of Ard: reverse distillation with attention in the one-class embedding.

Fast tests build tiny models (resnet18 / mobilenetv2_100 at 64x64, random teachers unless the
shared ImageNet MobileNetV2 weights are present). ``slow`` tests run the anomalib Engine, the
``anomalib`` CLI as a subprocess and the ONNX / OpenVINO exports.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from anomalib_dskd.components.rd import OneClassEmbedding
from anomalib_dskd.components.rd.attention import (
    ATTENTION_POSITIONS,
    ATTENTION_TYPES,
    AttentionBasicBlock,
    AttentionBottleneck,
    AttentionConfigError,
    attention_factory,
    create_attention,
)
from anomalib_dskd.models.ard import Ard, ArdModel
from anomalib_dskd.models.rd import RdModel

from .conftest import REPO_ROOT, shared_path

SIZE = (64, 64)
#: torch's ONNX exporter emits opset 18; anomalib's default 14 triggers a failing (harmless) down-conversion.
ONNX_OPSET = 18
TIMM_CLASS = {"se": "SEModule", "eca": "EcaModule", "cbam": "CbamModule"}


# ----------------------------------------------------------------------------------------------
# Reference parameter counts of the published modules, written out independently of timm.
# ----------------------------------------------------------------------------------------------
def _make_divisible(value: float, divisor: int) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def expected_attention_params(kind: str, channels: int) -> int:
    """SE (Hu et al.): 2-layer MLP with biases, reduction 16 (timm rounds to multiples of 8);
    ECA (Wang et al.): one 1-D kernel of adaptive odd size k = |log2(C) + 1| / 2;
    CBAM (Woo et al.): bias-free shared MLP (reduction 16) + 7x7 conv (2 -> 1) with BatchNorm."""
    if kind == "se":
        hidden = _make_divisible(channels / 16, 8)
        return 2 * channels * hidden + hidden + channels
    if kind == "eca":
        k = int(abs(math.log2(channels) + 1) / 2)
        return max(k if k % 2 else k + 1, 3)
    hidden = _make_divisible(channels / 16, 1)
    return 2 * channels * hidden + 2 * 7 * 7 + 2


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def mobilenet_weights() -> bool | str:
    """The shared ImageNet MobileNetV2 checkpoint when present, else a random teacher."""
    path = shared_path() / "weights" / "mobilenet_v2-b0353104.pth"
    return str(path) if path.is_file() else False


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------
STRUCTURE_CASES = [("resnet18", kind, position) for kind in ATTENTION_TYPES for position in ATTENTION_POSITIONS] + [
    ("mobilenetv2_100", kind, "both") for kind in ATTENTION_TYPES
]


@pytest.mark.parametrize(("backbone", "kind", "position"), STRUCTURE_CASES)
def test_shapes_and_parameter_counts(backbone: str, kind: str, position: str) -> None:
    torch.manual_seed(0)
    rd = RdModel(backbone, pre_trained=False, input_size=SIZE)
    ard = ArdModel(backbone, pre_trained=False, input_size=SIZE, attention_type=kind, attention_position=position)
    arch = ard.core.architecture
    bottleneck = ard.core.bottleneck

    # where the attention sits
    fused = not isinstance(bottleneck.fused_attention, nn.Identity)
    in_blocks = [hasattr(block, "attention") for block in bottleneck.embed]
    assert fused == (position in {"fused", "both"})
    assert all(in_blocks) == (position in {"blocks", "both"})
    assert any(in_blocks) == all(in_blocks)
    expected_modules = (1 if fused else 0) + (arch.embedding_blocks if all(in_blocks) else 0)
    modules = ard.attention_modules()
    assert len(modules) == expected_modules
    assert all(type(m).__name__ == TIMM_CLASS[kind] for m in modules)
    if all(in_blocks):
        assert all(isinstance(block, AttentionBasicBlock) for block in bottleneck.embed)

    # parameter counts: Rd + exactly the attention modules' parameters
    expected = 0
    if fused:
        expected += expected_attention_params(kind, arch.fused_channels)
    if all(in_blocks):
        expected += arch.embedding_blocks * expected_attention_params(kind, arch.embedding_channels)
    assert sum(n_params(m) for m in modules) == expected
    assert n_params(ard) - n_params(rd) == expected
    assert n_params(ard.core.teacher) == n_params(rd.core.teacher)
    assert n_params(ard.core.decoder) == n_params(rd.core.decoder)

    # shapes: embedding as RD's, student reproduces the teacher's pyramid
    images = torch.rand(2, 3, *SIZE)
    ard.train()
    teacher, student = ard(images)
    embedding = bottleneck(teacher)
    assert tuple(embedding.shape[1:]) == arch.embedding_shape(SIZE)
    assert [s.shape for s in student] == [t.shape for t in teacher]
    ard.eval()
    out = ard(images)
    assert out.anomaly_map.shape == (2, 1, *SIZE)
    assert out.pred_score.shape == (2,)


def test_known_parameter_counts_resnet18() -> None:
    """Hand-checked numbers (resnet18, layers 1-3: fused 3 x 256 = 768 channels, embedding 512)."""
    extra = {
        ("se", "fused"): 74_544,
        ("se", "blocks"): 2 * 33_312,
        ("eca", "both"): 3 * 5,
        ("cbam", "fused"): 73_828,
        ("cbam", "blocks"): 2 * 32_868,
    }
    rd = n_params(RdModel("resnet18", pre_trained=False, input_size=SIZE))
    for (kind, position), count in extra.items():
        ard = ArdModel("resnet18", pre_trained=False, input_size=SIZE, attention_type=kind, attention_position=position)
        assert n_params(ard) - rd == count, (kind, position)


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_bottleneck_blocks_get_attention(kind: str) -> None:
    """Bottleneck embeddings (wide-ResNet teachers) get the attention on the bn3 output."""
    channels = [64, 128, 256]
    plain = OneClassEmbedding(channels, block="bottleneck", num_blocks=3)
    attended = OneClassEmbedding(channels, block="bottleneck", num_blocks=3, block_attention=attention_factory(kind))
    assert all(isinstance(block, AttentionBottleneck) for block in attended.embed)
    assert n_params(attended) - n_params(plain) == 3 * expected_attention_params(kind, 512)
    features = [torch.rand(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(channels)]
    assert attended(features).shape == (2, 512, 2, 2)
    # with the Rd weights and identity attention it is the plain embedding
    attended.load_state_dict(plain.state_dict(), strict=False)
    for block in attended.embed:
        block.attention = nn.Identity()
    plain.eval(), attended.eval()
    torch.testing.assert_close(attended(features), plain(features), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The attention is really applied
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rd_shared_or_random_teacher() -> RdModel:
    """Plain RD with the shared ImageNet MobileNetV2 teacher, or a RANDOM-init teacher when
    ``../shared/weights/mobilenet_v2-b0353104.pth`` is absent (the test below holds for either)."""
    torch.manual_seed(0)
    return RdModel("mobilenetv2_100", pre_trained=mobilenet_weights(), input_size=SIZE).eval()


@pytest.mark.parametrize("position", ATTENTION_POSITIONS)
@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_attention_changes_output_and_is_the_only_difference(
    rd_shared_or_random_teacher: RdModel, kind: str, position: str,
) -> None:
    """Same teacher (ImageNet weights from ../shared when present, else random init) and same RD weights:
    attention changes the output, and replacing the attention modules by identities gives exactly plain RD's output."""
    rd = rd_shared_or_random_teacher
    ard = ArdModel(
        "mobilenetv2_100", pre_trained=False, input_size=SIZE, attention_type=kind, attention_position=position
    ).eval()
    # every Rd tensor (teacher included) is copied; only the attention modules are new
    missing, unexpected = ard.load_state_dict(rd.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".attention." in key or "fused_attention." in key for key in missing)
    extra = [k for k in ard.state_dict() if k not in rd.state_dict() and not k.endswith("num_batches_tracked")]
    assert sorted(missing) == sorted(extra)

    torch.manual_seed(1)
    images = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        plain = rd(images).anomaly_map
        attended = ard(images).anomaly_map
        assert (attended - plain).abs().max() > 1e-4

        bottleneck = ard.core.bottleneck
        bottleneck.fused_attention = nn.Identity()
        for block in bottleneck.embed:
            if hasattr(block, "attention"):
                block.attention = nn.Identity()
        torch.testing.assert_close(ard(images).anomaly_map, plain, rtol=0, atol=0)


def test_training_step_updates_attention_not_teacher() -> None:
    model = Ard(backbone="resnet18", pre_trained=False, attention_type="cbam", attention_position="both",
                pre_processor=Ard.configure_pre_processor(SIZE), evaluator=False, visualizer=False)
    optimizer = model.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    attention = [p for m in model.model.attention_modules() for p in m.parameters()]
    assert attention and all(id(p) in optimised for p in attention)
    assert not any(id(p) in optimised for p in model.model.core.teacher.parameters())
    before = [p.detach().clone() for p in attention]
    teacher_before = [p.detach().clone() for p in model.model.core.teacher.parameters()]
    model.model.train()
    loss = model.loss(*model.model(torch.rand(2, 3, *SIZE)))
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, attention, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, model.model.core.teacher.parameters(), strict=True))


# ----------------------------------------------------------------------------------------------
# Bad input, config, registration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"attention_type": "transformer"}, {"attention_type": None}])
def test_unknown_attention_type_lists_valid_ones(kwargs: dict) -> None:
    with pytest.raises(AttentionConfigError) as info:
        Ard(backbone="resnet18", pre_trained=False, **kwargs)
    message = str(info.value)
    assert "attention type" in message
    assert all(kind in message for kind in ATTENTION_TYPES)
    assert isinstance(info.value, ValueError)


def test_unknown_insertion_point_lists_valid_ones() -> None:
    with pytest.raises(AttentionConfigError) as info:
        ArdModel("resnet18", pre_trained=False, input_size=SIZE, attention_position="decoder")
    message = str(info.value)
    assert "'decoder'" in message
    assert all(position in message for position in ATTENTION_POSITIONS)
    with pytest.raises(AttentionConfigError, match="se, eca, cbam"):
        create_attention("nonlocal", 64)


def test_attention_names_are_case_insensitive() -> None:
    model = ArdModel("resnet18", pre_trained=False, input_size=SIZE, attention_type="CBAM", attention_position="Blocks")
    assert (model.attention_type, model.attention_position) == ("cbam", "blocks")


def test_config_file_builds_ard() -> None:
    from anomalib.models import get_model

    config = yaml.safe_load((REPO_ROOT / "configs" / "model" / "ard.yaml").read_text())
    model_config = config["model"]
    model_config["init_args"].update(backbone="resnet18", pre_trained=False)
    model = get_model(model_config)
    assert isinstance(model, Ard)
    assert model.model.attention_type == model_config["init_args"]["attention_type"]
    assert model.model.attention_position == model_config["init_args"]["attention_position"]
    assert model.lr == pytest.approx(model_config["init_args"]["lr"])


def test_registered_with_anomalib() -> None:
    import anomalib.models

    import anomalib_dskd

    assert anomalib_dskd.Ard is Ard
    assert "ard" in anomalib.models.list_models()
    model = anomalib.models.get_model("Ard", backbone="resnet18", pre_trained=False)
    assert isinstance(model, Ard)


# ----------------------------------------------------------------------------------------------
# End to end: Engine, CLI, export
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from anomalib_dskd.data.synthetic import generate_mvtec_ad_category

    root = tmp_path_factory.mktemp("ard_data")
    category = generate_mvtec_ad_category(
        root, category="parts", seed=0, image_size=SIZE, n_train=8, n_test_good=4, n_per_defect=2
    ).name
    return root, category


def _run_openvino(model_path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Run an OpenVINO model (``.xml`` or ``.onnx``) in f32 (the CPU plugin defaults to bf16 here)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(model_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    return {out.get_any_name(): result[out] for out in compiled.outputs}


def _run_onnxruntime(onnx_path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))


def _assert_close_to_torch(model: Ard, images: torch.Tensor, outputs: dict[str, dict[str, np.ndarray]]) -> None:
    model.eval()
    with torch.no_grad():
        reference = model(images)
    for field in ("anomaly_map", "pred_score"):
        expected = getattr(reference, field).numpy()
        for backend, values in outputs.items():
            error = np.abs(values[field].reshape(expected.shape) - expected).max()
            assert error < 1e-3, (backend, field, error)


@pytest.mark.slow
def test_engine_train_test_and_export(tiny_mvtec: tuple[Path, str], tmp_path: Path) -> None:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    root, category = tiny_mvtec
    datamodule = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=8, num_workers=0)
    model = Ard(backbone="resnet18", pre_trained=False, attention_type="se", attention_position="both",
                pre_processor=Ard.configure_pre_processor(SIZE), visualizer=False)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)
    assert {"image_AUROC", "pixel_AUROC"} <= set(results[0])
    assert all(0.0 <= results[0][k] <= 1.0 for k in ("image_AUROC", "pixel_AUROC"))
    assert torch.isfinite(model.post_processor.image_max)  # normalisation statistics were collected
    # the trained model exported with anomalib's to_openvino (pre-processing, model and the
    # normalising post-processor) matches torch
    images = torch.rand(2, 3, *SIZE)
    xml_path = model.to_openvino(tmp_path / "export", input_size=SIZE, onnx_kwargs={"opset_version": ONNX_OPSET})
    _assert_close_to_torch(model, images, {"openvino": _run_openvino(xml_path, images)})


@pytest.mark.slow
def test_cli_train_round_trip(tiny_mvtec: tuple[Path, str], tmp_path: Path) -> None:
    root, category = tiny_mvtec
    anomalib_cli = Path(sys.executable).parent / "anomalib"
    command = [
        str(anomalib_cli), "train",
        "--model", "Ard",
        "--model.backbone", "resnet18",
        "--model.pre_trained", "false",
        "--model.attention_type", "cbam",
        "--model.attention_position", "blocks",
        "--data", "anomalib.data.MVTecAD",
        "--data.root", str(root),
        "--data.category", category,
        "--data.train_batch_size", "4",
        "--data.eval_batch_size", "8",
        "--data.num_workers", "0",
        "--trainer.max_epochs", "1",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path / "results"),
    ]
    env = {**os.environ, "CI": "true", "OPENVINO_TELEMETRY_DISABLE": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)  # noqa: S603
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoints = list((tmp_path / "results").rglob("*.ckpt"))
    assert checkpoints, proc.stdout[-2000:]
    checkpoint = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    assert any(".embed.0.attention." in key for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["attention_type"] == "cbam"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_export_parity(kind: str, tmp_path: Path) -> None:
    """ONNX and OpenVINO (f32) outputs equal torch's within 1e-3 for every attention type."""
    torch.manual_seed(0)
    model = Ard(backbone="resnet18", pre_trained=False, attention_type=kind, attention_position="both",
                pre_processor=Ard.configure_pre_processor(SIZE), evaluator=False, visualizer=False)
    # non-trivial BatchNorm statistics in the embedding and decoder
    model.model.train()
    with torch.no_grad():
        for _ in range(2):
            model.model(torch.randn(4, 3, *SIZE))
    images = torch.rand(2, 3, *SIZE)
    onnx_path = model.to_onnx(tmp_path, input_size=SIZE, opset_version=ONNX_OPSET)
    # OpenVINO reads the same ONNX file (what anomalib's to_openvino converts; that path is
    # exercised on a trained model in test_engine_train_test_and_export)
    outputs = {"onnxruntime": _run_onnxruntime(onnx_path, images), "openvino": _run_openvino(onnx_path, images)}
    _assert_close_to_torch(model, images, outputs)
