"""Packd (few-shot prototype-aware contrastive distillation) and the few-shot datamodule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("CI", "true")
torch.set_num_threads(1)

SIZE = 64
CATEGORIES = ("aa", "bb", "cc", "dd")
BACKBONE = "mobilenetv2_100"


@pytest.fixture(scope="module")
def few_shot_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny synthetic MVTec AD categories (64x64, 6 train images each)."""
    from anomalib_dskd.data import generate_mvtec_ad_category

    root = tmp_path_factory.mktemp("few_shot")
    for seed, category in enumerate(CATEGORIES):
        generate_mvtec_ad_category(
            root,
            category,
            seed=seed,
            image_size=(SIZE, SIZE),
            n_train=6,
            n_test_good=3,
            n_per_defect=1,
        )
    return root


def make_model(**kwargs):
    from anomalib_dskd.models.packd import Packd

    kwargs.setdefault("visualizer", False)
    return Packd(
        backbone=BACKBONE,
        pre_trained=False,
        pre_processor=Packd.configure_pre_processor((SIZE, SIZE)),
        **kwargs,
    )


def make_datamodule(root: Path, target: str = "dd", **kwargs):
    from anomalib_dskd.data.few_shot import FewShotDataModule

    kwargs.setdefault("k_shot", 2)
    kwargs.setdefault("num_support_draws", 2)
    kwargs.setdefault("train_batch_size", 3)
    kwargs.setdefault("eval_batch_size", 8)
    return FewShotDataModule(
        train_sources=[{"format": "mvtec_ad", "root": str(root), "category": list(CATEGORIES)}],
        target={"format": "mvtec_ad", "root": str(root), "category": target},
        image_size=(SIZE, SIZE),
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- PEIM
def test_peim_shapes_and_levels() -> None:
    from anomalib_dskd.models.packd import PackdModel

    model = PackdModel(BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), num_prototypes=5, attention_dim=16)
    assert model.peim_levels == (2, 3, 4)
    assert model.teacher.layers == (1, 2, 3, 4)  # level 4 of the supports = the teacher's next stage
    queries, supports = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, 3, SIZE, SIZE)
    out = model(queries, supports)
    assert [tuple(p.shape) for p in out["prototypes"]] == [(2, 5, 16)] * 3
    assert [tuple(t.shape) for t in out["teacher"]] == [tuple(s.shape) for s in out["student"]]
    assert [tuple(t.shape[:3]) for t in out["support"]] == [(2, 3, c) for c in (24, 32, 96)]
    model.eval()
    prototypes = model.set_support(torch.rand(4, 3, SIZE, SIZE))
    assert [tuple(p.shape) for p in prototypes] == [(5, 16)] * 3  # independent of k
    result = model(torch.rand(3, 3, SIZE, SIZE))
    assert result.anomaly_map.shape == (3, 1, SIZE, SIZE)
    assert result.pred_score.shape == (3,)


def test_prototypes_change_the_student_only_after_the_zero_init_is_left() -> None:
    from anomalib_dskd.models.packd import PackdModel

    torch.manual_seed(0)
    model = PackdModel(BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), num_prototypes=4, attention_dim=16).eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    teacher = model.teacher(images)
    support_a, support_b = torch.rand(1, 2, 3, SIZE, SIZE), torch.rand(1, 2, 3, SIZE, SIZE) * 0.2
    with torch.no_grad():
        protos_a = [p.expand(2, -1, -1) for p in model.extract_prototypes(support_a)]
        protos_b = [p.expand(2, -1, -1) for p in model.extract_prototypes(support_b)]
        plain = model.decoder.decoder(model.bottleneck(teacher[:3]))
        a = model.student(teacher, protos_a)
        # zero-initialised output projections: an untrained Packd is exactly RD
        assert all(torch.equal(x, y) for x, y in zip(a, plain, strict=True))
        for integrator in model.peim.integrators:
            torch.nn.init.normal_(integrator.out.weight, std=0.1)
        a, b = model.student(teacher, protos_a), model.student(teacher, protos_b)
    assert all(x.shape == y.shape for x, y in zip(a, plain, strict=True))
    assert all((x - y).abs().max() > 1e-4 for x, y in zip(a, b, strict=True))  # prototypes condition the student


