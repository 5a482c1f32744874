"""The label-free health check of ``cmim pretrain``, a training callback beside the k-NN monitor: the effective
rank, per-dimension std and mean cosine (:func:`cmim.core.health.embedding_health`) of the encoder's global
embedding (``monitor.encoder``, ``monitor.feature``) on a fixed set of images, before training and every
``monitor.every_epochs`` epochs. It needs no labels, so it also watches runs on unlabeled folders, where k-NN
cannot run.

The images: ``monitor.health_images`` of the held-out split (``data.eval_split``) when it exists, else of the
training split, chosen once with a fixed seed, so every measurement of a run sees the same images.

Collapse warning (one line), against the run's first measurement (the random-init or ``model.init_from``
encoder with ``monitor.at_start``; else the first epoch's), when any of:

- the effective rank fell under ``monitor.collapse_fraction`` (0.25) of its start value (dimensional collapse:
  the images spread over ever fewer directions);
- the feature std fell under that fraction of its start value (complete collapse: every image near one point);
- the mean cosine between different images rose above ``monitor.collapse_cosine`` (0.9) from at most that.

The rules are relative to the start because a random-init ViT is far from spread out already: its mean-pooled
features share one large common direction (mean cosine about 0.98 and an effective rank of about 4 of 32 for the
test suite's tiny ViT), which is no collapse. The first measurement is the reference and never warns.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from cmim.core.distributed import barrier
from cmim.core.errors import CheckpointError, ConfigError
from cmim.core.health import embedding_health
from cmim.data.views import build_eval_dataset
from cmim.engine.callbacks import Callback
from cmim.eval.extract import extract_features

if TYPE_CHECKING:
    from cmim.engine.trainer import Trainer

__all__ = ["HEALTH_SEED", "HealthMonitor", "collapse_reason"]

HEALTH_SEED = 0


def collapse_reason(rec: dict[str, Any], start: dict[str, Any], fraction: float, max_cosine: float) -> str | None:
    """Why ``rec`` looks collapsed next to the run's ``start`` record (None: it does not; the start never does)."""
    if rec is start:
        return None
    why = []
    if rec["eff_rank"] < fraction * start["eff_rank"]:
        why.append(f"effective rank {rec['eff_rank']:.2f} < {fraction:g} x its start {start['eff_rank']:.2f}")
    if rec["feat_std"] < fraction * start["feat_std"]:
        why.append(f"feature std {rec['feat_std']:.4f} < {fraction:g} x its start {start['feat_std']:.4f}")
    if rec["mean_cos"] > max_cosine >= start["mean_cos"]:
        why.append(f"mean cosine {rec['mean_cos']:.3f} > {max_cosine:g}, from {start['mean_cos']:.3f} at the start")
    return "; ".join(why) or None


class HealthMonitor(Callback):
    """``cfg.monitor``: every ``every_epochs`` epochs (0: never), and at the start when ``at_start``; off with
    ``monitor.health=false``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        self._set: Dataset | None = None
        self._held_out = False

    # --- hooks ------------------------------------------------------------------------------------------
    def _on(self) -> bool:
        mon = self.cfg.monitor
        return bool(mon.health) and mon.every_epochs > 0

    def on_train_start(self, trainer: Trainer, resumed: bool) -> None:
        if self._on() and not resumed and self.cfg.monitor.at_start and trainer.step == 0:
            self.run(trainer)

    def on_epoch_end(self, trainer: Trainer) -> bool:
        mon, epochs = self.cfg.monitor, self.cfg.train.epochs
        if self._on() and (trainer.epoch % mon.every_epochs == 0 or trainer.epoch == epochs):
            self.run(trainer)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"health_history": self.history}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        history = ckpt.get("health_history", [])
        if not isinstance(history, list):
            raise CheckpointError("the checkpoint cannot be resumed: 'health_history' is not a list")
        self.history = list(history)

    def summary(self) -> dict[str, Any]:
        return {"health": self.history}

    def datasets(self) -> list[Dataset]:
        return [self._set] if self._set is not None else []

    # --- the measurement --------------------------------------------------------------------------------
    def dataset(self) -> Dataset:
        """The fixed images: a seeded sample of the held-out split, or of the training split without one."""
        if self._set is None:
            d, n = self.cfg.data, int(self.cfg.monitor.health_images)
            try:
                ds, self._held_out = build_eval_dataset(d, d.eval_split), True
            except ConfigError:
                raise
            except (FileNotFoundError, ValueError):  # no held-out split (e.g. one unlabeled folder)
                ds, self._held_out = build_eval_dataset(d, d.train_split), False
            size = len(ds)
            idx = np.arange(size) if n >= size else np.random.default_rng(HEALTH_SEED).choice(size, n, replace=False)
            self._set = Subset(ds, np.sort(idx).tolist())
        return self._set

    def run(self, trainer: Trainer) -> None:
        cfg, mon = self.cfg, self.cfg.monitor
        encoder = trainer.eval_encoder(mon.encoder)  # every process: a sharded encoder is gathered for rank 0
        if trainer.dist.is_main:
            assert encoder is not None
            t0 = time.perf_counter()
            feats, _ = extract_features(encoder, self.dataset(), feature=mon.feature,
                                        mean=list(cfg.data.mean), std=list(cfg.data.std), device=trainer.device,
                                        batch_size=mon.batch_size, precision=cfg.train.precision)
            h = embedding_health(feats)
            rec: dict[str, Any] = {"epoch": trainer.epoch, "step": trainer.step, "eff_rank": h["eff_rank"],
                                   "feat_std": h["feat_std"], "mean_cos": h["mean_cos"], "images": h["images"],
                                   "dim": h["dim"], "held_out": self._held_out, "encoder": str(mon.encoder),
                                   "feature": mon.feature}
            start = self.history[0] if self.history else rec
            why = collapse_reason(rec, start, mon.collapse_fraction, mon.collapse_cosine)
            rec["collapsed"] = why is not None
            rec["seconds"] = time.perf_counter() - t0
            self.history.append(rec)
            trainer.logger.log(trainer.step, {k: v for k, v in rec.items() if k != "step"}, kind="health")
            where = "held-out" if self._held_out else "training"
            tqdm.write(f"[health] epoch {trainer.epoch} step {trainer.step}: effective rank {h['eff_rank']:.1f} "
                       f"(start {start['eff_rank']:.1f}, dim {h['dim']}), feature std {h['feat_std']:.3f} "
                       f"(spread: ~{h['dim'] ** -0.5:.3f}), mean cosine {h['mean_cos']:.3f} "
                       f"({h['images']} {where} images, {mon.encoder} {mon.feature})")
            if why is not None:
                tqdm.write(f"[health] WARNING: the embeddings may be collapsing at epoch {trainer.epoch} step "
                           f"{trainer.step} ({why}); if a k-NN still rises they only crowd together, otherwise "
                           f"check optim.lr, the EMA momentum and the views")
        barrier()
