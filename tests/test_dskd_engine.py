"""Dskd end to end on generated MVTec-LOCO-layout data: Engine, checkpoint, export, CLI and DDP.

All tests here are ``slow`` (they train for one epoch): ``pytest -m slow tests/test_dskd_engine.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecLOCO
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_dskd.models.dskd import Dskd

pytestmark = pytest.mark.slow

SIZE = 64
N_VALIDATION = 5  # odd: a padding DistributedSampler would duplicate an image across two processes
N_TEST_GOOD = 3
CATEGORY = "parts"


def pre_processor() -> PreProcessor:
    return PreProcessor(
        transform=Compose([Resize((SIZE, SIZE)), Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    )


def small_dskd(**kwargs: object) -> Dskd:
    return Dskd(backbone="mobilenetv2_100", pre_trained=False, gccb_channels=16, pre_processor=pre_processor(), **kwargs)


def datamodule(root: Path, **kwargs: object) -> MVTecLOCO:
    return MVTecLOCO(root=root, category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0, **kwargs)


@pytest.fixture(autouse=True)
def _one_thread():  # noqa: ANN202
    """One intra-op thread: much faster than two spinning threads on a shared 2-core machine."""
    # imported here: the DDP test's worker script imports this module with only tests/ on its path
    from tests.conftest import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def loco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from anomalib_dskd.data import generate_loco_category

    root = tmp_path_factory.mktemp("loco")
    generate_loco_category(
        root,
        category=CATEGORY,
        seed=0,
        image_size=(SIZE, SIZE),
        n_train=8,
        n_validation=N_VALIDATION,
        n_test_good=N_TEST_GOOD,
        n_logical=3,
        n_structural=2,
    )
    return root


@pytest.fixture(scope="module")
def trained(loco_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One epoch of Engine.fit (train + validate) shared by the tests below."""
    from lightning.pytorch import seed_everything

    seed_everything(0)
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("engine")
    data = datamodule(loco_root)
    model = small_dskd()
    engine = Engine(max_epochs=1, default_root_dir=out, accelerator="cpu", devices=1, logger=False)
    engine.fit(model, datamodule=data)
    return {"engine": engine, "model": model, "data": data, "out": out, "ckpt": Path(engine.best_model_path)}


