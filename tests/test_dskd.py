"""Dskd building blocks: GCCB, losses (chunked affinity), Eq. 8 statistics and fusion, model wiring."""

from __future__ import annotations

import inspect

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Resize

from anomalib_dskd.components.rd import InputSizeError
from anomalib_dskd.models.dskd import (
    ContextualAffinityLoss,
    Dskd,
    DskdLoss,
    DskdModel,
    GlobalContextCondensingBlock,
    PerPixelCosineLoss,
)
from anomalib_dskd.models.dskd.anomaly_map import DskdScoreFusion, affinity_kl, affinity_kl_direct, pooled_affinity_kl
from anomalib_dskd.models.dskd.statistics import StreamingMoments
from anomalib_dskd.models.rd import Rd
from anomalib_dskd.models.rd.loss import RdLoss

SMALL = {"backbone": "mobilenetv2_100", "pre_trained": False, "input_size": (64, 64), "gccb_channels": 16}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- GCCB
@pytest.mark.parametrize(("channels", "size", "g"), [(192, (2, 2), 16), (64, (2, 3), 40), (32, (1, 1), 8)])
def test_gccb_shapes_and_parameter_count(channels: int, size: tuple[int, int], g: int) -> None:
    block = GlobalContextCondensingBlock(channels, size, g)
    condensed = {}

    def record(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        condensed["shape"] = output.shape

    block.layers[2].register_forward_hook(record)
    x = torch.randn(3, channels, *size)
    y = block(x)
    assert y.shape == x.shape
    assert condensed["shape"] == (3, g, 1, 1)  # the whole embedding condensed to one g-vector
    assert bool((y >= 0).all())  # ends with ReLU (suppl. Table 9)
    kernel = size[0] * size[1]
    expected = (channels * g + g) + (g * g * kernel + g) + (g * g * kernel + g) + (g * channels + channels)
    assert sum(p.numel() for p in block.parameters()) == expected
    assert GlobalContextCondensingBlock.expected_parameters(channels, size, g) == expected
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules())
    assert all(m.bias is not None for m in block.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d))


def test_gccb_without_projection_when_g_equals_c() -> None:
    block = GlobalContextCondensingBlock(24, (2, 2), 24)  # Table 6: g = C drops the 1x1 convolutions
    assert not block.project
    assert sum(p.numel() for p in block.parameters()) == 2 * (24 * 24 * 4 + 24)
    with pytest.raises(ValueError, match="project=False"):
        GlobalContextCondensingBlock(24, (2, 2), 16, project=False)


def test_gccb_refuses_empty_embedding() -> None:
    with pytest.raises(InputSizeError, match="spatial size"):
        GlobalContextCondensingBlock(24, (0, 2), 8)


def test_gccb_is_derived_from_teacher_and_input_size() -> None:
    model = DskdModel(**{**SMALL, "input_size": (64, 96)})
    assert (model.gccb.in_channels, model.gccb.spatial_size, model.gccb.channels) == (192, (2, 3), 16)
    teacher, local, glob = model.train()(torch.randn(2, 3, 64, 96))
    for t, s_loc, s_glo in zip(teacher, local, glob, strict=True):
        assert t.shape == s_loc.shape == s_glo.shape


@pytest.mark.slow
def test_gccb_default_teacher_gives_paper_shape() -> None:
    model = DskdModel("wide_resnet50_2", pre_trained=False, input_size=(256, 256), gccb_channels=8)
    assert (model.gccb.in_channels, model.gccb.spatial_size) == (2048, (8, 8))  # suppl. Table 9 input


