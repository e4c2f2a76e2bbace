"""Packd's score, variant by variant, from one training: which fusion of distillation and memory detects?

Issue #14's runs (``benchmarks/packd_fewshot.py``) showed that the support memory alone scores above the
fused Packd on every target (``docs/benchmarks/packd/memory_ablation.json``): the distillation term,
trained across categories, adds noise to the image maximum of an unseen category. This script trains
Packd once per target exactly as ``packd_fewshot.py`` does (same sources, seed, epochs, batches), then
computes, for the same seeded support draws, the *components* of the score once per test image:

* ``D``: the blurred, upsampled distillation map (``1 - cos`` of teacher and prototype-conditioned student,
  levels 1-3);
* ``M_l``: the blurred, upsampled nearest-support distance map of teacher level ``l`` (2, 3, 4);

and the same components of the supports themselves (``D`` of each support; ``M_l`` of each support against
the memory of the *other* supports, leave-one-out), from which normal statistics come. Every variant is a
fixed formula of these (Gaussian blur is linear, so blurring the sum equals summing the blurred terms):

* ``distill``: ``D`` (the paper's score); ``memory{S}``: ``sum_{l in S} M_l``;
* ``fused{S}``: ``D + memory{S}`` (Packd's score before this script, ``S = 23``);
* ``zscore{S}``: ``(D - mu_D) / sd_D + (memory{S} - mu_M) / sd_M``, scalar mean and std over all pixels of
  the supports' maps, so each term counts in units of its own normal spread;
* ``centred{S}``: the same with a per-pixel mean over the supports instead of the scalar one (a systematic
  error at a fixed place of the category, present in every normal image, is removed);
* ``memimg{S}``: the image score of ``memory{S}`` with the map of ``fused{S}`` (pixel metrics of the fusion).

Image score = maximum of the map. Each variant is also scored with foreign supports (the control: the
first training category's normal images, as ``packd-foreign``). ``--models patchcore rd`` adds the
k-shot baselines of ``packd_fewshot.py`` in the same run. Raw JSON (every draw), written after every k.

The variants are *chosen* without the target: ``--select-from`` reads the result files of all three
targets and, for each target, picks the variant with the highest mean image AUROC over the *other*
targets (every k), each measured by its own leave-one-out model; no test image or label of the target enters
its choice (those models did train on the target's normal training images, as a source); ties
(``memory{S}`` and ``memimg{S}`` share their image scores) are broken by AU-PRO on the same targets. The
chosen variant's figures on the target are the ``Packd`` row of the summary (a list of rows, as
``packd_fewshot.py --summary-out`` writes; the selection itself goes to ``variant_selection.json``).
``--package-check`` then scores the package's default ``Packd`` (``set_support`` and ``forward``) on the
same checkpoints and draws, reports its difference to the variant it implements, and times its
OpenVINO export.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CI", "true")
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

import torch
from _common import raw_metrics
from packd_fewshot import adapt_patchcore, adapt_rd, load_test_set, predict, train_packd

MEMORY_SETS = {"23": (2, 3), "234": (2, 3, 4), "34": (3, 4)}
FUSIONS = ("memory", "fused", "zscore", "centred", "memimg")


def variant_names() -> list[str]:
    return ["distill"] + [f"{fusion}{key}" for fusion in FUSIONS for key in MEMORY_SETS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-source", action="append", default=[], metavar="FORMAT:ROOT:CATEGORY")
    parser.add_argument("--generated", type=int, default=2)
    parser.add_argument("--target", metavar="FORMAT:ROOT:CATEGORY")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--train-k", type=int, default=4)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-batches", type=int, default=0)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--rd-steps", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default="../shared/weights/mobilenet_v2-b0353104.pth")
    parser.add_argument("--models", nargs="*", default=[], choices=["patchcore", "rd"],
                        help="k-shot baselines to run in the same process (after Packd's variants)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="Packd state dict: loaded if it exists (no training), written after training otherwise")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--select-from", type=Path, nargs="+", default=None,
                        help="only select: result files of every target (this script's --out)")
    parser.add_argument("--summary-out", type=Path, default=None)
    parser.add_argument("--package-check", type=Path, nargs="+", default=None, metavar="RESULT",
                        help="score the package's default Packd with each result file's checkpoint and draws, compare "
                             "with the variant --variant of that file, time its OpenVINO export; writes --out")
    parser.add_argument("--variant", default="memimg234", help="the variant the package default implements")
    return parser.parse_args(argv)


@torch.no_grad()
def components(torch_model: Any, images: torch.Tensor, banks: dict[int, torch.Tensor], chunk: int = 8,
               memory_banks_per_image: list[dict[int, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Blurred, upsampled ``D`` and ``M_l`` maps ``(N, 1, H, W)`` of pre-processed images.

    ``memory_banks_per_image``: one ``{level: bank}`` per image instead of ``banks`` (leave-one-out).
    """
    from anomalib_dskd.components.rd.anomaly_map import cosine_distance_maps, upsample_and_sum

    blur = torch_model.anomaly_map_generator.blur
    size = torch_model.input_size
    memory = torch_model.support_memory
    out: dict[str, list[torch.Tensor]] = {"D": []} | {f"M{level}": [] for level in banks}
    prototypes = torch_model.cached_prototypes
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk]
        features = torch_model.teacher(batch)
        student = torch_model.student(features[:3], [p.unsqueeze(0).expand(len(batch), -1, -1) for p in prototypes])
        out["D"].append(blur(upsample_and_sum(cosine_distance_maps(features[:3], student), size)))
        for level in banks:
            if memory_banks_per_image is None:
                level_map = memory([features[level - 1]], [banks[level]])[0]
            else:
                level_map = torch.cat([
                    memory([features[level - 1][i : i + 1]], [memory_banks_per_image[start + i][level]])[0]
                    for i in range(len(batch))
                ])
            out[f"M{level}"].append(blur(upsample_and_sum([level_map], size)))
    return {name: torch.cat(values) for name, values in out.items()}


