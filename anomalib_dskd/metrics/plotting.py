"""Plots of sPRO curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomalib_dskd.metrics.spro_core import LocoResult, SproCurve, limit_key

_PRETTY = {"logical_anomalies": "logical anomalies", "structural_anomalies": "structural anomalies"}


def _plot_points(curve: SproCurve, x_max: float, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2n points of the curve for display (dense below ``x_max``)."""
    if curve.fpr.size <= 2 * n:
        return curve.fpr, curve.spro
    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, n), np.linspace(0.0, x_max, n)]))
    return grid, np.interp(grid, curve.fpr, curve.spro)


def plot_spro_curve(result: LocoResult, subset: str, highlight_limit: float = 0.05, title: str | None = None):  # noqa: ANN201
    """Figure with the sPRO curve of ``subset``: full range (left) and zoom on [0, 2 x limit] (right).

    The area that makes up AU-sPRO at ``highlight_limit`` is shaded; every integration limit is
    marked by a dotted line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curve = result.curves[subset]
    limits = result.integration_limits
    zoom = min(1.0, 2 * highlight_limit)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for ax, x_max in zip(axes, (1.0, zoom), strict=True):
        x, y = _plot_points(curve, zoom)
        ax.plot(x, y, color="tab:blue", lw=1.8, label="sPRO curve")
        shade = x <= highlight_limit
        xs = np.append(x[shade], highlight_limit)
        ys = np.append(y[shade], np.interp(highlight_limit, curve.fpr, curve.spro))
        auc = result.auc_spro[subset][limit_key(highlight_limit)] if limit_key(highlight_limit) in result.auc_spro[subset] else curve.auc(highlight_limit)
        ax.fill_between(xs, 0, ys, color="tab:blue", alpha=0.18, label=f"AU-sPRO@{highlight_limit:g} = {auc:.4f}")
        for limit in limits:
            if limit <= x_max and limit < 1.0:
                strong = bool(np.isclose(limit, highlight_limit))
                color = "tab:red" if strong else "0.4"
                ax.axvline(limit, color=color, ls="--" if strong else ":", lw=1.4 if strong else 1.0)
                ax.text(limit, 0.97, f"FPR {limit:g} ", color=color, rotation=90, ha="right", va="top", fontsize=8,
                        transform=ax.get_xaxis_transform())
        ax.set_xlim(0, x_max)
        ax.set_ylim(0, 1.04)
        ax.set_xlabel("false positive rate (defect-free pixels)")
        ax.set_ylabel("mean saturated per-region overlap (sPRO)")
        ax.grid(alpha=0.3)
    axes[0].set_title("full curve", fontsize=10)
    axes[1].set_title(f"zoom: FPR <= {zoom:g}", fontsize=10)
    table = "\n".join(f"AU-sPRO@{k}: {v:.4f}" for k, v in result.auc_spro[subset].items())
    axes[0].legend(loc="lower right", fontsize=9)
    axes[1].legend(loc="lower right", fontsize=9)
    axes[1].text(0.98, 0.22, table, transform=axes[1].transAxes, ha="right", va="bottom", fontsize=8, family="monospace",
                 bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.9})
    name = _PRETTY.get(subset, subset)
    heading = f"{title}: {name}" if title else name
    n_def = result.num_defects.get(subset, 0)
    n_img = result.num_images.get(subset, 0)
    fig.suptitle(
        f"{heading} + good  ({n_img} anomalous images, {n_def} defects, {result.num_images.get('good', 0)} good; "
        f"image AUROC {result.image_auroc.get(subset, float('nan')):.4f}; {result.method})",
        fontsize=10,
    )
    return fig


def save_spro_curves(
    result: LocoResult,
    output_dir: str | Path,
    highlight_limit: float = 0.05,
    title: str | None = None,
) -> list[Path]:
    """Write ``spro_curve_<subset>.png`` for every anomalous subset into ``output_dir``."""
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for subset in result.subsets:
        fig = plot_spro_curve(result, subset, highlight_limit=highlight_limit, title=title)
        path = output_dir / f"spro_curve_{subset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
