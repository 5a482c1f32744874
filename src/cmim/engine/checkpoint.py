"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the target.

A run killed at any moment leaves either the previous checkpoint or the new one, never a torn file.

Checkpoints are only ever read with ``torch.load(weights_only=True)``: a pickle can run any code while it is
unpickled, so a file that needs more than tensors and plain Python values is refused, never "retried" with
full unpickling. That is why the RNG states are stored as tensors and plain types (no NumPy arrays).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here (missing, unreadable or from an incompatible run)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        raise CheckpointError(f"the checkpoint's RNG state cannot be restored: {_first_line(e)}") from None


class UnsafeCheckpointError(CheckpointError):
    """A file that only full unpickling (which can run arbitrary code) could read: refused, never retried."""


_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
# what torch's weights-only unpickler says when a file asks for more than tensors and plain values
_UNSAFE_MARKS = ("GLOBAL ", "call reduce for unrecognized function", "Can only create new object",
                 "Can only build ")
LEGACY_HINT = ("a cmim checkpoint written before weights-only loading must be re-created, or converted by "
               "someone who trusts the file")


def _first_line(e: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickler_reason(message: str) -> str:
    """The weights-only unpickler's own complaint inside torch's long message (e.g. 'Unsupported operand 18')."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "unreadable pickle")
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return useful[0] if useful else "unreadable pickle"


def read_weights(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; every failure is one :class:`CheckpointError` line.

    A file that references any other Python global raises :class:`UnsafeCheckpointError` naming the global.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # a non-torch pickle must fail with one line, not a warning first
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if any(m in msg for m in _UNSAFE_MARKS):
            found = _GLOBAL.search(msg)
            ref = f" (it references {found.group(1)})" if found else ""
            raise UnsafeCheckpointError(f"{path}: refused: the file needs full unpickling{ref}, which can run "
                                        f"code; cmim loads weights only ({LEGACY_HINT})") from None
        raise CheckpointError(f"cannot read {what} {path}: not a PyTorch weights file "
                              f"({_unpickler_reason(msg)[:200]})") from None
    except EOFError:
        raise CheckpointError(f"cannot read {what} {path}: empty or truncated file") from None
    except Exception as e:  # noqa: BLE001 - any other failure (torn zip, bad magic number, I/O) is unusable
        reason = _first_line(e).split(". ")[0]
        if "zip archive" in reason or "central directory" in reason:
            reason = f"truncated or corrupted ({reason})"
        raise CheckpointError(f"cannot read {what} {path}: {reason}") from None


def _not_cmim(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a cmim checkpoint ({why})")


def check_state_dict(sd: Any, path: Path, key: str = "model") -> None:
    """``sd`` must be a non-empty mapping of str -> Tensor (what ``load_state_dict`` and prefix lookups take)."""
    if not isinstance(sd, dict) or not sd:
        raise _not_cmim(path, f"'{key}' is not a state dict of tensors")
    for k, v in sd.items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise _not_cmim(path, f"'{key}' holds {type(v).__name__} at {str(k)[:60]!r}, not a tensor")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A cmim checkpoint, read weights-only and checked for the entries eval, export and resume rely on."""
    path = Path(path)
    ckpt = read_weights(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise _not_cmim(path, "no 'model' entry")
    check_state_dict(ckpt["model"], path)
    for key, ok, want in (("config", lambda v: isinstance(v, str), "a YAML string"),
                          ("method", lambda v: isinstance(v, str), "a string"),
                          ("encoder", lambda v: isinstance(v, dict), "a dict"),
                          ("step", _is_int, "an int"), ("epoch", _is_int, "an int")):
        if key in ckpt and ckpt[key] is not None and not ok(ckpt[key]):
            raise _not_cmim(path, f"'{key}' is {type(ckpt[key]).__name__}, not {want}")
    meta = ckpt.get("encoder")
    if meta and (not isinstance(meta.get("timm_name"), str) or not isinstance(meta.get("timm_kwargs", {}), dict)):
        raise _not_cmim(path, "'encoder' needs a 'timm_name' string and a 'timm_kwargs' dict")
    return ckpt


def check_resumable(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Everything ``Trainer.maybe_resume`` restores must be present and well-typed before it touches the run."""
    path = Path(path)
    for key in ("optimizer", "step", "epoch", "step_in_epoch", "rng"):
        if key not in ckpt:
            raise CheckpointError(f"{path} cannot be resumed: it has no '{key}' entry")
    for key in ("step", "epoch", "step_in_epoch"):
        if not _is_int(ckpt[key]) or ckpt[key] < 0:
            raise CheckpointError(f"{path} cannot be resumed: '{key}' is {ckpt[key]!r}, not a count")
    opt = ckpt["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) \
            or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"{path} cannot be resumed: 'optimizer' is not an optimizer state dict")
    if not isinstance(ckpt.get("knn_history", []), list):
        raise CheckpointError(f"{path} cannot be resumed: 'knn_history' is not a list")
    try:
        parse_rng_state(ckpt["rng"])
    except CheckpointError as e:
        raise CheckpointError(f"{path} cannot be resumed: {e}") from None
