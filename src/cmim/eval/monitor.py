"""The online k-NN monitor of ``cmim pretrain``, a training callback: k-NN top-1 of the encoder on labeled
subsets before training and every few epochs, plus the raw pixels of the same images once (the level a
pre-trained encoder has to beat). Its history is kept in the checkpoint and ``summary.json``. Without labels or
without an eval split (one unlabeled folder) it says so once and measures nothing; the label-free health check
(:mod:`cmim.eval.health`) still runs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig
from torch.utils.data import Dataset
from tqdm import tqdm

from cmim.core.distributed import barrier
from cmim.core.errors import CheckpointError, ConfigError
from cmim.data.views import build_eval_dataset
from cmim.engine.callbacks import Callback
from cmim.eval.knn import online_knn, pixel_knn

if TYPE_CHECKING:
    from cmim.engine.trainer import Trainer

__all__ = ["KnnMonitor"]


def _linear_text(res: dict[str, Any]) -> str:
    return f", linear probe {res['linear_top1']:.2f}%" if "linear_top1" in res else ""


class KnnMonitor(Callback):
    """``cfg.monitor``: every ``every_epochs`` epochs (0: never), and at the start when ``at_start``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        self.pixel_knn: dict[str, Any] | None = None  # the raw-pixel baseline, measured once
        self._sets: tuple[Dataset, Dataset] | None = None
        self.skipped: str | None = None  # why k-NN cannot run on this data (said once)

    # --- hooks ------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, resumed: bool) -> None:
        mon = self.cfg.monitor
        if not resumed and mon.every_epochs > 0 and mon.at_start and trainer.step == 0:
            self.run(trainer)

    def on_epoch_end(self, trainer: Trainer) -> bool:
        mon, epochs = self.cfg.monitor, self.cfg.train.epochs
        if mon.every_epochs > 0 and (trainer.epoch % mon.every_epochs == 0 or trainer.epoch == epochs):
            self.run(trainer)
            return True  # keep the k-NN history with the weights
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"knn_history": self.history, "pixel_knn": self.pixel_knn}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        history = ckpt.get("knn_history", [])
        if not isinstance(history, list):
            raise CheckpointError("the checkpoint cannot be resumed: 'knn_history' is not a list")
        self.history = list(history)
        pix = ckpt.get("pixel_knn")
        self.pixel_knn = dict(pix) if isinstance(pix, dict) else None

    def summary(self) -> dict[str, Any]:
        return {"knn": self.history, "knn_raw_pixels": self.pixel_knn}

    def datasets(self) -> list[Dataset]:
        return list(self._sets or ())

    # --- the measurement --------------------------------------------------------------------------------
    def _labeled_sets(self) -> tuple[Dataset, Dataset] | None:
        """The train / eval sets, or None (said once) when there is no eval split or no label."""
        d = self.cfg.data
        if self._sets is None and self.skipped is None:
            try:
                sets = (build_eval_dataset(d, d.train_split), build_eval_dataset(d, d.eval_split))
            except ConfigError:
                raise
            except (FileNotFoundError, ValueError) as e:  # e.g. one unlabeled folder: no data.eval_split
                self.skipped = f"no eval split ({str(e).splitlines()[0]})"
            else:
                targets = getattr(sets[0].base, "targets", None)  # type: ignore[attr-defined]
                if targets is not None and len(targets) and (np.asarray(targets) < 0).all():
                    self.skipped = "the training images have no labels"
                else:
                    self._sets = sets
            if self.skipped is not None:
                tqdm.write(f"[k-NN] not measured: {self.skipped}")
        return self._sets

    def run(self, trainer: Trainer) -> None:
        cfg, mon = self.cfg, self.cfg.monitor
        encoder = trainer.eval_encoder(mon.encoder)  # every process: a sharded encoder is gathered for rank 0
        if trainer.dist.is_main and self._labeled_sets() is not None:
            assert encoder is not None
            assert self._sets is not None
            if mon.raw_pixels and self.pixel_knn is None:
                t0 = time.perf_counter()
                res = pixel_knn(*self._sets, cfg)
                if res:
                    self.pixel_knn = {"knn_top1": res["top1"], "knn_top5": res["top5"], "k": mon.k,
                                      "train_images": mon.train_subset, "seconds": time.perf_counter() - t0,
                                      **({"linear_top1": res["linear_top1"]} if "linear_top1" in res else {})}
                    tqdm.write(f"[k-NN] raw pixels: top-1 {res['top1']:.2f}%{_linear_text(res)} (the baseline, "
                               f"k={mon.k})")
            t0 = time.perf_counter()
            res = online_knn(encoder, *self._sets, cfg, trainer.device)
            if res:
                rec = {"epoch": trainer.epoch, "step": trainer.step, "knn_top1": res["top1"],
                       "knn_top5": res["top5"], "encoder": str(mon.encoder), "feature": mon.feature, "k": mon.k,
                       "seconds": time.perf_counter() - t0,
                       **({"linear_top1": res["linear_top1"]} if "linear_top1" in res else {})}
                self.history.append(rec)
                trainer.logger.log(trainer.step, {k: v for k, v in rec.items() if k != "step"}, kind="knn")
                tqdm.write(f"[k-NN] epoch {trainer.epoch} step {trainer.step}: top-1 {res['top1']:.2f}%"
                           f"{_linear_text(res)} ({mon.encoder}, {mon.feature} features, k={mon.k})")
        barrier()