def test_sizes_the_model_cannot_take_are_refused() -> None:
    with pytest.raises(InputSizeError, match="multiples of 32"):
        DskdModel(**{**SMALL, "input_size": (48, 64)})
    model = DskdModel(**SMALL).eval()
    with pytest.raises(InputSizeError, match="built for 64x64"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(InputSizeError):
        Dskd(backbone="mobilenetv2_100", pre_trained=False, pre_processor=PreProcessor(transform=Resize((80, 80))))


# ---------------------------------------------------------------- losses
def test_affinity_loss_zero_iff_student_matches_teacher() -> None:
    teacher = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    loss = ContextualAffinityLoss(chunk_size=5)
    assert loss(teacher, [t.clone() for t in teacher]).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(teacher, [3.0 * t for t in teacher]).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free
    noisy = [t + 0.5 * torch.randn_like(t) for t in teacher]
    assert loss(teacher, noisy).item() > 1e-3
    # one displaced position is enough to make it positive
    moved = [t.clone() for t in teacher]
    moved[0][:, :, 0, 0] = teacher[0][:, :, 3, 5]
    assert loss(teacher, moved).item() > 1e-4


def test_affinity_loss_matches_equations() -> None:
    """Eq. 3-7 written out with explicit loops on a tiny example."""
    teacher = torch.randn(1, 3, 2, 2)
    student = torch.randn(1, 3, 2, 2)
    temperature = 0.7
    t = torch.nn.functional.normalize(teacher.flatten(2)[0].T, dim=1)
    s = torch.nn.functional.normalize(student.flatten(2)[0].T, dim=1)
    total = 0.0
    for i in range(4):
        p = torch.softmax(torch.stack([t[i] @ t[j] for j in range(4)]) / temperature, 0)
        q = torch.softmax(torch.stack([s[i] @ t[j] for j in range(4)]) / temperature, 0)  # Eq. 5: against teacher
        total += temperature**2 * float((p * (p / q).log()).sum())
    expected = total / 4
    got = ContextualAffinityLoss(temperature, chunk_size=3)([teacher], [student]).item()
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 0.02])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_affinity_equals_direct(temperature: float, chunk: int) -> None:
    teacher = torch.randn(2, 12, 8, 9)
    base = teacher + 0.7 * torch.randn_like(teacher)
    weights = torch.rand(2, 8, 9)
    direct_student = base.clone().requires_grad_()
    chunk_student = base.clone().requires_grad_()
    direct = affinity_kl_direct(teacher, direct_student, temperature)
    chunked = affinity_kl(teacher, chunk_student, temperature, chunk_size=chunk)
    (direct * weights).sum().backward()
    (chunked * weights).sum().backward()
    assert torch.allclose(chunked, direct, atol=1e-5)
    assert torch.allclose(chunk_student.grad, direct_student.grad, atol=1e-5)
    assert direct_student.grad.abs().max() > 1e-3  # the comparison is not vacuous
    with torch.no_grad():  # inference path (plain chunked ops)
        assert torch.allclose(affinity_kl(teacher, base, temperature, chunk), direct, atol=1e-5)
    # the loss built on it, and its gradients
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss_chunked = ContextualAffinityLoss(temperature, chunk_size=chunk)([teacher], [a])
    loss_direct = affinity_kl_direct(teacher, b, temperature).mean()
    loss_chunked.backward()
    loss_direct.backward()
    assert abs(loss_chunked.item() - loss_direct.item()) < 1e-5
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_chunked_affinity_gradient_to_a_trainable_teacher() -> None:
    teacher = torch.randn(1, 6, 5, 5)
    student = teacher + torch.randn_like(teacher)
    t1, s1 = teacher.clone().requires_grad_(), student.clone().requires_grad_()
    t2, s2 = teacher.clone().requires_grad_(), student.clone().requires_grad_()
    affinity_kl(t1, s1, 1.0, chunk_size=4).sum().backward()
    affinity_kl_direct(t2, s2, 1.0).sum().backward()
    assert torch.allclose(t1.grad, t2.grad, atol=1e-5)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-5)


def _saved_for_backward(fn) -> list[int]:  # noqa: ANN001
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sizes


def test_chunked_affinity_keeps_no_quadratic_tensor_for_backward() -> None:
    batch, channels, side = 2, 8, 32
    positions = side * side
    teacher = torch.randn(batch, channels, side, side)
    student = (teacher + torch.randn_like(teacher)).requires_grad_()
    direct = _saved_for_backward(lambda: affinity_kl_direct(teacher, student).mean())
    chunked = _saved_for_backward(lambda: affinity_kl(teacher, student, 1.0, chunk_size=64).mean())
    assert max(direct) >= batch * positions * positions  # the direct form keeps N x N affinities
    assert max(chunked) <= batch * positions * channels  # chunked: features-sized tensors only
    assert sum(chunked) < sum(direct) / 20


def test_per_pixel_loss_is_eq_2() -> None:
    teacher = [torch.randn(2, 4, 3, 3)]
    student = [torch.randn(2, 4, 3, 3)]
    expected = (1 - torch.nn.functional.cosine_similarity(teacher[0], student[0], dim=1)).mean()
    assert PerPixelCosineLoss()(teacher, student).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(("local", "glob"), [("pixel", "affinity"), ("pixel", "pixel"), ("affinity", "affinity"), ("affinity", "pixel")])
