"""The models, data and training lengths of the detection tests (shared with ``benchmarks/detection_floors.py``)."""

from __future__ import annotations

from typing import Any

#: the generated category (MVTec LOCO layout) every detection test trains and tests on
CATEGORY_ARGS: dict[str, Any] = {
    "seed": 0, "image_size": (128, 128), "n_train": 24, "n_validation": 4, "n_test_good": 12,
    "n_logical": 12, "n_structural": 12,
}
#: the harder preset (only counts and the row rule are wrong) and Dskd's training length on it
ARRANGEMENT_ARGS: dict[str, Any] = {**CATEGORY_ARGS, "preset": "arrangement", "n_train": 48}
ARRANGEMENT_EPOCHS = 30
SIZE = (128, 128)
#: training epochs per model (24 images, batch 8: 3 optimiser steps per epoch)
EPOCHS = {"rd": 10, "ard": 10, "dskd": 10, "patchcore": 1}
#: per-student maps scored as image scores too
EXTRA_MAPS = {"dskd": ("anomaly_map_local", "anomaly_map_global")}


def build(name: str, weights: str | bool) -> Any:  # noqa: ANN401
    """A fresh model ``name`` with the teacher ``weights``, raw post-processing, no evaluator or visualizer."""
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_dskd.models.ard import Ard
    from anomalib_dskd.models.dskd import Dskd
    from anomalib_dskd.models.rd import Rd

    transform = Compose([Resize(SIZE, antialias=True), Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    common = {
        "backbone": "mobilenetv2_100",
        "pre_trained": weights,
        "pre_processor": PreProcessor(transform=transform),
        "post_processor": PostProcessor(enable_normalization=False),
        "evaluator": False,
        "visualizer": False,
    }
    if name == "rd":
        return Rd(**common)
    if name == "ard":
        return Ard(**common)
    if name == "dskd":
        return Dskd(gccb_channels=64, **common)
    if name == "patchcore":  # anomalib's built-in, given the same teacher (as ../shared/BASELINES.md does)
        from anomalib.models import Patchcore

        from anomalib_dskd.benchmark.models import FEATURE_LAYERS
        from anomalib_dskd.weights import create_timm_model

        common.pop("backbone")
        teacher = create_timm_model("mobilenetv2_100", pre_trained=common.pop("pre_trained")).eval()
        layers = FEATURE_LAYERS["mobilenetv2_100"]["Patchcore"]
        return Patchcore(backbone=teacher, layers=layers, pre_trained=False, coreset_sampling_ratio=0.1, **common)
    msg = f"no detection model {name!r}"
    raise ValueError(msg)


#: Packd: four generated MVTec AD categories (train on three, test on the fourth with k supports)
PACKD_CATEGORIES = ("aa", "bb", "cc", "dd")
PACKD_CATEGORY_ARGS: dict[str, Any] = {"image_size": (128, 128), "n_train": 12, "n_test_good": 12, "n_per_defect": 4}
PACKD_EPOCHS = 3


def packd_setup(root: Any, weights: str | bool) -> tuple[Any, Any]:  # noqa: ANN401
    """Write the Packd categories under ``root``; return ``(build_model, datamodule)`` (target ``dd``, k = 4)."""
    from anomalib.post_processing import PostProcessor

    from anomalib_dskd.data import generate_mvtec_ad_category
    from anomalib_dskd.data.few_shot import FewShotDataModule
    from anomalib_dskd.models.packd import Packd

    for seed, category in enumerate(PACKD_CATEGORIES):
        generate_mvtec_ad_category(root, category, seed=seed, **PACKD_CATEGORY_ARGS)
    datamodule = FewShotDataModule(
        train_sources=[{"format": "mvtec_ad", "root": str(root), "category": list(PACKD_CATEGORIES)}],
        target={"format": "mvtec_ad", "root": str(root), "category": "dd"},
        image_size=SIZE, k_shot=4, num_support_draws=1, train_batch_size=4, eval_batch_size=8, num_workers=0,
    )

    def build_model() -> Any:  # noqa: ANN401
        return Packd(
            backbone="mobilenetv2_100", pre_trained=weights, pre_processor=Packd.configure_pre_processor(SIZE),
            post_processor=PostProcessor(enable_normalization=False), evaluator=False, visualizer=False,
        )

    return build_model, datamodule


#: Glance: a generated MVTec AD category at 256x256 (Glance's Global-Net needs 243..274 px), the small config
GLANCE_CATEGORY_ARGS: dict[str, Any] = {"image_size": (256, 256), "n_train": 32, "n_test_good": 10, "n_per_defect": 5}
GLANCE_STEPS = 400


def build_glance(weights: str | bool) -> Any:  # noqa: ANN401
    """Glance with ``configs/model/glance.yaml``'s init args, stage 1 = 60 % of the budget, raw post-processing."""
    from pathlib import Path

    import yaml
    from anomalib.post_processing import PostProcessor

    from anomalib_dskd.models.glance import Glance

    config = Path(__file__).resolve().parents[1] / "configs" / "model" / "glance.yaml"
    kwargs = dict(yaml.safe_load(config.read_text())["model"]["init_args"])
    kwargs.update(pre_trained=weights, local_fraction=0.6, post_processor=PostProcessor(enable_normalization=False),
                  evaluator=False, visualizer=False)
    return Glance(**kwargs)
