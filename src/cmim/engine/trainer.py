"""The method-agnostic pre-training loop.

Its set-up (the method, the data pipeline the method asks for, DDP or FSDP under torchrun, AdamW with a
per-iteration cosine schedule, the step with bf16 autocast, gradient accumulation and clipping) is
:func:`cmim.engine.run.build_run`, which ``cmim bench`` times; the loop adds logging, callbacks (the online
k-NN monitor is one) and atomic, exactly-resumable checkpoints.
Nothing in it knows about a particular method: the method returns ``{"loss": ...}`` and updates its teachers
in ``after_step``; nor about evaluation, which callbacks bring.

Robust steps: a step whose loss or gradient norm is NaN/inf is skipped on the device (fused AdamW's
``found_inf``, a 0-weight EMA lerp, BatchNorm statistics put back; see :func:`optimizer_update`), counted
(``nonfinite_steps``), and ``train.max_nonfinite_steps`` of them in a row stop the run with a
:class:`~cmim.core.errors.TrainingError` before anything more is saved. A batch that cannot fit in memory
is refused before the first step (:mod:`cmim.engine.memory`).

Hot-loop rule: no ``.item()`` or other host syncs except on logging and checkpoint steps (the skip decision
stays on the device; only ``optim.fused=false`` reads it on the host).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmim.config import to_yaml
from cmim.core.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from cmim.core.errors import TrainingError
from cmim.core.io import atomic_write_text
from cmim.data.decode import collate_pretrain
from cmim.data.skips import all_reduce_skips, read_skip_list, skip_report, write_skip_list
from cmim.data.stats import resolve_auto_stats
from cmim.engine.callbacks import Callback
from cmim.engine.checkpoint import Checkpointer, RunState, run_state
from cmim.engine.layout import gathered_encoder
from cmim.engine.logger import MetricsLogger
from cmim.engine.memory import check_batch_fits, out_of_memory_error
from cmim.engine.run import all_processes, build_run
from cmim.engine.step import StepResult
from cmim.methods import Method
from cmim.models import MaskedEncoder

log = logging.getLogger("cmim")


def kill_step_for_test(rank: int) -> int | None:
    """Fault-injection hook of the tests (``CMIM_TEST_KILL_AT_STEP``, ``CMIM_TEST_KILL_RANK``, default 1): the step
    after which the process of that rank kills itself (SIGKILL: no clean-up, as a lost node), on the first attempt
    of a torchrun job only, so that the restarted job runs through; None (read once, at set-up) otherwise."""
    at = os.environ.get("CMIM_TEST_KILL_AT_STEP")
    if at is None or rank != int(os.environ.get("CMIM_TEST_KILL_RANK", "1")):
        return None
    return int(at) if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" else None


class StepStats:
    """What the loop keeps between logging steps, on the device (no host sync per step): the loss and other
    scalars summed over the window's finite steps, and the non-finite counters, read only on logging and
    checkpoint steps."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.extra_sums: dict[str, torch.Tensor] = {}
        self.bad_window = torch.zeros((), dtype=torch.long, device=device)  # skipped since the last read
        self.bad_run = torch.zeros_like(self.bad_window)  # the current run of consecutive skipped steps
        self.bad_worst = torch.zeros_like(self.bad_window)  # the longest such run
        self.new_window()

    def new_window(self) -> None:
        self.loss_sum.zero_()
        self.extra_sums = {}
        self.steps, self.bad_steps, self.t0 = 0, 0, time.perf_counter()

    def add(self, res: StepResult) -> None:
        """A skipped step adds nothing to the means and is counted, all on the device."""
        ok = res.ok
        self.loss_sum += torch.where(ok, res.loss, 0.0)
        for k, v in res.extra.items():
            self.extra_sums[k] = self.extra_sums.get(k, 0.0) + torch.where(ok, v, 0.0)
        bad = (~ok).long()
        self.bad_window += bad
        self.bad_run.add_(1).mul_(bad)  # consecutive non-finite steps: +1 after a bad one, 0 after a good one
        torch.maximum(self.bad_worst, self.bad_run, out=self.bad_worst)
        self.steps += 1

    def read_nonfinite(self) -> tuple[int, int]:
        """(steps skipped since the last read, the longest run of them so far): a host sync. ``ok`` is the same
        on every process, so these counts are too."""
        n_bad, worst = (int(x) for x in torch.stack([self.bad_window, self.bad_worst]).tolist())
        self.bad_window.zero_()
        self.bad_steps += n_bad
        return n_bad, worst

    def close_window(self) -> tuple[float | None, dict[str, float | None], int, float]:
        """Means over all processes and the window's finite steps: (loss, other scalars, steps, seconds);
        then a new window starts."""
        n_good = self.steps - self.bad_steps
        loss = all_reduce_mean(self.loss_sum).item() / n_good if n_good else None
        extra = {k: all_reduce_mean(self.extra_sums[k]).item() / n_good if n_good else None
                 for k in sorted(self.extra_sums)}
        out = (loss, extra, self.steps, time.perf_counter() - self.t0)
        self.new_window()
        return out


