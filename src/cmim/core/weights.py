"""The one reader of weight files (cmim checkpoints, `cmim export` safetensors, the MoCo v3 release, timm
weights): safetensors, or ``torch.load(weights_only=True)``, with every failure turned into one
:class:`~cmim.core.errors.CheckpointError` line; and the structural checks of a cmim checkpoint. Nothing else
in cmim opens a weights file. :func:`read_encoder_weights` finds a ViT's weights inside any of them (and MAE /
DINO releases, Hub-style folders) for ``model.init_from``.

A pickle can run any code while it is unpickled, so a file that asks for any Python global beyond tensors
and plain values is refused (:class:`~cmim.core.errors.UnsafeCheckpointError`), never retried with full
unpickling.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmim.core.errors import CheckpointError, UnsafeCheckpointError, first_line

__all__ = ["LEGACY_HINT", "EncoderWeights", "check_state_dict", "is_int", "is_safetensors", "load_checkpoint",
           "read_encoder_weights", "read_safetensors_meta", "read_weights"]

LEGACY_HINT = ("a cmim checkpoint written before weights-only loading must be re-created, or converted by "
               "someone who trusts the file")


def _unpickler_reason(message: str) -> str:
    """The weights-only unpickler's own complaint inside torch's long message (e.g. 'Unsupported operand 18')."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "unreadable pickle")
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return useful[0] if useful else "unreadable pickle"


def _unsafe_globals(path: Path) -> list[str]:
    """The Python globals a ``torch.save`` file references beyond what weights-only loading builds (torch's own
    list, read without unpickling); [] for any other file, which ``torch.load(weights_only=True)`` then judges."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a torn archive: torch.load says what is wrong with it
        return []


def is_safetensors(path: str | os.PathLike) -> bool:
    """By name, or by content: an 8-byte header length followed by the JSON header."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return True
    with open(p, "rb") as f:
        head = f.read(16)
    return len(head) >= 9 and head[8:9] == b"{"


def read_safetensors_meta(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (its tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        raise CheckpointError(f"cannot read {path} as safetensors: {type(e).__name__}: {first_line(e)}") from None


def read_weights(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """A weights file on CPU: a safetensors file's tensors, else ``torch.load(path, weights_only=True)``;
    every failure is one :class:`CheckpointError` line.

    A torch file that references any other Python global raises :class:`UnsafeCheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any failure means an unusable file
            raise CheckpointError(f"cannot read {what} {path}: {type(e).__name__}: {first_line(e)}") from None
    unsafe = _unsafe_globals(path)
    if unsafe:
        more = ", ..." if len(unsafe) > 3 else ""
        raise UnsafeCheckpointError(f"{path}: refused: the file needs full unpickling (it references "
                                    f"{', '.join(unsafe[:3])}{more}), which can run code; cmim loads weights only "
                                    f"({LEGACY_HINT})")
    try:
        with warnings.catch_warnings():  # a non-torch pickle must fail with one line, not a warning first
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what the weights-only unpickler would not build, in any other file
        raise CheckpointError(f"cannot read {what} {path}: not a PyTorch weights file "
                              f"({_unpickler_reason(str(e))[:200]})") from None
    except EOFError:
        raise CheckpointError(f"cannot read {what} {path}: empty or truncated file") from None
    except Exception as e:  # noqa: BLE001 - any other failure (torn zip, bad magic number, I/O) is unusable
        reason = first_line(e).split(". ")[0]
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


def is_int(x: Any) -> bool:
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
                          ("step", is_int, "an int"), ("epoch", is_int, "an int")):
        if key in ckpt and ckpt[key] is not None and not ok(ckpt[key]):
            raise _not_cmim(path, f"'{key}' is {type(ckpt[key]).__name__}, not {want}")
    meta = ckpt.get("encoder")
    if meta and (not isinstance(meta.get("timm_name"), str) or not isinstance(meta.get("timm_kwargs", {}), dict)):
        raise _not_cmim(path, "'encoder' needs a 'timm_name' string and a 'timm_kwargs' dict")
    return ckpt


# --- a ViT's weights inside any release file (model.init_from) ------------------------------------------------
#: files a Hub-style model folder holds its weights in, in order of preference
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: entries of a checkpoint dict that hold a model's state dict, in order of preference (DINO / iBOT keep their
#: EMA encoder under "teacher", MAE under "model", MoCo v3 under "state_dict")
STATE_ENTRIES = ("teacher", "model", "state_dict", "student", "module")
_PATCH = "patch_embed.proj.weight"  # marks a ViT (timm, MAE, DINO, MoCo v3, BEiT): its prefix is the encoder's
# encoders of a file that are not the one to start from: MoCo v3's key encoder (its base encoder is what the
# reference fine-tunes), MimCo's frozen teacher, decoders
_NOT_PREFERRED = ("momentum_encoder", "contrastive_teacher", "target_encoder", "decoder")


@dataclass
class EncoderWeights:
    """A ViT's tensors from a weights file, keys relative to the timm backbone (``blocks.0.attn.qkv.weight``), plus
    ``mask_token`` when the file has the encoder's; ``source`` says where in the file they were found."""

    state: dict[str, torch.Tensor]
    path: str
    source: str
    others: list[str] = field(default_factory=list)  # other encoder prefixes the file holds (not taken)


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)} if isinstance(obj, dict) else {}


def _state_dict_of(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where): the file itself when it maps names to tensors, else its first entry that does."""
    own = _tensors(obj)
    if own and any(k.endswith(_PATCH) for k in own):
        return own, "top level"
    if isinstance(obj, dict):
        for key in STATE_ENTRIES:
            sd = _tensors(obj.get(key))
            if any(k.endswith(_PATCH) for k in sd):
                return sd, f"'{key}' entry"
    return own, "top level"


def _rank(prefix: str) -> tuple[bool, bool, int]:
    """Preference among the ViTs of one state dict: not a key encoder / frozen teacher / decoder; a cmim
    checkpoint's EMA teacher before its student; then the shortest prefix."""
    return (any(w in prefix for w in _NOT_PREFERRED), not prefix.startswith("teacher."), len(prefix))


def read_encoder_weights(path: str | os.PathLike) -> EncoderWeights:
    """The ViT encoder weights in ``path``: a safetensors or weights-only torch file (a timm state dict, an MAE / DINO
    / MoCo v3 release, a cmim checkpoint or export) or a Hub-style folder (``model.safetensors``). The encoder is
    the ViT (``*patch_embed.proj.weight``) under prefixes such as ``module.``, ``backbone.``, ``base_encoder.``,
    ``encoder.`` or a cmim checkpoint's ``teacher.backbone.``; see :func:`_rank` when a file holds several."""
    path = Path(path)
    if path.is_dir():
        found = next((path / f for f in HUB_WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise CheckpointError(f"model.init_from: {path} is a folder without {' or '.join(HUB_WEIGHT_FILES)}")
        path = found
    obj = read_weights(path, what="model.init_from weights")
    sd, where = _state_dict_of(obj)
    prefixes = sorted({k[: -len(_PATCH)] for k in sd if k.endswith(_PATCH)}, key=_rank)
    if not prefixes:
        raise CheckpointError(f"model.init_from: {path} holds no ViT weights (no '*{_PATCH}' tensor)")
    prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if prefix.endswith("backbone.") and f"{prefix[: -len('backbone.')]}mask_token" in sd:  # a cmim encoder
        state["mask_token"] = sd[f"{prefix[: -len('backbone.')]}mask_token"]
    source = where + (f", prefix '{prefix}'" if prefix else "")
    return EncoderWeights(state, str(path), source, prefixes[1:])
