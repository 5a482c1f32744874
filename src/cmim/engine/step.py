"""One optimizer step, the same for ``cmim pretrain`` and ``cmim bench``.

A step takes ``accum_steps`` loaded micro-batches and, for each, moves it to the device, turns the crops and
drawn parameters into finished views (:class:`~cmim.data.augment.ViewMaker`, on the device), runs the method
under autocast and back-propagates (gradients reduced across processes on the last micro-batch only). Then it clips,
steps AdamW unless the step is non-finite (decided on the device, no host sync), puts BatchNorm statistics
back when it was, and calls the method's ``after_step`` (EMA teachers). Bookkeeping (logging, checkpoints,
counting skipped steps) is the caller's.

Model-side randomness (drop path, dropout) draws from torch's global generator, which every step re-seeds
from (seed, rank, step) (:func:`model_seed`): each process draws its own stochastic-depth masks, as the
reference's per-process seeds give, and a resumed run draws exactly what the uninterrupted one did. Data
randomness is separate: a function of (seed, epoch, sample index), drawn in the loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from cmim.core.precision import autocast
from cmim.data.augment import ViewMaker

__all__ = ["RunningStats", "StepResult", "TrainStep", "model_seed", "optimizer_update", "to_device"]


def model_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of optimizer step ``step`` on process ``rank`` (a 63-bit hash of the three)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] & (2**63 - 1))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def optimizer_update(optimizer: torch.optim.Optimizer, params: list[Tensor], clip_grad: float | None,
                     finite: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Clip (when set), step unless the step is non-finite, clear the gradients.

    Returns ``(grad_norm, ok)``, device tensors: the gradient norm before clipping, and whether it and
    ``finite`` (e.g. the loss is finite) hold. A step that is not ok changes nothing: parameters, AdamW moments
    and step counters stay bit-identical. Fused AdamW (the default) skips it on the device through its
    ``found_inf`` input (the mechanism GradScaler uses; 0 = update as usual), so no host sync is needed; the
    unfused optimizer has no such input and reads ``ok`` on the host (a sync on CUDA).
    """
    if clip_grad is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    if isinstance(grad_norm, DTensor):  # sharded gradients (FSDP): the global norm, replicated on every process
        grad_norm = grad_norm.to_local()
    ok = torch.isfinite(grad_norm)
    if finite is not None:
        ok = ok & finite
    if getattr(optimizer, "_step_supports_amp_scaling", False):  # fused: honours optimizer.found_inf
        optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif ok.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok


class RunningStats:
    """BatchNorm running statistics change in the forward, before the step is known to be finite: a copy is
    taken before each step and put back when the step is skipped (a device select, no host sync; bit-identical
    when the step is kept). Also the EMA teacher's, which normalizes in train mode."""

    def __init__(self, module: nn.Module) -> None:
        self.stats = [b for m in module.modules()
                      if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
                      for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [torch.empty_like(b) for b in self.stats]

    def save(self) -> None:
        if self.stats:
            torch._foreach_copy_(self.saved, self.stats)

    def keep_if(self, ok: Tensor) -> None:
        for b, saved in zip(self.stats, self.saved, strict=True):
            torch.where(ok, b, saved, out=b)


@dataclass
class StepResult:
    """Device tensors of one step (reading them is a host sync: do it on logging steps only)."""

    loss: Tensor  # mean over the micro-batches
    ok: Tensor  # False: the step was non-finite and skipped
    grad_norm: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)  # other scalars the method reports, e.g. loss_patch
    after_step: dict[str, float] = field(default_factory=dict)  # what after_step logged (e.g. momentum)


class TrainStep:
    """The training step of ``method`` (see the module docstring).

    ``model`` is what runs the forward: the method itself (sharded or not), its DDP wrapper, or a compiled one
    of either; ``no_sync`` a context in which backward does not reduce gradients (DDP's ``no_sync``, FSDP's
    gradient sync turned off; :class:`cmim.engine.layout.Layout`), used for all but the last micro-batch;
    ``all_processes`` turns this process's "finite" flag into the flag of all processes (a device
    all-reduce), so that every process skips or none.
    """

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer, view_maker: ViewMaker,
                 device: torch.device, *, accum_steps: int = 1, precision: str = "bf16",
                 clip_grad: float | None = None, model: Callable[..., dict[str, Tensor]] | None = None,
                 no_sync: Callable[[], AbstractContextManager] | None = None,
                 all_processes: Callable[[Tensor], Tensor] | None = None,
                 seed: int = 0, rank: int = 0, decoder: Callable[[dict[str, Any]], Tensor] | None = None) -> None:
        self.method = method
        self.optimizer = optimizer
        self.view_maker = view_maker
        self.device = device
        self.accum_steps = int(accum_steps)
        self.clip_grad = clip_grad
        self.model = model if model is not None else method  # not `or`: a compiled module has no __bool__
        self.no_sync = no_sync
        self.all_processes = all_processes or (lambda flag: flag)
        self.autocast = autocast(device, precision)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.running_stats = RunningStats(method)
        self.seed, self.rank = int(seed), int(rank)
        self.decoder = decoder

    def inputs(self, batch: dict[str, Any]) -> tuple[list[Tensor], Tensor | None]:
        """A loaded (device) batch -> the method's inputs: the finished views and the patch mask. ``decoder``
        (``data.decode=device``) first turns the batch's JPEG bytes into crops."""
        crops = self.decoder(batch) if self.decoder is not None else batch["crops"]
        return self.view_maker(crops, batch["aug"]), batch.get("mask")

    def forward(self, batch: dict[str, Any], model: Callable[..., dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor]:
        """The method's outputs on one device batch, under the step's autocast (no backward)."""
        views, mask = self.inputs(batch)
        with self.autocast:
            return (model if model is not None else self.model)(views, mask)

    def __call__(self, micro_batches: Iterable[dict[str, Any]], step: int, total_steps: int, lr: float,
                 model: Callable[..., dict[str, Tensor]] | None = None) -> StepResult:
        """Optimizer step number ``step + 1`` of ``total_steps`` at learning rate ``lr``, on ``accum_steps``
        host or device micro-batches. ``model`` overrides the forward (``cmim bench`` times eager against
        compiled)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        torch.manual_seed(model_seed(self.seed, self.rank, step))
        step_loss: Tensor | None = None
        extra: dict[str, Tensor] = {}
        self.running_stats.save()
        batches = iter(micro_batches)
        for a in range(self.accum_steps):
            batch = to_device(next(batches), self.device)
            last = a == self.accum_steps - 1
            sync = self.no_sync() if (self.no_sync is not None and not last) else contextlib.nullcontext()
            with sync:
                out = self.forward(batch, model)
                (out["loss"] / self.accum_steps).backward()
            part = out["loss"].detach() / self.accum_steps
            step_loss = part if step_loss is None else step_loss + part
            for k, v in out.items():
                if k != "loss" and torch.is_tensor(v) and v.ndim == 0:
                    extra[k] = extra.get(k, 0.0) + v.detach().float() / self.accum_steps
        assert step_loss is not None
        grad_norm, ok = optimizer_update(self.optimizer, self.params, self.clip_grad,
                                         finite=self.all_processes(torch.isfinite(step_loss)))
        self.running_stats.keep_if(ok)
        logged = self.method.after_step(step + 1, total_steps, ok)
        return StepResult(step_loss, ok, grad_norm, extra, logged)
