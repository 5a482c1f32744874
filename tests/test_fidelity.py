"""Fidelity to the references: MoCo v3's ViT initialization, and gradient checkpointing of the masked forward."""

import copy
import math

import pytest
import torch
import torch.utils.checkpoint

from cmim.config import ConfigError, load_config
from cmim.models import build_encoder

DIM, DEPTH, HEADS, IMG, PATCH, CHANS = 192, 2, 3, 32, 8, 3


def _vit_cfg(**kw):
    ov = ["model.family=vit", "model.size=tiny", f"model.embed_dim={DIM}", f"model.depth={DEPTH}",
          f"model.num_heads={HEADS}", f"model.patch_size={PATCH}", "data.name=synthetic", f"data.img_size={IMG}",
          f"data.in_chans={CHANS}"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, ov)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def test_mocov3_init_matches_reference_formulas():
    torch.manual_seed(0)
    enc = build_encoder(_vit_cfg(**{"model.init": "mocov3"}).model, IMG, CHANS)
    bb = enc.backbone
    for blk in bb.blocks:
        qkv = blk.attn.qkv.weight  # (3D, D): three (D, D) matrices, each xavier-uniform
        assert qkv.shape == (3 * DIM, DIM)
        val_qkv = math.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))
        assert qkv.abs().max().item() <= val_qkv
        assert _rel(qkv.std().item(), val_qkv / math.sqrt(3)) < 0.05
        fc1 = blk.mlp.fc1.weight  # (4D, D), plain xavier-uniform
        assert _rel(fc1.std().item(), math.sqrt(2.0 / (fc1.shape[0] + fc1.shape[1]))) < 0.05
        assert fc1.abs().max().item() <= math.sqrt(6.0 / (fc1.shape[0] + fc1.shape[1]))
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert torch.count_nonzero(lin.bias) == 0
    assert bb.cls_token.std().item() < 1e-5 and bb.cls_token.abs().max().item() > 0
    proj = bb.patch_embed.proj
    val_pe = math.sqrt(6.0 / (CHANS * PATCH * PATCH + DIM))
    assert proj.weight.abs().max().item() <= val_pe
    assert _rel(proj.weight.std().item(), val_pe / math.sqrt(3)) < 0.05
    assert torch.count_nonzero(proj.bias) == 0
    # the mask token keeps cmim's own init (truncated normal, std 0.02)
    assert _rel(enc.mask_token.std().item(), 0.02) < 0.3


def test_mocov3_init_with_one_channel_uses_real_fan_in():
    torch.manual_seed(0)
    cfg = _vit_cfg(**{"model.init": "mocov3", "data.in_chans": 1, "data.mean": [0.5], "data.std": [0.5]})
    proj = build_encoder(cfg.model, IMG, 1).backbone.patch_embed.proj
    val_pe = math.sqrt(6.0 / (1 * PATCH * PATCH + DIM))
    assert proj.weight.abs().max().item() <= val_pe
    assert proj.weight.abs().max().item() > math.sqrt(6.0 / (3 * PATCH * PATCH + DIM))  # not the 3-channel bound


def test_mocov3_init_with_sincos_and_frozen_patch_embed():
    torch.manual_seed(0)
    cfg = _vit_cfg(**{"model.init": "mocov3", "model.pos_embed": "sincos", "model.frozen_patch_embed": "true"})
    enc = build_encoder(cfg.model, IMG, CHANS)
    assert not enc.backbone.pos_embed.requires_grad and torch.count_nonzero(enc.backbone.pos_embed[0, 0]) == 0
    assert enc.backbone.pos_embed.abs().max().item() == pytest.approx(1.0, abs=1e-6)  # sin-cos, written after
    assert all(not p.requires_grad for p in enc.backbone.patch_embed.parameters())


def test_timm_init_is_unchanged():
    torch.manual_seed(0)
    bb = build_encoder(_vit_cfg().model, IMG, CHANS).backbone
    assert _rel(bb.blocks[0].attn.qkv.weight.std().item(), 0.02) < 0.1  # timm: truncated normal, std 0.02
    assert _rel(bb.blocks[0].mlp.fc1.weight.std().item(), 0.02) < 0.1


