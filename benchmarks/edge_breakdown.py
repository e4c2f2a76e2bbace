"""Where Dskd's OpenVINO latency goes: each part of the model exported and timed on its own, side by side.

Each part of ``DskdModel`` (random weights: the cost of these dense graphs does not depend on them) is exported
to ONNX on its own with the inputs it gets inside the model, compiled for the OpenVINO CPU plugin
(``INFERENCE_PRECISION_HINT=f32``, ``--threads`` threads, batch 1) and timed in interleaved rounds (``--rounds``
rounds of ``--calls`` calls of every part in turn; the figure is the median of the round medians). Parts:

* ``teacher`` (shared by both students; Rd has the same), ``local_ocbe`` + ``local_decoder`` (= Rd's student),
  ``global_ocbe`` (the teacher's next stage), ``gccb``, ``global_decoder``;
* ``local_map_scales`` (per-scale cosine distance), ``global_map_scale<l>`` (the affinity KL of scale ``l``
  with the key pooling of ``--key-pool``);
* the map's resize + sum + Gaussian smoothing for two students' three scales, as the package did it before
  (``interpolate_and_filter``: bilinear interpolation of each scale to the input size, a reflect-padded
  separable filter) and as it does now (``upsample_smooth``: ``UpsampleSmooth``'s constant matrix products).

The parts' sum is not the whole model's latency (a whole graph lets OpenVINO fuse across the boundaries);
``benchmarks/edge_latency.py`` measures whole models side by side.

    CI=true python benchmarks/edge_breakdown.py --output docs/benchmarks/edge/breakdown.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore")

import torch
from _common import command_line, interleaved_latency
from torch import nn


class _Part(nn.Module):
    def __init__(self, function: Any) -> None:
        super().__init__()
        self.function = function

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.function(*inputs)


def _parts(model: Any, images: torch.Tensor, size: tuple[int, int], sigma: float) -> dict[str, tuple[nn.Module, tuple]]:
    from anomalib_dskd.components.rd import SeparableGaussianBlur2d, UpsampleSmooth, upsample_and_sum
    from anomalib_dskd.models.dskd.anomaly_map import affinity_kl_maps, cosine_distance_maps

    with torch.no_grad():
        teacher = model.core.teacher(images)
        local_embedding = model.core.bottleneck(teacher)
        local = model.core.decoder(local_embedding)
        global_embedding = model.global_bottleneck(teacher)
        condensed = model.gccb(global_embedding)
        glob = model.global_decoder(condensed)
    pools = list(model.global_map_key_pool)
    blur = SeparableGaussianBlur2d(sigma)
    smooth = UpsampleSmooth(size, sigma)
    scale_maps = tuple(torch.rand(1, 1, *t.shape[-2:]) for t in teacher) * 2  # two students' three scales

    def interpolate_and_filter(*maps: torch.Tensor) -> torch.Tensor:
        first, second = upsample_and_sum(maps[:3], size), upsample_and_sum(maps[3:], size)
        return blur(torch.cat([first * 2.0 - 1.0, second * 3.0 - 2.0], dim=1)).sum(1, keepdim=True)

    def upsample_smooth(*maps: torch.Tensor) -> torch.Tensor:
        return (smooth(maps[:3]) * 2.0 - 1.0) + (smooth(maps[3:]) * 3.0 - 2.0)

    parts: dict[str, tuple[nn.Module, tuple]] = {
        "teacher": (_Part(lambda x: tuple(model.core.teacher(x))), (images,)),
        "local_ocbe": (_Part(lambda *t: model.core.bottleneck(list(t))), tuple(teacher)),
        "local_decoder": (_Part(lambda e: tuple(model.core.decoder(e))), (local_embedding,)),
        "global_ocbe": (_Part(lambda *t: model.global_bottleneck(list(t))), tuple(teacher)),
        "gccb": (_Part(model.gccb), (global_embedding,)),
        "global_decoder": (_Part(lambda e: tuple(model.global_decoder(e))), (condensed,)),
        "local_map_scales": (
            _Part(lambda *f: tuple(cosine_distance_maps(f[:3], f[3:]))), (*teacher, *local),
        ),
    }
    for index, pool in enumerate(pools):
        parts[f"global_map_scale{index}"] = (
            _Part(lambda t, s, p=pool: affinity_kl_maps([t], [s], model.temperature, model.chunk_size, [p])[0]),
            (teacher[index], glob[index]),
        )
    parts["interpolate_and_filter"] = (_Part(interpolate_and_filter), scale_maps)
    parts["upsample_smooth"] = (_Part(upsample_smooth), scale_maps)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--gccb-channels", type=int, default=256)
    parser.add_argument("--key-pool", default="1", help="Dskd's global_map_key_pool: k or one per scale, e.g. 4,2,1")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    import openvino as ov

    from anomalib_dskd.models.dskd.torch_model import DskdModel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    pools = [int(v) for v in args.key_pool.split(",")]
    model = DskdModel(
        backbone=args.backbone, pre_trained=False, input_size=size, gccb_channels=args.gccb_channels,
        global_map_key_pool=pools[0] if len(pools) == 1 else pools,
    ).eval()
    model.requires_grad_(False)
    images = torch.rand(1, 3, *size)
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads}
    requests: dict[str, tuple[Any, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (part, inputs) in _parts(model, images, size, sigma=4.0).items():
            path = Path(tmp) / f"{name}.onnx"
            with torch.no_grad():
                torch.onnx.export(part, inputs, str(path), opset_version=18, dynamo=True, verbose=False)
            compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", config)
            requests[name] = (compiled.create_infer_request(), [value.numpy() for value in inputs])
            print(f"exported {name}", flush=True)
    rounds = interleaved_latency(requests, args.rounds, args.calls, warmup=5)
    result = {
        "command": command_line("benchmarks/edge_breakdown.py", args),
        "key_pool_per_scale": list(model.global_map_key_pool),
        "load_average_end": list(os.getloadavg()),
        "parts": {name: {"median_ms": statistics.median(v), "round_medians_ms": v} for name, v in rounds.items()},
    }
    for name, row in result["parts"].items():
        print(f"{name:<24}{row['median_ms']:8.2f} ms")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
