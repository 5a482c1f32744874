"""Open any encoder source as a :class:`~cmim.models.MaskedEncoder`: a cmim training checkpoint (any method,
teacher or student) or a ``.safetensors`` file written by ``cmim export``.

Checkpoints are read without rebuilding the method: the encoder's weights are cut out of ``ckpt["model"]``
by prefix and loaded into a fresh encoder built from ``ckpt["encoder"]``. That keeps evaluation independent
of a method's other parts (MimCo's frozen teacher file, projectors, queues) and of how a method names its
modules: which encoder is cut out follows the one rule of :mod:`cmim.models.stored_encoder`, which MimCo's teacher
loader follows too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cmim.config import ConfigError, from_yaml_string
from cmim.core.checkpoint_paths import newest_dcp_checkpoint
from cmim.core.errors import CheckpointError, first_line, load_error_detail
from cmim.core.weights import is_safetensors, load_checkpoint, read_safetensors_meta, read_weights
from cmim.methods import declared_encoder_prefixes
from cmim.models import MaskedEncoder, build_encoder
from cmim.models.stored_encoder import ENCODER_ROLES, encoder_prefixes, encoder_state_dict
from cmim.models.stored_encoder import encoder_prefix as stored_encoder_prefix

__all__ = [
    "EXPORT_META_KEY",
    "HUB_WEIGHTS",
    "EncoderSource",
    "encoder_prefix",
    "encoder_prefixes",
    "encoder_state_dict",
    "load_source",
    "random_init_like",
    "sha256_file",
]

EXPORT_META_KEY = "cmim"  # safetensors metadata key holding the JSON description written by `cmim export`

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Content hash of a file (memoized per path, size and mtime: big checkpoints are hashed once)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@dataclass
class EncoderSource:
    """An encoder plus what evaluation must know about where it came from."""

    encoder: MaskedEncoder
    path: str
    sha256: str
    kind: str  # "checkpoint" | "export"
    which: str  # teacher | student (as requested; for exports: the one that was exported)
    method: str | None
    data: dict[str, Any]  # the pre-training data config (at least img_size, in_chans, mean, std)
    config: DictConfig | None = None  # full pre-training config when known
    init: str = "pretrained"  # "pretrained" | "random-s<seed>" (same architecture, fresh weights)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """Identifies the weights: content hash + encoder + init (the feature-cache key starts with it)."""
        return f"{self.sha256[:16]}-{self.which}-{self.init}"

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "kind": self.kind, "encoder": self.which,
                "method": self.method, "init": self.init, "timm_name": self.encoder.timm_name,
                "timm_kwargs": self.encoder.timm_kwargs}


def encoder_prefix(state_dict: dict[str, Any], method: str | None, which: str) -> str:
    """The state-dict prefix of the encoder ``method.encoder(which)`` returns: the one rule
    (:func:`cmim.models.stored_encoder.encoder_prefix`) with the method's declared prefixes."""
    return stored_encoder_prefix(state_dict, which, declared_encoder_prefixes(method))


def _data_summary(data: Any) -> dict[str, Any]:
    d = OmegaConf.to_container(data, resolve=True, enum_to_str=True) if isinstance(data, DictConfig) else dict(data)
    return dict(d)  # type: ignore[arg-type]