def test_loss_and_map_kind_per_student(local: str, glob: str) -> None:
    kinds = {"pixel": PerPixelCosineLoss, "affinity": ContextualAffinityLoss}
    module = Dskd(
        backbone="mobilenetv2_100",
        pre_trained=False,
        gccb_channels=8,
        local_loss=local,
        global_loss=glob,
        pre_processor=PreProcessor(transform=Resize((64, 64))),
        visualizer=False,
    )
    assert isinstance(module.loss.local_loss, kinds[local])
    assert isinstance(module.loss.global_loss, kinds[glob])
    assert module.model.map_kinds == {"local": local, "global": glob}
    teacher, s_loc, s_glo = module.model.train()(torch.randn(2, 3, 64, 64))
    total, parts = module.loss(teacher, s_loc, s_glo)
    assert set(parts) == {"local", "global"}
    assert total.item() == pytest.approx((parts["local"] + parts["global"]).item())


def test_flatten_local_loss_is_rds_loss_scored_with_the_cosine_map() -> None:
    """``local_loss="flatten"`` trains the local student exactly as Rd trains its student (RD's whole-map
    cosine) and scores it with the same cosine-distance map; a loss that is not a kind is refused."""
    module = Dskd(backbone="mobilenetv2_100", pre_trained=False, gccb_channels=8, local_loss="flatten",
                  pre_processor=PreProcessor(transform=Resize((64, 64))), visualizer=False)
    assert module.model.map_kinds == {"local": "pixel", "global": "affinity"}
    teacher, s_loc, s_glo = module.model.train()(torch.randn(2, 3, 64, 64))
    _, parts = module.loss(teacher, s_loc, s_glo)
    assert inspect.signature(Rd).parameters["loss_mode"].default == "flatten"
    rd_loss = RdLoss("flatten")  # what Rd trains with by default
    assert parts["local"].item() == pytest.approx(rd_loss(teacher, s_loc).item(), rel=1e-6)
    assert parts["local"].item() != pytest.approx(PerPixelCosineLoss()(teacher, s_loc).item(), rel=1e-3)
    with pytest.raises(ValueError, match="loss must be one of"):
        Dskd(backbone="mobilenetv2_100", pre_trained=False, local_loss="cosine",
             pre_processor=PreProcessor(transform=Resize((64, 64))), visualizer=False)


def test_defaults_follow_paper() -> None:
    module = Dskd(backbone="mobilenetv2_100", pre_trained=False, visualizer=False)
    assert module.model.input_size == (256, 256)
    assert module.model.gccb.channels == 1024
    assert isinstance(module.loss.local_loss, PerPixelCosineLoss)
    assert isinstance(module.loss.global_loss, ContextualAffinityLoss)
    assert module.loss.global_loss.temperature == 1.0
    optimizer = module.configure_optimizers()
    assert optimizer.defaults["lr"] == 0.005
    assert optimizer.defaults["betas"] == (0.5, 0.999)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in module.model.teacher.parameters()}
    students = [module.model.core.bottleneck, module.model.core.decoder, module.model.global_bottleneck,
                module.model.gccb, module.model.global_decoder]
    assert trained == {id(p) for m in students for p in m.parameters()}  # both students, trained together


@pytest.mark.parametrize("students", ["local", "global"])
def test_single_student_models(students: str) -> None:
    model = DskdModel(**SMALL, students=students)
    teacher, local, glob = model.train()(torch.randn(2, 3, 64, 64))
    assert (local is None) == (students == "global")
    assert (glob is None) == (students == "local")
    assert hasattr(model, "gccb") == (students == "global")
    model.eval()
    assert model(torch.randn(1, 3, 64, 64)).anomaly_map.shape == (1, 1, 64, 64)
    assert model.map_mean.shape == (1,)


