"""How a method is laid out over the processes of a run: one copy per process (DDP) or sharded (FSDP2).

``train.strategy=ddp`` keeps a full copy of every weight, gradient and AdamW moment on each process and
all-reduces the gradients. ``train.strategy=fsdp`` shards them (``torch.distributed.fsdp.fully_shard``): each
transformer block, each encoder, each head and then the whole method is a unit whose parameters are gathered
just before it runs and freed after, so a process holds 1/N of the state plus the unit at work. The units are
found by type (every :class:`~cmim.models.MaskedEncoder` and its blocks, every :class:`~cmim.models.MLPHead`),
so an EMA teacher, a deep copy of its student, is sharded exactly like it and the EMA stays a local update of
matching shards (the method checks it: :meth:`~cmim.methods.base.Method.check_layout`).

Other rules of a sharded run, and where they are kept:

- mixed precision on GPUs: blocks and encoders compute with bf16 parameters and reduce gradients in fp32; the
  heads keep fp32 parameters (their BatchNorm mixes batch statistics with fp32 running buffers). On CPU no
  policy is set (bf16 BatchNorm parameters fail there); autocast does what it does under DDP;
- BatchNorm running statistics are buffers, which FSDP neither shards nor broadcasts: with the heads' global
  BatchNorm (``train.sync_bn``) every process computes the same ones; with per-process BatchNorm each keeps its
  own and checkpoints hold rank 0's, as DDP (which broadcasts rank 0's before each forward) does;
- the gradient norm for clipping is global across shards (``clip_grad_norm_`` on sharded gradients returns a
  replicated DTensor: :func:`cmim.engine.step.optimizer_update` takes its local value);
- the optimizer is built after sharding, over the sharded parameters;
- activation checkpointing (``train.grad_checkpointing``) is switched on before sharding, under both strategies.

A single process (no torchrun) is never wrapped: ``strategy`` changes nothing there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cmim.core.distributed import DistInfo
from cmim.core.precision import resolve_precision
from cmim.methods import Method
from cmim.models import MaskedEncoder, MLPHead

__all__ = ["Layout", "enable_grad_checkpointing", "gathered_encoder", "lay_out"]


@dataclass
class Layout:
    """The method as the step runs it: ``model`` (what the forward calls), ``no_sync`` (a context in which a
    backward does not reduce gradients: accumulation micro-batches) and whether the parameters are sharded."""

    model: nn.Module
    strategy: str  # "single" | "ddp" | "fsdp"
    no_sync: Callable[[], AbstractContextManager] | None = None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def enable_grad_checkpointing(method: nn.Module) -> int:
    """Recompute every encoder block's activations in backward (each encoder's own flag); returns how many
    encoders. Teachers run without autograd, so their flag costs nothing."""
    encoders = [m for m in method.modules() if isinstance(m, MaskedEncoder)]
    for enc in encoders:
        enc.set_grad_checkpointing(True)
    return len(encoders)


def _fsdp_units(method: nn.Module) -> Iterator[tuple[nn.Module, bool]]:
    """(module, is_head) in the order they are sharded: inner units before the units that hold them."""
    for m in list(method.modules()):
        if isinstance(m, MaskedEncoder):
            for blk in m.backbone.blocks:
                yield blk, False
            yield m, False
        elif isinstance(m, MLPHead):
            yield m, True


def shard(method: nn.Module, dist: DistInfo, precision: str) -> nn.Module:
    """FSDP2 over all processes: blocks, encoders and heads, then the method as the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    body: dict[str, Any] = {"mesh": mesh}
    heads: dict[str, Any] = {"mesh": mesh}
    if dist.device.type == "cuda" and resolve_precision(precision, dist.device) == "bf16":
        body["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        heads["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for unit, is_head in _fsdp_units(method):
        fully_shard(unit, **(heads if is_head else body))
    fully_shard(method, **body)
    return method


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def lay_out(method: Method, dist: DistInfo, strategy: str, precision: str) -> Layout:
    """Wrap (DDP) or shard (FSDP) ``method`` for a multi-process run; unchanged on a single process.
    Call after moving it to its device and converting its BatchNorm, before building the optimizer."""
    if not dist.enabled:
        return Layout(method, "single")
    if strategy == "fsdp":
        shard(method, dist, precision)
        method.check_layout()
        return Layout(method, "fsdp", lambda: _fsdp_no_sync(method))
    ids = [dist.local_rank] if dist.device.type == "cuda" else None
    ddp = DDP(method, device_ids=ids)
    return Layout(ddp, "ddp", ddp.no_sync)


# --- a whole encoder for evaluation (checkpoints gather their state in cmim.engine.checkpoint) ----------------


def gathered_encoder(encoder: MaskedEncoder, layout: Layout, is_main: bool) -> MaskedEncoder | None:
    """The encoder as one plain module for evaluation on rank 0 (the online monitors). Unsharded: the encoder
    itself. Sharded: a collective that gathers its weights to rank 0, which gets an unsharded copy (eval mode,
    on the encoder's device); the other processes get None."""
    if not layout.sharded:
        return encoder
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(encoder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    with torch.random.fork_rng():  # building the copy draws an init that is overwritten: leave the RNG alone
        copy = MaskedEncoder(encoder.timm_name, encoder.timm_kwargs)
    copy.load_state_dict(state)
    return copy.to(encoder.mask_token.device).eval()
