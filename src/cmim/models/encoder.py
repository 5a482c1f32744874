"""timm ViT / BEiT backbones with a masked forward.

The backbone is an unmodified timm model, so its ``state_dict`` has plain timm keys and can be exported and
fine-tuned with timm. The only addition for masked image modeling, the learnable mask token, lives in the
wrapper: masked patch embeddings are replaced by it *before* position information and the CLS token are
added (as in BEiT/ConMIM/SimMIM), and an all-False mask reproduces timm's own ``forward_features`` exactly.
"""

from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import Tensor, nn

from cmim.core.choices import Choice

# (embed_dim, depth, num_heads): the standard ViT presets.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
# ``model.size``: one of the presets
ModelSize = Choice("ModelSize", list(PRESETS))


class ModelFamily(Choice):
    """``model.family``: "vit" (timm VisionTransformer) | "beit" (timm Beit)."""

    vit = "vit"
    beit = "beit"


class PosEmbed(Choice):
    """``model.pos_embed``: "learn" (learned) | "sincos" (fixed 2-D sin-cos, MoCo v3; vit family only)."""

    learn = "learn"
    sincos = "sincos"


class GlobalPool(Choice):
    """``model.global_pool``: the exported timm model's pooled feature, "avg" (patch tokens) | "token" (CLS)."""

    avg = "avg"
    token = "token"


class WeightInit(Choice):
    """``model.init``: "timm" (timm's default) | "mocov3" (MoCo v3's xavier init, qkv as three matrices)."""

    timm = "timm"
    mocov3 = "mocov3"


def timm_spec(model_cfg: Any, img_size: int, in_chans: int) -> tuple[str, dict[str, Any]]:
    """The timm model name and keyword arguments that rebuild this backbone (export relies on them)."""
    dim, depth, heads = PRESETS[model_cfg.size]
    dim = model_cfg.embed_dim or dim
    depth = model_cfg.depth or depth
    heads = model_cfg.num_heads or heads
    common: dict[str, Any] = dict(
        img_size=img_size, patch_size=model_cfg.patch_size, in_chans=in_chans, num_classes=0,
        embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=model_cfg.mlp_ratio,
        qkv_bias=model_cfg.qkv_bias, global_pool=str(model_cfg.global_pool),  # a plain str in checkpoints
    )
    if model_cfg.family == ModelFamily.vit:
        size = model_cfg.size
        # fc_norm=False keeps timm's per-token final `norm` for both poolings: "avg" pools normalized tokens.
        kwargs = dict(common, init_values=model_cfg.layer_scale_init, fc_norm=False)
        return f"vit_{size}_patch16_224", kwargs
    large = model_cfg.size == ModelSize.large
    kwargs = dict(
        common, init_values=model_cfg.layer_scale_init, use_fc_norm=False,
        use_abs_pos_emb=not model_cfg.shared_rel_pos_bias, use_rel_pos_bias=False,
        use_shared_rel_pos_bias=model_cfg.shared_rel_pos_bias,
    )
    return ("beit_large_patch16_224" if large else "beit_base_patch16_224"), kwargs


