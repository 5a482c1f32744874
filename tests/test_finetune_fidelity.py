"""Fine-tuning as BEiT/ConMIM do it (issue #13 items 1-2), checked against hand-built expectations:

* ``finetune.rel_pos_bias=per_block``: a Beit encoder's shared relative position table becomes one table per
  block, each equal to the shared one at step 0 (so the model computes exactly what the encoder did), and
  block i's table trains at block i's layer-decay scale.
* ``finetune.head_norm=fc_norm``: no pre-trained final norm, mean-pooled patch tokens through a fresh LayerNorm.
* the defaults (``pretrained`` / ``shared``) build, bit for bit, the model fine-tuning built before these keys.

Layer decay (timm ``param_groups_layer_decay`` over ``Beit/VisionTransformer.group_matcher``), for ``depth``
blocks: layer id 0 = stem (patch_embed, cls_token, pos_embed, a shared rel_pos_bias), i + 1 = block i (the
pre-trained final norm joins the last block), depth + 1 = everything unmatched (head, fc_norm); lr scale =
layer_decay ** (depth + 1 - layer_id). So block i: layer_decay ** (depth - i); head / fc_norm: 1; stem:
layer_decay ** (depth + 1).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from timm.models.beit import gen_relative_position_index
from torch import nn

from cmim.config import ConfigError, ModelConfig
from cmim.eval.config import FinetuneConfig, load_eval_config
from cmim.eval.finetune import build_finetune_model, build_optimizer
from cmim.eval.loading import EncoderSource
from cmim.models import build_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

IMG, PATCH, DIM, DEPTH, HEADS, CLASSES = 32, 8, 64, 3, 2, 5
SHARED = "rel_pos_bias.relative_position_bias_table"


def _source(family: str) -> EncoderSource:
    """A tiny encoder (img 32, patch 8, width 64, 3 blocks) with non-trivial weights: the shared table and
    the final norm are randomized, so "copied" and "dropped" can be told from "freshly initialized"."""
    torch.manual_seed(1)
    mc = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(
        family=family, size="tiny", embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
        layer_scale_init=0.1 if family == "beit" else None))
    enc = build_encoder(mc, IMG, 3)
    with torch.no_grad():
        for name, p in enc.backbone.named_parameters():
            if name == SHARED or name.startswith("norm."):
                p.normal_(0.0, 0.5)
    data = {"img_size": IMG, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    return EncoderSource(enc.eval(), "<memory>", "0" * 64, "checkpoint", "teacher", "conmim", data)


@pytest.fixture(scope="module")
def beit() -> EncoderSource:
    return _source("beit")


@pytest.fixture(scope="module")
def vit() -> EncoderSource:
    return _source("vit")


def _ft(**over):
    return OmegaConf.merge(OmegaConf.structured(FinetuneConfig), {"drop_path": 0.0, **over})


def _x() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def _scales(model: nn.Module, ft) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr_scale, weight_decay) of the optimizer fine-tuning uses."""
    opt = build_optimizer(model, ft)
    by_id = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


# (a) ------------------------------------------------------------------------------------------------------
def test_per_block_tables_start_as_the_shared_table(beit):
    model = build_finetune_model(beit, _ft(rel_pos_bias="per_block", head_norm="pretrained"), CLASSES).eval()
    shared = beit.encoder.backbone.state_dict()[SHARED]
    assert shared.abs().sum() > 0
    assert model.rel_pos_bias is None and SHARED not in model.state_dict()
    grid = beit.encoder.grid_size
    for i, blk in enumerate(model.blocks):
        assert torch.equal(blk.attn.relative_position_bias_table.detach(), shared), i
        assert torch.equal(blk.attn.relative_position_index, gen_relative_position_index(grid))
    tables = [blk.attn.relative_position_bias_table for blk in model.blocks]
    assert len({t.data_ptr() for t in tables}) == DEPTH  # copies, not one tensor shared again
    # so at step 0 the model computes what the pre-trained encoder computed
    x = _x()
    with torch.no_grad():
        diff = (model.forward_features(x) - beit.encoder(x)).abs().max().item()
    assert diff <= 1e-5, diff
    # and the tables then train apart: each gets its own gradient
    model.train()
    model(x).square().sum().backward()
    grads = [t.grad for t in tables]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not torch.equal(grads[0], grads[-1])


# (b) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_norm", ["pretrained", "fc_norm"])
def test_layer_decay_scales_per_block_table(beit, head_norm):
    ld = 0.5
    ft = _ft(rel_pos_bias="per_block", head_norm=head_norm, layer_decay=ld, weight_decay=0.05)
    model = build_finetune_model(beit, ft, CLASSES)
    scales = _scales(model, ft)
    num_layers = DEPTH
    for i in range(DEPTH):
        lr_scale, wd = scales[f"blocks.{i}.attn.relative_position_bias_table"]
        assert lr_scale == pytest.approx(ld ** (num_layers + 1 - (i + 1))), i
        assert wd == 0.0  # Beit.no_weight_decay lists every relative_position_bias_table
        assert scales[f"blocks.{i}.attn.qkv.weight"][0] == lr_scale  # same group as its block
    for name in ("head.weight", "head.bias"):
        assert scales[name][0] == 1.0
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token"):
        assert scales[name][0] == pytest.approx(ld ** (num_layers + 1))
    assert min(s for s, _ in scales.values()) == pytest.approx(ld ** (num_layers + 1))
    if head_norm == "fc_norm":
        assert scales["fc_norm.weight"] == (1.0, 0.0) and scales["fc_norm.bias"] == (1.0, 0.0)
    else:  # the pre-trained final norm trains with the last block
        assert scales["norm.weight"][0] == pytest.approx(ld)


