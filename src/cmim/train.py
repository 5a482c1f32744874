"""``cmim pretrain`` as a library call: the engine's training loop with the online k-NN monitor and the
label-free health check."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

__all__ = ["pretrain", "print_pretrain_summary"]


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) pre-training with ``cfg`` (see :func:`cmim.config.load_config`); returns the summary
    that is also written to ``out_dir/summary.json``."""
    from cmim.engine.trainer import pretrain as run
    from cmim.eval.health import HealthMonitor
    from cmim.eval.monitor import KnnMonitor

    return run(cfg, callbacks=[KnnMonitor(cfg), HealthMonitor(cfg)])


def _evidence(first: dict, last: dict, pixels: dict | None) -> list[str]:
    """The linear-probe line (when the monitor ran one) and the verdict: what pre-training gained."""
    out = []
    probes = [("k-NN", "knn_top1")]
    if "linear_top1" in first and "linear_top1" in last:
        probes.append(("linear", "linear_top1"))
        base = f"raw pixels {pixels['linear_top1']:.2f}% | " if pixels and "linear_top1" in pixels else ""
        out.append(f"linear probe top-1 (same images): {base}random init {first['linear_top1']:.2f}% -> "
                   f"pre-trained {last['linear_top1']:.2f}%")
    gains = [f"{last[k] - first[k]:+.2f} ({name})" for name, k in probes]
    text = f"verdict: pre-training gained {' / '.join(gains)} points over random init"
    if pixels:
        over = [f"{last[k] - pixels[k]:+.2f}" for _, k in probes if k in pixels]
        text += f" and {' / '.join(over)} over raw pixels"
    out.append(text)
    return out


def print_pretrain_summary(summary: dict) -> None:
    """The run in one or two lines; unreadable images skipped are named on the last one, where users look."""
    knn = summary.get("knn") or []
    pixels = summary.get("knn_raw_pixels")
    speed = summary.get("img_per_s")
    lines = [f"cmim: {summary['method']} finished {summary['steps']}/{summary['total_steps']} steps"
             + (f", {speed:.1f} img/s" if speed else "") + f"; checkpoint: {summary['checkpoint']}"]
    if knn:
        first, last = knn[0], knn[-1]
        base = f"raw pixels {pixels['knn_top1']:.2f}% | " if pixels else ""
        if first["step"] == 0 and len(knn) > 1:
            lines.append(f"k-NN top-1 (k={first.get('k', 20)}, same images): {base}random init "
                         f"{first['knn_top1']:.2f}% -> pre-trained {last['knn_top1']:.2f}% ({last['encoder']}, "
                         f"{last['feature']} features, epoch {last['epoch']})")
            lines.extend(_evidence(first, last, pixels))
        else:
            lines.append(f"k-NN top-1: {base}{last['encoder']} {last['feature']} features {last['knn_top1']:.2f}% "
                         f"at epoch {last['epoch']}")
    n_skipped = int(summary.get("skipped_images") or 0)
    if n_skipped:
        lines[-1] += (f"; {n_skipped} unreadable image{'s' if n_skipped != 1 else ''} skipped "
                      f"(listed in {summary.get('skipped_list')})")
    print("\n".join(lines))
