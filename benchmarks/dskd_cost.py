"""Cost of Dskd against plain RD on the same teacher: training step and inference, time and peak memory.

Prints one table. Random teacher weights (cost does not depend on them). Times are medians, wall
clock and process CPU time (all threads); ``OMP_WAIT_POLICY=PASSIVE`` is set. Peak memory is the
process's peak resident set size during the measured phase minus the resident size just before
it (Linux ``/proc/self/clear_refs``), i.e. the extra memory the phase needed.

Usage (2 threads, as the targets are stated)::

    CI=true python benchmarks/dskd_cost.py --backbone mobilenetv2_100 --gccb-channels 256 --batch 8
    CI=true python benchmarks/dskd_cost.py --global-map-scales 1,2   # + Dskd without the 64x64 global map
    CI=true python benchmarks/dskd_cost.py --backbone wide_resnet50_2 --gccb-channels 1024 --batch 2 --steps 2 --runs 5
    CI=true python benchmarks/dskd_cost.py --affinity-only   # chunked vs direct affinity loss alone
    CI=true python benchmarks/dskd_cost.py --breakdown       # where Dskd's inference time goes
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("CI", "true")
# Threads that wait sleep instead of spinning: on a shared, oversubscribed machine spinning OpenMP
# threads burn CPU while their partner is descheduled (20x the CPU time of one thread, measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def resident_kib(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Extra peak resident memory (MiB) of a block: peak RSS during it minus RSS before it.

    Measured around the *first* calls: freed memory stays in the allocator's cache afterwards, so
    later calls would show only what they need beyond it.
    """

    def __enter__(self) -> PeakMemory:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.before = resident_kib()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mib = (resident_kib("VmHWM") - self.before) / 1024


def median_time(fn, runs: int, warmup: int = 1) -> tuple[float, float]:  # noqa: ANN001
    """Median wall time and median process CPU time (all threads) of ``fn``, in seconds.

    On a shared machine the wall time depends on the other processes; the CPU time much less,
    so both are reported and the ratios are given for both.
    """
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def build(kind: str, args: argparse.Namespace, global_map_scales: list[int] | None = None):  # noqa: ANN201
    from anomalib_dskd.models.dskd import Dskd
    from anomalib_dskd.models.rd import Rd

    if kind == "rd":
        return Rd(backbone=args.backbone, pre_trained=False, loss_mode="pixel", visualizer=False, evaluator=False)
    return Dskd(
        backbone=args.backbone,
        pre_trained=False,
        gccb_channels=args.gccb_channels,
        affinity_chunk_size=args.chunk or None,
        global_map_scales=global_map_scales,
        visualizer=False,
        evaluator=False,
    )


def train_step_fn(kind: str, module, images: torch.Tensor):  # noqa: ANN001, ANN201
    model = module.model
    model.train()
    optimizer = module.configure_optimizers()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if kind == "rd":
            loss = module.loss(*model(images))
        else:
            loss = module.loss(*model(images))[0]
        loss.backward()
        optimizer.step()

    return step


def openvino_fn(module, size: int, threads: int, workdir: Path):  # noqa: ANN001, ANN201
    import openvino as ov

    xml = module.to_openvino(workdir, input_size=(size, size))
    bytes_ = sum(p.stat().st_size for p in xml.parent.iterdir() if p.suffix in {".xml", ".bin"})
    compiled = ov.Core().compile_model(
        str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads)}
    )
    request = compiled.create_infer_request()
    image = torch.rand(1, 3, size, size).numpy()
    return (lambda: request.infer({0: image})), bytes_


