"""What a training checkpoint holds, piece by piece, and the one place that collects the pieces.

Each piece of a run says what it holds through torch's ``Stateful`` protocol (``state_dict`` /
``load_state_dict``): the trainer's progress, the method's modules (student, teachers, heads), the optimizer, the
RNGs, and the callbacks. A piece writes top-level entries of the checkpoint (the single-file layout: ``model``,
``optimizer``, ``rng``, ``step``, ...) and names the ones a resume needs in ``entries``; before anything is
restored, :meth:`RunState.check` finds every such entry and lets each piece check its own, so a refused
checkpoint leaves the run untouched.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` (full state dicts for the single
file, sharded ones for DCP): the same code serves a plain module, DDP (the method itself is passed, never its
wrapper) and FSDP2 (DTensor parameters). Their tensors are keyed by parameter name, so an optimizer state written
by one world size loads on another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cmim.core.errors import CheckpointError, first_line, load_error_detail
from cmim.core.weights import is_int
from cmim.engine.checkpoint.rng import RNGState

__all__ = ["CallbackState", "ModelState", "OptimizerState", "Part", "ProgressState", "RunState", "run_state",
           "state_options"]


class Part(Protocol):
    """A piece of the run in the checkpoint (a ``Stateful`` whose state is a dict of top-level entries)."""

    entries: tuple[str, ...]  # the entries a resume needs (checked present before anything is restored)

    def state_dict(self) -> dict[str, Any]: ...

    def check(self, ckpt: dict[str, Any]) -> None:
        """Raise CheckpointError (phrased to follow the checkpoint's path) if this piece cannot take ``ckpt``."""

    def load_state_dict(self, ckpt: dict[str, Any]) -> None: ...


def state_options(full: bool) -> StateDictOptions:
    """Full (gathered, on CPU, rank 0's) state for the single file; sharded (each process its own) for DCP."""
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if full else StateDictOptions()


def _is_count(x: Any) -> bool:
    return is_int(x) and x >= 0


class ProgressState:
    """The trainer's position: optimizer steps, epoch, batch within the epoch (the data position: the sampler skips
    that many global batches) and the schedule length it was made for, plus what identifies the run."""

    entries = ("step", "epoch", "step_in_epoch")

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def check(self, ckpt: dict[str, Any]) -> None:
        t = self.trainer
        if ckpt.get("method") != t.cfg.method:
            raise CheckpointError(f"was written by method {ckpt.get('method')!r}, not {t.cfg.method!r}")
        if ckpt.get("total_steps") != t.total_steps:
            raise CheckpointError(f"was made for a {ckpt.get('total_steps')}-step run, this one has "
                                  f"{t.total_steps} (epochs, batch size or dataset changed)")
        for key in self.entries:
            if not _is_count(ckpt[key]):
                raise CheckpointError(f"cannot be resumed: '{key}' is {ckpt[key]!r}, not a count")

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.trainer.load_state_dict(ckpt)


class ModelState:
    """The ``model`` entry: every module of the method (student, EMA / frozen teachers, heads, buffers)."""

    entries = ("model",)
    sharded = True

    def __init__(self, module: nn.Module, full: bool) -> None:
        self.module, self.options = module, state_options(full)

    def state_dict(self) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.module, options=self.options)}

    def check(self, ckpt: dict[str, Any]) -> None:
        sd = ckpt["model"]
        if not isinstance(sd, dict) or not sd:
            raise CheckpointError("is not a cmim checkpoint ('model' is not a state dict of tensors)")
        want = {k: tuple(v.shape) for k, v in self.module.state_dict().items()}  # global shapes (DTensor too)
        missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
        wrong = [k for k in want if k in sd and tuple(getattr(sd[k], "shape", ())) != want[k]]
        if missing or unexpected or wrong:
            detail = (f"size mismatch for {wrong[0]}: {tuple(sd[wrong[0]].shape)} in the checkpoint, "
                      f"{want[wrong[0]]} in this model" if wrong else
                      f"missing keys {missing[:3]}" if missing else f"unexpected keys {unexpected[:3]}")
            raise CheckpointError(f"does not fit this model configuration: {detail}")

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        try:
            set_model_state_dict(self.module, ckpt["model"], options=self.options)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"does not fit this model configuration: {load_error_detail(e)}") from None


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The optimizer's parameters by name, group by group (the names the state dicts use)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