def build_banks(torch_model: Any, supports: torch.Tensor, levels: tuple[int, ...]) -> dict[int, torch.Tensor]:
    features = torch_model.teacher(supports)
    return {level: torch_model.support_memory.build([features[level - 1]])[0] for level in levels}


@torch.no_grad()
def variant_maps(query: dict[str, torch.Tensor], support: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{variant: (image scores, maps)}`` from the query's and the supports' components."""

    def stats(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return values.mean(), values.std().clamp_min(1e-8), values.mean(dim=0, keepdim=True)

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    distill = query["D"]
    mu_d, sd_d, pos_d = stats(support["D"])
    out["distill"] = distill
    for key, levels in MEMORY_SETS.items():
        mem = sum(query[f"M{level}"] for level in levels)
        mem_support = sum(support[f"M{level}"] for level in levels)
        mu_m, sd_m, pos_m = stats(mem_support)
        out[f"memory{key}"] = mem
        out[f"fused{key}"] = distill + mem
        out[f"zscore{key}"] = (distill - mu_d) / sd_d + (mem - mu_m) / sd_m
        out[f"centred{key}"] = (distill - pos_d) / sd_d + (mem - pos_m) / sd_m
    result = {name: (maps.amax(dim=(-2, -1)).reshape(-1), maps) for name, maps in out.items()}
    for key in MEMORY_SETS:
        result[f"memimg{key}"] = (result[f"memory{key}"][0], result[f"fused{key}"][1])
    return result


def score_supports(torch_model: Any, supports: torch.Tensor, levels: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The supports' own components: ``D`` with the cached prototypes, ``M_l`` against the other supports."""
    features = torch_model.teacher(supports)
    loo = []
    for index in range(len(supports)):
        keep = [j for j in range(len(supports)) if j != index]
        loo.append({level: torch_model.support_memory.build([features[level - 1][keep]])[0] for level in levels})
    return components(torch_model, supports, dict.fromkeys(levels), memory_banks_per_image=loo)


def evaluate(args: argparse.Namespace, packd: Any, images: torch.Tensor, supports: torch.Tensor,
             labels: torch.Tensor, masks: torch.Tensor, pixel: bool) -> dict[str, dict[str, float]]:
    torch_model = packd.model.eval()
    transform = packd.pre_processor.transform
    levels = (2, 3, 4)
    start = time.perf_counter()
    packd.set_support(supports)
    prepared = transform(supports)
    banks = build_banks(torch_model, prepared, levels)
    support_parts = score_supports(torch_model, prepared, levels)
    adapt = time.perf_counter() - start
    query = components(torch_model, transform(images), banks)
    results = {}
    for name, (scores, maps) in variant_maps(query, support_parts).items():
        if pixel:
            results[name] = raw_metrics(scores, maps, labels, masks)
        else:
            from types import SimpleNamespace

            from anomalib_dskd.metrics import raw_auroc

            metric = raw_auroc(["pred_score", "gt_label"])
            metric.update(SimpleNamespace(pred_score=scores, gt_label=labels))
            results[name] = {"image_auroc": float(metric.compute())}
        results[name]["adapt_s"] = adapt
    return results


def write(args: argparse.Namespace, rows: list[dict[str, Any]], category: str, train_s: float | None) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                        "args": {k: str(v) for k, v in vars(args).items()},
                                        "target": category, "train_s": train_s, "rows": rows}, indent=1))