def affinity_only(args: argparse.Namespace) -> None:
    """Affinity loss + backward alone, chunked vs direct; each setting in a fresh process (clean peak RSS)."""
    import subprocess
    import sys

    if args.affinity_chunk is None:
        print(
            f"affinity loss + backward, mobilenetv2 feature shapes at {args.size}px, batch {args.batch}, "
            f"{args.threads} threads (median of {args.runs}); peak = extra resident memory of the first call"
        )
        print(f"{'chunk':>8} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
        for chunk in (0, 4096, 1024, 512, 128):
            command = [sys.executable, __file__, "--affinity-only", "--affinity-chunk", str(chunk)]
            command += ["--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
            command += ["--runs", str(args.runs)]
            print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        return

    from anomalib_dskd.models.dskd.anomaly_map import affinity_kl_direct
    from anomalib_dskd.models.dskd.loss import ContextualAffinityLoss

    size = args.size
    shapes = [(24, size // 4), (32, size // 8), (96, size // 16)]  # mobilenetv2_100 stages 1-3
    teacher = [torch.randn(args.batch, c, s, s) for c, s in shapes]
    student = [(t + 0.3 * torch.randn_like(t)).requires_grad_() for t in teacher]
    chunk = args.affinity_chunk
    if chunk == 0:

        def loss_call(t, s):  # noqa: ANN001, ANN202
            return sum(affinity_kl_direct(a, b).mean() for a, b in zip(t, s, strict=True))
    else:
        loss_call = ContextualAffinityLoss(chunk_size=chunk)

    def run() -> None:
        loss_call(teacher, student).backward()

    with PeakMemory() as peak:
        run()
    seconds, cpu = median_time(run, args.runs, warmup=0)
    print(f"{'direct' if chunk == 0 else chunk:>8} {seconds:8.3f} {cpu:8.3f} {peak.mib:9.0f}")


def breakdown(args: argparse.Namespace) -> None:
    """Median time of each part of ``DskdModel``'s eval forward (torch, batch 1): where inference goes."""
    from anomalib_dskd.models.dskd.anomaly_map import upsampled_student_map
    from anomalib_dskd.models.dskd.torch_model import DskdModel

    size = (args.size, args.size)
    model = DskdModel(backbone=args.backbone, pre_trained=False, input_size=size, gccb_channels=args.gccb_channels)
    model.eval()
    images = torch.rand(1, 3, *size)

    def median_ms(fn) -> float:  # noqa: ANN001
        return 1000 * median_time(fn, args.runs, warmup=3)[0]

    chunk = args.chunk or None
    with torch.no_grad():
        teacher = model.core.teacher(images)
        local = model.core.decoder(model.core.bottleneck(teacher))
        parts = {
            "teacher": lambda: model.core.teacher(images),
            "local student (OCBE + decoder)": lambda: model.core.decoder(model.core.bottleneck(teacher)),
            "global student (OCBE + GCCB + decoder)": lambda: model.global_decoder(
                model.gccb(model.global_bottleneck(teacher))
            ),
            "local cosine map (3 scales)": lambda: upsampled_student_map("pixel", teacher, local, size),
        }
        for index, feature in enumerate(teacher):
            label = f"global affinity map, scale {feature.shape[-2]}x{feature.shape[-1]}"
            parts[label] = lambda i=index: upsampled_student_map(
                "affinity", teacher[i : i + 1], local[i : i + 1], size, 1.0, chunk
            )
        parts["whole DskdModel forward"] = lambda: model(images)
        print(f"{args.backbone}, g = {args.gccb_channels}, {args.size}x{args.size}, batch 1, {args.threads} threads")
        for label, fn in parts.items():
            print(f"  {label:<45} {median_ms(fn):8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--gccb-channels", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=512, help="affinity chunk size (0 = direct)")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    parser.add_argument("--runs", type=int, default=20, help="timed inference runs (median)")
    parser.add_argument("--no-openvino", action="store_true")
    parser.add_argument(
        "--global-map-scales",
        type=lambda text: [int(item) for item in text.split(",")],
        default=None,
        help="also measure Dskd with these global_map_scales (e.g. 1,2)",
    )
    parser.add_argument("--affinity-only", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="time the parts of Dskd's inference (torch, batch 1)")
    parser.add_argument("--affinity-chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.affinity_only:
        affinity_only(args)
        return
    if args.breakdown:
        breakdown(args)
        return

    rows = []
    variants = [("rd", "rd", None), ("dskd", "dskd", None)]
    if args.global_map_scales:
        label = "dskd[" + ",".join(map(str, args.global_map_scales)) + "]"
        variants.append((label, "dskd", args.global_map_scales))
    for label, kind, scales in variants:
        module = build(kind, args, scales)
        params = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
        images = torch.randn(args.batch, 3, args.size, args.size)
        step = train_step_fn(kind, module, images)
        with PeakMemory() as train_peak:  # first steps: activations, gradients and the Adam state
            step()
            step()
        train = median_time(step, args.steps, warmup=0)

        module.eval()
        image = torch.rand(1, 3, args.size, args.size)
        with torch.inference_mode():
            infer = lambda: module(image)  # noqa: E731 - full pipeline: pre-processing, model, post-processing
            with PeakMemory() as infer_peak:
                infer()
            torch_infer = median_time(infer, args.runs)
        ov_infer, ov_bytes = (float("nan"), float("nan")), float("nan")
        if not args.no_openvino:
            with tempfile.TemporaryDirectory() as tmp:
                ov_call, ov_bytes = openvino_fn(module, args.size, args.threads, Path(tmp))
                ov_infer = median_time(ov_call, args.runs, warmup=2)
        rows.append((label, params, train, train_peak.mib, torch_infer, infer_peak.mib, ov_infer, ov_bytes))
        del module, step

    print(
        f"\n{args.backbone} teacher (random weights), {args.size}x{args.size}, {args.threads} threads; "
        f"training step at batch {args.batch} (median of {args.steps}); inference batch 1 (median of {args.runs}); "
        f"Dskd gccb_channels={args.gccb_channels}, affinity chunk={args.chunk or 'direct'}. Times wall / process CPU."
    )
    print(
        f"{'model':10} {'trainable':>10} {'train s':>15} {'train MiB':>9} {'torch ms':>15} {'torch MiB':>9} "
        f"{'OV f32 ms':>15} {'OV MB':>7}"
    )
    for kind, params, train, train_mib, torch_infer, infer_mib, ov_infer, ov_bytes in rows:
        print(
            f"{kind:10} {params / 1e6:9.2f}M {train[0]:7.3f}/{train[1]:7.3f} {train_mib:9.0f} "
            f"{torch_infer[0] * 1e3:7.1f}/{torch_infer[1] * 1e3:7.1f} {infer_mib:9.0f} "
            f"{ov_infer[0] * 1e3:7.1f}/{ov_infer[1] * 1e3:7.1f} {ov_bytes / 1e6:7.1f}"
        )
    rd = rows[0]
    for dskd in rows[1:]:
        for label, index in (("wall", 0), ("CPU", 1)):
            print(
                f"ratios {dskd[0]}/RD ({label}): training step {dskd[2][index] / rd[2][index]:.2f}x (target <= 2), "
                f"torch inference {dskd[4][index] / rd[4][index]:.2f}x, "
                f"OpenVINO inference {dskd[6][index] / rd[6][index]:.2f}x (target <= 1.5)"
            )


if __name__ == "__main__":
    main()
