"""Deployment: every model, exported the way ``anomalib export --export_type openvino`` exports it, runs
under anomalib's own ``OpenVINOInferencer`` and gives torch's scores, maps, labels and masks.

Per model, on the generated MVTec AD category of ``conftest.tiny_mvtec_ad`` (64x64 images): an
``Engine.validate`` (the RD-based models: it gives the post-processor its thresholds and min-max,
Dskd its Eq. 8 statistics, Packd its support prototypes) or, for Glance, whose score statistics are
computed at the end of training, an ``Engine.fit`` of 2 + 2 steps; then
``Engine.export(model, ExportType.OPENVINO)`` without ``input_size`` (the CLI's default: batch, height
and width dynamic, the model's PreProcessor resizing inside the graph) and
``OpenVINOInferencer(xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})`` (the CPU plugin
defaults to bf16 on this machine). Compared, within ``assert_export_parity``'s tolerance (1e-3 of the
torch output's scale; labels and masks wherever torch is further than that from the threshold, see
``export_utils.assert_prediction_matches``):

* image paths (the inferencer reads them as ``anomalib predict``'s dataset does) against
  ``Engine.predict`` (the code ``anomalib predict`` runs), image by image;
* a tensor batch of the same images, and a ``uint8`` HWC array of a 96x128 image (resized inside the
  graph: down to 64x64 for the RD-based models, up to 256x256 for Glance), against the torch model's
  forward (``model.eval()(images)``);
* that 96x128 image resized by the user with antialiasing to the model's input against
  ``Engine.predict`` on the 96x128 file. anomalib's PreProcessor resizes with antialiasing during
  training, validation and ``Engine.predict`` but exports an antialias-free copy of its transform
  (``get_exportable_transform``; OpenVINO 2026.4's CPU plugin also ignores ONNX ``Resize``'s
  antialias attribute), so an image larger than the model's input fed to the inferencer as it is
  matches the forward above, not ``Engine.predict``: see ``docs/deployment.md``.

Export and compile run once per model; the images are the test split's first good and first defective one.
The real ``anomalib export --export_type openvino`` subprocess runs in ``tests/test_registration.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .export_utils import (
    INFERENCER_CONFIG,
    PREDICTION_FIELDS,
    assert_prediction_matches,
    batch_outputs,
    torch_outputs,
)
from .test_dskd_engine import _one_thread  # noqa: F401  # autouse here too: one intra-op thread

pytestmark = pytest.mark.slow

MODELS = ("rd", "ard", "dskd", "packd", "glance")
SIZE = (64, 64)  # input of the RD-based models (Glance's is 256x256); the generated images are 64x64 too
LARGE = (96, 128)  # (H, W) of an image of another size than the models' inputs, resized inside the exported graph


def build(name: str):
    """Each model small, as in its own tests (ResNet18 teachers: the cheapest export), no evaluator or visualizer."""
    small = {"backbone": "resnet18", "pre_trained": False, "evaluator": False, "visualizer": False}
    if name == "rd":
        from anomalib_dskd.models.rd import Rd

        return Rd(pre_processor=Rd.configure_pre_processor(SIZE), **small)
    if name == "ard":
        from anomalib_dskd.models.ard import Ard

        return Ard(attention_type="se", attention_position="both", pre_processor=Ard.configure_pre_processor(SIZE),
                   **small)
    if name == "dskd":
        from anomalib_dskd.models.dskd import Dskd

        from .test_dskd_engine import pre_processor

        return Dskd(gccb_channels=16, pre_processor=pre_processor(), **small)
    if name == "packd":
        from anomalib_dskd.models.packd import Packd

        model = Packd(num_prototypes=4, attention_dim=16, k_shot=2, pre_processor=Packd.configure_pre_processor(SIZE),
                      **small)
        for integrator in model.model.peim.integrators:  # the prototypes must matter in the exported graph
            torch.nn.init.normal_(integrator.out.weight, std=0.05)
        return model
    from .test_glance import _glance

    return _glance(evaluator=False, visualizer=False)


@pytest.fixture(scope="module")
def images(tiny_mvtec_ad: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good and a defective test image (64x64) and a larger copy of the defective one (LARGE, nearest)."""
    from PIL import Image

    root, category = tiny_mvtec_ad
    test = root / category / "test"
    folder = tmp_path_factory.mktemp("deploy_images")
    defect = next(path for path in sorted(test.iterdir()) if path.name != "good")
    sources = {"good": min((test / "good").glob("*.png")), "defect": min(defect.glob("*.png"))}
    paths = {}
    for key, source in sources.items():
        paths[key] = folder / f"{key}.png"
        paths[key].write_bytes(source.read_bytes())
    paths["large"] = folder / "large.png"
    Image.open(sources["defect"]).convert("RGB").resize(LARGE[::-1], Image.NEAREST).save(paths["large"])
    return paths