def test_peim_levels_validation() -> None:
    from anomalib_dskd.models.packd import PackdModel

    model = PackdModel(BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), peim_levels=(1, 2, 3),
                       support_score_levels=(2, 3))
    assert model.teacher.layers == (1, 2, 3)
    # a level-4 support memory needs the teacher's next stage even when the PEIM does not
    assert PackdModel(BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), peim_levels=(1, 2, 3)).teacher.layers == (1, 2, 3, 4)
    assert len(model.peim.integrators) == 3
    with pytest.raises(ValueError, match="peim_levels"):
        PackdModel(BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), peim_levels=(2, 5))


# ---------------------------------------------------------------------------------------------- losses
def test_orthogonality_loss() -> None:
    from anomalib_dskd.models.packd.loss import OrthogonalityLoss

    loss = OrthogonalityLoss()
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    orthonormal = q[:, :6].T * 3.0  # 6 orthogonal prototypes of any length (L2-normalised inside)
    assert loss([orthonormal, orthonormal[None].repeat(2, 1, 1)]).item() == pytest.approx(0.0, abs=1e-5)
    assert loss([torch.randn(6, 16)]).item() > 0.1
    duplicated = orthonormal.clone()
    duplicated[1] = duplicated[0]
    assert loss([duplicated]).item() == pytest.approx(2.0, abs=1e-4)


def test_contrastive_loss_prefers_matched_pairs() -> None:
    from anomalib_dskd.models.packd.loss import ContrastiveDistillationLoss

    torch.manual_seed(0)
    loss = ContrastiveDistillationLoss(temperature=0.1)
    teacher = [torch.randn(4, 8, 5, 5), torch.randn(4, 16, 3, 3)]
    matched = [t + 0.05 * torch.randn_like(t) for t in teacher]
    shuffled = [m[torch.tensor([1, 2, 3, 0])] for m in matched]  # student of another query
    mask = ~torch.eye(4, dtype=torch.bool)
    assert loss(teacher, matched, mask) < loss(teacher, shuffled, mask)
    assert loss(teacher, matched, None) == pytest.approx(0.0, abs=1e-6)  # no negatives: log(1)
    supports = [torch.randn(4, 2, *t.shape[1:]) for t in teacher]
    assert loss(teacher, matched, mask, supports) > loss(teacher, matched, mask) - 1e-6
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveDistillationLoss(0)


# ---------------------------------------------------------------------------------------------- datamodule
def test_leave_one_out_never_trains_on_the_target(few_shot_root: Path) -> None:
    datamodule = make_datamodule(few_shot_root, target="bb")
    datamodule.setup()
    assert [spec["category"] for spec in datamodule.train_specs] == ["aa", "cc", "dd"]
    assert [spec["category"] for spec in datamodule.excluded_specs] == ["bb"]
    paths = datamodule.train_data.image_paths()
    assert paths
    assert not any(Path(path).resolve().is_relative_to((few_shot_root / "bb").resolve()) for path in paths)
    # every training batch: groups of 1 + k images of one category, categories mixed
    loader = datamodule.train_dataloader()
    for batch in loader:
        groups = [batch.image_path[i : i + 3] for i in range(0, len(batch.image_path), 3)]
        categories = [{Path(p).parts[-4] for p in group} for group in groups]
        assert all(len(c) == 1 for c in categories)
        assert len({next(iter(c)) for c in categories}) == 3  # 3 groups, 3 different categories
        assert "bb" not in set().union(*categories)
        assert all(len(set(group)) == 3 for group in groups)  # query is not among its supports
    # the test set is the target's
    assert all("/bb/test/" in str(path) for path in datamodule.test_data.samples.image_path)


def test_any_anomalib_layout_across_datasets(few_shot_root: Path, tiny_loco: tuple[Path, str]) -> None:
    """MVTec LOCO and Folder sources train together; the target comes from another dataset."""
    from anomalib_dskd.data.few_shot import FewShotDataModule

    loco_root, loco_category = tiny_loco
    datamodule = FewShotDataModule(
        train_sources=[
            f"mvtec_loco:{loco_root}:{loco_category}",
            {
                "format": "folder",
                "root": str(few_shot_root / "aa"),
                "category": "aa_folder",
                "normal_dir": "train/good",
            },
        ],
        target={"format": "mvtec_ad", "root": str(few_shot_root), "category": "dd"},
        k_shot=2,
        image_size=(SIZE, SIZE),
        train_batch_size=2,
    )
    datamodule.setup()
    assert datamodule.train_data.categories == [f"mvtec_loco/{loco_category}", "folder/aa_folder"]
    assert [len(indices) for indices in datamodule.train_data.category_indices] == [8, 6]
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (6, 3, SIZE, SIZE)
    assert {Path(p).parts[-4] for p in batch.image_path[:3]} != {Path(p).parts[-4] for p in batch.image_path[3:]}