def test_shared_table_default_sits_in_the_stem_group(beit):
    """Today's behaviour, kept as the default: the one shared table trains at the stem's scale."""
    ft = _ft(layer_decay=0.5)
    scales = _scales(build_finetune_model(beit, ft, CLASSES), ft)
    assert scales[SHARED][0] == pytest.approx(0.5 ** (DEPTH + 1))


# (c) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "beit"])
def test_fc_norm_replaces_the_pretrained_final_norm(family, beit, vit):
    src = beit if family == "beit" else vit
    rel = "per_block" if family == "beit" else "shared"
    model = build_finetune_model(src, _ft(head_norm="fc_norm", rel_pos_bias=rel), CLASSES).eval()
    sd = model.state_dict()
    assert isinstance(model.norm, nn.Identity) and not [k for k in sd if k.startswith("norm.")]
    assert isinstance(model.fc_norm, nn.LayerNorm) and model.fc_norm.normalized_shape == (DIM,)
    assert torch.equal(model.fc_norm.weight, torch.ones(DIM)) and torch.equal(model.fc_norm.bias, torch.zeros(DIM))
    assert model.global_pool == "avg"
    # the pre-trained blocks are all there
    enc_sd = src.encoder.backbone.state_dict()
    for k, v in enc_sd.items():
        if k.startswith("blocks.") or k.startswith("patch_embed."):
            assert torch.equal(sd[k], v), k
    # hand-built: the encoder without its final norm, mean of the patch tokens, then a plain LayerNorm
    pre = copy.deepcopy(src.encoder.backbone).eval()
    pre.norm = nn.Identity()
    x = _x()
    with torch.no_grad():
        expected = F.layer_norm(pre.forward_features(x)[:, 1:].mean(dim=1), (DIM,), eps=1e-6)
        got = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.allclose(logits, model.head(expected), atol=1e-5)


# (d) ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "beit"])
def test_defaults_build_the_model_fine_tuning_built_before(family, beit, vit):
    """Default keys: exactly timm.create_model(<exported architecture>, num_classes, global_pool, drop path)
    with the encoder's weights loaded, as fine-tuning did before the keys existed - same keys, shapes and
    values, the fresh head included (same RNG use), and the same optimizer groups."""
    src = beit if family == "beit" else vit
    ft = _ft(drop_path=0.1)
    assert ft.head_norm == "pretrained" and ft.rel_pos_bias == "shared"
    torch.manual_seed(7)
    expected = timm.create_model(src.encoder.timm_name, pretrained=False, **{
        **src.encoder.timm_kwargs, "num_classes": CLASSES, "global_pool": ft.pool, "drop_path_rate": 0.1})
    missing, unexpected = expected.load_state_dict(src.encoder.backbone.state_dict(), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    torch.manual_seed(7)
    model = build_finetune_model(src, ft, CLASSES)
    e_sd, m_sd = expected.state_dict(), model.state_dict()
    assert list(e_sd) == list(m_sd)
    for k in e_sd:
        assert e_sd[k].shape == m_sd[k].shape and torch.equal(e_sd[k], m_sd[k]), k
    assert type(model.norm) is type(expected.norm) and type(model.fc_norm) is type(expected.fc_norm)
    assert isinstance(model.fc_norm, nn.Identity)  # today: pooled after the pre-trained norm, no fc_norm
    assert _scales(model, ft) == _scales(expected, ft)


def test_recipes_choose_the_variant():
    cpu = load_eval_config("configs/finetune_fmnist_cpu.yaml").finetune
    assert (cpu.head_norm, cpu.rel_pos_bias) == ("pretrained", "shared")  # unchanged CPU recipe
    ref = load_eval_config("configs/finetune_conmim_vit_base_in1k.yaml", ["data.name=synthetic"]).finetune
    assert (ref.head_norm, ref.rel_pos_bias) == ("fc_norm", "per_block")


def test_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="finetune.head_norm"):
        load_eval_config(None, ["data.name=synthetic", "finetune.head_norm=layernorm"])
    with pytest.raises(ConfigError, match="finetune.rel_pos_bias"):
        load_eval_config(None, ["data.name=synthetic", "finetune.rel_pos_bias=block"])


def test_per_block_leaves_an_encoder_without_shared_table_as_is(vit):
    """The MAE recipe inherits rel_pos_bias=per_block from the ConMIM one; a ViT has no table to split."""
    torch.manual_seed(7)
    a = build_finetune_model(vit, _ft(rel_pos_bias="per_block"), CLASSES).state_dict()
    torch.manual_seed(7)
    b = build_finetune_model(vit, _ft(), CLASSES).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("head_norm", ["pretrained", "fc_norm"])
def test_beit_head_starts_at_beits_init_scale(beit, head_norm):
    """BEiT/ConMIM --init_scale 0.001: the new head is trunc-normal(std 0.02) scaled by 0.001 (timm's Beit does it,
    head_init_scale=0.001), so the fine-tune starts from near-zero logits; the plain ViT head is timm's own."""
    torch.manual_seed(0)
    model = build_finetune_model(beit, _ft(head_norm=head_norm), CLASSES)
    w = model.head.weight
    assert w.shape == (CLASSES, DIM)
    assert 0.3 * 0.02 * 1e-3 < w.std().item() < 2.0 * 0.02 * 1e-3
    assert w.abs().max().item() < 6 * 0.02 * 1e-3  # a scaled normal, not a unit-scale head
    assert model.head.bias.abs().max().item() == 0.0
