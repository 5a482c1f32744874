"""torch.distributed set-up for torchrun launches (single- and multi-node); gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cmim.core.choices import Choice
from cmim.core.errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: bool = False  # this process joined a process group (any torchrun launch, one process included)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Distributed training is on: the model is wrapped in DDP and steps agree through collectives."""
        return self.group


class DeviceChoice(Choice):
    """``train.device``: "auto" (CUDA when there is one) | "cpu" | "cuda"."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(Choice):
    """``train.strategy`` of multi-process runs: "ddp" keeps a full copy of the state on every process; "fsdp"
    shards weights, gradients and AdamW moments (FSDP2, per block; cmim.engine.layout)."""

    ddp = "ddp"
    fsdp = "fsdp"


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """"auto" | "cpu" | "cuda" -> the device (cuda: this process's GPU, made current); ``key`` names the
    config value in the one-line error when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: cuda requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """torchrun's store (``env://``), with keys of this attempt only. A job restarted by torchrun
    (``--max-restarts``) reuses its agent's store, where the lost attempt's keys (the processes' gloo addresses)
    remain; a new process reading them before their owner rewrites them connects to a dead process."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
    return dist.PrefixStore(f"cmim/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun, with one process too (so that a 1-GPU torchrun run
    takes the DDP path that a multi-GPU one takes); a plain ``python``/``cmim`` launch is a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    launched = launched_by_torchrun()  # torchrun sets TORCHELASTIC_RUN_ID, one process or many
    if launched and not dist.is_initialized():
        store = _attempt_store(rank, world_size)
        if device.type == "cuda":  # device_id: NCCL binds this GPU at once (no guessing in barrier())
            dist.init_process_group(backend="nccl", store=store, rank=rank, world_size=world_size, device_id=device)
        else:
            dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device, group=launched)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0 (no gradient: used for keys/targets)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def end_worker(code: int) -> None:
    """A torchrun worker whose command has finished (its process group left, its files written) ends here with
    ``code`` and skips the interpreter's teardown: under load a worker was seen to abort in it now and then
    (SIGABRT, "terminate called without an active exception", 1 run in 25 of a 2-process FSDP test), which
    torchrun reports as a failed worker and restarts. Output and log handlers are flushed first. Elsewhere:
    returns, and the process ends normally."""
    if not launched_by_torchrun():
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said on it
            pass
    os._exit(code)


def cleanup() -> None:
    """Leave the process group together: a process that tears gloo down while a peer is still sending to it can
    abort on exit ("terminate called without an active exception"), so all meet at a barrier first."""
    if is_dist():
        try:
            dist.barrier()
        except (RuntimeError, ValueError):  # a peer is already gone (an error path): nothing left to wait for
            pass
        dist.destroy_process_group()