def test_support_draws_are_reproducible(few_shot_root: Path) -> None:
    first, second = make_datamodule(few_shot_root, seed=3), make_datamodule(few_shot_root, seed=3)
    other = make_datamodule(few_shot_root, seed=4)
    for module in (first, second, other):
        module.setup()
    assert first.support_paths(0) == second.support_paths(0)
    assert all("/dd/train/good/" in path for path in first.support_paths(0))
    assert len(set(first.support_paths(1))) == 2
    draws = {tuple(first.support_paths(d)) for d in range(4)} | {tuple(other.support_paths(d)) for d in range(4)}
    assert len(draws) > 1  # draws differ across draws / seeds
    assert first.support_paths(0) != other.support_paths(0) or first.support_paths(1) != other.support_paths(1)
    images = first.support_images(0)
    assert images.shape == (2, 3, SIZE, SIZE)
    assert 0 <= images.min() and images.max() <= 1


def test_datamodule_errors(few_shot_root: Path, tmp_path: Path) -> None:
    from anomalib_dskd.data.few_shot import FewShotDataError, FewShotDataModule

    with pytest.raises(FewShotDataError, match="k_shot"):
        make_datamodule(few_shot_root, k_shot=6).setup()  # 6 train images: query + 6 supports impossible
    with pytest.raises(FewShotDataError, match="does not exist"):
        make_datamodule(tmp_path / "nowhere").setup()
    with pytest.raises(FewShotDataError, match="format"):
        FewShotDataModule(target="nope:x:y")
    only_target = make_datamodule(few_shot_root)
    only_target.train_specs = []
    only_target.setup()
    with pytest.raises(FewShotDataError, match="no training category"):
        only_target.train_dataloader()


