"""``cmim export CKPT OUT.safetensors``: the pre-trained encoder as a plain timm state dict.

The file holds exactly ``timm.create_model(name, **kwargs).state_dict()`` keys (no classifier head: the
encoder was built with ``num_classes=0``), so ::

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **kwargs)

loads it without key surgery. ``name`` and ``kwargs`` are stored in the safetensors metadata (key "cmim", as
JSON) and in a ``OUT.json`` sidecar, together with the normalization the encoder was trained with.
:func:`load_encoder` does all of this for a user, from an exported file or straight from a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cmim.core.errors import CheckpointError
from cmim.core.io import atomic_path, atomic_write_text
from cmim.eval.loading import EXPORT_META_KEY, EncoderSource, load_source
from cmim.eval.timm_model import build_timm_model

__all__ = ["add_parser", "export_encoder", "load_encoder"]

log = logging.getLogger("cmim")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cmim")
    except PackageNotFoundError:
        return "unknown"


def _data_hints(src: EncoderSource) -> dict[str, Any]:
    """The run's data settings (normalization above all), minus its machine-specific root folder."""
    return {k: v for k, v in src.data.items() if k not in ("root", "num_workers")}


def pretrained_cfg_overlay(meta: dict[str, Any], file: str | None = None) -> dict[str, Any]:
    """timm ``pretrained_cfg_overlay`` matching an export: file, input size and normalization."""
    d, kw = meta.get("data", {}), meta["timm_kwargs"]
    size = int(kw.get("img_size", d.get("img_size", 224)))
    chans = int(kw.get("in_chans", d.get("in_chans", 3)))
    # no hub id / url: these weights exist only in the file, never on the hub under the architecture's tag
    overlay: dict[str, Any] = {"input_size": (chans, size, size), "hf_hub_id": None, "url": None,
                               "tag": "cmim", "num_classes": int(kw.get("num_classes", 0))}
    if "mean" in d and "std" in d:
        overlay.update(mean=tuple(d["mean"]), std=tuple(d["std"]))
    if "interpolation" in d:
        overlay["interpolation"] = d["interpolation"]
    if "eval_crop_pct" in d:
        overlay["crop_pct"] = float(d["eval_crop_pct"])
    if file is not None:
        overlay["file"] = str(file)
    return overlay


def export_encoder(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "teacher") -> dict[str, Any]:
    """Write a checkpoint's ``which`` encoder as ``out`` (.safetensors) + ``out.json``; return the meta."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"export target must end in .safetensors: {out}")
    src = load_source(ckpt, which)
    enc = src.encoder
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in enc.backbone.state_dict().items()}
    meta: dict[str, Any] = {
        "timm_name": enc.timm_name, "timm_kwargs": enc.timm_kwargs, "family": enc.family,
        "encoder": src.which, "method": src.method, "source": str(ckpt), "source_sha256": src.sha256,
        "step": src.extra.get("step"), "data": _data_hints(src), "cmim_version": _version(),
    }
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", EXPORT_META_KEY: json.dumps(meta)})
    sidecar = dict(meta, pretrained_cfg_overlay=pretrained_cfg_overlay(meta, str(out)),
                   usage=(f"timm.create_model({enc.timm_name!r}, pretrained=True, "
                          f"pretrained_cfg_overlay=dict(file={str(out)!r}), **timm_kwargs)"))
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    return meta


def load_encoder(path: str | os.PathLike, which: str = "teacher", **timm_kwargs: Any) -> nn.Module:
    """The pre-trained encoder as a timm model (eval mode), from an exported file or a cmim checkpoint.

    Exported files go through timm's own loader (``pretrained_cfg_overlay``), so the model also carries the
    right ``pretrained_cfg`` (input size, mean/std) for ``timm.data.resolve_data_config``. Extra keyword
    arguments reach ``timm.create_model`` (e.g. ``num_classes=10`` adds a fresh head).
    """
    src = load_source(path, which)
    if src.kind == "export":
        meta = src.extra["export"]
        model = timm.create_model(meta["timm_name"], pretrained=True,
                                  pretrained_cfg_overlay=pretrained_cfg_overlay(meta, str(path)),
                                  **{**meta["timm_kwargs"], **timm_kwargs})
    else:
        model = build_timm_model(src, **timm_kwargs)
    return model.eval()


# --- command line ---------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    meta = export_encoder(args.checkpoint, args.out, args.encoder)
    n = sum(t.numel() for t in load_encoder(args.out).state_dict().values() if torch.is_tensor(t))
    print(f"cmim export: {meta['method']} {meta['encoder']} encoder -> {args.out} "
          f"({meta['timm_name']}, {n / 1e6:.2f}M params); load with "
          f"timm.create_model({meta['timm_name']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={args.out!r}), **kwargs) - kwargs in "
          f"{Path(args.out).with_suffix('.json')}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint's encoder as timm-ready safetensors",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="cmim checkpoint (checkpoint.pt)")
    p.add_argument("out", help="output .safetensors file (a .json sidecar is written next to it)")
    p.add_argument("--encoder", choices=("teacher", "student"), default="teacher",
                   help="which encoder (default: teacher, the EMA encoder used downstream)")
    p.set_defaults(func=_run)
