"""An encoder source as a plain timm model: the architecture it was pre-trained with, its weights, and the two
fine-tuning variants of the BEiT/ConMIM recipe.

Used by ``cmim export`` / :func:`cmim.load_encoder` (the pre-trained encoder as is) and by fine-tuning. It
depends on :mod:`cmim.eval.loading` only, so :mod:`cmim.export` and :mod:`cmim.eval.finetune` both import
it without importing each other.

Fine-tuning variants (both off by default, which builds exactly the pre-trained architecture):

* ``head_norm="fc_norm"``: the pre-trained final ``norm`` is dropped (timm makes it an ``Identity``), the
  pooled tokens go through a fresh LayerNorm ``fc_norm`` before the head (BEiT/ConMIM ``use_mean_pooling``,
  MAE ``global_pool``). timm's ``fc_norm=True`` (VisionTransformer) / ``use_fc_norm=True`` (Beit).
* ``rel_pos_bias="per_block"``: a Beit encoder's shared relative position table becomes one
  ``attn.relative_position_bias_table`` per block, each a copy of the pre-trained shared table (BEiT/ConMIM
  ``--rel_pos_bias``); timm computes the matching ``relative_position_index`` itself. The model is then a
  timm Beit with ``use_rel_pos_bias=True, use_shared_rel_pos_bias=False``, and since the tables are named
  ``blocks.<i>.attn.*``, timm's layer-decay grouping gives block i's table block i's lr scale. An encoder
  without a shared table (a ViT, a Beit with an absolute position embedding) has nothing to split and is
  built as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from torch import nn

from cmim.core.choices import Choice
from cmim.core.errors import CheckpointError, ConfigError
from cmim.eval.loading import EncoderSource

__all__ = ["HEAD_NORMS", "REL_POS_BIASES", "SHARED_TABLE", "HeadNorm", "RelPosBias", "build_timm_model",
           "finetune_variant"]

log = logging.getLogger("cmim")


class HeadNorm(Choice):
    """``finetune.head_norm``: see the module docstring."""

    pretrained = "pretrained"
    fc_norm = "fc_norm"


class RelPosBias(Choice):
    """``finetune.rel_pos_bias``: see the module docstring."""

    shared = "shared"
    per_block = "per_block"


HEAD_NORMS = tuple(h.value for h in HeadNorm)
REL_POS_BIASES = tuple(r.value for r in RelPosBias)
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def _block_table(i: int) -> str:
    return f"blocks.{i}.attn.relative_position_bias_table"


def finetune_variant(src: EncoderSource, head_norm: str = "pretrained",
                     rel_pos_bias: str = "shared") -> dict[str, Any]:
    """timm kwargs that turn ``src``'s architecture into the requested fine-tuning variant ({} = as is)."""
    if head_norm not in HEAD_NORMS:
        raise ConfigError(f"finetune.head_norm: must be one of {', '.join(HEAD_NORMS)}, got {head_norm!r}")
    if rel_pos_bias not in REL_POS_BIASES:
        raise ConfigError(f"finetune.rel_pos_bias: must be one of {', '.join(REL_POS_BIASES)}, "
                          f"got {rel_pos_bias!r}")
    beit = src.encoder.family == "beit"
    kw: dict[str, Any] = {}
    if head_norm == "fc_norm":
        kw["use_fc_norm" if beit else "fc_norm"] = True
    if rel_pos_bias == "per_block":
        if beit and getattr(src.encoder.backbone, "rel_pos_bias", None) is not None:
            kw.update(use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
        else:  # e.g. the MAE recipe, which inherits the ConMIM one, on a ViT: nothing to split
            log.info("finetune.rel_pos_bias=per_block: the %s encoder has no shared relative position bias; "
                     "built as it is", src.encoder.family)
    return kw


def _convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The pre-trained weights renamed for ``model``'s variant: the shared table copied into every block
    (added to a block's own table where the encoder already had one: the bias it applied is their sum), and
    the final norm left out where ``model`` has none."""
    state = dict(state)
    if SHARED_TABLE in state and getattr(model, "rel_pos_bias", None) is None:
        shared = state.pop(SHARED_TABLE)
        for i in range(len(model.blocks)):
            own = state.get(_block_table(i))
            state[_block_table(i)] = shared.clone() if own is None else own + shared
    if isinstance(getattr(model, "norm", None), nn.Identity):
        for k in [k for k in state if k.startswith("norm.")]:
            del state[k]
    return state


def build_timm_model(src: EncoderSource, pretrained: bool = True, *, head_norm: str = "pretrained",
                     rel_pos_bias: str = "shared", **overrides: Any) -> nn.Module:
    """A fresh timm model of ``src``'s architecture (kwargs may be overridden, e.g. num_classes, global_pool,
    drop_path_rate), carrying ``src``'s weights when ``pretrained``; only a classifier head (and a fresh
    ``fc_norm``) may be missing. ``head_norm`` / ``rel_pos_bias``: see the module docstring; the defaults
    build ``src``'s own architecture."""
    changes = {**finetune_variant(src, head_norm, rel_pos_bias), **overrides}
    kwargs = {**src.encoder.timm_kwargs, **changes}
    model = timm.create_model(src.encoder.timm_name, pretrained=False, **kwargs)
    if pretrained:
        state = _convert_state_dict(src.encoder.backbone.state_dict(), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
        if bad or unexpected:
            raise CheckpointError(f"{src.path}: weights do not fit {src.encoder.timm_name} with {changes} "
                                  f"(missing {bad[:3]}, unexpected {unexpected[:3]})")
    return model