# ---------------------------------------------------------------------------------------------- engine, export
@pytest.fixture(scope="module")
def trained(few_shot_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from anomalib.engine import Engine

    from anomalib_dskd.data.few_shot import evaluate_support_draws

    torch.manual_seed(0)
    model = make_model(num_prototypes=4, attention_dim=16)
    datamodule = make_datamodule(few_shot_root)
    root = tmp_path_factory.mktemp("engine")
    engine = Engine(max_epochs=1, default_root_dir=root, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    results = evaluate_support_draws(engine, model, datamodule)
    return {"model": model, "datamodule": datamodule, "engine": engine, "results": results, "root": root}


@pytest.mark.slow  # uses `trained`: an Engine training
def test_engine_fit_and_test_over_draws(trained: dict) -> None:
    model, results = trained["model"], trained["results"]
    assert model.k_shot == 2
    assert model.categories_per_batch == 3
    assert results["draws"] == [0, 1]
    assert len(results["per_draw"]) == 2
    for key in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= results["mean"][key] <= 1.0
    assert model.model.has_support
    # the trained PEIM moved away from the zero-initialised read-out
    assert any(integrator.out.weight.abs().sum() > 0 for integrator in model.model.peim.integrators)
    checkpoints = sorted(Path(trained["root"]).rglob("*.ckpt"))
    assert checkpoints
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["state_dict"]
    assert bool(state["model.support_ready"])  # the prototypes of the validation draw are in the checkpoint


@pytest.mark.slow  # uses `trained`: an Engine training
def test_set_support_from_folder_and_errors(trained: dict, few_shot_root: Path, tmp_path: Path) -> None:
    from anomalib_dskd.models.packd import SupportError

    model = trained["model"].eval()
    good = few_shot_root / "dd" / "train" / "good"
    prototypes = model.set_support(good)
    again = model.set_support(sorted(good.iterdir()))
    assert all(torch.allclose(a, b) for a, b in zip(prototypes, again, strict=True))
    assert model.model.support_shots.item() == 6
    with torch.no_grad():
        result = model(torch.rand(2, 3, SIZE, SIZE))
    assert result.anomaly_map.shape == (2, 1, SIZE, SIZE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SupportError, match="no images"):
        model.set_support(empty)
    with pytest.raises(SupportError, match="does not exist"):
        model.set_support(tmp_path / "missing")
    with pytest.raises(SupportError, match="input size"):
        model.set_support(torch.rand(2, 3, 32, 32), pre_processed=True)
    with pytest.raises(SupportError, match="RGB"):
        model.set_support(torch.rand(2, 1, SIZE, SIZE))
    fresh = make_model()
    with pytest.raises(SupportError, match="no support set"):
        fresh.eval()(torch.rand(1, 3, SIZE, SIZE))


@pytest.mark.slow  # uses `trained`: an Engine training
def test_foreign_supports_change_the_target_scores(trained: dict, few_shot_root: Path) -> None:
    """Same weights, supports of another category: the target's image scores must move (issue #14).

    Measure: the mean absolute change of the target's test-image scores divided by the spread (std) of
    those scores with the right supports. A change of a quarter of the spread or more reorders the
    ranking of the target's images; the bound (0.25) is fixed by that meaning, not fitted: this run
    measured 0.51 with the fused score (the support memory's first design), 1.94 with the default
    (``image_score="memory"``) and 0.003-0.005 with the paper's score (``support_score_weight=0``, the
    design before the memory) on the same weights, so the check fails on that design by two orders of
    magnitude, which is asserted too. Foreign supports must also make the target look more
    anomalous (higher scores) for most of its images.
    """
    from anomalib.data.utils.image import read_image

    model = trained["model"].eval()
    images = torch.stack([read_image(p, as_tensor=True) for p in sorted((few_shot_root / "dd" / "test").rglob("*.png"))])
    batch = model.pre_processor.transform(images)

    def scores(category: str) -> torch.Tensor:
        model.set_support(few_shot_root / category / "train" / "good")
        with torch.no_grad():
            return model.model(batch).pred_score

    weight, image_score = model.model.support_score_weight, model.model.image_score
    try:
        changes = {}
        for value in (weight, 0.0):
            model.model.support_score_weight = value
            model.model.image_score = image_score if value else "map"  # weight 0: the distillation map alone
            own, foreign = scores("dd"), scores("aa")
            changes[value] = float((foreign - own).abs().mean() / own.std())
            if value:
                assert (foreign > own).float().mean() >= 0.8
        assert changes[weight] >= 0.25, changes
        assert changes[0.0] < 0.1, changes  # the paper's score alone barely depends on the supports
    finally:
        model.model.support_score_weight, model.model.image_score = weight, image_score
        model.set_support(few_shot_root / "dd" / "train" / "good")


def test_support_memory_scores_and_loads_any_k() -> None:
    """The nearest-support map is 0 on a support image, grows off it, and a checkpoint of another k loads."""
    from anomalib_dskd.models.packd.components.support_memory import SupportMemory, check_support_levels
    from anomalib_dskd.models.packd.torch_model import PackdModel

    torch.manual_seed(0)
    memory = SupportMemory([8], [2])
    supports = torch.randn(3, 8, 5, 5)
    memory.set([supports])
    assert memory.banks[0].shape == (75, 8)
    own = memory([supports[:1]])[0]
    assert own.shape == (1, 1, 5, 5)
    assert own.abs().max() < 1e-5  # every position of a support is in the memory
    assert memory([torch.randn(1, 8, 5, 5)])[0].mean() > 0.05
    with pytest.raises(ValueError, match="support_score_levels"):
        check_support_levels([0, 2])
    with pytest.raises(ValueError, match="support_score_levels"):
        check_support_levels([2, 5])
    model = PackdModel(backbone=BACKBONE, pre_trained=False, input_size=(SIZE, SIZE)).eval()
    model.set_support(torch.rand(2, 3, SIZE, SIZE))
    other = PackdModel(backbone=BACKBONE, pre_trained=False, input_size=(SIZE, SIZE)).eval()
    other.set_support(torch.rand(5, 3, SIZE, SIZE))
    other.load_state_dict(model.state_dict())
    query = torch.rand(2, 3, SIZE, SIZE)
    assert torch.allclose(other(query).anomaly_map, model(query).anomaly_map)
    # passing the supports to forward scores like caching them
    fresh = torch.rand(3, 3, SIZE, SIZE)
    direct = model(query, supports=fresh).anomaly_map
    model.set_support(fresh)
    assert torch.allclose(direct, model(query).anomaly_map, atol=1e-6)
    with pytest.raises(ValueError, match="support_score_weight"):
        PackdModel(backbone=BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), support_score_weight=-1)


@pytest.mark.parametrize(("metric", "combine"), [("cosine", "concat"), ("euclidean", "sum"), ("euclidean", "concat")])
def test_support_memory_metric_and_combine(metric: str, combine: str) -> None:
    """Euclidean / concatenated memories: brute-force nearest distances, 0 on a support, one map when concatenated."""
    import torch.nn.functional as F  # noqa: N812

    from anomalib_dskd.models.packd.components.support_memory import SupportMemory

    torch.manual_seed(0)
    memory = SupportMemory([4, 6], [2, 3], metric=metric, combine=combine)
    supports = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    memory.set(supports)
    assert len(memory.banks) == (1 if combine == "concat" else 2)
    assert memory.banks[0].shape == ((128, 10) if combine == "concat" else (128, 4))
    own = memory([level[1:] for level in supports])
    assert all(level_map.abs().max() < 1e-2 for level_map in own)  # sqrt of a rounding residue for euclidean
    query = [torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)]
    maps = memory(query)
    assert [tuple(level_map.shape) for level_map in maps] == ([(1, 1, 8, 8)] if combine == "concat" else
                                                              [(1, 1, 8, 8), (1, 1, 4, 4)])
    # brute force on one position of the first memory: pooled (and resized / normalised) features
    pooled = [F.avg_pool2d(level, 3, stride=1, padding=1, count_include_pad=False) for level in query + supports]
    if metric == "cosine":
        pooled = [F.normalize(level, dim=1) for level in pooled]
    if combine == "concat":
        resized = [F.interpolate(level, size=(8, 8), mode="bilinear") if level.shape[-1] == 4 else level
                   for level in pooled]
        if metric == "cosine":
            resized = [F.normalize(level, dim=1) / 2**0.5 for level in resized]
        q, s = torch.cat(resized[0:2], 1), torch.cat(resized[2:4], 1)
    else:
        q, s = pooled[0], pooled[2]
    point = q[0, :, 3, 5]
    candidates = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])
    expected = (1 - (candidates @ point).max()) if metric == "cosine" else (candidates - point).norm(dim=1).min()
    torch.testing.assert_close(maps[0][0, 0, 3, 5], expected, rtol=1e-4, atol=1e-4)
    for name, value in (("support_metric", "manhattan"), ("support_combine", "max")):
        with pytest.raises(ValueError, match=name):
            SupportMemory([4], [2], **{name.removeprefix("support_"): value})


