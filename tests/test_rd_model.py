"""The package's plain reverse-distillation model ``Rd``: Lightning behaviour and export."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import AnomalibModule

from anomalib_dskd import Rd
from anomalib_dskd.components.rd import InputSizeError

from .export_utils import assert_export_parity


def _rd(backbone: str = "resnet18", size: int = 64) -> Rd:
    return Rd(backbone=backbone, pre_trained=False, pre_processor=AnomalibModule.configure_pre_processor((size, size)))


def test_rd_is_a_direct_anomalib_module() -> None:
    assert AnomalibModule in Rd.__bases__
    assert Rd.__module__ == "anomalib_dskd.models.rd.lightning_model"


def test_forward_in_eval_returns_inference_batch() -> None:
    model = _rd().eval()
    batch = model(torch.rand(2, 3, 100, 80))  # the pre-processor resizes to 64x64
    assert isinstance(batch, InferenceBatch)
    assert batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_score.shape[0] == 2


def test_optimizer_trains_only_the_student() -> None:
    model = _rd()
    params = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    core = model.model.core
    assert params == {id(p) for p in [*core.bottleneck.parameters(), *core.decoder.parameters()]}
    assert not any(id(p) in params for p in core.teacher.parameters())


def test_input_size_not_multiple_of_32_is_refused() -> None:
    with pytest.raises(InputSizeError, match=r"\(250, 250\).*multiples of 32"):
        Rd(backbone="resnet18", pre_trained=False, pre_processor=AnomalibModule.configure_pre_processor((250, 250)))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_100", "efficientnet_lite0"])
def test_export_onnx_openvino_match_torch(backbone: str, tmp_path) -> None:  # noqa: ANN001
    paths = assert_export_parity(_rd(backbone), tmp_path, (64, 64))
    assert paths["openvino"].with_suffix(".bin").stat().st_size > 0
