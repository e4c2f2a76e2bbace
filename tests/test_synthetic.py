"""Tests of the synthetic MVTec LOCO / MVTec AD generator and the ``generate`` CLI subcommand."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalib_dskd.data import (
    DEFECT_TYPES,
    LOGICAL_DEFECTS,
    STRUCTURAL_DEFECTS,
    generate_loco_category,
    generate_mvtec_ad_category,
    loco_defects_config,
)

CATEGORY = "synthetic_parts"
LOCO_COUNTS = {"n_train": 6, "n_validation": 2, "n_test_good": 4, "n_logical": 8, "n_structural": 8}
AD_COUNTS = {"n_train": 5, "n_test_good": 4, "n_per_defect": 3}


def _names(folder: Path, pattern: str = "*.png") -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def loco_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_loco_category(tmp_path_factory.mktemp("loco"), CATEGORY, seed=3, **LOCO_COUNTS)


@pytest.fixture(scope="module")
def ad_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_mvtec_ad_category(tmp_path_factory.mktemp("ad"), CATEGORY, seed=3, **AD_COUNTS)


# ------------------------------------------------------------------------------------------------
# MVTec LOCO layout
# ------------------------------------------------------------------------------------------------
def test_loco_layout_and_file_names(loco_category: Path) -> None:
    root = loco_category
    assert root.name == CATEGORY
    top = sorted(p.name for p in root.iterdir())
    assert top == ["defects_config.json", "ground_truth", "test", "train", "validation"]
    expected = lambda n: [f"{i:03d}.png" for i in range(n)]  # noqa: E731
    assert _names(root / "train" / "good") == expected(LOCO_COUNTS["n_train"])
    assert _names(root / "validation" / "good") == expected(LOCO_COUNTS["n_validation"])
    assert sorted(p.name for p in (root / "test").iterdir()) == ["good", "logical_anomalies", "structural_anomalies"]
    assert _names(root / "test" / "good") == expected(LOCO_COUNTS["n_test_good"])
    assert _names(root / "test" / "logical_anomalies") == expected(LOCO_COUNTS["n_logical"])
    assert _names(root / "test" / "structural_anomalies") == expected(LOCO_COUNTS["n_structural"])
    # ground truth: one folder per anomalous image, channels 000.png, 001.png, ...; none for good images
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == ["logical_anomalies", "structural_anomalies"]
    for family in ("logical_anomalies", "structural_anomalies"):
        images = [p.stem for p in sorted((root / "test" / family).glob("*.png"))]
        folders = sorted(p.name for p in (root / "ground_truth" / family).iterdir())
        assert folders == images
        for folder in folders:
            channels = _names(root / "ground_truth" / family / folder)
            assert channels == [f"{k:03d}.png" for k in range(len(channels))]
            assert 1 <= len(channels) <= 2


def test_loco_images_are_rgb_of_requested_size(loco_category: Path) -> None:
    for path in sorted(loco_category.glob("*/*/*.png")):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8
        assert image.shape == (256, 256, 3), path


def test_defects_config_format(loco_category: Path) -> None:
    config = json.loads((loco_category / "defects_config.json").read_text())
    assert config == loco_defects_config((256, 256))
    assert [e["defect_name"] for e in config] == [d.name for d in DEFECT_TYPES]
    assert set(LOGICAL_DEFECTS) | set(STRUCTURAL_DEFECTS) == {e["defect_name"] for e in config}
    for entry in config:
        assert set(entry) == {"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"}
        assert 1 <= entry["pixel_value"] <= 255
        if entry["relative_saturation"]:
            assert 0.0 < entry["saturation_threshold"] <= 1.0
        else:
            assert isinstance(entry["saturation_threshold"], int)
            assert entry["saturation_threshold"] > 1
    assert len({e["pixel_value"] for e in config}) == len(config)
    # both kinds of saturation, as in the official configs
    assert any(e["relative_saturation"] for e in config)
    assert any(not e["relative_saturation"] for e in config)
    assert any(e["relative_saturation"] and e["saturation_threshold"] < 1.0 for e in config)


def test_loco_masks_match_config(loco_category: Path) -> None:
    config = json.loads((loco_category / "defects_config.json").read_text())
    family_of = {d.pixel_value: d.family for d in DEFECT_TYPES}
    seen_values: set[int] = set()
    for family in ("logical", "structural"):
        for folder in sorted((loco_category / "ground_truth" / f"{family}_anomalies").iterdir()):
            values_in_image = []
            for channel in sorted(folder.glob("*.png")):
                mask = cv2.imread(str(channel), cv2.IMREAD_UNCHANGED)
                assert mask.dtype == np.uint8
                assert mask.shape == (256, 256), "one single-channel mask of the image size per defect"
                values = set(np.unique(mask).tolist())
                assert 0 in values
                nonzero = values - {0}
                assert len(nonzero) == 1, f"{channel}: expected one defect value, got {sorted(nonzero)}"
                (value,) = nonzero
                assert family_of[value] == family, f"{channel}: a {family_of[value]} defect among {family} ones"
                assert (mask > 0).sum() >= 20, f"{channel}: defect region too small"
                values_in_image.append(value)
            assert len(set(values_in_image)) == len(values_in_image), "channels of one image are distinct defects"
            seen_values.update(values_in_image)
    # every defect type of the config occurs at least once with the default rotation of types
    assert seen_values == {e["pixel_value"] for e in config}


def test_loco_has_multi_channel_ground_truth(loco_category: Path) -> None:
    for family in ("logical_anomalies", "structural_anomalies"):
        second = sorted((loco_category / "ground_truth" / family).glob("*/001.png"))
        assert second, f"no {family} image with two defect channels"


def test_loco_anomalies_change_the_image(loco_category: Path) -> None:
    """Inside the defect region, anomalous images differ clearly from the mean normal image."""
    normals = np.stack(
        [cv2.imread(str(p)).astype(np.float32) for p in sorted((loco_category / "train" / "good").glob("*.png"))],
    )
    mean, spread = normals.mean(axis=0), normals.std(axis=0).mean()
    for family in ("logical_anomalies", "structural_anomalies"):
        for image_path in sorted((loco_category / "test" / family).glob("*.png")):
            image = cv2.imread(str(image_path)).astype(np.float32)
            gt_folder = loco_category / "ground_truth" / family / image_path.stem
            masks = [cv2.imread(str(p), 0) > 0 for p in gt_folder.glob("*.png")]
            region = np.any(masks, axis=0)
            diff_inside = np.abs(image - mean).max(axis=2)[region].mean()
            assert diff_inside > 4 * spread + 20, f"{image_path}: anomaly hardly visible ({diff_inside:.1f})"
    goods = [cv2.imread(str(p)).astype(np.float32) for p in sorted((loco_category / "test" / "good").glob("*.png"))]
    assert max(np.abs(g - mean).mean() for g in goods) < 10.0


def test_loco_non_square_size(tmp_path: Path) -> None:
    out = generate_loco_category(
        tmp_path, "wide", image_size=(200, 400), n_train=1, n_validation=1, n_test_good=1, n_logical=3, n_structural=4
    )
    assert cv2.imread(str(out / "train" / "good" / "000.png")).shape == (200, 400, 3)
    assert cv2.imread(str(out / "test" / "structural_anomalies" / "003.png")).shape == (200, 400, 3)
    for mask_path in out.glob("ground_truth/*/*/*.png"):
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (200, 400)
        assert mask.any()


def test_loco_deterministic(tmp_path: Path) -> None:
    kwargs = {"image_size": (96, 128), "n_train": 2, "n_validation": 1, "n_test_good": 2}
    kwargs |= {"n_logical": 3, "n_structural": 4}
    a = _tree_hashes(generate_loco_category(tmp_path / "a", seed=7, **kwargs))
    b = _tree_hashes(generate_loco_category(tmp_path / "b", seed=7, **kwargs))
    c = _tree_hashes(generate_loco_category(tmp_path / "c", seed=8, **kwargs))
    assert a == b
    assert a.keys() == c.keys()
    assert a != c
    # overwriting in place gives the same bytes again
    again = _tree_hashes(generate_loco_category(tmp_path / "a", seed=7, overwrite=True, **kwargs))
    assert again == a


def test_counts_do_not_change_other_images(tmp_path: Path) -> None:
    small = {"image_size": (96, 128), "n_validation": 1, "n_test_good": 1, "n_logical": 2, "n_structural": 1}
    a = generate_loco_category(tmp_path / "a", seed=1, n_train=1, **small)
    b = generate_loco_category(tmp_path / "b", seed=1, n_train=3, **small)
    assert (a / "test/logical_anomalies/001.png").read_bytes() == (b / "test/logical_anomalies/001.png").read_bytes()
    assert (a / "train/good/000.png").read_bytes() == (b / "train/good/000.png").read_bytes()


# ------------------------------------------------------------------------------------------------
# MVTec AD layout
# ------------------------------------------------------------------------------------------------
def test_mvtec_ad_layout_and_masks(ad_category: Path) -> None:
    root = ad_category
    assert sorted(p.name for p in root.iterdir()) == ["ground_truth", "test", "train"]
    assert _names(root / "train" / "good") == [f"{i:03d}.png" for i in range(AD_COUNTS["n_train"])]
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *STRUCTURAL_DEFECTS])
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(STRUCTURAL_DEFECTS)
    for defect in STRUCTURAL_DEFECTS:
        n = AD_COUNTS["n_per_defect"]
        assert _names(root / "test" / defect) == [f"{i:03d}.png" for i in range(n)]
        assert _names(root / "ground_truth" / defect) == [f"{i:03d}_mask.png" for i in range(n)]
        for mask_path in (root / "ground_truth" / defect).glob("*.png"):
            mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (256, 256)
            assert set(np.unique(mask).tolist()) == {0, 255}


def test_mvtec_ad_logical_types_and_validation(tmp_path: Path) -> None:
    out = generate_mvtec_ad_category(
        tmp_path, image_size=(128, 160), n_train=1, n_test_good=1, n_per_defect=2, n_validation=2,
        defect_types=["missing_object", "scratch"],
    )
    assert _names(out / "validation" / "good") == ["000.png", "001.png"]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["good", "missing_object", "scratch"]
    assert (cv2.imread(str(out / "ground_truth" / "missing_object" / "001_mask.png"), 0) == 255).sum() > 100


def test_mvtec_ad_deterministic(tmp_path: Path) -> None:
    kwargs = {"image_size": (80, 80), "n_train": 2, "n_test_good": 1, "n_per_defect": 2}
    a = _tree_hashes(generate_mvtec_ad_category(tmp_path / "a", seed=5, **kwargs))
    b = _tree_hashes(generate_mvtec_ad_category(tmp_path / "b", seed=5, **kwargs))
    assert a == b


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_train": 0}, ValueError, "n_train must be positive"),
        ({"n_validation": 0}, ValueError, "n_validation must be positive"),
        ({"n_logical": -1}, ValueError, "n_logical must be >= 0"),
        ({"n_logical": 0, "n_structural": 0}, ValueError, "at least 1"),
        ({"n_train": 2.5}, TypeError, "n_train must be an integer"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"image_size": (32, 256)}, ValueError, r"image_size .* out of range"),
        ({"image_size": (256, 100000)}, ValueError, "out of range"),
        ({"image_size": (256,)}, TypeError, r"pair of integers \(height, width\)"),
        ({"category": "a/b"}, ValueError, "plain folder name"),
        ({"category": ".."}, ValueError, "plain folder name"),
    ],
)
def test_loco_invalid_inputs(tmp_path: Path, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        generate_loco_category(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written when the inputs are invalid"


def test_mvtec_ad_invalid_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        generate_mvtec_ad_category(tmp_path, defect_types=["scratch", "crack"])
    with pytest.raises(ValueError, match="n_per_defect must be positive"):
        generate_mvtec_ad_category(tmp_path, n_per_defect=0)
    with pytest.raises(ValueError, match="distinct"):
        generate_mvtec_ad_category(tmp_path, defect_types=[])


def test_existing_category_refused_unless_overwrite(tmp_path: Path) -> None:
    small = {"image_size": (64, 64), "n_train": 1, "n_validation": 1, "n_test_good": 1}
    small |= {"n_logical": 1, "n_structural": 0}
    out = tmp_path / CATEGORY
    out.mkdir()
    (out / "stale.png").write_bytes(b"not an image")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_loco_category(tmp_path, **small)
    assert (out / "stale.png").exists()
    generate_loco_category(tmp_path, overwrite=True, **small)
    assert not (out / "stale.png").exists()
    assert (out / "train" / "good" / "000.png").is_file()
    # an existing empty folder is fine without overwrite
    (tmp_path / "empty").mkdir()
    generate_mvtec_ad_category(tmp_path, "empty", image_size=(64, 64), n_train=1, n_test_good=1, n_per_defect=1)


# ------------------------------------------------------------------------------------------------
# anomalib datamodules read the generated data
# ------------------------------------------------------------------------------------------------
def _check_test_loader(loader, n_good: int, n_bad: int, size: tuple[int, int]) -> None:  # noqa: ANN001
    labels = []
    for batch in loader:
        assert batch.image.shape[1:] == (3, *size)
        assert batch.gt_mask.shape[1:] == size
        for label, mask in zip(batch.gt_label.tolist(), batch.gt_mask, strict=True):
            labels.append(label)
            if label == 1:
                assert mask.any(), "anomalous sample with an empty mask"
            else:
                assert label == 0
                assert not mask.any(), "good sample with a non-empty mask"
    assert labels.count(0) == n_good
    assert labels.count(1) == n_bad


def test_anomalib_mvtec_loco_reads_generated_category(loco_category: Path) -> None:
    from anomalib.data import MVTecLOCO

    datamodule = MVTecLOCO(
        root=loco_category.parent, category=CATEGORY, train_batch_size=4, eval_batch_size=8, num_workers=0
    )
    datamodule.setup()
    assert len(datamodule.train_data) == LOCO_COUNTS["n_train"]
    assert len(datamodule.val_data) == LOCO_COUNTS["n_validation"]
    n_test = LOCO_COUNTS["n_test_good"] + LOCO_COUNTS["n_logical"] + LOCO_COUNTS["n_structural"]
    assert len(datamodule.test_data) == n_test
    train_batch = next(iter(datamodule.train_dataloader()))
    assert train_batch.image.shape == (4, 3, 256, 256)
    assert (train_batch.gt_label == 0).all()
    # multi-channel ground truth is read as a list of mask paths and merged
    samples = datamodule.test_data.samples
    assert samples.mask_path.apply(lambda x: isinstance(x, list) and len(x) == 2).any()
    _check_test_loader(
        datamodule.test_dataloader(),
        n_good=LOCO_COUNTS["n_test_good"],
        n_bad=LOCO_COUNTS["n_logical"] + LOCO_COUNTS["n_structural"],
        size=(256, 256),
    )


def test_anomalib_mvtec_ad_reads_generated_category(ad_category: Path) -> None:
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(
        root=ad_category.parent, category=CATEGORY, train_batch_size=2, eval_batch_size=5, num_workers=0
    )
    datamodule.setup()
    assert len(datamodule.train_data) == AD_COUNTS["n_train"]
    n_bad = AD_COUNTS["n_per_defect"] * len(STRUCTURAL_DEFECTS)
    assert len(datamodule.test_data) == AD_COUNTS["n_test_good"] + n_bad
    _check_test_loader(datamodule.test_dataloader(), n_good=AD_COUNTS["n_test_good"], n_bad=n_bad, size=(256, 256))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_generate_loco(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_dskd.cli.main import main

    argv = [
        "generate", "--root", str(tmp_path), "--category", "cli_parts", "--layout", "loco", "--seed", "2",
        "--image-size", "96", "160", "--n-train", "2", "--n-validation", "1", "--n-test-good", "1",
        "--n-logical", "3", "--n-structural", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "cli_parts"
    assert "wrote 11 images" in capsys.readouterr().out
    assert cv2.imread(str(out / "test" / "logical_anomalies" / "002.png")).shape == (96, 160, 3)
    assert (out / "ground_truth" / "structural_anomalies" / "003" / "001.png").is_file()
    expected = generate_loco_category(
        tmp_path / "api", "cli_parts", seed=2, image_size=(96, 160),
        n_train=2, n_validation=1, n_test_good=1, n_logical=3, n_structural=4,
    )  # fmt: skip
    assert _tree_hashes(out) == _tree_hashes(expected)
    # second run refuses without --overwrite, succeeds with it
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_cli_generate_mvtec_ad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_dskd.cli.main import main

    argv = [
        "generate", "--root", str(tmp_path), "--layout", "mvtec_ad", "--image-size", "64", "96",
        "--n-train", "1", "--n-test-good", "1", "--n-per-defect", "2", "--defect-types", "dent", "extra_object",
    ]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / CATEGORY
    assert sorted(p.name for p in (out / "test").iterdir()) == ["dent", "extra_object", "good"]
    assert _names(out / "ground_truth" / "dent") == ["000_mask.png", "001_mask.png"]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layout", "mvtec_ad", "--n-logical", "3"], "--n-logical"),
        (["--layout", "loco", "--n-per-defect", "3"], "--n-per-defect"),
        (["--image-size", "16", "16"], "out of range"),
        (["--layout", "mvtec_ad", "--defect-types", "crack"], "unknown"),
        (["--n-train", "0"], "n_train must be positive"),
    ],
)
def test_cli_generate_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from anomalib_dskd.cli.main import main

    assert main(["generate", "--root", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_rejects_negative_counts(tmp_path: Path) -> None:
    from anomalib_dskd.cli.main import main

    with pytest.raises(SystemExit):
        main(["generate", "--root", str(tmp_path), "--n-train", "-1"])


# ---------------------------------------------------------------- the "arrangement" preset
def test_arrangement_preset_breaks_only_global_rules() -> None:
    """Normal: each row a permutation of the three kinds. Defects keep every neighbour pair normal."""
    from collections import Counter

    import numpy as np

    from anomalib_dskd.data.synthetic import _arrangement_rows

    rng = np.random.default_rng(0)
    for _ in range(50):
        rows, marked = _arrangement_rows(rng, None)
        assert marked == [] and all(sorted(row) == [0, 1, 2] for row in rows)
        for defect in ("row_duplicate", "row_exchange"):
            rows, marked = _arrangement_rows(rng, defect)
            assert all(a != b for row in rows for a, b in zip(row, row[1:])), rows  # neighbours differ, as in normal
            assert any(sorted(row) != [0, 1, 2] for row in rows)
            counts = Counter(kind for row in rows for kind in row)
            if defect == "row_exchange":
                assert sorted(counts.values()) == [2, 2, 2] and len(marked) == 4  # counts as in normal images
            else:
                assert sorted(counts.values()) == [1, 2, 3] and len(marked) == 2


def test_arrangement_preset_category(tmp_path) -> None:  # noqa: ANN001
    import json

    import pytest

    from anomalib_dskd.data import generate_loco_category

    path = generate_loco_category(tmp_path, "arr", preset="arrangement", image_size=(64, 96), n_train=2,
                                  n_validation=1, n_test_good=1, n_logical=2, n_structural=1)
    names = [entry["defect_name"] for entry in json.loads((path / "defects_config.json").read_text())]
    assert names == ["row_duplicate", "row_exchange", "scratch", "contamination", "dent"]
    assert len(list((path / "ground_truth" / "logical_anomalies").rglob("*.png"))) == 2
    with pytest.raises(ValueError, match="preset must be one of"):
        generate_loco_category(tmp_path, "bad", preset="rows")