class MaskedEncoder(nn.Module):
    """A timm ViT or Beit (``self.backbone``) plus the mask token used by masked image modeling.

    ``forward(images, mask)`` returns all tokens after the final norm, shape (B, 1 + N, D), CLS first.

    Attention kernel: timm's blocks call ``F.scaled_dot_product_attention`` when their ``fused_attn`` flag is
    set. On CUDA that is the fast path; on CPU, PyTorch's flash-attention kernel is slower than timm's
    explicit ``softmax(q k^T) v`` at ViT sequence lengths, its backward especially (measured in BENCHMARKS.md).
    So the flag follows the device the encoder lives on (:attr:`fused_attn_cpu`, :attr:`fused_attn_accel`).
    Both paths compute the same attention.
    """

    #: use SDPA on CPU (False: timm's explicit attention, faster there for training)
    fused_attn_cpu: bool = False
    #: use SDPA on accelerators (CUDA etc.)
    fused_attn_accel: bool = True

    def __init__(self, timm_name: str, timm_kwargs: dict[str, Any], drop_path: float = 0.0,
                 sincos_pos_embed: bool = False, frozen_patch_embed: bool = False, init: str = "timm") -> None:
        super().__init__()
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs)
        self.backbone = timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path,
                                          **timm_kwargs)
        self.family = "beit" if hasattr(self.backbone, "rel_pos_bias") else "vit"
        if init == WeightInit.mocov3:
            if self.family != "vit":
                raise ValueError("model.init=mocov3 (MoCo v3's ViT initialization) is available for the vit "
                                 "family only")
            self._init_mocov3()
        elif init != WeightInit.timm:
            raise ValueError(f"unknown init {init!r} (timm or mocov3)")
        self.embed_dim: int = self.backbone.embed_dim
        self.grid_size: tuple[int, int] = tuple(self.backbone.patch_embed.grid_size)
        self.patch_size: int = self.backbone.patch_embed.patch_size[0]
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        if sincos_pos_embed:
            self._set_sincos_pos_embed()
        if frozen_patch_embed:
            for p in self.backbone.patch_embed.parameters():
                p.requires_grad_(False)
        self._select_attention()

    def _init_mocov3(self) -> None:
        """MoCo v3's ViT initialization (``VisionTransformerMoCo`` in the reference ``vits.py``).

        Every Linear gets xavier-uniform weights and zero biases, except that the fused attention ``qkv``
        projection is drawn as three stacked (D, D) matrices (bound sqrt(6 / (D + D)), not from the fused
        (3D, D) shape); the CLS token is N(0, 1e-6); the patch projection is xavier-uniform as a Linear from
        in_chans * p * p pixels to D, with a zero bias. LayerNorms and the position embedding are left as timm
        made them (sin-cos, when asked for, is written afterwards).
        """
        bb = self.backbone
        with torch.no_grad():
            for name, m in bb.named_modules():
                if not isinstance(m, nn.Linear):
                    continue
                if name.endswith("qkv"):
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            if getattr(bb, "cls_token", None) is not None:
                nn.init.normal_(bb.cls_token, std=1e-6)
            proj = bb.patch_embed.proj
            fan_in = proj.weight.shape[1] * math.prod(proj.weight.shape[2:])  # in_chans * p * p
            bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
            nn.init.uniform_(proj.weight, -bound, bound)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's own flag, ``backbone.grad_checkpointing``,
        so ``backbone.set_grad_checkpointing`` works the same). Only in training with autograd on."""
        self.backbone.set_grad_checkpointing(enable)

    def _blocks(self, x: Tensor, **kwargs: Any) -> Tensor:
        """The transformer blocks, each under activation checkpointing when it is on (see above)."""
        ckpt = bool(getattr(self.backbone, "grad_checkpointing", False)) and self.training \
            and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for blk in self.backbone.blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **kwargs) if ckpt else blk(x, **kwargs)
        return x

    def _select_attention(self) -> None:
        """Set every timm attention's ``fused_attn`` flag for the device the parameters are on."""
        fused = self.fused_attn_cpu if self.mask_token.device.type == "cpu" else self.fused_attn_accel
        for m in self.backbone.modules():
            if isinstance(getattr(m, "fused_attn", None), bool):
                m.fused_attn = fused

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # .to()/.cuda()/.cpu() all end here: re-select the attention kernel for the new device.
        out = super()._apply(fn, recurse)
        self._select_attention()
        return out

    def _set_sincos_pos_embed(self) -> None:
        """Fixed 2-D sin-cos position embedding (MoCo v3); the CLS position gets zeros."""
        pos = getattr(self.backbone, "pos_embed", None)
        if pos is None:
            raise ValueError("a sin-cos position embedding needs a backbone with an absolute position "
                             "embedding")
        table = build_sincos2d_pos_embed(list(self.grid_size), dim=self.embed_dim, temperature=10000.0)
        with torch.no_grad():
            pos.zero_()
            pos[0, -self.num_patches:] = table.to(pos.dtype)
        pos.requires_grad_(False)

    def _embed(self, images: Tensor, mask: Tensor | None) -> Tensor:
        x = self.backbone.patch_embed(images)  # (B, N, D)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return x

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        bb = self.backbone
        x = self._embed(images, mask)
        if self.family == "vit":
            x = bb._pos_embed(x)
            x = bb.patch_drop(x)
            x = bb.norm_pre(x)
            return bb.norm(self._blocks(x))
        x = torch.cat((bb.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if bb.pos_embed is not None:
            x = x + bb.pos_embed
        x = bb.pos_drop(x)
        rel_pos_bias = bb.rel_pos_bias() if bb.rel_pos_bias is not None else None
        dev = x.device.type
        if rel_pos_bias is not None and torch.is_autocast_enabled(dev):
            # What SDPA's autocast does to its attn_mask; on the explicit path it keeps the (B, H, N, N)
            # scores, softmax and their backward in bf16 instead of promoting them all to fp32.
            rel_pos_bias = rel_pos_bias.to(torch.get_autocast_dtype(dev))
        return bb.norm(self._blocks(x, shared_rel_pos_bias=rel_pos_bias))

    @staticmethod
    def pool(tokens: Tensor, feature: str = "mean") -> Tensor:
        """Image feature from tokens: "mean" of patch tokens (timm's global_pool="avg"), "cls", or "gridG": the
        patch-token map average-pooled to G x G cells and concatenated (G*G*D values), which keeps the coarse
        layout that a global mean throws away (objects of a centred dataset differ in where their parts are)."""
        if feature == "mean":
            return tokens[:, 1:].mean(dim=1)
        if feature == "cls":
            return tokens[:, 0]
        if feature.startswith("grid"):
            patches = tokens[:, 1:]
            side = math.isqrt(patches.shape[1])
            fmap = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
            return F.adaptive_avg_pool2d(fmap.float(), int(feature[4:])).flatten(1)
        raise ValueError(f"unknown pooled feature {feature!r} (mean, cls or gridG, e.g. grid2)")


def is_pooled_feature(name: str) -> bool:
    """mean, cls or gridG with G >= 1."""
    return name in ("mean", "cls") or (name.startswith("grid") and name[4:].isdigit() and int(name[4:]) >= 1)


def build_encoder(model_cfg: Any, img_size: int, in_chans: int) -> MaskedEncoder:
    if model_cfg.pos_embed == PosEmbed.sincos and model_cfg.family != ModelFamily.vit:
        raise ValueError("model.pos_embed=sincos is available for the vit family only")
    init = getattr(model_cfg, "init", "timm")  # configs stored before model.init existed: timm's init
    name, kwargs = timm_spec(model_cfg, img_size, in_chans)
    return MaskedEncoder(name, kwargs, drop_path=model_cfg.drop_path,
                         sincos_pos_embed=model_cfg.pos_embed == PosEmbed.sincos,
                         frozen_patch_embed=model_cfg.frozen_patch_embed, init=init)
