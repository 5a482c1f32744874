"""``model.init_from``: start an encoder from existing ViT weights instead of a random init.

The weights come from :func:`cmim.core.weights.read_encoder_weights` (the one reader: safetensors or weights-only
torch files, Hub-style folders; nothing is downloaded). Every tensor of the timm backbone is taken from the file
when the names and shapes agree, or adapted when only the input geometry differs:

- ``pos_embed``: another patch grid (image size / patch size) -> resampled to this grid, bicubic, prefix (CLS)
  tokens kept (``timm.layers.resample_abs_pos_embed``); kept as is when the encoder's position embedding is the
  fixed sin-cos table (``model.pos_embed=sincos``);
- ``patch_embed.proj.weight``: another channel count -> ``timm.models._manipulate.adapt_input_conv`` (channels
  repeated and rescaled, or summed for 1 channel, so a grey or N-band image gives activations of the scale the
  pre-trained weights saw); another patch size -> ``timm.layers.resample_patch_embed``;
- BEiT relative position tables: another window -> ``timm.layers.resize_rel_pos_bias_table``.

What was loaded is reported in one short table (:meth:`InitReport.table`). The method builds its EMA teacher /
momentum encoder by copying the student after this, so both start from the same weights; heads and projectors
stay randomly initialized.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table
from timm.models._manipulate import adapt_input_conv
from torch import Tensor

from cmim.core.errors import CheckpointError, first_line
from cmim.core.weights import read_encoder_weights
from cmim.models.encoder import MaskedEncoder

__all__ = ["InitReport", "init_encoder_from"]


@dataclass
class InitReport:
    """What ``model.init_from`` did: keys loaded as they are, adapted (with old -> new shapes), not loaded."""

    path: str
    source: str
    matched: list[str] = field(default_factory=list)
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the encoder's tensors the file does not give: kept at init
    unexpected: list[str] = field(default_factory=list)  # the file's tensors the encoder has no place for
    kept: list[str] = field(default_factory=list)  # deliberately not loaded (the fixed sin-cos table)

    def table(self, examples: int = 3) -> str:
        """A few lines: counts with example keys."""
        def ex(keys: list[str]) -> str:
            return ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")

        rows = [("matched", len(self.matched), ex(self.matched)),
                ("resized", len(self.resized), ex([f"{k} {tuple(a)} -> {tuple(b)}" for k, a, b in self.resized])),
                ("missing", len(self.missing) + len(self.mismatched) + len(self.kept),
                 ex(self.missing + [f"{k} (shape {tuple(a)} in the file, {tuple(b)} here)"
                                    for k, a, b in self.mismatched] + [f"{k} (kept: sin-cos)" for k in self.kept])),
                ("unexpected", len(self.unexpected), ex(self.unexpected))]
        head = f"model.init_from {self.path} ({self.source}):"
        return "\n".join([head] + [f"  {name:<10} {n:>5}  {keys}".rstrip() for name, n, keys in rows])


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side > 0 and side * side == n else None


def _adapt(key: str, src: Tensor, dst: Tensor, encoder: MaskedEncoder) -> Tensor | None:
    """``src`` reshaped to ``dst``'s shape when only the input geometry differs; None when it cannot be."""
    if key == "pos_embed" and src.ndim == 3 and src.shape[-1] == dst.shape[-1]:
        prefix = int(getattr(encoder.backbone, "num_prefix_tokens", 1))
        side = _square(src.shape[1] - prefix)
        if side is None or dst.shape[1] != prefix + encoder.num_patches:
            return None
        return resample_abs_pos_embed(src, new_size=list(encoder.grid_size), old_size=[side, side],
                                      num_prefix_tokens=prefix)
    if key == "patch_embed.proj.weight" and src.ndim == 4 and src.shape[0] == dst.shape[0]:
        out = src
        if out.shape[1] != dst.shape[1]:
            try:
                out = adapt_input_conv(int(dst.shape[1]), out, base_chans=int(out.shape[1]))
            except TypeError:  # a timm without base_chans adapts 3-channel weights only
                out = adapt_input_conv(int(dst.shape[1]), out)
        if tuple(out.shape[-2:]) != tuple(dst.shape[-2:]):
            out = resample_patch_embed(out, list(dst.shape[-2:]))
        return out
    if key.endswith("relative_position_bias_table") and src.ndim == 2 and src.shape[-1] == dst.shape[-1]:
        return resize_rel_pos_bias_table(src, new_window_size=tuple(encoder.grid_size), new_bias_shape=dst.shape)
    return None


@torch.no_grad()
def init_encoder_from(encoder: MaskedEncoder, path: str | os.PathLike, keep_pos_embed: bool = False) -> InitReport:
    """Load ``path``'s ViT into ``encoder`` (in place; see the module docstring) and report it. Blocks or tokens
    the file lacks stay at their init and extra ones are ignored (a shallower encoder takes the first blocks);
    ``keep_pos_embed`` leaves the position embedding as it is (a fixed sin-cos table). Raises
    :class:`CheckpointError` when a tensor has a shape that cannot be adapted (another width or head count), or
    nothing fits at all; nothing is loaded then."""
    weights = read_encoder_weights(path)
    src = dict(weights.state)
    report = InitReport(weights.path, weights.source)
    target = encoder.backbone.state_dict()
    new: dict[str, Tensor] = {}
    for key, dst in target.items():
        if key == "pos_embed" and keep_pos_embed:
            src.pop(key, None)
            report.kept.append(key)
            continue
        if key not in src:
            report.missing.append(key)
            continue
        value = src.pop(key)
        if value.shape == dst.shape:
            new[key] = value.to(dst.dtype)
            report.matched.append(key)
            continue
        try:
            adapted = _adapt(key, value.float(), dst, encoder)
        except Exception as e:  # noqa: BLE001 - a layout timm cannot adapt: reported, not loaded
            raise CheckpointError(f"model.init_from {weights.path}: cannot adapt {key} {tuple(value.shape)} to "
                                  f"{tuple(dst.shape)}: {first_line(e)}") from None
        if adapted is not None and adapted.shape == dst.shape:
            new[key] = adapted.to(dst.dtype)
            report.resized.append((key, tuple(value.shape), tuple(dst.shape)))
        else:
            report.mismatched.append((key, tuple(value.shape), tuple(dst.shape)))
    token = src.pop("mask_token", None)
    if token is not None and token.shape == encoder.mask_token.shape:
        encoder.mask_token.copy_(token.to(encoder.mask_token.dtype))
        report.matched.append("mask_token")
    else:
        report.missing.append("mask_token")
        if token is not None:
            report.unexpected.append("mask_token")
    report.unexpected = sorted(src) + report.unexpected
    if not new:
        raise CheckpointError(f"model.init_from {weights.path} ({weights.source}): no tensor fits this encoder "
                              f"(file: {', '.join(sorted(weights.state)[:3])}; encoder: {', '.join(list(target)[:3])})")
    if report.mismatched:  # another width / head count / MLP ratio: a partial load would pass for a good one
        shown = "; ".join(f"{k} {tuple(a)} in the file, {tuple(b)} here" for k, a, b in report.mismatched[:2])
        raise CheckpointError(f"model.init_from {weights.path}: {len(report.mismatched)} tensors do not fit this "
                              f"encoder ({shown}): set model.embed_dim / num_heads / mlp_ratio to the file's")
    encoder.backbone.load_state_dict(new, strict=False)
    return report
