"""Frozen teachers for MimCo: load a pre-trained ViT (and its projector, when it has one) from a file.

Three formats are read (``fmt="auto"`` tells them apart):

- ``cmim``: a checkpoint written by ``cmim pretrain`` (any method). The encoder is the one evaluation would
  take (the rule of :mod:`cmim.models.stored_encoder`): ``which="teacher"`` gives the method's EMA encoder
  (``teacher.*``) when it has one, else the student (methods without EMA, e.g. MimCo and SimMIM);
  ``which="student"`` the student. The encoder's projector (``<teacher|student>_projector.*``) comes with it
  when the method has one.
- ``mocov3``: the official MoCo v3 release (``main_moco.py`` checkpoints, e.g. ``vit-s-300ep.pth.tar``): the
  ViT under ``module.base_encoder.`` (the encoder the reference fine-tunes and probes), whose ``head`` is the
  projector. Its architecture is read from the weights; the head count cannot be, so it defaults to 12 (the
  release's ViT-S and ViT-B both use 12) and can be set with ``timm_kwargs={"num_heads": ...}``.
- ``timm``: any timm ViT weights file (safetensors or a torch state dict) plus the timm model name and keyword
  arguments that build it. A classifier ``head`` in the file is dropped; such a teacher has no projector.

The teacher is frozen: no parameter requires grad and :meth:`FrozenTeacher.train` always leaves it in eval
mode, so its BatchNorm layers (projector) use their running statistics and it never changes during training.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cmim.core.errors import CheckpointError, TeacherError, first_line, load_error_detail
from cmim.core.weights import check_state_dict, read_weights
from cmim.models.encoder import MaskedEncoder
from cmim.models.heads import MLPHead
from cmim.models.stored_encoder import ENCODER_ROLES, encoder_prefix, encoder_state_dict

__all__ = ["FORMATS", "FrozenTeacher", "TeacherError", "load_teacher", "mlp_head_from_state_dict"]

FORMATS = ("auto", "cmim", "mocov3", "timm")
MOCOV3_PREFIXES = ("module.base_encoder.", "base_encoder.")


class FrozenTeacher(nn.Module):
    """A pre-trained encoder plus optional projector, frozen and always in eval mode."""

    def __init__(self, encoder: MaskedEncoder, projector: MLPHead | None, source: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.source = source  # human-readable origin, e.g. "cmim mocov3 checkpoint ckpt.pt (teacher)"
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever the caller asks: a frozen teacher must not update BatchNorm stats."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def in_chans(self) -> int:
        return int(self.encoder.backbone.patch_embed.proj.in_channels)

    @property
    def projector_dim(self) -> int | None:
        """Output width of the projector, or None without one."""
        if self.projector is None:
            return None
        return next(m for m in reversed(self.projector) if isinstance(m, nn.Linear)).out_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """All tokens after the final norm, (B, 1 + N, D), CLS first."""
        return self.encoder(images)

    @torch.no_grad()
    def project(self, tokens: Tensor) -> Tensor:
        """The projector applied to every token (eval mode: each token independently)."""
        if self.projector is None:
            raise TeacherError(f"the teacher ({self.source}) has no projector")
        return self.projector(tokens)


# --- helpers ------------------------------------------------------------------------------------------------
def mlp_head_from_state_dict(sd: dict[str, Tensor]) -> MLPHead:
    """Rebuild an :class:`MLPHead` (the MoCo v3 / ConMIM layout) from its state dict alone.

    Linear layers are the 2-D ``<index>.weight`` entries; a BatchNorm after the last one means ``last_bn``.
    """
    linear = sorted(int(k.split(".")[0]) for k, v in sd.items()
                    if re.fullmatch(r"\d+\.weight", k) and v.ndim == 2)
    if not linear:
        raise TeacherError("projector weights hold no linear layer")
    first, last = sd[f"{linear[0]}.weight"], sd[f"{linear[-1]}.weight"]
    hidden = first.shape[0] if len(linear) > 1 else last.shape[0]
    last_bn = f"{linear[-1] + 1}.running_mean" in sd
    head = MLPHead(first.shape[1], hidden, last.shape[0], num_layers=len(linear), last_bn=last_bn)
    _load_strict(head, sd, "projector")
    return head


def _load_strict(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise TeacherError(f"{what} weights do not fit the model: {load_error_detail(e)}") from None


def _build(timm_name: str, kwargs: dict[str, Any]) -> MaskedEncoder:
    try:
        return MaskedEncoder(timm_name, kwargs)
    except Exception as e:  # noqa: BLE001 - unknown model name or bad kwargs
        raise TeacherError(f"cannot build timm model {timm_name!r} with {kwargs}: {first_line(e)}") from None


def _strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _read(path: Path) -> Any:
    """The file's contents through the one weights reader (safetensors, or torch weights-only: a file that
    needs full unpickling is refused with one line, never loaded another way)."""
    try:
        return read_weights(path, what="teacher")
    except CheckpointError as e:
        raise TeacherError(str(e)) from None


def _is_cmim(obj: Any) -> bool:
    return isinstance(obj, dict) and "model" in obj and "encoder" in obj and "config" in obj


def _state_dict(obj: Any) -> dict[str, Tensor]:
    """The tensor mapping inside a file: the object itself or its ``state_dict`` / ``model`` entry."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise TeacherError("the file holds no state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def detect_format(obj: Any) -> str:
    if _is_cmim(obj):
        return "cmim"
    sd = _state_dict(obj)
    if any(k.startswith(p) for k in sd for p in MOCOV3_PREFIXES):
        return "mocov3"
    return "timm"