def test_mocov3_init_is_vit_only():
    cfg = load_config(None, ["model.family=beit", "model.size=tiny", "model.depth=1", "data.name=synthetic",
                             "data.img_size=32", "model.init=mocov3"])
    with pytest.raises(ValueError, match="vit family only") as e:
        build_encoder(cfg.model, 32, 3)
    assert "\n" not in str(e.value)


def test_bad_init_is_a_config_error():
    with pytest.raises(ConfigError, match="model.init") as e:
        load_config(None, ["model.init=bogus", "data.name=synthetic"])
    assert "\n" not in str(e.value)


def _small(family: str):
    ov = [f"model.family={family}", "model.size=tiny", "model.embed_dim=48", "model.depth=3", "model.num_heads=3",
          "model.patch_size=4", "model.drop_path=0.1", "data.name=synthetic", "data.img_size=16"]
    if family == "beit":
        ov.append("model.layer_scale_init=0.1")
    return load_config(None, ov)


def _grads(enc, x, mask, seed=0):
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path draws in both runs
    out = enc(x, mask)
    (out.float().pow(2).mean() + out[:, 0].sum()).backward()
    return out.detach(), {n: (None if p.grad is None else p.grad.clone()) for n, p in enc.named_parameters()}


@pytest.mark.parametrize("family,via_backbone", [("vit", False), ("beit", True)])
def test_grad_checkpointing_same_gradients(family, via_backbone, monkeypatch):
    torch.manual_seed(0)
    enc = build_encoder(_small(family).model, 16, 3).train()
    other = copy.deepcopy(enc)
    x = torch.randn(4, 3, 16, 16)
    mask = torch.rand(4, 16) < 0.4
    ref_out, ref = _grads(enc, x, mask)

    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    if via_backbone:
        other.backbone.set_grad_checkpointing()  # timm's own switch is honoured
    else:
        other.set_grad_checkpointing(True)
    assert other.backbone.grad_checkpointing
    out, got = _grads(other, x, mask)
    assert calls == [False] * len(enc.backbone.blocks)  # one non-reentrant checkpoint per block
    torch.testing.assert_close(out, ref_out)
    assert ref.keys() == got.keys()
    for name in ref:
        if ref[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], ref[name], msg=name)

    # no recomputation where there is no backward: eval mode, or autograd off
    calls.clear()
    with torch.no_grad():
        other(x, mask)
    other.eval()
    other(x, mask)
    assert calls == []
    other.set_grad_checkpointing(False)
    other.train()
    other(x, mask)
    assert calls == [] and not other.backbone.grad_checkpointing


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_checkpointing_off_is_bit_identical(family):
    torch.manual_seed(0)
    enc = build_encoder(_small(family).model, 16, 3).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = enc.backbone.forward_features(x)
    assert torch.equal(enc(x), ref)
    enc.set_grad_checkpointing(True)
    assert torch.equal(enc(x), ref)  # eval: checkpointing does not apply


# --- per-process model randomness (#13 item 4) ----------------------------------------------------------
def _one_step_loss(rank: int) -> float:
    from conftest import TINY

    from cmim.bench import synthetic_batches
    from cmim.config import load_config
    from cmim.data.augment import ViewMaker
    from cmim.engine.run import build_optimizer
    from cmim.engine.step import TrainStep
    from cmim.methods import build_method

    cfg = load_config(None, [*TINY, "method=conmim", "model.drop_path=0.5"])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    cpu = torch.device("cpu")
    d = cfg.data
    step = TrainStep(method, build_optimizer(method, cfg, cpu), ViewMaker(method.view_spec(), d.mean, d.std, 3),
                     cpu, precision="fp32", seed=0, rank=rank)
    return float(step(synthetic_batches(cfg, method, 4, 1), 3, 10, 1e-3).loss)


def test_drop_path_masks_differ_between_processes_and_replay_exactly():
    from cmim.engine.step import model_seed

    assert model_seed(0, 0, 5) == model_seed(0, 0, 5)
    assert len({model_seed(0, r, s) for r in range(2) for s in range(3)}) == 6
    # same weights and data: only the stochastic-depth masks differ between ranks, and a replay (a resume)
    # of the same (seed, rank, step) draws the same ones
    assert _one_step_loss(0) == _one_step_loss(0)
    assert _one_step_loss(0) != _one_step_loss(1)
