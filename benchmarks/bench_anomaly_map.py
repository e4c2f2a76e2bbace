"""Anomaly-map generation: the package's separable blur vs anomalib's RD map (33x33 2-D blur).

Same features in, same map out (checked), time per call compared. Also times the blur alone and
the whole RD forward pass to show the blur's share.

    python benchmarks/bench_anomaly_map.py --threads 2 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    """Median wall time of ``fn()`` in milliseconds (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    """Print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from anomalib.models.components.filters import GaussianBlur2d
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerator as TheirMap

    from anomalib_dskd.components.rd import AnomalyMapGenerator, SeparableGaussianBlur2d
    from anomalib_dskd.models.rd import RdModel

    size, batch = args.size, args.batch
    shapes = [(256, size // 4), (512, size // 8), (1024, size // 16)]  # wide_resnet50_2 layer1-3
    teacher = [torch.randn(batch, c, s, s) for c, s in shapes]
    student = [t + 0.2 * torch.randn_like(t) for t in teacher]
    theirs = TheirMap(image_size=(size, size), mode=AnomalyMapGenerationMode.ADD)
    ours = AnomalyMapGenerator((size, size))
    with torch.no_grad():
        max_diff = (theirs(teacher, student) - ours(teacher, student)).abs().max().item()
        t_theirs = timed(lambda: theirs(teacher, student), args.repeats)
        t_ours = timed(lambda: ours(teacher, student), args.repeats)
        maps = torch.rand(batch, 1, size, size)
        blur2d = GaussianBlur2d(sigma=4, kernel_size=(33, 33), channels=1)
        blur_sep = SeparableGaussianBlur2d(4)
        t_blur2d = timed(lambda: blur2d(maps), args.repeats)
        t_blursep = timed(lambda: blur_sep(maps), args.repeats)
        rd = RdModel("wide_resnet50_2", pre_trained=False, input_size=(size, size)).eval()
        image = torch.rand(batch, 3, size, size)
        t_forward = timed(lambda: rd(image), max(5, args.repeats // 3))

    print(f"torch {torch.__version__}, {args.threads} threads, batch {batch}, {size}x{size}, median of {args.repeats}")
    print(f"max |ours - anomalib| on the same features: {max_diff:.2e}")
    print("| step | anomalib 2.7 (ms) | anomalib-dskd (ms) | ratio |")
    print("|---|---|---|---|")
    print(f"| anomaly map (cosine, upsample, sum, blur) | {t_theirs:.2f} | {t_ours:.2f} | {t_theirs / t_ours:.1f}x |")
    print(f"| Gaussian blur alone (sigma 4, 33 taps) | {t_blur2d:.2f} | {t_blursep:.2f} | {t_blur2d / t_blursep:.1f}x |")
    print(f"| whole Rd forward, wide_resnet50_2 (ours) | - | {t_forward:.1f} | blur share with anomalib's blur: "
          f"{t_blur2d / (t_forward - t_blursep + t_blur2d):.0%}, with ours: {t_blursep / t_forward:.0%} |")


if __name__ == "__main__":
    main()