def reference_statistics(model: Dskd, loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Recompute the statistics in this process from the normal images of ``loader`` (model unchanged)."""
    saved = (model.model.map_mean.clone(), model.model.map_std.clone(), model.model.statistics_images.clone())
    mean, std = model.compute_statistics(loader)
    images = float(model.model.statistics_images)
    model.model.set_statistics(*saved)
    return mean, std, images


def test_fit_computes_statistics_from_normal_validation_images(trained: dict, loco_root: Path) -> None:
    model, data = trained["model"], trained["data"]
    assert model.model.is_calibrated
    assert model.model.statistics_images.item() == N_VALIDATION
    mean, std, _ = reference_statistics(model, data.val_dataloader())
    assert torch.allclose(model.model.map_mean, mean, rtol=1e-6)
    assert torch.allclose(model.model.map_std, std, rtol=1e-6)
    # A validation set that contains anomalies (val = test set): only its normal images count.
    mixed = datamodule(loco_root, val_split_mode="same_as_test")
    trained["engine"].validate(model, datamodule=mixed)
    assert model.model.statistics_images.item() == N_TEST_GOOD
    mean_mixed, std_mixed, _ = reference_statistics(model, mixed.val_dataloader())
    assert torch.allclose(model.model.map_mean, mean_mixed, rtol=1e-6)
    assert not torch.allclose(mean_mixed, mean, rtol=1e-3)  # other images, other statistics
    trained["engine"].validate(model, datamodule=data)  # back to the training run's statistics
    assert torch.allclose(model.model.map_mean, mean, rtol=1e-6)


def test_training_data_when_there_is_no_validation_set(tmp_path: Path) -> None:
    from anomalib.data import MVTecAD

    from anomalib_dskd.data import generate_mvtec_ad_category

    generate_mvtec_ad_category(tmp_path / "ad", category=CATEGORY, seed=0, image_size=(SIZE, SIZE), n_train=6, n_test_good=2)
    data = MVTecAD(
        root=tmp_path / "ad", category=CATEGORY, train_batch_size=4, eval_batch_size=4, num_workers=0, val_split_mode="none"
    )
    model = small_dskd()
    engine = Engine(
        max_epochs=1, default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, limit_val_batches=0
    )
    engine.fit(model, datamodule=data)
    assert model.model.statistics_images.item() == 6  # the training images
    mean, _, _ = reference_statistics(model, data.train_dataloader())
    assert torch.allclose(model.model.map_mean, mean, rtol=1e-6)
    checkpoint = torch.load(engine.best_model_path, map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"]["model.statistics_images"].item() == 6  # calibrated before the last save


def test_test_and_predict_with_student_maps(trained: dict) -> None:
    engine, model, data = trained["engine"], trained["model"], trained["data"]
    metrics = engine.test(model, datamodule=data)[0]
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    predictions = engine.predict(model, dataloaders=data.test_dataloader())
    batch = predictions[0]
    assert batch.anomaly_map.shape[-2:] == (SIZE, SIZE)
    assert batch.anomaly_map_local.shape == batch.anomaly_map_global.shape == (len(batch.image), 1, SIZE, SIZE)
    assert batch.pred_label is not None and batch.pred_score.shape == (len(batch.image),)
    # the per-student maps add up to the final (pre-normalisation) map
    model.eval()
    with torch.no_grad():
        raw = model.model(batch.image)  # batch.image was pre-processed in place by the PreProcessor callback
    assert torch.allclose(batch.anomaly_map_local + batch.anomaly_map_global, raw.anomaly_map, atol=1e-4)
    pictures = sorted((trained["out"]).rglob("images/**/*.png"))
    assert pictures
    from PIL import Image

    width, height = Image.open(pictures[0]).size
    assert width == 5 * height  # image | local | global | final | prediction


def test_checkpoint_keeps_statistics(trained: dict) -> None:
    model = trained["model"]
    ckpt = trained["ckpt"]
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["model.map_mean"], model.model.map_mean)
    loaded = Dskd.load_from_checkpoint(ckpt, map_location="cpu")
    assert torch.equal(loaded.model.map_mean, model.model.map_mean)
    assert torch.equal(loaded.model.map_std, model.model.map_std)
    assert loaded.model.statistics_images.item() == N_VALIDATION
    assert not torch.equal(loaded.model.map_std, torch.ones_like(loaded.model.map_std))
    images = torch.rand(2, 3, SIZE, SIZE)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(images).anomaly_map, model(images).anomaly_map, atol=1e-6)


def test_onnx_and_openvino_export_match_torch(trained: dict, tmp_path: Path) -> None:
    """The whole pipeline (pre-processing, both students, Eq. 8 with the statistics, post-processing).

    One dynamo export: ``Engine.export(ONNX)``, then the ONNX file converted to OpenVINO IR exactly
    as ``to_openvino`` does (``ov.convert_model`` + ``ov.save_model``; the CLI test runs
    ``anomalib export --export_type openvino`` itself). OpenVINO runs with the f32 precision hint.
    """
    import onnxruntime
    import openvino as ov

    engine, model = trained["engine"], trained["model"]
    model.eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(images)
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path, input_size=(SIZE, SIZE))
    ov_path = tmp_path / "model.xml"
    ov.save_model(ov.convert_model(onnx_path), ov_path, compress_to_fp16=False)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True))
    compiled = ov.Core().compile_model(str(ov_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_result = compiled(images.numpy())
    ov_out = {out.get_any_name(): ov_result[out] for out in compiled.outputs}
    reference = expected.anomaly_map.numpy()
    span = float(reference.max() - reference.min())
    assert span > 1e-2  # a non-trivial map
    for name, outputs in (("onnx", onnx_out), ("openvino", ov_out)):
        anomaly_map = outputs["anomaly_map"].reshape(reference.shape)
        assert np.abs(anomaly_map - reference).max() <= 1e-3 * span, name
        assert np.abs(outputs["pred_score"].reshape(-1) - expected.pred_score.numpy()).max() <= 1e-3 * span, name
        decided = np.abs(expected.pred_score.numpy() - 0.5) > 1e-3  # labels away from the threshold
        assert np.array_equal(outputs["pred_label"].reshape(-1)[decided], expected.pred_label.numpy()[decided]), name


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "anomalib"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_cli_train_predict_export(loco_root: Path, tmp_path: Path) -> None:
    """``anomalib train`` / ``predict`` / ``export`` as real subprocesses (64x64 via the pre-processor flags)."""
    common = [
        "--model", "Dskd",
        "--model.backbone", "mobilenetv2_100",
        "--model.pre_trained", "false",
        "--model.gccb_channels", "16",
        "--model.pre_processor", "anomalib.pre_processing.PreProcessor",
        "--model.pre_processor.transform", "torchvision.transforms.v2.Resize",
        "--model.pre_processor.transform.size", f"[{SIZE},{SIZE}]",
    ]
    data = [
        "--data", "anomalib.data.MVTecLOCO",
        "--data.root", str(loco_root),
        "--data.category", CATEGORY,
        "--data.train_batch_size", "4",
        "--data.eval_batch_size", "4",
        "--data.num_workers", "0",
    ]
    train = run_cli("train", *common, *data, "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path), cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints, train.stdout[-2000:]
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.statistics_images"].item() == N_VALIDATION  # calibrated on the validation images
    assert "image_AUROC" in train.stdout  # `anomalib train` also tested the model
    predict = run_cli(
        "predict", *common, "--ckpt_path", str(checkpoints[-1]),
        "--data", str(loco_root / CATEGORY / "test" / "logical_anomalies"),
        "--default_root_dir", str(tmp_path / "predict"), cwd=tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert list((tmp_path / "predict").rglob("*.png"))
    # torch export here (ONNX / OpenVINO exports are checked in process above: each dynamo export costs ~30 s)
    export = run_cli(
        "export", *common, "--ckpt_path", str(checkpoints[-1]), "--export_type", "torch",
        "--export_root", str(tmp_path / "export"), cwd=tmp_path,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    exported = list((tmp_path / "export").rglob("model.pt"))
    assert exported
    loaded = torch.load(exported[0], map_location="cpu", weights_only=False)["model"]
    assert torch.equal(loaded.model.map_mean, state["model.map_mean"])


DDP_SCRIPT = """
import json, os, sys
import torch
from lightning.pytorch import seed_everything
from anomalib.data import MVTecLOCO
from anomalib.engine import Engine
sys.path.insert(0, {tests!r})
from test_dskd_engine import small_dskd

torch.set_num_threads(1)
seed_everything(0)
model = small_dskd()
data = MVTecLOCO(root={root!r}, category={category!r}, train_batch_size=4, eval_batch_size=2, num_workers=0)
engine = Engine(max_epochs=1, default_root_dir={out!r}, accelerator="cpu", devices=2, strategy="ddp", logger=False)
engine.fit(model, datamodule=data)
rank = engine.trainer.global_rank
result = {{
    "rank": rank,
    "world": engine.trainer.world_size,
    "mean": model.model.map_mean.tolist(),
    "std": model.model.map_std.tolist(),
    "images": float(model.model.statistics_images),
    "ckpt": engine.best_model_path,
}}
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as handle:
    json.dump(result, handle)
"""


def test_ddp_statistics_equal_single_process(loco_root: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(
        DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(loco_root), category=CATEGORY, out=str(tmp_path))
    )
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1", "PL_GLOBAL_SEED": "0"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["mean"] == ranks[1]["mean"] and ranks[0]["std"] == ranks[1]["std"]
    assert ranks[0]["images"] == N_VALIDATION  # every validation image once: no padding duplicate, none lost
    # One process, same weights (the DDP checkpoint), same data
    model = Dskd.load_from_checkpoint(ranks[0]["ckpt"], map_location="cpu")
    state = torch.load(ranks[0]["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.map_mean"].tolist() == ranks[0]["mean"]
    data = datamodule(loco_root)
    data.setup()
    mean, std, images = reference_statistics(model, data.val_dataloader())
    assert images == N_VALIDATION
    assert np.allclose(ranks[0]["mean"], mean.numpy(), rtol=1e-6, atol=0)
    assert np.allclose(ranks[0]["std"], std.numpy(), rtol=1e-6, atol=0)
