import pytest
import torch

from cmim.config import load_config
from cmim.models import MaskedEncoder, MLPHead, build_encoder


def _cfg(family: str, **kw):
    ov = [f"model.family={family}", "model.size=tiny", "model.embed_dim=48", "model.depth=2",
          "model.num_heads=3", "model.patch_size=4", "data.name=synthetic", "data.img_size=28", "data.in_chans=1",
          "data.mean=[0.5]", "data.std=[0.5]"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, ov)


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_empty_mask_equals_plain_timm_forward(family):
    torch.manual_seed(0)
    cfg = _cfg(family, **({"model.layer_scale_init": 0.1} if family == "beit" else {}))
    enc = build_encoder(cfg.model, 28, 1).eval()
    x = torch.randn(3, 1, 28, 28)
    empty = torch.zeros(3, 49, dtype=torch.bool)
    ref = enc.backbone.forward_features(x)
    assert torch.equal(enc(x, empty), ref)
    assert torch.equal(enc(x), ref)


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_mask_replaces_patch_embedding_before_position(family):
    torch.manual_seed(0)
    enc = build_encoder(_cfg(family).model, 28, 1).eval()
    x1, x2 = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28)
    full = torch.ones(1, 49, dtype=torch.bool)
    # fully masked: the input image no longer matters
    assert torch.allclose(enc(x1, full), enc(x2, full), atol=1e-6)
    # the masked embedding is the mask token
    emb = enc._embed(x1, full)
    assert torch.equal(emb[0, 5], enc.mask_token[0, 0])
    # partially masked differs from the unmasked forward
    part = torch.zeros(1, 49, dtype=torch.bool)
    part[0, :10] = True
    assert not torch.allclose(enc(x1, part), enc(x1))


def test_backbone_state_dict_is_plain_timm():
    import timm

    enc = build_encoder(_cfg("beit", **{"model.layer_scale_init": 0.1}).model, 28, 1)
    assert "mask_token" not in enc.backbone.state_dict()
    plain = timm.create_model(enc.timm_name, pretrained=False, **enc.timm_kwargs)
    result = plain.load_state_dict(enc.backbone.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 1, 28, 28)
    plain.eval(), enc.eval()
    assert torch.equal(plain.forward_features(x), enc(x))
    assert enc.backbone.rel_pos_bias is not None and enc.backbone.pos_embed is None
    assert torch.allclose(enc.backbone.blocks[0].gamma_1, torch.full((48,), 0.1))


@pytest.mark.parametrize("size,dim,depth", [("tiny", 192, 12), ("small", 384, 12), ("base", 768, 12)])
def test_presets(size, dim, depth):
    cfg = load_config(None, [f"model.size={size}", "data.name=synthetic", "data.img_size=32"])
    enc = build_encoder(cfg.model, 32, 3)
    assert enc.embed_dim == dim and len(enc.backbone.blocks) == depth and enc.grid_size == (2, 2)


def test_sincos_and_frozen_patch_embed():
    enc = build_encoder(_cfg("vit", **{"model.pos_embed": "sincos", "model.frozen_patch_embed": "true"}).model, 28, 1)
    assert not enc.backbone.pos_embed.requires_grad
    assert not any(p.requires_grad for p in enc.backbone.patch_embed.parameters())
    assert enc.backbone.pos_embed[0, 1:].abs().sum() > 0


def test_mlp_head_on_tokens_uses_all_token_statistics():
    head = MLPHead(8, 16, 4, num_layers=3)
    x = torch.randn(2, 5, 8)
    y = head(x)
    assert y.shape == (2, 5, 4)
    flat = y.reshape(-1, 4)  # last BatchNorm (no affine) normalizes over all B*N tokens
    assert torch.allclose(flat.mean(0), torch.zeros(4), atol=1e-5)
    assert head[-1].affine is False and all(not getattr(m, "bias", None) is not None for m in head
                                            if isinstance(m, torch.nn.Linear))


def test_pool():
    t = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)
    assert torch.equal(MaskedEncoder.pool(t, "cls"), t[:, 0])
    assert torch.equal(MaskedEncoder.pool(t, "mean"), t[:, 1:].mean(1))
