"""Training curves from ``metrics.jsonl``: loss, learning rate, EMA momentum, online k-NN, gradient norm and
throughput, one panel each, several runs overlaid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cmim.engine.logger import read_metrics
from cmim.viz.common import new_figure, save_figure

__all__ = ["PANELS", "load_curves", "plot_curves"]

# (record kind, key, panel title)
PANELS: list[tuple[str, str, str]] = [
    ("train", "loss", "pre-training loss"),
    ("train", "lr", "learning rate"),
    ("train", "momentum", "EMA momentum"),
    ("knn", "knn_top1", "online k-NN top-1 (%)"),
    ("train", "grad_norm", "gradient norm (before clipping)"),
    ("train", "img_per_s", "throughput (img/s)"),
]


def metrics_path(run: str | os.PathLike) -> Path:
    p = Path(run)
    p = p / "metrics.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no metrics log at {p} (expected RUN_DIR/metrics.jsonl)")
    return p


def load_curves(run: str | os.PathLike) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """(kind, key) -> (steps, values); a resumed run's replayed steps keep their last record."""
    by_step: dict[tuple[str, str], dict[int, float]] = {}
    for rec in read_metrics(metrics_path(run)):
        kind, step = rec.get("kind", "train"), rec.get("step")
        if step is None:
            continue
        for k, v in rec.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "time", "epoch"):
                by_step.setdefault((kind, k), {})[int(step)] = float(v)
    return {key: (sorted(d), [d[s] for s in sorted(d)]) for key, d in by_step.items()}


def plot_curves(runs: list[str | os.PathLike], out: str | os.PathLike,
                labels: list[str] | None = None) -> Path:
    """One PNG with a panel per available metric; each run is one line."""
    curves = [load_curves(r) for r in runs]
    labels = labels or [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    panels = [p for p in PANELS if any((p[0], p[1]) in c for c in curves)]
    if not panels:
        raise FileNotFoundError(f"no plottable metrics in {', '.join(str(r) for r in runs)}")
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = new_figure(rows, cols, (4.2 * cols, 3.0 * rows))
    for ax, (kind, key, title) in zip(axes, panels):
        for c, label in zip(curves, labels):
            if (kind, key) in c:
                steps, values = c[(kind, key)]
                style: dict[str, Any] = {"marker": "o"} if kind == "knn" or len(steps) < 8 else {}
                ax.plot(steps, values, label=label, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if kind == "knn":
            for c in curves:
                if (kind, key) in c:
                    s, v = c[(kind, key)]
                    ax.annotate(f"{v[-1]:.1f}", (s[-1], v[-1]), textcoords="offset points", xytext=(4, 4),
                                fontsize=8)
    for ax in axes[len(panels):]:
        ax.axis("off")
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle("training curves: " + ", ".join(labels), fontsize=11)
    return save_figure(fig, out)
