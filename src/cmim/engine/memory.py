"""Will a batch fit? A step's memory, estimated before the first training batch is built.

Why: a recipe's batch that does not fit either gets the process killed by the kernel (CPU: no error, no
message) or dies in the middle of a step (CUDA). Checking first turns both into one line with a suggestion.

How the estimate is made (the same way on CPU and CUDA): the activation memory is *measured*, not modelled.
The real method runs its forward (train mode, the step's autocast, eager) on micro-batches of 2, 3 and 4
images while a saved-tensors hook adds up the storages autograd keeps for backward (parameters and buffers
excluded). Three points fit ``bytes(b) = c + l*b + q*b^2``: ``c`` holds batch-independent tensors (autocast
weight copies), ``q`` in-batch similarity matrices (contrastive losses). Autograd's saved tensors are what a
step holds at its peak, except for backward's transients (gradients of activations, kernel workspaces) and
forward temporaries that are not saved; :data:`TRANSIENT_FACTOR` covers those, calibrated once on CPU against
the peak RSS of real forward+backward+AdamW steps (numbers at its definition). Gradients and AdamW moments
(3 x trainable parameters, when not yet allocated) and the data loader's batches in flight are added.

The probe costs three small forward passes (milliseconds for test models; measured 1.7 s for ViT-S and 3.5 s
for ViT-B at 224 px on 2 busy CPU cores); it leaves the RNGs and every buffer (BatchNorm statistics) exactly as
they were, so a run is bit-identical with or without it (``train.check_memory=false`` turns it off).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cmim.core.errors import TrainingError

log = logging.getLogger("cmim")

#: Peak step memory / autograd's saved tensors. Calibrated once on CPU (2 cores, torch 2.14, ConMIM ViT-S/16 at
#: 224 px, synthetic batches, one fresh process per point): the peak RSS increase over one forward + backward
#: + fused AdamW step, minus gradients and moments (3 x parameters), divided by the saved-tensor bytes of the
#: same micro-batch, was 0.90 / 0.98 / 1.19 / 1.03 at 16 / 32 / 64 / 128 images in bf16 and 1.00 / 1.14 at
#: 16 / 32 in fp32 (below 1 at 4 images: the allocator reuses memory freed while building the model). 1.25 is
#: above every point. Not calibrated on CUDA (the caching allocator adds fragmentation); there a step's
#: OutOfMemoryError still ends in one line (:func:`out_of_memory_error`).
TRANSIENT_FACTOR = 1.25

#: AdamW keeps two tensors the size of each trained parameter (exp_avg, exp_avg_sq)
ADAMW_STATES = 2

_GB = 1e9
PROBE_SIZES = (2, 3, 4)  # micro-batches of the probe


@dataclass
class StepMemory:
    """Bytes a step needs as a function of the per-process micro-batch ``b``."""

    constant: float  # batch-independent saved tensors (autocast weight copies)
    linear: float  # saved-tensor bytes per image
    quadratic: float  # in-batch similarity matrices
    state: float  # gradients and optimizer moments not yet allocated
    data_per_image: float  # host bytes of one image's batch entry (uint8 crops, masks, parameters)

    def activations(self, b: int) -> float:
        return TRANSIENT_FACTOR * (self.constant + self.linear * b + self.quadratic * b * b)

    def need(self, b: int, data_batches: int) -> float:
        return self.activations(b) + self.state + self.data_per_image * b * data_batches


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of a sharded (FSDP) tensor, else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def saved_tensor_bytes(method: nn.Module, forward: Callable[[dict[str, Any]], Any], batch: dict[str, Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward in one ``forward`` of ``batch`` (the step's
    views and method under its autocast; no backward)."""
    own = {local_tensor(t).untyped_storage().data_ptr() for t in [*method.parameters(), *method.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in own:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(batch)
    total = sum(seen.values())
    del out
    return total


@contextlib.contextmanager
def _untouched(method: nn.Module, device: torch.device):
    """Restore the RNGs and every buffer afterwards: the probe must not change what training does."""
    buffers = [(b, b.detach().clone()) for b in method.buffers()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def fit_activations(method: nn.Module, make_batch: Callable[[int], dict[str, Any]],
                    forward: Callable[[dict[str, Any]], Any], device: torch.device) -> StepMemory:
    """Measure the method's saved tensors on micro-batches of 2, 3 and 4 images (2: BatchNorm needs more than
    one sample per channel in train mode) and fit ``c + l*b + q*b^2`` through the three points (no state)."""
    sizes = PROBE_SIZES
    host = make_batch(sizes[-1])
    data_per_image = sum(v.nbytes for v in host.values() if torch.is_tensor(v)) / sizes[-1]
    s = []
    with _untouched(method, device):
        for n in sizes:
            batch = {k: v[:n].to(device) if torch.is_tensor(v) else v for k, v in host.items()}
            s.append(float(saved_tensor_bytes(method, forward, batch)))
    (x0, x1, x2), (s0, s1, s2) = sizes, s
    d01, d12 = (s1 - s0) / (x1 - x0), (s2 - s1) / (x2 - x1)
    q = max(0.0, (d12 - d01) / (x2 - x0))
    lin = max(0.0, d01 - q * (x0 + x1))
    const = max(0.0, s0 - lin * x0 - q * x0 * x0)
    return StepMemory(const, lin, q, 0.0, data_per_image)


def estimate_step_memory(method: nn.Module, make_batch: Callable[[int], dict[str, Any]],
                         forward: Callable[[dict[str, Any]], Any], optimizer: torch.optim.Optimizer,
                         device: torch.device) -> StepMemory:
    """:func:`fit_activations` plus the gradients and AdamW moments not allocated yet (this process's share:
    a sharded parameter's gradient and moments are sharded like it)."""
    est = fit_activations(method, make_batch, forward, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = sum(local_tensor(p).numel() * p.element_size() for p in params if p.grad is None)
    state += sum(ADAMW_STATES * local_tensor(p).numel() * p.element_size() for p in params
                 if not optimizer.state.get(p))
    est.state = float(state)
    return est


@dataclass
class DeviceMemory:
    """Bytes per device of a training step, by kind (a planning estimate: :func:`device_memory`)."""

    weights: float  # fp32 trained weights and EMA/frozen teachers
    gradients: float
    optimizer: float  # AdamW moments
    gathered: float  # FSDP: units gathered for compute and gradients before their reduce-scatter
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations


def device_memory(trained: int, frozen: int, largest_unit: int, acts: StepMemory, batch: int, *,
                  shards: int = 1, compute_bytes: int = 2) -> DeviceMemory:
    """Memory per device of a step on ``batch`` images per device, from parameter counts (``trained``: with
    gradients and AdamW moments; ``frozen``: EMA or frozen teachers) and measured activations ``acts``.

    ``shards`` > 1 (FSDP over that many devices): weights, gradients and moments are divided by it; the units
    in flight are added (two ``largest_unit``s gathered in ``compute_bytes`` per value, the one at work and the
    one prefetched, and one unit's fp32 gradients before their reduce-scatter), and the batch-independent
    activations are left out: they are the compute copies of the weights autocast keeps for backward, which
    FSDP frees after each unit's forward and gathers again for its backward."""
    fp32 = 4
    return DeviceMemory(
        weights=fp32 * (trained + frozen) / shards,
        gradients=fp32 * trained / shards,
        optimizer=ADAMW_STATES * fp32 * trained / shards,
        gathered=(2 * compute_bytes + fp32) * largest_unit if shards > 1 else 0.0,
        activations=TRANSIENT_FACTOR * ((acts.constant if shards == 1 else 0.0) + acts.linear * batch
                                        + acts.quadratic * batch * batch),
    )


def _cgroup_available() -> float | None:
    """cgroup v2 limit minus non-reclaimable usage (containers: MemAvailable shows the host's memory)."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        current = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        return int(limit) - (current - int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        return None


def host_available_bytes() -> float | None:
    """Memory a new allocation can get without swapping or the OOM killer: MemAvailable (and the cgroup)."""
    avail = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = float(line.split()[1]) * 1024
                break
    if avail is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            avail = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    cg = _cgroup_available()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return avail


def device_available_bytes(device: torch.device) -> float | None:
    """Free memory of the step's device: CUDA free memory plus this process's cached, unused blocks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return host_available_bytes()
    return None


def suggestion(batch_size: int, accum_steps: int, world_size: int, fits: int) -> str:
    """``try train.batch_size=X or train.accum_steps=Y`` for the largest per-process micro-batch that fits."""
    if fits < 1:
        return "not even one image per process fits; use a smaller model, image size or train.precision=bf16"
    unit = world_size * accum_steps
    bs = unit * 2 ** (fits.bit_length() - 1)  # a power of two when the unit is one
    options = [f"train.batch_size={bs}"] if bs < batch_size else []
    for a in range(accum_steps + 1, batch_size // world_size + 1):
        if batch_size % (world_size * a) == 0 and batch_size // (world_size * a) <= fits:
            options.append(f"train.accum_steps={a}")
            break
    return "try " + " or ".join(options) if options else "use a smaller batch"


def _size(n: float) -> str:
    """61 GB, 1.5 GB, 340 MB, 0.25 MB: two significant digits are all an estimate has."""
    if n >= 10 * _GB:
        return f"{n / _GB:.0f} GB"
    if n >= _GB:
        return f"{n / _GB:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.2g} MB"


def _largest_fit(fn: Callable[[int], float], avail: float, upper: int) -> int:
    lo, hi = 0, upper  # fn is non-decreasing; the largest b <= upper with fn(b) <= avail
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fn(mid) <= avail:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_batch_fits(method: nn.Module, make_batch: Callable[[int], dict[str, Any]],
                     forward: Callable[[dict[str, Any]], Any], optimizer: torch.optim.Optimizer,
                     device: torch.device, *, batch_size: int, accum_steps: int,
                     world_size: int = 1, data_batches: int = 1, processes_per_host: int = 1,
                     reduce_min: Callable[[float], float] | None = None) -> StepMemory:
    """Raise :class:`TrainingError` when a step of ``batch_size`` cannot fit; the estimate otherwise.

    ``data_batches``: host micro-batches alive at once (the loader's prefetch plus the one in use);
    ``processes_per_host``: processes sharing this host's RAM; ``reduce_min``: the minimum over processes (so
    that every process stops, or none)."""
    micro = batch_size // (world_size * accum_steps)
    est = estimate_step_memory(method, make_batch, forward, optimizer, device)
    host = host_available_bytes()
    checks: list[tuple[str, Callable[[int], float], float | None]] = []
    if device.type == "cpu":
        checks.append(("CPU RAM", lambda b: processes_per_host * est.need(b, data_batches), host))
    else:
        checks.append((f"{device.type.upper()} memory", lambda b: est.activations(b) + est.state,
                       device_available_bytes(device)))
        checks.append(("CPU RAM for the data loader",
                       lambda b: processes_per_host * est.data_per_image * b * data_batches, host))
    for what, need, avail in checks:
        here = avail is None or need(micro) <= avail
        everywhere = here if reduce_min is None else reduce_min(1.0 if here else 0.0) > 0.5
        if avail is not None:
            log.debug("memory: %d images per process and micro-batch need about %.2f GB of %s, %.2f GB available",
                      micro, need(micro) / _GB, what, avail / _GB)
        if everywhere:
            continue
        if here:
            raise TrainingError(f"a batch of {batch_size} does not fit in the {what} of another process (see its "
                                f"error line)")
        assert avail is not None  # (not here) implies a known amount
        fits = _largest_fit(need, avail, micro)
        per = f" ({micro} per process and micro-batch)" if micro != batch_size else ""
        raise TrainingError(
            f"a batch of {batch_size}{per} needs about {_size(need(micro))} of {what} (estimate), "
            f"{_size(avail)} are available; {suggestion(batch_size, accum_steps, world_size, fits)}")
    return est


def out_of_memory_error(device: torch.device, batch_size: int, accum_steps: int, world_size: int = 1,
                        step: int | None = None) -> TrainingError:
    """The one line for an OutOfMemoryError raised during a step (the estimate was too optimistic)."""
    micro = batch_size // (world_size * accum_steps)
    at = f" at step {step}" if step is not None else ""
    return TrainingError(f"out of {device.type.upper()} memory{at} with a batch of {batch_size} "
                         f"({micro} images per process and micro-batch); "
                         f"{suggestion(batch_size, accum_steps, world_size, max(1, micro // 2))}")
