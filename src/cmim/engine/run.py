"""The set-up of a training run, built once for ``cmim pretrain`` (:class:`~cmim.engine.trainer.Trainer`) and
``cmim bench``: what the bench times is then what training runs.

:func:`build_run` builds, in this order (the order fixes the initial weights and every draw, so it is kept):
the seed; the method on its device (identical weights on every process); the training data, which the method's
view spec shapes (the bench makes its own synthetic batches instead); the heads' global BatchNorm on a
multi-process run; activation checkpointing; the layout over processes (DDP or FSDP2,
:mod:`cmim.engine.layout`); AdamW over the laid-out (possibly sharded) parameters; ``torch.compile``; the
on-device views; the learning-rate schedule; the step (:class:`~cmim.engine.step.TrainStep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from omegaconf import DictConfig
from torch import Tensor, nn

from cmim.core.distributed import DistInfo
from cmim.core.host_memory import keep_freed_memory
from cmim.core.schedules import cosine_schedule, scaled_lr
from cmim.data.augment import ViewMaker
from cmim.data.decode import DeviceDecoder
from cmim.data.views import PretrainDataset, build_pretrain_dataset
from cmim.engine.layout import Layout, enable_grad_checkpointing, lay_out
from cmim.engine.sampler import GlobalBatchSampler
from cmim.engine.step import TrainStep
from cmim.methods import Method, build_method, method_spec
from cmim.models.sync_bn import convert_global_batchnorm

__all__ = ["LrSchedule", "Run", "build_optimizer", "build_run", "peak_lr"]


def peak_lr(cfg: DictConfig) -> float:
    return scaled_lr(cfg.optim.lr, cfg.optim.blr, cfg.train.batch_size)


def build_optimizer(method: nn.Module, cfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = method.param_groups(o.weight_decay)  # type: ignore[operator]
    fused = bool(o.fused) and device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=tuple(o.betas), eps=o.eps, fused=fused or None)


@dataclass(frozen=True)
class LrSchedule:
    """Per-iteration linear warm-up then cosine to ``min_lr``; called with the number of steps done."""

    peak: float
    min_lr: float
    total_steps: int
    warmup_steps: int

    def __call__(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.peak, self.min_lr, self.warmup_steps)


@dataclass
class Run:
    """Everything a step needs, built by :func:`build_run`."""

    cfg: DictConfig
    dist: DistInfo
    method: Method  # the method itself (under FSDP its sub-modules hold shards)
    layout: Layout  # layout.model is what the forward calls (the method, or its DDP wrapper)
    forward: nn.Module  # layout.model, compiled with train.compile
    optimizer: torch.optim.Optimizer
    view_maker: ViewMaker
    schedule: LrSchedule
    train_step: TrainStep
    train_set: PretrainDataset | None = None  # with data: the training set and its sampler
    sampler: GlobalBatchSampler | None = None

    @property
    def device(self) -> torch.device:
        return self.dist.device


def all_processes(dist: DistInfo, flag: Tensor) -> Tensor:
    """``flag`` on every process (a device all-reduce, no host sync): a step is skipped on all or none."""
    if not dist.enabled:
        return flag
    x = flag.to(torch.float32)
    tdist.all_reduce(x, op=tdist.ReduceOp.MIN)
    return x > 0.5


def build_run(cfg: DictConfig, dist: DistInfo, *, data: bool = True, total_steps: int | None = None) -> Run:
    """The run of ``cfg`` on this process. ``data``: also the training set and its sampler, which fix the
    schedule's length; without them (the bench) the schedule spans ``total_steps`` with no warm-up.
    ``cfg.data.mean/std`` must be numbers by now (``auto`` is resolved by the caller)."""
    t, d, device = cfg.train, cfg.data, dist.device
    if t.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(t.seed)  # identical initial weights on every process
    method = build_method(cfg).to(device)
    spec = method.view_spec()
    train_set = sampler = None
    if data:
        train_set = build_pretrain_dataset(d, d.train_split, spec, t.seed)
        sampler = GlobalBatchSampler(len(train_set), t.batch_size, world_size=dist.world_size, rank=dist.rank,
                                     accum_steps=t.accum_steps, seed=t.seed)
        total = t.epochs * sampler.steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * sampler.steps_per_epoch)
    else:
        if total_steps is None:
            raise ValueError("build_run without data needs total_steps")
        total, warmup = total_steps, 0
    sync_bn = t.sync_bn if t.sync_bn is not None else method_spec(cfg.method).sync_bn
    if dist.enabled and sync_bn:
        method = convert_global_batchnorm(method, device.type)  # type: ignore[assignment]
    if t.grad_checkpointing:
        enable_grad_checkpointing(method)
    layout = lay_out(method, dist, t.strategy, t.precision)
    optimizer = build_optimizer(method, cfg, device)
    forward = torch.compile(layout.model) if t.compile else layout.model
    view_maker = ViewMaker(spec, d.mean, d.std, d.in_chans).to(device)
    decoder = (DeviceDecoder(d.img_size, d.in_chans, device, train_set.decoded_item, d.interpolation)
               if train_set is not None and d.decode == "device" else None)
    train_step = TrainStep(method, optimizer, view_maker, device, accum_steps=t.accum_steps, precision=t.precision,
                           clip_grad=cfg.optim.clip_grad, model=forward, no_sync=layout.no_sync,
                           all_processes=lambda flag: all_processes(dist, flag), seed=t.seed, rank=dist.rank,
                           decoder=decoder)
    schedule = LrSchedule(peak_lr(cfg), cfg.optim.min_lr, total, warmup)
    return Run(cfg, dist, method, layout, forward, optimizer, view_maker, schedule, train_step, train_set, sampler)