def test_support_memory_options_export(tmp_path: Path) -> None:
    """A Packd with the Euclidean, concatenated memory exports with ONNX / OpenVINO parity, memory as constants."""
    from tests.export_utils import assert_export_parity

    torch.manual_seed(0)
    model = make_model(support_metric="euclidean", support_combine="concat", evaluator=False, post_processor=False)
    model.model.eval()
    model.model.set_support(torch.randn(2, 3, SIZE, SIZE))
    assert_export_parity(model, tmp_path, (SIZE, SIZE))


def test_memory_image_score_keeps_the_fused_map() -> None:
    """``image_score="memory"``: the map is the fusion, the image score the maximum of the memory term alone."""
    from anomalib_dskd.components.rd.anomaly_map import upsample_and_sum
    from anomalib_dskd.models.packd.torch_model import PackdModel

    torch.manual_seed(0)
    kwargs = {"backbone": BACKBONE, "pre_trained": False, "input_size": (SIZE, SIZE), "support_score_weight": 0.7}
    memory_scored = PackdModel(**kwargs, image_score="memory").eval()
    map_scored = PackdModel(**kwargs, image_score="map").eval()
    map_scored.load_state_dict(memory_scored.state_dict())
    supports, query = torch.rand(3, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    memory_scored.set_support(supports)
    map_scored.set_support(supports)
    with torch.no_grad():
        ours, fused = memory_scored(query), map_scored(query)
        memory_map = memory_scored.anomaly_map_generator.blur(
            upsample_and_sum(memory_scored.support_distance_maps(memory_scored.teacher(query)), (SIZE, SIZE)))
    torch.testing.assert_close(ours.anomaly_map, fused.anomaly_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.pred_score, memory_map.amax(dim=(-2, -1)).reshape(-1))
    assert (fused.pred_score - ours.pred_score).abs().min() > 1e-3  # the distillation term is not in the score
    with pytest.raises(ValueError, match="image_score='memory'"):
        PackdModel(**kwargs | {"support_score_weight": 0.0}, image_score="memory")


@pytest.mark.parametrize("normalisation", ["zscore", "centred"])
def test_score_normalisation_standardises_the_supports_own_maps(normalisation: str) -> None:
    """Each term of the normalised score has mean 0 and std 1 over the supports' leave-one-out maps.

    The statistics are recomputed here from the definition (each support a query, its memory map against
    the others), independently of ``support_statistics``; a wrong sign, a missing leave-one-out (the
    memory map of a support against itself is 0 everywhere), or a weight applied twice all move the
    standardised maps' mean or std far from (0, 1), not by the 1e-4 this test allows.
    """
    from anomalib_dskd.components.rd.anomaly_map import cosine_distance_maps, upsample_and_sum
    from anomalib_dskd.models.packd.torch_model import PackdModel, SupportError

    torch.manual_seed(0)
    model = PackdModel(backbone=BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), support_score_weight=0.5,
                       support_score_levels=(2, 3, 4), score_normalisation=normalisation).eval()
    supports, query = torch.rand(3, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    model.set_support(supports)
    with torch.no_grad():
        features = model.teacher(supports)
        prototypes = [p.unsqueeze(0).expand(3, -1, -1) for p in model.cached_prototypes]
        blur = model.anomaly_map_generator.blur
        distill = blur(upsample_and_sum(cosine_distance_maps(features[:3], model.student(features[:3], prototypes)), (SIZE, SIZE)))
        memory = []
        for i in range(3):
            others = [j for j in range(3) if j != i]
            banks = model.support_memory.build([features[level - 1][others] for level in (2, 3, 4)])
            memory.append(blur(upsample_and_sum(model.support_memory([features[level - 1][i : i + 1] for level in (2, 3, 4)], banks), (SIZE, SIZE))))
        memory = torch.cat(memory)
    assert memory.min() > 0.01  # leave-one-out: a support's map against itself would be 0
    for index, term in enumerate((distill, memory)):
        standard = term / model.score_scales[index]
        assert standard.std() == pytest.approx(1.0, abs=1e-4)
    # the shift is the weighted mean of the standardised terms (per pixel for "centred")
    means = [(t / model.score_scales[i]).mean(dim=0, keepdim=True) for i, t in enumerate((distill, memory))]
    expected = means[0] + 0.5 * means[1]
    expected = expected if normalisation == "centred" else expected.mean().reshape(1, 1, 1, 1)
    assert model.score_shift.shape == expected.shape
    assert torch.allclose(model.score_shift, expected, atol=1e-4)
    # a checkpoint of the normalised model loads into a fresh one and scores the same
    other = PackdModel(backbone=BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), support_score_weight=0.5,
                       support_score_levels=(2, 3, 4), score_normalisation=normalisation).eval()
    other.load_state_dict(model.state_dict())
    assert torch.allclose(other(query).anomaly_map, model(query).anomaly_map, atol=1e-6)
    with pytest.raises(SupportError, match="at least 2 support images"):
        model.set_support(supports[:1])
    with pytest.raises(ValueError, match="score_normalisation must be one of"):
        PackdModel(backbone=BACKBONE, pre_trained=False, input_size=(SIZE, SIZE), score_normalisation="minmax")


