"""OpenVINO latency of Rd and Dskd's scoring variants side by side: f32 and INT8, batch 1, interleaved rounds.

Every variant is exported once (random weights: the cost of these dense graphs does not depend on them;
Dskd's Eq. 8 statistics set to fixed values), quantised with NNCF twice (calibrated on random images: for
latency only, accuracy is ``benchmarks/int8_smoothing_scope.py``'s job): ``int8``, the package's path (every op
NNCF quantises but the map smoothing and the scoring tail's elementwise, reduction and MatMul ops,
``measure.quantize_int8(..., tail_types=F32_ELEMENTWISE_OPS)``), and ``int8_conv``, those op types kept f32
everywhere, the networks' residual ``Add``s included (Dskd's path before 2026-12-03), and compiled with
``INFERENCE_PRECISION_HINT=f32`` and ``--threads`` threads. Then ``--rounds`` rounds each time
``--calls`` calls of every variant in turn, so that whatever else runs on the machine weighs on all of
them alike; the figure per variant is the median over rounds of the round's median, and the ratio to Rd
is taken round by round (median of the per-round ratios).

    CI=true python benchmarks/edge_latency.py --output docs/benchmarks/edge/latency.json

``--op-profile`` also compiles each variant's f32 graph with OpenVINO's per-op counters (``PERF_COUNT``,
separately, after the timed rounds) and reports where its time goes, by kind of op (:data:`OP_KINDS`): the
whole graph's layout conversions (``Reorder`` / ``Transpose``), which the parts timed on their own by
``edge_breakdown.py`` do not show.

Variants: ``rd``; ``dskd`` (paper scoring, exact Eq. 6 at every scale); ``dskd_pool2`` /
``dskd_pool4`` (``global_map_key_pool``: keys of the 64x64 map pooled over 2x2 / 4x4 cells);
``dskd_scales12`` (``global_map_scales=[1, 2]``: no 64x64 global map); ``dskd_pool421`` / ``dskd_pool842``
(``global_map_key_pool=[4, 2, 1]`` / ``[8, 4, 2]``: keys pooled at the two or three shallowest scales).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import command_line, interleaved_latency  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "rd": {},
    "dskd": {},
    "dskd_pool2": {"global_map_key_pool": 2},
    "dskd_pool4": {"global_map_key_pool": 4},
    "dskd_scales12": {"global_map_scales": [1, 2]},
    "dskd_pool421": {"global_map_key_pool": [4, 2, 1]},
    "dskd_pool842": {"global_map_key_pool": [8, 4, 2]},
}


#: OpenVINO op types by kind, for ``--op-profile`` (anything else is ``other``)
OP_KINDS: dict[str, tuple[str, ...]] = {
    "convolution": ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "FullyConnected"),
    "layout": ("Reorder", "Transpose"),
    "matmul_exp": ("MatMul", "Exp", "Log"),
    "elementwise_reduce": (
        "Add", "Subtract", "Multiply", "Divide", "PowerStatic", "Power", "Sqrt", "Relu", "Clamp",
        "ReduceL2", "ReduceSum", "ReduceMean", "ReduceMax", "AvgPool", "Eltwise",
    ),
}


def op_profile(xml: Path, image: np.ndarray, threads: int, calls: int = 30) -> dict[str, Any]:
    """Mean per-call time of an OpenVINO graph's ops by kind (:data:`OP_KINDS`), from ``PERF_COUNT``, ms."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
              "PERF_COUNT": True}
    request = ov.Core().compile_model(str(xml), "CPU", config).create_infer_request()
    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    kinds: dict[str, float] = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    by_type: dict[str, float] = {}
    for _ in range(5):
        request.infer({0: image})
    for _ in range(calls):
        request.infer({0: image})
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3 / calls
            kinds[kind_of.get(info.node_type, "other")] += ms
            by_type[info.node_type] = by_type.get(info.node_type, 0.0) + ms
    return {"total_ms": sum(kinds.values()), "by_kind_ms": kinds,
            "by_type_ms": dict(sorted(by_type.items(), key=lambda item: -item[1]))}