class OptimizerState:
    """The ``optimizer`` entry: AdamW's moments and step counts keyed by parameter name, and its groups.

    Checked against this run's optimizer before it is loaded (torch's loader takes a misshapen state silently);
    a checkpoint from before names were used (state keyed by parameter index) is read by index order.
    """

    entries = ("optimizer",)
    sharded = True

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, full: bool) -> None:
        self.module, self.optimizer, self.options = module, optimizer, state_options(full)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": get_optimizer_state_dict(self.module, self.optimizer, options=self.options)}

    def _by_name(self, osd: dict[str, Any]) -> dict[str, Any]:
        """``osd`` with parameter names for keys (an index-keyed state is renamed in the optimizer's order)."""
        groups = osd["param_groups"]
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise CheckpointError(": its optimizer state does not fit this run's optimizer (a group without "
                                  "'params')")
        ids = [i for g in groups for i in g["params"]]
        if not ids or not all(is_int(i) for i in ids):
            return osd
        flat = [n for g in _param_names(self.module, self.optimizer) for n in g]
        if sorted(ids) != list(range(len(flat))) or not all(is_int(k) and k < len(flat) for k in osd["state"]):
            raise CheckpointError(f": its optimizer state does not fit this run's optimizer ({len(ids)} parameters "
                                  f"by index, this run has {len(flat)})")
        return {"state": {flat[k]: v for k, v in osd["state"].items()},
                "param_groups": [{**g, "params": [flat[i] for i in g["params"]]} for g in groups]}

    def check(self, ckpt: dict[str, Any]) -> None:
        osd = ckpt["optimizer"]
        if not isinstance(osd, dict) or not isinstance(osd.get("state"), dict) \
                or not isinstance(osd.get("param_groups"), list):
            raise CheckpointError("cannot be resumed: 'optimizer' is not an optimizer state dict")
        osd = self._by_name(osd)
        want = _param_names(self.module, self.optimizer)
        have = [list(g["params"]) for g in osd["param_groups"]]
        shapes = {n: p.shape for n, p in self.module.named_parameters()}

        def unfit(why: str) -> CheckpointError:
            return CheckpointError(f": its optimizer state does not fit this run's optimizer ({why})")

        if len(have) != len(want):
            raise unfit(f"{len(have)} parameter groups, this run has {len(want)}")
        for i, (h, w) in enumerate(zip(have, want, strict=True)):
            if sorted(map(str, h)) != sorted(w):
                extra = sorted(set(map(str, h)) - set(w))[:2]
                raise unfit(f"group {i} holds {len(h)} parameters, this run's {len(w)}"
                            + (f"; e.g. unknown {extra}" if extra else ""))
        for name, entry in osd["state"].items():
            if name not in shapes or not isinstance(entry, dict):
                raise unfit(f"state for unknown parameter {str(name)[:80]!r}")
            for key, value in entry.items():
                if torch.is_tensor(value) and value.ndim > 0 and value.shape != shapes[name]:
                    raise unfit(f"'{key}' of {name} has shape {tuple(value.shape)}, the parameter "
                                f"{tuple(shapes[name])}")
        ckpt["optimizer"] = osd

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        try:
            set_optimizer_state_dict(self.module, self.optimizer, ckpt["optimizer"], options=self.options)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f": its optimizer state does not fit this run's optimizer: "
                                  f"{first_line(e, 300)}") from None


class CallbackState:
    """A callback's entries (e.g. the k-NN monitor's history); its ``load_state_dict`` is its check."""

    entries: tuple[str, ...] = ()

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict()

    def check(self, ckpt: dict[str, Any]) -> None:
        try:
            self.callback.load_state_dict(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f": {e}") from None

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        pass  # loaded by check, first: a callback that refuses its state leaves the run untouched


def _at(path: Any, e: CheckpointError) -> CheckpointError:
    """A part's refusal, which is phrased to follow the checkpoint's path."""
    msg = str(e)
    return CheckpointError(f"{path}{'' if msg.startswith(':') else ' '}{msg}")


class RunState:
    """The run's parts in restore order: what a checkpoint holds is their union; validation is theirs, derived
    from the same ``entries``."""

    def __init__(self, parts: Iterable[Part]) -> None:
        self.parts = list(parts)

    @property
    def sharded_entries(self) -> tuple[str, ...]:
        """Entries whose tensors may be DTensors: every process writes and reads its own shards of them."""
        return tuple(e for p in self.parts if getattr(p, "sharded", False) for e in p.entries)

    def state_dict(self) -> dict[str, Any]:
        """The whole checkpoint (call on every process: gathering a sharded model is a collective)."""
        out: dict[str, Any] = {}
        for p in self.parts:
            out.update(p.state_dict())
        return out

    def check(self, ckpt: dict[str, Any], path: Any, parts: Callable[[Part], bool] = lambda p: True) -> None:
        """Refuse ``ckpt`` (one line naming ``path``) unless every chosen part can take it; touches nothing but the
        callbacks' own state."""
        chosen = [p for p in self.parts if parts(p)]
        for p in chosen:
            for key in p.entries:
                if key not in ckpt:
                    raise CheckpointError(f"{path} cannot be resumed: it has no '{key}' entry")
        for p in chosen:
            try:
                p.check(ckpt)
            except CheckpointError as e:
                raise _at(path, e) from None

    def load_state_dict(self, ckpt: dict[str, Any], path: Any) -> None:
        for p in self.parts:
            try:
                p.load_state_dict(ckpt)
            except CheckpointError as e:
                raise _at(path, e) from None


def run_state(trainer: Any, module: nn.Module, optimizer: torch.optim.Optimizer, callbacks: Iterable[Any],
              full: bool) -> RunState:
    """The parts of a training run (``full``: the single-file format's full state dicts). Callbacks come last:
    their check loads their state, which only happens once every other part has accepted the checkpoint."""
    return RunState([ProgressState(trainer), ModelState(module, full), OptimizerState(module, optimizer, full),
                     RNGState(), *(CallbackState(cb) for cb in callbacks)])
