"""The training step as ``cmim bench`` times it: the run :func:`cmim.engine.run.build_run` builds for training,
cycling over synthetic batches prepared in advance on the device, so that only the device work is timed."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate

from cmim.bench.timing import sync, timeit
from cmim.core.distributed import DistInfo
from cmim.data.synthetic import SyntheticDataset
from cmim.data.views import PretrainDataset
from cmim.engine.memory import check_batch_fits
from cmim.engine.run import build_run
from cmim.engine.step import to_device

__all__ = ["StepRunner", "count_host_syncs", "profile_table", "synthetic_batches"]


def synthetic_batches(cfg: DictConfig, method: Any, batch: int, count: int) -> list[dict[str, Tensor]]:
    """``count`` collated pre-training batches of procedural images, built by the recipe's own views."""
    d = cfg.data
    base = SyntheticDataset(batch * count, max(2, d.synthetic_classes), d.img_size, d.in_chans, seed=0)
    ds = PretrainDataset(base, method.view_spec(), d.img_size, d.crop_scale, d.crop_ratio, d.interpolation,
                         d.hflip_prob, seed=0)
    return [default_collate([ds[i] for i in range(k * batch, (k + 1) * batch)]) for k in range(count)]


class StepRunner:
    """The trainer's own step (:class:`cmim.engine.step.TrainStep`: views on the device, forward under autocast,
    backward per micro-batch, clip, fused AdamW, the non-finite skip, ``after_step``), built by the trainer's
    :func:`~cmim.engine.run.build_run` on one process, cycling over pre-built device batches."""

    def __init__(self, cfg: DictConfig, device: torch.device, total_steps: int = 10_000) -> None:
        t, d = cfg.train, cfg.data
        if any(isinstance(d[k], str) for k in ("mean", "std")):
            # data.mean/std=auto changes no timing: unit statistics stand in for the estimate a run makes first
            cfg = copy.deepcopy(cfg)
            for k in ("mean", "std"):
                if isinstance(cfg.data[k], str):
                    cfg.data[k] = [0.5] * d.in_chans
        self.cfg, self.device, self.total_steps = cfg, device, total_steps
        run = build_run(cfg, DistInfo(device=device), data=False, total_steps=total_steps)
        self.method, self.optimizer, self.forward = run.method, run.optimizer, run.forward
        self.view_maker, self.train_step, self._lr = run.view_maker, run.train_step, run.schedule
        self.method.train()
        self.accum = int(t.accum_steps)
        self.micro = t.batch_size // self.accum
        if t.check_memory:  # before building batches that cannot fit (the trainer's check; 2 batches kept)
            check_batch_fits(self.method, lambda n: synthetic_batches(cfg, self.method, n, 1)[0],
                             lambda b: self.train_step.forward(b, self.method), self.optimizer, device,
                             batch_size=t.batch_size, accum_steps=self.accum, data_batches=2)
        host = synthetic_batches(cfg, self.method, self.micro, 2)
        self.batches = [to_device(b, device) for b in host]
        self.step = 0
        self.loss = torch.zeros((), device=device)

    def run(self, forward: Callable[..., dict[str, Tensor]] | None = None) -> None:
        micro = (self.batches[(self.step * self.accum + a) % len(self.batches)] for a in range(self.accum))
        res = self.train_step(micro, self.step, self.total_steps, self._lr(self.step), model=forward)
        self.loss += res.loss
        self.step += 1

    def eager_step(self) -> None:
        self.run(self.method)

    def view_maker_seconds(self, reps: int) -> list[float]:
        """The on-device augmentation of one micro-batch, under the step's autocast as in the step."""
        batch = self.batches[0]

        def views() -> None:
            with self.train_step.autocast:
                self.train_step.inputs(batch)

        return timeit(views, self.device, reps)


def count_host_syncs(runner: StepRunner) -> int | None:
    """CUDA only: how many host-device synchronizations one step performs (0 is the goal)."""
    if runner.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(runner.device)
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_table(runner: StepRunner, steps: int, rows: int) -> str:
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            runner.run()
        sync(runner.device)
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