def test_plain_batch_episodes_never_use_the_query() -> None:
    """Episodes of a plain one-category batch: supports are other images of the batch, seeded by torch's RNG."""
    from lightning.pytorch import seed_everything

    from anomalib_dskd.models.packd.lightning_model import draw_episode_supports

    paths = [f"good/{i:03d}.png" for i in range(5)] + ["good/000.png"]  # candidate 5 is query 0's image again
    seed_everything(0)
    draws = [draw_episode_supports(5, 3, paths, 6) for _ in range(30)]
    for index in draws:
        assert index.shape == (5, 3)
        for query, supports in enumerate(index.tolist()):
            assert len(set(supports)) == 3
            assert query not in supports
            assert paths[query] not in {paths[j] for j in supports}  # not even a copy of the query
    assert len({tuple(map(tuple, index.tolist())) for index in draws}) > 1  # random across steps
    seed_everything(0)
    assert all(torch.equal(index, draw_episode_supports(5, 3, paths, 6)) for index in draws)  # reproducible


def test_plain_batches_train_and_too_small_batches_fail_clearly() -> None:
    from anomalib.data import ImageBatch

    from anomalib_dskd.models.packd import SupportError

    def batch(n: int, first: int = 0) -> ImageBatch:
        return ImageBatch(image=torch.rand(n, 3, SIZE, SIZE), image_path=[f"good/{first + i}.png" for i in range(n)])

    model = make_model(k_shot=2, num_prototypes=4, attention_dim=16)
    with pytest.raises(SupportError, match="raise train_batch_size to at least 3"):
        model.training_step(batch(2))  # a query would have only 1 other image, k_shot = 2
    model = make_model(k_shot=2, num_prototypes=4, attention_dim=16)
    seen: list[torch.Tensor] = []
    episodes = model.model.episodes
    model.model.episodes = lambda images, index: seen.append(images) or episodes(images, index)
    assert torch.isfinite(model.training_step(batch(3))["loss"])
    assert seen[-1].shape[0] == 3  # one teacher pass over the batch: queries and supports
    assert torch.isfinite(model.training_step(batch(2, first=3))["loss"])  # the short last batch of an epoch ...
    assert seen[-1].shape[0] == 5  # ... also draws from the previous batch
    with pytest.raises(ValueError, match="k_shot"):
        make_model(k_shot=0)