def mean_auroc(rows: list[dict[str, Any]], model: str, k: int | None = None, supports: str = "target",
               metric: str = "image_auroc") -> float:
    values = [r[metric] for r in rows
              if r["model"] == model and r.get("supports", "target") == supports and (k is None or r["k"] == k)]
    return statistics.mean(values)


def select(files: list[Path], summary_out: Path | None) -> int:
    results = {json.loads(path.read_text())["target"]: json.loads(path.read_text()) for path in files}
    names = variant_names()
    selection = {}
    print("| variant | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{mean_auroc(r['rows'], name):.3f}" for r in results.values()) + " |")
    for target in results:
        # image AUROC on the other targets decides; AU-PRO on them breaks ties (memory{S} and memimg{S} have
        # the same image scores and differ only in their map)
        others = [t for t in results if t != target]
        validation = {name: statistics.mean(mean_auroc(results[t]["rows"], name) for t in others) for name in names}
        tie_break = {name: statistics.mean(mean_auroc(results[t]["rows"], name, metric="aupro") for t in others)
                     for name in names}
        chosen = max(names, key=lambda name: (round(validation[name], 9), tie_break[name]))
        selection[target] = {"chosen": chosen, "validated_on": others, "validation_image_auroc": validation,
                             "validation_aupro": tie_break}
        print(f"{target}: chosen {chosen} (mean image AUROC {validation[chosen]:.3f}, AU-PRO {tie_break[chosen]:.3f} "
              f"on {others}); on {target}: {mean_auroc(results[target]['rows'], chosen):.3f}")
    summary = []
    for path, (target, data) in zip(files, results.items(), strict=True):
        chosen = selection[target]["chosen"]
        for k in sorted({r["k"] for r in data["rows"]}):
            for label, model, supports in (("Packd", chosen, "target"), ("Packd-foreign", chosen, "foreign"),
                                           ("Patchcore-k", "patchcore", "target"), ("Rd-k", "rd", "target")):
                picked = [r for r in data["rows"]
                          if r["model"] == model and r["k"] == k and r.get("supports", "target") == supports]
                if not picked:
                    continue
                values = [r["image_auroc"] for r in picked]
                row = {"model": label, "target": target, "k": k, "image_auroc_mean": round(statistics.mean(values), 4),
                       "image_auroc_std": round(statistics.pstdev(values), 4), "draws": len(values), "variant": model}
                for metric in ("pixel_auroc", "aupro", "adapt_s"):
                    if metric in picked[0]:
                        row[f"{metric}_mean"] = round(statistics.mean(r[metric] for r in picked), 4)
                row["source"] = str(path)
                summary.append(row)
    if summary_out:
        summary_out.write_text(json.dumps(summary, indent=1))
        selection_out = summary_out.with_name("variant_selection.json")
        selection_out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                             "selection": selection}, indent=1))
        print(f"wrote {summary_out} and {selection_out}")
    return 0