# ---------------------------------------------------------------- Eq. 8 statistics and fusion
def test_streaming_moments_use_normal_images_only() -> None:
    maps = [torch.rand(6, 1, 5, 5) * 3, torch.rand(6, 1, 5, 5) + 2]
    normal = torch.tensor([True, False, True, True, False, True])
    moments = StreamingMoments(2)
    moments.update([m[:3] for m in maps], normal[:3])
    moments.update([m[3:] for m in maps], normal[3:])
    mean, std = moments.compute()
    for index, values in enumerate(maps):
        kept = values[normal].double()
        assert mean[index].item() == pytest.approx(kept.mean().item(), rel=1e-12)
        assert std[index].item() == pytest.approx(kept.std(unbiased=False).item(), rel=1e-10)
    assert moments.images.item() == 4
    with pytest.raises(ValueError, match="No normal image"):
        StreamingMoments(1).compute()


def test_compute_statistics_standardises_with_normal_validation_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Known per-student maps: the stored mean / std are those of the normal images' maps only."""
    module = Dskd(
        backbone="mobilenetv2_100",
        pre_trained=False,
        gccb_channels=8,
        pre_processor=PreProcessor(transform=Resize((64, 64))),
        visualizer=False,
    )

    def known_maps(images: torch.Tensor) -> list[torch.Tensor]:
        return [images.mean(1, keepdim=True) * 2 + 1, images[:, :1] ** 2]

    monkeypatch.setattr(module.model, "student_maps", known_maps)
    images = torch.rand(7, 3, 64, 64)
    labels = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    batches = [ImageBatch(image=images[i : i + 3], gt_label=labels[i : i + 3]) for i in range(0, 7, 3)]
    mean, std = module.compute_statistics(batches)
    normal_maps = known_maps(images[labels == 0])
    for index, values in enumerate(normal_maps):
        assert mean[index].item() == pytest.approx(values.double().mean().item(), rel=1e-9)
        assert std[index].item() == pytest.approx(values.double().std(unbiased=False).item(), rel=1e-9)
    assert torch.equal(module.model.map_mean, mean)
    assert torch.equal(module.model.map_std, std)
    assert module.model.statistics_images.item() == 4
    # the anomalous images would have changed them
    all_maps = known_maps(images)
    assert abs(all_maps[0].double().mean().item() - mean[0].item()) > 1e-3


def test_fusion_is_eq_8() -> None:
    local = torch.rand(2, 1, 64, 64) * 5
    glob = torch.rand(2, 1, 64, 64) * 0.1 + 0.3
    mean = torch.tensor([2.0, 0.35], dtype=torch.float64)
    std = torch.tensor([1.5, 0.02], dtype=torch.float64)
    fused, parts = DskdScoreFusion(sigma=4)([local, glob], list(mean), list(std))
    reference = GaussianBlur2d(sigma=4, channels=1)((local - 2.0) / 1.5 + (glob - 0.35) / 0.02)
    assert torch.allclose(fused, reference, atol=1e-4)
    assert torch.allclose(parts[0] + parts[1], fused, atol=1e-5)
    assert torch.allclose(parts[0], GaussianBlur2d(sigma=4, channels=1)((local - 2.0) / 1.5), atol=1e-4)


def test_model_output_is_eq_8_of_its_student_maps() -> None:
    model = DskdModel(**SMALL).eval()
    images = torch.randn(3, 3, 64, 64)
    model.set_statistics(torch.tensor([0.4, 0.02]), torch.tensor([0.1, 0.005]), 10)
    with torch.no_grad():
        local, glob = model.student_maps(images)
        output = model(images)
    assert isinstance(output, InferenceBatch)
    standardised = (local - 0.4) / 0.1 + (glob - 0.02) / 0.005
    expected = GaussianBlur2d(sigma=4, channels=1)(standardised)
    scale = float(expected.abs().max())
    assert torch.allclose(output.anomaly_map, expected, atol=1e-5 * scale)
    assert torch.allclose(output.pred_score, expected.amax(dim=(-2, -1)).reshape(-1), atol=1e-5 * scale)
    # the maps of each student: cosine distance (local) and affinity KL (global), upsampled and summed
    with torch.no_grad():
        teacher, s_loc, s_glo = model.features(images)
    cosine = sum(
        torch.nn.functional.interpolate(
            (1 - torch.nn.functional.cosine_similarity(t, s, dim=1)).unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=True
        )
        for t, s in zip(teacher, s_loc, strict=True)
    )
    kl = sum(
        torch.nn.functional.interpolate(affinity_kl_direct(t, s).unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=True)
        for t, s in zip(teacher, s_glo, strict=True)
    )
    assert torch.allclose(local, cosine, atol=1e-5)
    assert torch.allclose(glob, kl, atol=1e-5)