def encoder_meta(method: Method) -> dict[str, Any]:
    enc = method.encoder("teacher")
    return {"timm_name": enc.timm_name, "timm_kwargs": enc.timm_kwargs, "family": enc.family}


class Trainer:
    """A pre-training run of ``cfg``; ``callbacks`` (e.g. :class:`cmim.eval.monitor.KnnMonitor`) hook into it."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo | None = None,
                 callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.dist = dist_info or init_distributed(cfg.train.device)
        self.device = self.dist.device
        t = cfg.train
        self.out_dir = Path(t.out_dir)
        # data.mean/std=auto: the numbers, estimated once from the data, are what config.yaml and every checkpoint
        # hold (each process computes the same ones: a fixed sample, summed in the same order)
        self.data_stats = resolve_auto_stats(cfg.data)
        if self.data_stats is not None and self.dist.is_main:
            log.info("data.mean/std=auto: mean %s, std %s (from %d images of split %r)", self.data_stats["mean"],
                     self.data_stats["std"], self.data_stats["images"], self.data_stats["split"])
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "config.yaml", to_yaml(cfg))
        run = build_run(cfg, self.dist)
        assert run.train_set is not None and run.sampler is not None
        self.method, self.optimizer, self.layout = run.method, run.optimizer, run.layout
        self.model: torch.nn.Module = run.layout.model
        self.forward, self.view_maker, self.train_step = run.forward, run.view_maker, run.train_step
        self.train_set, self.sampler, self.schedule = run.train_set, run.sampler, run.schedule
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps, self.warmup_steps = self.schedule.total_steps, self.schedule.warmup_steps
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.nonfinite_steps = 0  # steps skipped because their loss or gradient norm was NaN/inf (whole run)
        self.logger = MetricsLogger(self.out_dir, enabled=self.dist.is_main, tensorboard=t.tensorboard)
        self.checkpointer = Checkpointer(self.out_dir, t.checkpoint_format, t.keep_checkpoints, self.dist)
        self.kill_at_step = kill_step_for_test(self.dist.rank)

    # --- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint: its position (step, epoch, batch in the epoch: the data and schedule
        position), the run it belongs to, and the skipped-step count."""
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "total_steps": self.total_steps, "world_size": self.dist.world_size,
                "config": to_yaml(self.cfg), "method": self.cfg.method, "encoder": encoder_meta(self.method),
                "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))

    def run_state(self, full: bool) -> RunState:
        """Everything a checkpoint holds (``full``: gathered for the single file; else sharded for DCP)."""
        return run_state(self, self.method, self.optimizer, self.callbacks, full)

    def checkpoint_path(self) -> Path:
        return self.checkpointer.default_path()

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.run_state, self.step)  # every process: sharded state is gathered or written

    def maybe_resume(self) -> bool:
        path = self.checkpointer.resume_path(self.cfg.train.resume)
        if path is None:
            return False
        self.checkpointer.restore(self.run_state, path)
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                     self.step_in_epoch)
        return True

    def eval_encoder(self, which: str) -> MaskedEncoder | None:
        """``method.encoder(which)`` as one module that rank 0 can evaluate alone (the online monitors). Every
        process must call it: under FSDP it gathers the shards (rank 0 gets a copy, the others None)."""
        return gathered_encoder(self.method.encoder(which), self.layout, self.dist.is_main)

    # --- robustness -------------------------------------------------------------------------------------
    def _nonfinite_error(self, worst: int, last_saved: int | None) -> TrainingError:
        where = (f"the last good checkpoint is {self.checkpoint_path()} (step {last_saved})" if last_saved is not None
                 else "no checkpoint was written yet")
        return TrainingError(f"{worst} consecutive non-finite steps (NaN/inf loss or gradients) by step {self.step} "
                             f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); stopped without "
                             f"saving: {where}; try a lower optim.lr or optim.clip_grad")

    def check_memory(self) -> None:
        """Refuse a batch that cannot fit before building one (estimate: :mod:`cmim.engine.memory`)."""
        t, nw = self.cfg.train, self.cfg.data.num_workers
        in_flight = (nw * 4 if nw > 0 else 0) + 1  # the loader's prefetch (prefetch_factor 4) + the batch in use

        def make_batch(n: int) -> dict[str, Any]:  # decoded crops (data.decode=device too): the estimate slices them
            return collate_pretrain([self.train_set.decoded_item(i % len(self.train_set)) for i in range(n)])

        def reduce_min(x: float) -> float:
            return float(all_processes(self.dist, torch.tensor(x, device=self.device) > 0.5))

        check_batch_fits(self.method, make_batch, lambda b: self.train_step.forward(b, self.method),
                         self.optimizer, self.device,
                         batch_size=t.batch_size, accum_steps=t.accum_steps, world_size=self.dist.world_size,
                         data_batches=in_flight * (2 if self.device.type == "cuda" else 1),  # pinned copies
                         processes_per_host=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                         reduce_min=reduce_min if self.dist.enabled else None)

    # --- training ---------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        nw = self.cfg.data.num_workers
        return DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=nw, collate_fn=collate_pretrain,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if nw > 0 else None,
                          generator=torch.Generator())  # keeps the global RNG untouched (exact resume)

    def train(self) -> dict[str, Any]:
        t = self.cfg.train
        resumed = self.maybe_resume()
        if t.check_memory and self.step < self.total_steps:
            self.check_memory()
        for cb in self.callbacks:
            cb.on_train_start(self, resumed)
        stop = False
        self.train_seconds = 0.0
        start_step = self.step
        self.model.train()
        stats = StepStats(self.device)
        last_saved = self.step if resumed else None
        while self.epoch < t.epochs and not stop:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            self.train_set.set_epoch(self.epoch)
            it = iter(self._loader())
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                       disable=not (self.dist.is_main and t.progress), dynamic_ncols=True, leave=False)
            stats.new_window()
            while self.step_in_epoch < self.steps_per_epoch:
                lr = self.schedule(self.step)
                try:
                    res = self.train_step((next(it) for _ in range(t.accum_steps)), self.step, self.total_steps, lr)
                except torch.OutOfMemoryError:
                    raise out_of_memory_error(self.device, t.batch_size, t.accum_steps, self.dist.world_size,
                                              step=self.step + 1) from None
                stats.add(res)
                self.step += 1
                self.step_in_epoch += 1
                bar.update(1)
                end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                stop = t.max_steps is not None and self.step >= t.max_steps
                log_now = self.step % t.log_every_steps == 0 or end_of_epoch or stop
                save_now = bool(t.ckpt_every_steps and self.step % t.ckpt_every_steps == 0) or end_of_epoch or stop
                if log_now or save_now:  # the host syncs, on logging and checkpoint steps only
                    n_bad, worst = stats.read_nonfinite()
                    self.nonfinite_steps += n_bad
                if log_now:
                    self._log(stats, res, lr, bar)
                if (log_now or save_now) and worst >= t.max_nonfinite_steps:
                    # nothing is saved from here on: the checkpoint on disk is the last good one
                    bar.close()
                    self.logger.close()
                    raise self._nonfinite_error(worst, last_saved)
                if end_of_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                if save_now:
                    self.save_checkpoint()
                    last_saved = self.step
                if self.step == self.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop or end_of_epoch:
                    break
            bar.close()
            del it
            if self.step_in_epoch == 0 and any([cb.on_epoch_end(self) for cb in self.callbacks]):
                self.save_checkpoint()  # keep what the callbacks measured with the weights
                last_saved = self.step
        return self._finish(resumed, self.step - start_step)

    def _log(self, stats: StepStats, res: StepResult, lr: float, bar: Any) -> None:
        """One metrics record: the window's means, the step's learning rate, what after_step reported."""
        loss, extra, steps, dt = stats.close_window()
        self.train_seconds += dt
        rec = {"epoch": self.epoch, "loss": loss, "lr": lr,
               "img_per_s": steps * self.cfg.train.batch_size / dt, **res.after_step, **extra}
        norm = float(res.grad_norm)
        rec["grad_norm"] = norm if math.isfinite(norm) else None
        rec["nonfinite_steps"] = self.nonfinite_steps
        self.logger.log(self.step, rec)
        shown = f"{loss:.4f}" if loss is not None else "non-finite"
        bar.set_postfix(loss=shown, lr=f"{lr:.2e}", img_s=f"{rec['img_per_s']:.0f}")

    def _finish(self, resumed: bool, steps_done: int) -> dict[str, Any]:
        """Skipped images and the summary (``summary.json``)."""
        cfg, images_per_step, train_seconds = self.cfg, self.cfg.train.batch_size, self.train_seconds
        # unreadable / oversized images: counted and listed once for the whole run (all processes, the
        # monitor's sets, and before a resume), each warned about once when first met
        all_reduce_skips(self.train_set, self.device)
        skip_file = self.out_dir / "skipped.txt"
        read = [ds for cb in self.callbacks for ds in cb.datasets()]
        skipped = skip_report(self.train_set, *read) if self.dist.is_main else []
        if resumed and self.dist.is_main:
            skipped = sorted(dict(read_skip_list(skip_file) + skipped).items())
        summary = {
            "method": cfg.method, "steps": self.step, "epochs_done": self.epoch, "total_steps": self.total_steps,
            "train_seconds": train_seconds,
            "img_per_s": steps_done * images_per_step / train_seconds if train_seconds > 0 else None,
            **{k: v for cb in self.callbacks for k, v in cb.summary().items()},
            "checkpoint": str(self.checkpoint_path()),
            "skipped_images": len(skipped), "skipped_list": str(skip_file) if skipped else None,
            "nonfinite_steps": self.nonfinite_steps,
            "world_size": self.dist.world_size, "ddp": self.dist.enabled, "strategy": self.layout.strategy,
            **({"data_stats": self.data_stats} if self.data_stats is not None else {}),
        }
        if self.dist.is_main:
            write_skip_list(skip_file, skipped)
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        barrier()
        return summary


def pretrain(cfg: DictConfig, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run (or resume) a pre-training job; returns a summary dict (also written to out_dir/summary.json).
    ``cmim.train.pretrain`` is this with the online k-NN monitor."""
    trainer = Trainer(cfg, callbacks=callbacks)
    try:
        return trainer.train()
    finally:
        cleanup()
