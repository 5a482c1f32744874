"""Every RNG state the run draws from, as tensors and plain Python values, and its checkpoint part.

Checkpoints are only ever read weights-only (:func:`cmim.core.weights.read_weights`, and DCP through
:mod:`cmim.engine.checkpoint.dcp`): a pickle can run any code while it is unpickled, so a file that needs more
than tensors and plain Python values is refused, never "retried" with full unpickling. That is why the RNG
states are stored as tensors and plain types (no NumPy arrays).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from cmim.core.errors import CheckpointError, first_line

__all__ = ["RNGState", "parse_rng_state", "rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain Python values (readable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _byte_state(t: Any) -> bool:
    return torch.is_tensor(t) and t.dtype == torch.uint8 and t.ndim == 1


def parse_rng_state(state: Any) -> dict[str, Any]:
    """Check a stored RNG state and convert it to what the RNGs take; CheckpointError when unusable.

    Called before anything is restored, so a bad state never leaves a half-resumed run.
    """
    bad = CheckpointError
    if not isinstance(state, dict) or not _byte_state(state.get("torch")):
        raise bad("the checkpoint's RNG state is not in cmim's format ('rng.torch' must be a byte tensor)")
    n = state.get("numpy")
    if not isinstance(n, dict) or not isinstance(n.get("kind"), str) or not torch.is_tensor(n.get("keys")) \
            or n["keys"].shape != (624,) or n["keys"].dtype != torch.int64 \
            or not all(isinstance(n.get(k), int) for k in ("pos", "has_gauss")) \
            or not isinstance(n.get("cached_gaussian"), float):
        raise bad("the checkpoint's RNG state is not in cmim's format ('rng.numpy' must be "
                  "{kind, keys: 624 int64, pos, has_gauss, cached_gaussian})")
    keys = n["keys"].numpy()
    if keys.min() < 0 or keys.max() > 0xFFFFFFFF:
        raise bad("the checkpoint's RNG state is not in cmim's format ('rng.numpy.keys' out of range)")
    py = state.get("python")
    if not isinstance(py, (tuple, list)) or len(py) != 3 or not isinstance(py[0], int) \
            or not isinstance(py[1], (tuple, list)) or not all(isinstance(x, int) for x in py[1]) \
            or not (py[2] is None or isinstance(py[2], float)):
        raise bad("the checkpoint's RNG state is not in cmim's format ('rng.python' must be "
                  "random.getstate())")
    cuda = state.get("cuda")
    if cuda is not None and (not isinstance(cuda, (tuple, list)) or not all(_byte_state(t) for t in cuda)):
        raise bad("the checkpoint's RNG state is not in cmim's format ('rng.cuda' must be byte tensors)")
    return {"torch": state["torch"],
            "numpy": (n["kind"], keys.astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]),
            "python": (py[0], tuple(py[1]), py[2]), "cuda": list(cuda) if cuda is not None else None}


def set_rng_state(state: Any) -> None:
    """Restore :func:`rng_state`'s output exactly (resume is bit-exact)."""
    s = parse_rng_state(state)
    try:
        torch.set_rng_state(s["torch"])
        np.random.set_state(s["numpy"])
        random.setstate(s["python"])
        if s["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's RNG state cannot be restored: {first_line(e)}") from None


class RNGState:
    """The ``rng`` entry: this process's RNG states (rank 0's is saved; every process restores it, as each step
    re-seeds torch per process anyway, :func:`cmim.engine.step.model_seed`)."""

    entries = ("rng",)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def check(self, ckpt: dict[str, Any]) -> None:
        try:
            parse_rng_state(ckpt["rng"])
        except CheckpointError as e:
            raise CheckpointError(f"cannot be resumed: {e}") from None

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        set_rng_state(ckpt["rng"])