def test_uncalibrated_model_adds_raw_maps_and_warns() -> None:
    from anomalib_dskd.models.dskd.torch_model import warn_if_uncalibrated

    model = DskdModel(**SMALL).eval()
    assert not model.is_calibrated
    with pytest.warns(UserWarning, match="statistics"):
        warn_if_uncalibrated(model, "test")
    model.set_statistics(torch.zeros(2), torch.ones(2), 1)
    assert model.is_calibrated


def test_statistics_are_buffers_in_the_state_dict() -> None:
    model = DskdModel(**SMALL)
    model.set_statistics(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), 5)
    state = model.state_dict()
    assert torch.equal(state["map_mean"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    other = DskdModel(**SMALL)
    other.load_state_dict(state)
    assert torch.equal(other.map_std, torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert other.statistics_images.item() == 5


# ---------------------------------------------------------------- global map scales (faster inference)
def test_global_map_scales_select_the_global_students_maps() -> None:
    full = DskdModel(**SMALL).eval()
    fast = DskdModel(**SMALL, global_map_scales=(1, 2)).eval()
    fast.load_state_dict(full.state_dict())  # same weights; uncalibrated statistics carry no scale choice yet
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        teacher, _, s_glo = full.features(images)
        local_full, glob_full = full.student_maps(images)
        local_fast, glob_fast = fast.student_maps(images)
    kl = [
        torch.nn.functional.interpolate(affinity_kl_direct(t, s).unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=True)
        for t, s in zip(teacher, s_glo, strict=True)
    ]
    assert torch.allclose(local_fast, local_full)  # the local student keeps every scale
    assert torch.allclose(glob_fast, kl[1] + kl[2], atol=1e-5)
    assert torch.allclose(glob_full, kl[0] + kl[1] + kl[2], atol=1e-5)
    assert not torch.allclose(glob_fast, glob_full, atol=1e-3)


@pytest.mark.parametrize("scales", [(), (3,), (-1, 1), (1, 1)])
def test_global_map_scales_refuse_bad_indices(scales: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="global_map_scales"):
        DskdModel(**SMALL, global_map_scales=scales)


def test_statistics_of_other_global_map_scales_are_refused_until_recomputed() -> None:
    full = DskdModel(**SMALL).eval()
    full.set_statistics(torch.tensor([0.4, 0.02]), torch.tensor([0.1, 0.005]), 10)
    fast = DskdModel(**SMALL, global_map_scales=[1, 2]).eval()
    fast.load_state_dict(full.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match=r"global_map_scales=\(0, 1, 2\).*Recompute"):
        fast(images)
    fast.set_statistics(torch.tensor([0.4, 0.01]), torch.tensor([0.1, 0.004]), 10)
    assert fast.statistics_scales.tolist() == [0, 1, 1]
    assert isinstance(fast(images), InferenceBatch)
    # a checkpoint from before the option (no statistics_scales entry) scored every scale
    state = full.state_dict()
    del state["statistics_scales"]
    old = DskdModel(**SMALL).eval()
    old.load_state_dict(state)
    assert old.statistics_scales.tolist() == [1, 1, 1]
    assert isinstance(old(images), InferenceBatch)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"global_map_scales": [1, 2]}, {"global_map_key_pool": 2}])
def test_export_parity_with_faster_global_scoring(tmp_path, options: dict) -> None:  # noqa: ANN001
    from tests.export_utils import assert_export_parity

    model = Dskd(
        backbone="mobilenetv2_100", pre_trained=False, gccb_channels=16, **options,
        pre_processor=PreProcessor(transform=Resize((64, 64))), visualizer=False, evaluator=False,
    )
    model.model.set_statistics(torch.tensor([0.4, 0.01]), torch.tensor([0.1, 0.004]), 10)
    assert_export_parity(model, tmp_path, (64, 64))