def test_test_time_support_draw_is_seeded(few_shot_root: Path) -> None:
    from anomalib.data import MVTecAD

    data = MVTecAD(root=few_shot_root, category="aa", train_batch_size=4, eval_batch_size=8, num_workers=0)
    data.setup()
    draw = make_model(k_shot=2).draw_support_paths(data.train_data)
    assert draw == make_model(k_shot=2).draw_support_paths(data.train_data)  # same seed, same supports
    assert draw != make_model(k_shot=2, support_seed=1).draw_support_paths(data.train_data)
    assert len(set(draw)) == 2
    assert all(Path(path).parent == few_shot_root / "aa" / "train" / "good" for path in draw)
    from anomalib_dskd.models.packd import SupportError

    with pytest.raises(SupportError, match="fewer than Packd's k_shot=7"):
        make_model(k_shot=7).draw_support_paths(data.train_data)


@pytest.mark.slow  # an Engine training
def test_fit_and_test_on_a_plain_datamodule(
    few_shot_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """anomalib's own MVTecAD datamodule: episodes from the batches, supports drawn from the training set."""
    import logging

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_dskd.models.packd import SupportError, lightning_model

    recorded: list[tuple[int, list[str], torch.Tensor]] = []
    draw = lightning_model.draw_episode_supports

    def spy(queries: int, k_shot: int, paths: list[str] | None, candidates: int) -> torch.Tensor:
        index = draw(queries, k_shot, paths, candidates)
        recorded.append((queries, list(paths or []), index))
        return index

    monkeypatch.setattr(lightning_model, "draw_episode_supports", spy)
    seed_everything(0)
    model = make_model(k_shot=2, num_prototypes=4, attention_dim=16)
    before = [p.detach().clone() for p in model.model.decoder.parameters()]
    data = MVTecAD(root=few_shot_root, category="aa", train_batch_size=4, eval_batch_size=8, num_workers=0)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with caplog.at_level(logging.INFO, logger=lightning_model.__name__):
        engine.fit(model, datamodule=data)
    assert not model._grouped_batches
    assert any(not torch.equal(a, b) for a, b in zip(before, model.model.decoder.parameters(), strict=True))
    good = few_shot_root / "aa" / "train" / "good"
    assert [queries for queries, _, _ in recorded] == [4, 2]  # 6 training images at batch 4
    assert len(recorded[1][1]) == 6  # the short batch drew from its 2 images and the 4 of the previous batch
    for queries, paths, index in recorded:
        assert all(Path(path).parent == good for path in paths)  # the category's training images
        for query, supports in enumerate(index.tolist()[:queries]):
            assert paths[query] not in {paths[j] for j in supports}  # never the query itself
    # validation / test: k supports drawn from the training set with support_seed, logged, kept in the checkpoint
    drawn = model.draw_support_paths(data.train_data)
    assert model.support_paths == drawn and model.model.has_support
    assert "support_seed=0" in caplog.text and drawn[0] in caplog.text
    checkpoint = torch.load(engine.best_model_path, map_location="cpu", weights_only=False)
    assert bool(checkpoint["state_dict"]["model.support_ready"])
    assert checkpoint["packd_few_shot"]["support_paths"] == drawn
    assert 0.0 <= engine.test(model, datamodule=data)[0]["image_AUROC"] <= 1.0
    assert model.support_paths == drawn
    # an explicit support set wins over the datamodule's draw
    model.set_support(few_shot_root / "dd" / "train" / "good")
    engine.test(model, datamodule=data)
    assert model.support_paths == [str(path) for path in sorted((few_shot_root / "dd" / "train" / "good").iterdir())]
    # a train_batch_size below k_shot + 1 is refused before training
    small = MVTecAD(root=few_shot_root, category="aa", train_batch_size=2, eval_batch_size=8, num_workers=0)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path / "small", logger=False, enable_progress_bar=False)
    with pytest.raises(SupportError, match="train_batch_size must be at least 3, got 2"):
        engine.fit(make_model(k_shot=2), datamodule=small)


