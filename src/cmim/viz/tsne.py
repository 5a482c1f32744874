"""t-SNE of test-set features, one panel per encoder, colored by class, with k-NN and linear-probe top-1 in
each title: MimCo's linear-separability argument, made visible.

The numbers come from result JSONs already written by ``cmim eval`` for the same weights and feature when
every panel has both (the titles say "eval"); otherwise all panels are measured here the same way, on the
cached features of the train/test subsets (the titles say "quick"), so panels are always comparable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cmim.core.distributed import resolve_device
from cmim.core.knn import knn_accuracy
from cmim.eval.feature_cache import cached_features
from cmim.eval.linear import linear_on_features
from cmim.eval.loading import EncoderSource
from cmim.viz.common import new_figure, save_figure

__all__ = ["embed_2d", "find_results", "plot_tsne", "quick_scores"]


def find_results(src: EncoderSource, feature: str) -> dict[str, dict[str, Any]]:
    """Latest eval JSON per protocol (knn, linear) for exactly these weights and this feature."""
    found: dict[str, dict[str, Any]] = {}
    folder = Path(src.path).resolve().parent / "eval"
    for p in sorted(folder.glob("*.json"), key=lambda q: q.stat().st_mtime) if folder.is_dir() else []:
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        c, f = r.get("checkpoint", {}), r.get("features", {})
        same = (c.get("sha256") == src.sha256 and f.get("encoder") == src.which and f.get("init") == src.init
                and f.get("feature") == feature)
        if same and r.get("protocol") in ("knn", "linear"):
            found[r["protocol"]] = r
    return found


def quick_scores(src: EncoderSource, cfg: DictConfig) -> dict[str, float]:
    """k-NN (k=20) and a cached-feature linear probe on the configured subsets."""
    trf, trl, _ = cached_features(src, cfg, "train")
    tef, tel, _ = cached_features(src, cfg, "test")
    out = {"knn": knn_accuracy(trf, trl, tef, tel, k=20, temperature=cfg.knn.temperature)["top1"]}
    lin = OmegaConf.merge(cfg.linear, {"epochs": min(int(cfg.linear.epochs), 30)})
    res = linear_on_features(trf, trl, tef, tel, lin, seed=cfg.seed, device=resolve_device(cfg.device, key="device"))
    out["linear"] = res["top1"]
    out["n_train"], out["n_test"] = len(trl), len(tel)
    return out


def embed_2d(feats: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE (PCA init, perplexity <= 30 and below a quarter of the points) to 2-D; exact gradients for a few
    hundred points (Barnes-Hut's per-iteration overhead dominates there), Barnes-Hut above."""
    from sklearn.manifold import TSNE

    n = feats.shape[0]
    perplexity = float(max(2.0, min(30.0, (n - 1) / 4)))
    method = "exact" if n <= 300 else "barnes_hut"
    return TSNE(n_components=2, init="pca", perplexity=perplexity, method=method,
                random_state=seed).fit_transform(feats)


def plot_tsne(sources: list[tuple[str, EncoderSource]], cfg: DictConfig, out: str | os.PathLike,
              n_points: int = 2000, class_names: list[str] | None = None) -> Path:
    """Side-by-side t-SNE panels of the first ``n_points`` (evenly spaced) test samples."""
    cols = len(sources)
    found = [find_results(src, cfg.feature) for _, src in sources]
    use_eval = all("knn" in f and "linear" in f for f in found)
    fig, axes = new_figure(1, cols, (4.6 * cols, 4.8))
    scatter = None
    for ax, (name, src), res in zip(axes, sources, found):
        tef, tel, _ = cached_features(src, cfg, "test")
        step = max(1, len(tel) // n_points)
        f, y = tef[::step][:n_points].numpy(), tel[::step][:n_points].numpy()
        xy = embed_2d(f / np.linalg.norm(f, axis=1, keepdims=True).clip(1e-12), seed=cfg.seed)
        scatter = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab10" if y.max() < 10 else "tab20", s=4,
                             vmin=0, vmax=max(9, int(y.max())))
        if use_eval:
            k, lin = res["knn"], res["linear"]
            score = (f"k-NN {k['top1']:.1f}% | linear {lin['top1']:.1f}% (eval, "
                     f"{k['features']['test_samples']} test)")
        else:
            q = quick_scores(src, cfg)
            score = f"k-NN {q['knn']:.1f}% | linear {q['linear']:.1f}% (quick, {q['n_train']} train)"
        ax.set_title(f"{name}\n{score}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if scatter is not None and class_names:
        handles = [
            axes[0].scatter([], [], color=scatter.cmap(scatter.norm(i)), s=12, label=n)
            for i, n in enumerate(class_names)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(class_names), 10), fontsize=7,
                   frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"t-SNE of {cfg.feature}-pooled test features ({cfg.data.name})", fontsize=10)
    return save_figure(fig, out)