# ---------------------------------------------------------------- pooled keys at the fine scale
def test_pooled_keys_are_exact_when_the_teacher_is_constant_on_each_cell() -> None:
    """With every k x k cell of the teacher map holding one vector, the KL over positions equals the KL over
    cells (each cell's k^2 equal terms merge), which is what pooled keys compute: equal up to rounding.
    Any other teacher makes the cell terms' log-mean-exp differ from their mean (the documented error)."""
    coarse = torch.randn(2, 8, 8, 8)
    teacher = torch.nn.functional.interpolate(coarse, scale_factor=2, mode="nearest")  # constant on 2x2 cells
    student = teacher + 0.5 * torch.randn_like(teacher)  # the student is free: queries stay exact
    exact = affinity_kl_direct(teacher, student)
    assert torch.allclose(pooled_affinity_kl(teacher, student, 2, chunk_size=64), exact, rtol=1e-4, atol=1e-6)
    assert torch.equal(pooled_affinity_kl(teacher, student, 1), affinity_kl(teacher, student))
    rough = torch.randn(2, 8, 16, 16)  # neighbouring vectors unrelated: pooling is no longer exact
    assert not torch.allclose(pooled_affinity_kl(rough, student, 2), affinity_kl_direct(rough, student), rtol=1e-2)


def test_pooled_keys_track_the_exact_map_on_smooth_features() -> None:
    smooth = torch.nn.functional.interpolate(torch.randn(1, 16, 8, 8), scale_factor=4, mode="bilinear")
    student = smooth + 0.3 * torch.randn_like(smooth)
    exact = affinity_kl_direct(smooth, student).flatten()
    pooled = pooled_affinity_kl(smooth, student, 2).flatten()
    correlation = torch.corrcoef(torch.stack([exact, pooled]))[0, 1]
    assert correlation > 0.99, correlation


@pytest.mark.parametrize(
    ("option", "pools", "described"),
    [(2, [2, 1, 1], "2"), ([2, 2, 1], [2, 2, 1], r"\(2, 2, 1\)")],
    ids=["shallowest", "per-scale"],
)
def test_global_map_key_pool_scores_its_scales_and_guards_statistics(option, pools: list, described: str) -> None:  # noqa: ANN001
    """An int pools the shallowest scale's keys, a sequence each scale's; the statistics guard names the setting."""
    exact = DskdModel(**SMALL).eval()
    pooled = DskdModel(**SMALL, global_map_key_pool=option).eval()
    pooled.load_state_dict(exact.state_dict())
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        teacher, _, s_glo = exact.features(images)
        _, glob = pooled.student_maps(images)
    parts = [pooled_affinity_kl(t, s, pool) for t, s, pool in zip(teacher, s_glo, pools, strict=True)]
    assert torch.equal(pooled_affinity_kl(teacher[2], s_glo[2], 1), affinity_kl(teacher[2], s_glo[2]))  # 1 = exact
    expected = sum(
        torch.nn.functional.interpolate(p.unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=True) for p in parts
    )
    assert torch.allclose(glob, expected, atol=1e-5)
    exact.set_statistics(torch.tensor([0.4, 0.02]), torch.tensor([0.1, 0.005]), 10)
    pooled.load_state_dict(exact.state_dict())
    with pytest.raises(RuntimeError, match=rf"global_map_key_pool=1, but .*global_map_key_pool={described}.*Recompute"):
        pooled(images)
    pooled.set_statistics(torch.tensor([0.4, 0.02]), torch.tensor([0.1, 0.005]), 10)
    assert pooled.statistics_scales.tolist() == pools
    assert isinstance(pooled(images), InferenceBatch)


def test_global_map_key_pool_forms_and_errors() -> None:
    model = DskdModel(**SMALL, global_map_key_pool=[2, 2, 1])
    model.set_global_map_key_pool(2)  # the int form: the shallowest scale only
    assert model.global_map_key_pool == (2, 1, 1)
    with pytest.raises(ValueError, match="one value per teacher scale"):
        DskdModel(**SMALL, global_map_key_pool=[2, 1])
    with pytest.raises(ValueError, match="must divide the feature grid 4x4"):
        DskdModel(**SMALL, global_map_key_pool=[1, 1, 8])  # 64 px: the deepest grid is 4x4


@pytest.mark.parametrize("pool", [0, -2, 3, True])
def test_global_map_key_pool_refuses_values_that_do_not_divide_the_grid(pool: int) -> None:
    with pytest.raises(ValueError, match="global_map_key_pool"):
        DskdModel(**SMALL, global_map_key_pool=pool)  # 64 px: a 16x16 shallowest grid


def test_dskd_is_registered_with_anomalib() -> None:
    from anomalib.models import get_model

    import anomalib_dskd

    assert anomalib_dskd.Dskd is Dskd
    model = get_model("Dskd", backbone="mobilenetv2_100", pre_trained=False, gccb_channels=8, visualizer=False)
    assert isinstance(model, Dskd)


