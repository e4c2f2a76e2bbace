"""Mean +- std per model of ``dskd_accuracy.py`` outputs (JSON lines), and paired differences by seed.

Usage::

    python benchmarks/dskd_accuracy_summary.py before=docs/benchmarks/dskd/juice_bottle_accuracy.jsonl \\
        after=docs/benchmarks/dskd/juice_bottle_accuracy_signed.jsonl

Each argument is ``label=path``; rows are grouped by ``(label, model, global_embedding)``. Lines that are
not JSON objects (the script's log) are skipped.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

METRICS = (
    ("image_AUROC", "image AUROC"),
    ("pixel_AUROC", "pixel AUROC"),
    ("pixel_AUPRO", "AU-PRO 0.3"),
    ("pixel05_AUPRO", "AU-PRO 0.05"),
    ("image_AUROC_local_student_only", "local alone"),
    ("image_AUROC_global_student_only", "global alone"),
)


def load(arguments: list[str]) -> dict[tuple[str, str, str], dict[int, dict]]:
    groups: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for argument in arguments:
        label, path = argument.split("=", 1)
        with open(path, encoding="utf-8") as file:
            for line in file:
                if not line.startswith("{"):
                    continue
                row = json.loads(line)
                embedding = row.get("global_embedding", "fused" if row["model"] == "dskd" else "")
                groups[(label, row["model"], embedding)][int(row["seed"])] = row
    return groups


def cell(values: list[float]) -> str:
    if not values:
        return ""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f} ({' / '.join(f'{v:.3f}' for v in values)})"


def main() -> None:
    groups = load(sys.argv[1:])
    print("| run | model | OCBE_glo | seeds | " + " | ".join(name for _, name in METRICS) + " | fit_s |")
    print("|---" * (len(METRICS) + 5) + "|")
    order = [argument.split("=", 1)[0] for argument in sys.argv[1:]]
    for (label, model, embedding), rows in sorted(groups.items(), key=lambda i: (order.index(i[0][0]), i[0][1:])):
        seeds = sorted(rows)
        values = [cell([rows[s][key] for s in seeds if key in rows[s]]) for key, _ in METRICS]
        fit = [rows[s]["fit_s"] for s in seeds]
        print(f"| {label} | {model} | {embedding or '-'} | {','.join(map(str, seeds))} | " + " | ".join(values)
              + f" | {min(fit):.0f}-{max(fit):.0f} |")
    order = [argument.split("=", 1)[0] for argument in sys.argv[1:]]
    keys = sorted(groups, key=lambda key: (order.index(key[0]), key[1], key[2]))
    print("\nPaired differences (same seed; later argument minus earlier, then OCBE_glo teacher_stage minus fused):")
    for i, first in enumerate(keys):
        for second in keys[i + 1 :]:
            if first[1] != second[1]:
                continue
            common = sorted(set(groups[first]) & set(groups[second]))
            if not common:
                continue
            parts = []
            for key, name in METRICS[:4]:
                diffs = [groups[second][s][key] - groups[first][s][key] for s in common]
                parts.append(f"{name} {cell(diffs)}")
            print(f"- {second[0]}/{second[2] or second[1]} - {first[0]}/{first[2] or first[1]} ({first[1]}, seeds "
                  f"{','.join(map(str, common))}): " + "; ".join(parts))


if __name__ == "__main__":
    main()