@pytest.mark.slow
def test_export_parity(trained: dict, tmp_path: Path, few_shot_root: Path) -> None:
    from tests.export_utils import assert_export_parity

    model = trained["model"]
    model.set_support(few_shot_root / "dd" / "train" / "good")
    for integrator in model.model.peim.integrators:  # make sure the prototypes matter in the exported graph
        torch.nn.init.normal_(integrator.out.weight, std=0.05)
    assert_export_parity(model, tmp_path, (SIZE, SIZE))


# ---------------------------------------------------------------------------------------------- CLI
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "anomalib"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_cli_train_and_test(few_shot_root: Path, tmp_path: Path) -> None:
    """``anomalib train`` / ``anomalib test`` with the few-shot datamodule, as real subprocesses."""
    model = [
        "--model",
        "Packd",
        "--model.backbone",
        BACKBONE,
        "--model.pre_trained",
        "false",
        "--model.num_prototypes",
        "4",
        "--model.attention_dim",
        "16",
        "--model.visualizer",
        "false",
        "--model.pre_processor",
        "anomalib.pre_processing.PreProcessor",
        "--model.pre_processor.transform",
        "torchvision.transforms.v2.Resize",
        "--model.pre_processor.transform.size",
        f"[{SIZE},{SIZE}]",
    ]
    sources = (
        "["
        + ", ".join(f'{{"format": "mvtec_ad", "root": "{few_shot_root}", "category": "{c}"}}' for c in CATEGORIES)
        + "]"
    )
    data = [
        "--data",
        "anomalib_dskd.data.few_shot.FewShotDataModule",
        "--data.train_sources",
        sources,
        "--data.target",
        f"mvtec_ad:{few_shot_root}:dd",
        "--data.k_shot",
        "2",
        "--data.image_size",
        f"[{SIZE},{SIZE}]",
        "--data.train_batch_size",
        "3",
    ]
    train = run_cli(
        "train", *model, *data, "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path), cwd=tmp_path
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "image_AUROC" in train.stdout
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    tested = run_cli(
        "test",
        *model,
        *data,
        "--data.support_draw",
        "1",
        "--ckpt_path",
        str(checkpoints[-1]),
        "--default_root_dir",
        str(tmp_path / "test"),
        cwd=tmp_path,
    )
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "image_AUROC" in tested.stdout
    predicted = run_cli(
        "predict",
        *model,
        "--model.support",
        str(few_shot_root / "dd" / "train" / "good"),
        "--ckpt_path",
        str(checkpoints[-1]),
        "--data",
        str(few_shot_root / "dd" / "test" / "good"),
        "--default_root_dir",
        str(tmp_path / "predict"),
        cwd=tmp_path,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]


def test_registered_with_anomalib() -> None:
    import anomalib.models as anomalib_models

    import anomalib_dskd
    from anomalib_dskd.registration import MODELS

    assert MODELS["Packd"] == "anomalib_dskd.models.packd.lightning_model"
    assert anomalib_dskd.Packd is anomalib_models.Packd
    assert "packd" in {name.lower() for name in anomalib_models.list_models()}