# ---------------------------------------------------------------- OCBE_glo as the paper draws it
def test_global_embedding_is_the_teachers_next_stage_with_its_weights(tmp_path) -> None:  # noqa: ANN001
    """Fig. 3: the 4-th ResNet stage as trainable OCBE_glo, started from the teacher's weights, on F_T^3 alone."""
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = DskdModel(backbone="resnet18", pre_trained=str(path), input_size=(64, 64), gccb_channels=16)
    stage = model.global_bottleneck.stage
    assert len(stage) == 1
    for key, value in reference.layer4.state_dict().items():
        assert torch.equal(stage[0].state_dict()[key], value), key
    assert all(p.requires_grad for p in model.global_bottleneck.parameters())
    assert isinstance(model.global_bottleneck.project, torch.nn.Identity)  # 512 = 2 x 256 channels
    teacher = model.core.teacher(torch.rand(1, 3, 64, 64))
    shallow = [torch.full_like(t, 7.0) for t in teacher[:-1]]
    with torch.no_grad():  # only the deepest teacher feature enters OCBE_glo
        assert torch.equal(model.global_bottleneck(teacher), model.global_bottleneck([*shallow, teacher[-1]]))
    random = DskdModel(backbone="resnet18", pre_trained=str(path), input_size=(64, 64), gccb_channels=16,
                       global_embedding_init="random")
    assert not torch.equal(random.global_bottleneck.stage[0][0].conv1.weight, reference.layer4[0].conv1.weight)


def test_global_embedding_projects_a_wider_next_stage() -> None:
    model = DskdModel(**SMALL)  # MobileNetV2: blocks 5-6 give 320 channels, the decoder expects 2 x 96
    assert model.global_embedding == "teacher_stage"
    assert isinstance(model.global_bottleneck.project[0], torch.nn.Conv2d)
    assert model.global_bottleneck.project[0].weight.shape[:2] == (192, 320)
    teacher = model.core.teacher(torch.rand(2, 3, 64, 64))
    assert model.global_bottleneck(teacher).shape == (2, 192, 2, 2)


def test_global_embedding_options_are_checked() -> None:
    with pytest.raises(ValueError, match="global_embedding must be one of"):
        DskdModel(**SMALL, global_embedding="layer4")
    with pytest.raises(ValueError, match="global_embedding_init must be one of"):
        DskdModel(**SMALL, global_embedding_init="imagenet")


def test_no_stage_after_the_deepest_layer_is_a_clear_error() -> None:
    from anomalib_dskd.components.rd import TeacherBackboneError

    with pytest.raises(TeacherBackboneError, match="no stage after layer 4.*global_embedding='fused'"):
        DskdModel(backbone="resnet18", layers=(2, 3, 4), pre_trained=False, input_size=(128, 128), gccb_channels=8)
    fused = DskdModel(backbone="resnet18", layers=(2, 3, 4), pre_trained=False, input_size=(128, 128),
                      gccb_channels=8, global_embedding="fused")
    assert fused.global_embedding == "fused"


def test_checkpoint_with_the_fused_design_loads_as_trained(tmp_path) -> None:  # noqa: ANN001
    """A checkpoint from before ``global_embedding`` (fused OCBE_glo, no such hyperparameter) loads exactly."""
    import lightning

    small = {"backbone": "mobilenetv2_100", "pre_trained": False, "gccb_channels": 16, "visualizer": False,
             "evaluator": False, "pre_processor": PreProcessor(transform=Resize((64, 64)))}
    old = Dskd(**small, global_embedding="fused").eval()
    old.model.set_statistics(torch.tensor([0.4, 0.02]), torch.tensor([0.1, 0.005]), 10)
    hyper = {k: v for k, v in old.hparams.items() if k != "global_embedding"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": hyper,
                "pytorch-lightning_version": lightning.__version__}, path)
    loaded = Dskd.load_from_checkpoint(path, map_location="cpu", pre_processor=small["pre_processor"]).eval()
    assert loaded.model.global_embedding == "fused"
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = loaded.model(images), old.model(images)
    assert torch.equal(ours.anomaly_map, theirs.anomaly_map)
    assert torch.equal(ours.pred_score, theirs.pred_score)