@pytest.mark.parametrize("name", MODELS)
def test_openvino_inferencer_matches_torch(
    name: str, tiny_mvtec_ad: tuple[Path, str], images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib.data import MVTecAD
    from anomalib.data.utils import read_image
    from anomalib.deploy import ExportType, OpenVINOInferencer
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything
    from PIL import Image
    from torchvision.transforms.v2.functional import resize

    seed_everything(0)
    monkeypatch.chdir(tmp_path)  # the inferencer writes its compile cache to ./openvino_cache
    root, category = tiny_mvtec_ad
    model = build(name)
    engine = Engine(max_epochs=1, default_root_dir=tmp_path, accelerator="cpu", devices=1,
                    logger=False, enable_progress_bar=False)
    datamodule = MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=8, num_workers=0)
    # validation gives the post-processor its thresholds and min-max, Dskd its Eq. 8 statistics, Packd its
    # prototypes (k_shot training images); Glance computes its score statistics at the end of training (2 + 2 steps)
    (engine.fit if name == "glance" else engine.validate)(model, datamodule=datamodule)
    post = model.post_processor
    assert all(bool(torch.isfinite(value)) for value in (post.image_threshold, post.pixel_threshold, post.image_min,
                                                         post.image_max, post.pixel_min, post.pixel_max))
    thresholds = (float(post.normalized_image_threshold), float(post.normalized_pixel_threshold))

    xml = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "export", onnx_kwargs={"opset_version": 18})
    inferencer = OpenVINOInferencer(xml, device="CPU", config=INFERENCER_CONFIG)
    # the inferencer maps outputs by name: exactly the InferenceBatch fields (Dskd's per-student maps are not exported)
    assert sorted(port.get_any_name() for port in inferencer.model.outputs) == sorted(PREDICTION_FIELDS)
    size = tuple(model.pre_processor.transform.transforms[0].size)  # the model's input (H, W): its Resize

    # 1. Image paths: the inferencer against Engine.predict (anomalib predict), image by image
    predicted = {Path(batch.image_path[0]).stem: batch for batch in engine.predict(model, data_path=images["good"].parent)}
    for key in ("good", "defect"):
        prediction = inferencer.predict(images[key])
        pixels = read_image(images[key], as_tensor=True)  # what Engine.predict's dataset read
        assert np.abs(prediction.image[0] - pixels.permute(1, 2, 0).numpy()).max() <= 1e-6  # the same pixels
        assert_prediction_matches(prediction, batch_outputs(predicted[key]), thresholds, where=f"{name} {key} path")

    # 2. A tensor batch (as read above) and a larger uint8 HWC array against the torch model's forward
    batch = torch.stack([read_image(images[key], as_tensor=True) for key in ("good", "defect")])
    assert_prediction_matches(inferencer.predict(batch), torch_outputs(model, batch), thresholds,
                              where=f"{name} tensor batch")
    large = read_image(images["large"], as_tensor=True)
    large_uint8 = np.asarray(Image.open(images["large"]).convert("RGB"))
    assert_prediction_matches(inferencer.predict(large_uint8), torch_outputs(model, large[None]), thresholds,
                              where=f"{name} {LARGE} array")

    # 3. The larger image resized with antialiasing by the user against Engine.predict on the larger file
    resized = resize(large, list(size), antialias=True)
    assert_prediction_matches(inferencer.predict(resized), batch_outputs(predicted["large"]), thresholds,
                              where=f"{name} {LARGE} resized by the user")