def package_check(args: argparse.Namespace) -> int:
    """The package's default ``Packd`` on each result file's checkpoint and draws, next to ``--variant``.

    Reproduces the variant through the package's own code path (``set_support``, ``forward``), not this
    script's component maps, and times the exported model (OpenVINO f32, batch 1) at the smallest and the
    largest k (the memory grows with k).
    """
    from packd_fewshot import bare_model, openvino_timing

    from anomalib_dskd.data.few_shot import FewShotDataModule, parse_specs
    from anomalib_dskd.models.packd import Packd

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "variant": args.variant, "targets": {}}
    for path in args.package_check:
        result = json.loads(path.read_text())
        run = result["args"]
        spec, ks, draws = run["target"], [int(k) for k in run["k"].strip("[]").split(",")], int(run["draws"])
        run_args = argparse.Namespace(seed=int(run["seed"]), backbone=run["backbone"], weights=args.weights,
                                      image_size=int(run["image_size"]), threads=args.threads)
        packd = bare_model(Packd, run_args)
        packd.load_state_dict(torch.load(run["checkpoint"], map_location="cpu"), strict=False)
        images, masks, labels = load_test_set(parse_specs(spec)[0], run_args.image_size)
        rows, latency, worst = [], {}, 0.0
        for k in ks:
            datamodule = FewShotDataModule(train_sources=[], target=spec, k_shot=k, seed=run_args.seed,
                                           image_size=(run_args.image_size,) * 2, num_support_draws=draws)
            datamodule.setup()
            for draw in range(draws):
                start = time.perf_counter()
                packd.set_support(datamodule.support_images(draw))
                adapt = time.perf_counter() - start
                scores, maps = predict(packd.model, packd.pre_processor.transform, images)
                row = {"model": "packd-package", "k": k, "draw": draw, "adapt_s": adapt,
                       **raw_metrics(scores, maps, labels, masks)}
                reference = next(r for r in result["rows"] if r["model"] == args.variant and r["k"] == k
                                 and r["draw"] == draw and r.get("supports", "target") == "target")
                row["difference_to_variant"] = {m: row[m] - reference[m] for m in ("image_auroc", "pixel_auroc", "aupro")}
                worst = max(worst, *(abs(v) for v in row["difference_to_variant"].values()))
                rows.append(row)
                print(f"{result['target']} k={k} draw={draw}: " + ", ".join(
                    f"{m} {row[m]:.4f} ({row['difference_to_variant'][m]:+.1e})" for m in row["difference_to_variant"]),
                    flush=True)
                if draw == 0 and k in {min(ks), max(ks)}:
                    latency[f"k{k}"] = openvino_timing(packd, run_args, f"{result['target']}_k{k}")
                    print(f"  OpenVINO f32 k={k}: {latency[f'k{k}']}", flush=True)
        out["targets"][result["target"]] = {"rows": rows, "openvino": latency, "max_abs_difference": worst}
        if args.out:
            args.out.write_text(json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.select_from:
        return select(args.select_from, args.summary_out)
    if args.package_check:
        return package_check(args)
    torch.set_num_threads(args.threads)
    from packd_fewshot import bare_model

    from anomalib_dskd.data import generate_mvtec_ad_category
    from anomalib_dskd.data.few_shot import FewShotDataModule, parse_specs
    from anomalib_dskd.models.packd import Packd

    target = parse_specs(args.target)[0]
    work = Path(tempfile.mkdtemp(prefix="packd_variants_"))
    sources = list(args.train_source)
    for index in range(args.generated):  # the same generated categories as packd_fewshot.py
        name = f"generated_{index}"
        generate_mvtec_ad_category(work, name, seed=100 + index, image_size=(args.image_size,) * 2,
                                   n_train=max(args.k) + 8, n_test_good=2, n_per_defect=1)
        sources.append(f"mvtec_ad:{work}:{name}")
    images, masks, labels = load_test_set(target, args.image_size)
    print(f"target {target['category']}: {len(images)} test images ({int(labels.sum())} anomalous)", flush=True)
    train_s = None
    if args.checkpoint and args.checkpoint.exists():
        packd = bare_model(Packd, args)
        packd.load_state_dict(torch.load(args.checkpoint, map_location="cpu"), strict=False)
        print(f"loaded {args.checkpoint}", flush=True)
    else:
        packd, _, train_s = train_packd(args, args.train_k, sources, args.target)
        if args.checkpoint:
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(packd.state_dict(), args.checkpoint)
    rows: list[dict[str, Any]] = []
    for k in args.k:
        datamodule = FewShotDataModule(train_sources=sources, target=args.target, k_shot=k, seed=args.seed,
                                       image_size=(args.image_size,) * 2, train_batch_size=args.groups,
                                       num_support_draws=args.draws)
        datamodule.setup()
        for draw in range(args.draws):
            supports = datamodule.support_images(draw)
            train_data = datamodule.train_data
            foreign = torch.stack(
                [torch.as_tensor(train_data[i].image) for i in train_data.category_indices[0][draw : draw + k]])
            for which, images_k, pixel in (("target", supports, True), ("foreign", foreign, False)):
                for name, metrics in evaluate(args, packd, images, images_k, labels, masks, pixel).items():
                    rows.append({"model": name, "supports": which, "k": k, "draw": draw, **metrics})
            best = max((r for r in rows if r["k"] == k and r["draw"] == draw and r["supports"] == "target"),
                       key=lambda r: r["image_auroc"])
            print(f"k={k} draw={draw}: " + ", ".join(
                f"{r['model']} {r['image_auroc']:.3f}" for r in rows
                if r["k"] == k and r["draw"] == draw and r["supports"] == "target") + f" (best {best['model']})",
                flush=True)
        write(args, rows, target["category"], train_s)
    for k in args.k:
        datamodule = FewShotDataModule(train_sources=[], target=args.target, k_shot=k, seed=args.seed,
                                       image_size=(args.image_size,) * 2, num_support_draws=args.draws)
        datamodule.setup()
        for draw in range(args.draws):
            supports = datamodule.support_images(draw)
            for name in args.models:
                model, adapt = (adapt_patchcore if name == "patchcore" else adapt_rd)(args, supports)
                scores, maps = predict(model.model, model.pre_processor.transform, images)
                row = {"model": name, "supports": "target", "k": k, "draw": draw, "adapt_s": adapt,
                       **raw_metrics(scores, maps, labels, masks)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            write(args, rows, target["category"], train_s)
    write(args, rows, target["category"], train_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