# --- the three formats --------------------------------------------------------------------------------------
def _from_cmim(ckpt: dict[str, Any], which: str, path: Path, declared: Mapping[str, str] | None) -> FrozenTeacher:
    sd, meta = ckpt["model"], ckpt["encoder"]
    try:
        check_state_dict(sd, path)
        prefix = encoder_prefix(sd, which, declared)
    except CheckpointError as e:
        raise TeacherError(str(e)) from None  # load_teacher names the file
    if not isinstance(meta, dict) or not isinstance(meta.get("timm_name"), str) \
            or not isinstance(meta.get("timm_kwargs"), dict):
        raise TeacherError(f"{path} is not a cmim checkpoint ('encoder' needs a 'timm_name' string and a "
                           "'timm_kwargs' dict)")
    role = prefix.removesuffix(".")
    encoder = _build(meta["timm_name"], meta["timm_kwargs"])
    _load_strict(encoder, encoder_state_dict(sd, prefix), f"{path} ({role} encoder)")
    proj_sd = _strip(sd, f"{role}_projector.")  # a method keeps an encoder's projector beside it
    projector = mlp_head_from_state_dict(proj_sd) if proj_sd else None
    return FrozenTeacher(encoder, projector, f"cmim {ckpt.get('method')} checkpoint {path} ({role})")