def build(name: str, args: argparse.Namespace) -> Any:  # noqa: ANN401
    from anomalib.post_processing import PostProcessor

    from anomalib_dskd.models.dskd import Dskd
    from anomalib_dskd.models.rd import Rd

    # raw outputs: an untrained model has no normalisation statistics, and NaN constants in the exported
    # post-processor make OpenVINO refuse the INT8 graph (Clamp with NaN bounds)
    post = PostProcessor(enable_normalization=False)
    if name == "rd":
        return Rd(backbone=args.backbone, pre_trained=False, post_processor=post, visualizer=False, evaluator=False).eval()
    model = Dskd(
        post_processor=post,
        backbone=args.backbone, pre_trained=False, gccb_channels=args.gccb_channels, visualizer=False, evaluator=False,
        **VARIANTS[name],
    ).eval()
    model.model.set_statistics(torch.tensor([0.4, 0.02]), torch.tensor([0.1, 0.005]), 10)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--gccb-channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--op-profile", action="store_true", help="also per-op-kind times of each f32 graph")
    args = parser.parse_args()
    import openvino as ov

    from anomalib_dskd.benchmark.measure import F32_ELEMENTWISE_OPS, export_openvino, openvino_size_mb, quantize_int8

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads}
    image = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    calibration = np.random.default_rng(1).random((16, 3, *size), dtype=np.float32)
    requests: dict[str, Any] = {}
    sizes: dict[str, float] = {}
    profiles: dict[str, Any] = {}
    f32_graphs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model = build(name, args)
            f32 = f32_graphs[name] = export_openvino(model, Path(tmp) / name / "f32", size)
            int8 = quantize_int8(f32, calibration, Path(tmp) / name / "int8", tail_types=F32_ELEMENTWISE_OPS)
            int8_conv = quantize_int8(f32, calibration, Path(tmp) / name / "int8_conv", ignored_types=F32_ELEMENTWISE_OPS)
            for runtime, xml in (("f32", f32), ("int8", int8), ("int8_conv", int8_conv)):
                compiled = ov.Core().compile_model(str(xml), "CPU", config)
                requests[f"{name}/{runtime}"] = compiled.create_infer_request()
                sizes[f"{name}/{runtime}"] = openvino_size_mb(xml)
            print(f"exported {name}", flush=True)
        rounds = interleaved_latency({key: (request, {0: image}) for key, request in requests.items()},
                                     args.rounds, args.calls, warmup=3)
        if args.op_profile:
            requests.clear()  # the timed requests' threads are not left running beside the profiled ones
            profiles = {name: op_profile(xml, image, args.threads) for name, xml in f32_graphs.items()}
    result: dict[str, Any] = {
        "command": command_line("benchmarks/edge_latency.py", args),
        "threads": args.threads, "size": list(size), "load_average_end": list(os.getloadavg()),
        "variants": {},
        **({"op_profile_f32": profiles} if profiles else {}),
    }
    for key, values in rounds.items():
        name, runtime = key.split("/")
        reference = rounds.get(f"rd/{runtime}")
        ratio = statistics.median(v / r for v, r in zip(values, reference, strict=True)) if reference else None
        f32 = rounds[f"{name}/f32"]
        result["variants"][key] = {
            "median_ms": statistics.median(values), "round_medians_ms": values, "ratio_to_rd": ratio,
            "int8_speedup": statistics.median(a / b for a, b in zip(f32, values, strict=True)) if runtime != "f32" else None,
            "size_mib": sizes[key],
        }
    print(f"{'variant':<22}{'median ms':>10}{'x Rd':>8}{'f32/int8':>10}{'MiB':>8}")
    for key, row in result["variants"].items():
        speedup = f"{row['int8_speedup']:.2f}" if row["int8_speedup"] else ""
        ratio = f"{row['ratio_to_rd']:.2f}" if row["ratio_to_rd"] else ""
        print(f"{key:<22}{row['median_ms']:>10.1f}{ratio:>8}{speedup:>10}{row['size_mib']:>8.1f}")
    for name, profile in profiles.items():
        kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in profile["by_kind_ms"].items())
        print(f"{name:<22}ops {profile['total_ms']:.2f} ms: {kinds}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