def _stored_config(ckpt: dict[str, Any], path: Path) -> DictConfig | None:
    """The pre-training config a checkpoint stores (None without one); one error line when it is garbage."""
    if not isinstance(ckpt.get("config"), str):
        return None
    try:
        return from_yaml_string(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - not YAML, or YAML that is not a config mapping
        first = first_line(e)
        raise CheckpointError(f"{path}: its stored config is not a cmim config ({first})") from None


def _load_checkpoint_source(path: Path, which: str) -> EncoderSource:
    ckpt = load_checkpoint(path)  # weights-only, and "model" checked to be a state dict of tensors
    method = ckpt.get("method")
    cfg = _stored_config(ckpt, path)
    method = method or (cfg.method if cfg is not None else None)
    prefix = encoder_prefix(ckpt["model"], method, which)
    sd = encoder_state_dict(ckpt["model"], prefix)
    meta = ckpt.get("encoder") or {}
    try:
        if cfg is not None:
            enc = build_encoder(cfg.model, cfg.data.img_size, cfg.data.in_chans)
        elif meta.get("timm_name"):
            enc = MaskedEncoder(meta["timm_name"], meta.get("timm_kwargs", {}))
        else:
            raise CheckpointError(f"{path}: no stored config or encoder description to rebuild the encoder")
        enc.load_state_dict(sd, strict=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - bad stored architecture or weights: the file is unusable
        raise CheckpointError(f"{path}: the {which} encoder ({prefix!r}) does not fit its stored "
                              f"architecture: {load_error_detail(e)}") from None
    data = _data_summary(cfg.data) if cfg is not None else {}
    return EncoderSource(enc.eval(), str(path), sha256_file(path), "checkpoint", which, method, data, cfg,
                         extra={"prefix": prefix, "step": ckpt.get("step"), "epoch": ckpt.get("epoch")})


def read_export_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The description ``cmim export`` stored in a safetensors file's metadata."""
    raw = read_safetensors_meta(path).get(EXPORT_META_KEY)
    if raw is None:
        raise CheckpointError(f"{path} has no cmim metadata (not written by `cmim export`)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its cmim metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("timm_name"), str) \
            or not isinstance(meta.get("timm_kwargs"), dict):
        raise CheckpointError(f"{path}: its cmim metadata lacks a 'timm_name' string and a 'timm_kwargs' dict")
    return meta


def _load_export_source(path: Path, folder: Path | None = None) -> EncoderSource:
    """An exported file; ``folder``: the Hub-style folder (``cmim export --format hub``) it was found in."""
    meta = read_export_meta(path)
    sd = read_weights(path, what="export")
    try:
        enc = MaskedEncoder(meta["timm_name"], meta["timm_kwargs"])
        missing, unexpected = enc.backbone.load_state_dict(sd, strict=False)
    except Exception as e:  # noqa: BLE001 - torn file, unknown model or misshapen weights: unusable
        first = first_line(e)
        raise CheckpointError(f"{path}: weights do not load into {meta['timm_name']} ({first})") from None
    if unexpected or [k for k in missing if not k.startswith("head")]:
        raise CheckpointError(f"{path}: weights do not fit {meta['timm_name']} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    extra: dict[str, Any] = {"export": meta, **({"hub_dir": str(folder)} if folder is not None else {})}
    return EncoderSource(enc.eval(), str(folder or path), sha256_file(path), "export", meta.get("encoder", "teacher"),
                         meta.get("method"), dict(meta.get("data", {})), None, extra=extra)


HUB_WEIGHTS = "model.safetensors"  # the weights file of a Hub-style folder (timm's preferred name)


def load_source(path: str | os.PathLike, which: str = "teacher") -> EncoderSource:
    """Open a checkpoint (``which`` = teacher | student), an exported ``.safetensors`` file or a Hub-style folder
    written by ``cmim export --format hub`` (its ``model.safetensors`` carries the same description)."""
    if which not in ENCODER_ROLES:
        raise ConfigError(f"encoder: must be {' or '.join(ENCODER_ROLES)}, got {which!r}")
    which = str(which)  # a config's enum member: its plain name from here on
    p = Path(path)
    if p.is_dir():
        if not (p / HUB_WEIGHTS).is_file():
            if newest_dcp_checkpoint(p) is not None:  # a run of train.checkpoint_format=dcp, or one of its steps
                raise CheckpointError(f"{p} holds sharded (DCP) checkpoints: make one file first with "
                                      f"`cmim checkpoint consolidate {p} OUT.pt`, then give OUT.pt")
            raise CheckpointError(f"{p} is a folder without {HUB_WEIGHTS} (not written by `cmim export --format hub`)")
        return _load_export_source(p / HUB_WEIGHTS, folder=p)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if is_safetensors(p):
        return _load_export_source(p)
    return _load_checkpoint_source(p, which)


def random_init_like(src: EncoderSource, seed: int = 0) -> EncoderSource:
    """Same architecture as ``src``, freshly initialized with ``seed``: the baseline for every protocol."""
    torch.manual_seed(seed)
    if src.config is not None:
        enc = build_encoder(src.config.model, src.config.data.img_size, src.config.data.in_chans)
    else:
        enc = MaskedEncoder(src.encoder.timm_name, src.encoder.timm_kwargs)
    return EncoderSource(enc.eval(), src.path, src.sha256, src.kind, src.which, src.method, dict(src.data),
                         src.config, init=f"random-s{seed}", extra=dict(src.extra))