def _mocov3_vit_kwargs(sd: dict[str, Tensor], overrides: dict[str, Any]) -> dict[str, Any]:
    """timm VisionTransformer kwargs of a MoCo v3 release ViT, read from the shapes of its weights."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd or "cls_token" not in sd:
        raise TeacherError("MoCo v3 weights: only the plain ViTs (vit_small, vit_base) are supported, "
                           "not the convolutional-stem variants")
    try:
        dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise TeacherError(f"MoCo v3 weights: not a ViT of the expected layout ({type(e).__name__}: "
                           f"{first_line(e)})") from None
    kwargs: dict[str, Any] = dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, num_classes=0, embed_dim=dim, depth=depth,
        num_heads=12, mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, global_pool="token", fc_norm=False,
    )
    kwargs.update(overrides)
    if kwargs["embed_dim"] % kwargs["num_heads"]:
        raise TeacherError(f"MoCo v3 weights: width {dim} is not divisible by "
                           f"num_heads={kwargs['num_heads']}; set mimco.teacher_timm_kwargs.num_heads")
    return kwargs


def _from_mocov3(obj: Any, timm_kwargs: dict[str, Any], path: Path) -> FrozenTeacher:
    sd = _state_dict(obj)
    prefix = next((p for p in MOCOV3_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        raise TeacherError(f"{path}: no 'module.base_encoder.' weights (not a MoCo v3 checkpoint)")
    enc_sd = _strip(sd, prefix)
    head_sd = _strip(enc_sd, "head.")
    backbone_sd = {k: v for k, v in enc_sd.items() if not k.startswith("head.")}
    encoder = _build("vit_base_patch16_224", _mocov3_vit_kwargs(backbone_sd, timm_kwargs))
    _load_strict(encoder.backbone, backbone_sd, f"{path} (MoCo v3 base encoder)")
    projector = mlp_head_from_state_dict(head_sd) if head_sd else None
    return FrozenTeacher(encoder, projector, f"MoCo v3 release {path} (base encoder)")


def _from_timm(obj: Any, timm_name: str | None, timm_kwargs: dict[str, Any], path: Path) -> FrozenTeacher:
    if not timm_name:
        raise TeacherError(f"{path} is a plain state dict: set mimco.teacher_timm_name (and "
                           "teacher_timm_kwargs) to the timm model it belongs to")
    sd = _state_dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    kwargs = {"num_classes": 0, **timm_kwargs}
    encoder = _build(timm_name, kwargs)
    if kwargs["num_classes"] == 0:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    _load_strict(encoder.backbone, sd, f"{path} ({timm_name})")
    return FrozenTeacher(encoder, None, f"timm {timm_name} weights {path}")


def load_teacher(path: str | os.PathLike, fmt: str = "auto", which: str = "teacher",
                 timm_name: str | None = None, timm_kwargs: dict[str, Any] | None = None,
                 declared_prefixes: Callable[[str | None], Mapping[str, str] | None] | None = None) -> FrozenTeacher:
    """Load a frozen teacher from ``path`` (format ``fmt``, see the module docstring). ``which``: the encoder of a
    cmim checkpoint to take; ``declared_prefixes``: method name -> where its checkpoints keep each encoder
    (``cmim.methods.declared_encoder_prefixes``, which this layer cannot import), for the one rule of
    :mod:`cmim.models.stored_encoder`."""
    if fmt not in FORMATS:
        raise TeacherError(f"unknown teacher format {fmt!r} (choose from {', '.join(FORMATS)})")
    if which not in ENCODER_ROLES:
        raise TeacherError(f"teacher encoder must be {' or '.join(map(repr, ENCODER_ROLES))}, got {which!r}")
    path = Path(path)
    obj = _read(path)
    kwargs = dict(timm_kwargs or {})
    try:
        fmt = detect_format(obj) if fmt == "auto" else fmt
        if fmt == "cmim":
            if not _is_cmim(obj):
                raise TeacherError(f"{path} is not a cmim checkpoint (needs 'model', 'encoder' and 'config')")
            method = obj.get("method")
            declared = declared_prefixes(method) if declared_prefixes is not None else None
            return _from_cmim(obj, which, path, declared)
        if fmt == "mocov3":
            return _from_mocov3(obj, kwargs, path)
        return _from_timm(obj, timm_name, kwargs, path)
    except TeacherError as e:
        if str(path) in str(e):
            raise
        raise TeacherError(f"teacher {path}: {e}") from None  # every teacher error names its file


def check_fits(teacher: FrozenTeacher, student: MaskedEncoder, in_chans: int) -> None:
    """Raise :class:`TeacherError` unless the teacher's tokens line up with the student's.

    Grid and input channels must match (patch j of the teacher must cover the student's patch j). Width may
    differ: the student's heads map to the teacher's width.
    """
    tg, sg = teacher.grid_size, student.grid_size
    if tuple(tg) != tuple(sg):
        raise TeacherError(
            f"teacher patch grid {tg[0]}x{tg[1]} ({tg[0] * teacher.patch_size} px / patch "
            f"{teacher.patch_size}) does not match the student's {sg[0]}x{sg[1]} "
            f"({sg[0] * student.patch_size} px / patch {student.patch_size}): set data.img_size and "
            "model.patch_size to the teacher's")
    if teacher.in_chans != in_chans:
        raise TeacherError(f"the teacher takes {teacher.in_chans}-channel images, data.in_chans is "
                           f"{in_chans}")
    if getattr(teacher.encoder.backbone, "num_prefix_tokens", 1) != 1:
        raise TeacherError("the teacher must have exactly one CLS token and no register tokens")
