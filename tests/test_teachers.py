"""Teacher loading: each format, made here from a small model, gives exactly the source model's features."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY
from safetensors.torch import save_file
from torch import nn

from cmim.config import load_config, to_yaml
from cmim.engine.trainer import encoder_meta
from cmim.methods import build_method
from cmim.models import MLPHead, build_encoder
from cmim.models.teachers import FrozenTeacher, TeacherError, check_fits, load_teacher

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _randomize_bn(module: nn.Module) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(2)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _same_attention_kernel(source: nn.Module, teacher: FrozenTeacher) -> None:
    """Give the plain timm source model the attention kernel MaskedEncoder picked (SDPA or explicit)."""
    fused = teacher.encoder.backbone.blocks[0].attn.fused_attn
    for m in source.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def _cmim_checkpoint(method, cfg) -> dict:
    return {"model": method.state_dict(), "encoder": encoder_meta(method), "config": to_yaml(cfg),
            "method": cfg.method, "step": 0}


@pytest.fixture(scope="module")
def mocov3():
    cfg = load_config(None, [*TINY, "method=mocov3"])
    torch.manual_seed(0)
    m = build_method(cfg)
    with torch.no_grad():  # make teacher and student differ, as after training
        for p in m.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _randomize_bn(m)
    return m.eval(), cfg


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_cmim_checkpoint(tmp_path, mocov3, which):
    m, cfg = mocov3
    path = tmp_path / "checkpoint.pt"
    torch.save(_cmim_checkpoint(m, cfg), path)
    t = load_teacher(path, which=which)
    enc, proj = (m.teacher, m.teacher_projector) if which == "teacher" else (m.student, m.student_projector)
    with torch.no_grad():
        ref = enc(X)
        assert torch.equal(t(X), ref)
        assert torch.equal(t.project(ref[:, 0]), proj(ref[:, 0]))
    assert t.projector_dim == 32 and t.embed_dim == 32 and t.grid_size == (4, 4)
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not t.projector.training


def test_cmim_checkpoint_without_ema_uses_student(tmp_path, mocov3):
    m, cfg = mocov3
    ckpt = _cmim_checkpoint(m, cfg)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k.startswith("student.")}  # e.g. SimMIM
    torch.save(ckpt, tmp_path / "c.pt")
    t = load_teacher(tmp_path / "c.pt", fmt="cmim")
    assert t.projector is None
    with torch.no_grad():
        assert torch.equal(t(X), m.student(X))


def test_official_mocov3_release(tmp_path):
    """A small stand-in for vit-s-300ep.pth.tar: 12 heads; base/momentum encoders, predictor under module."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=3,
                            embed_dim=48, depth=2, num_heads=12, num_classes=0, global_pool="token").eval()
    vit.head = MLPHead(48, 64, 24, num_layers=3)
    _randomize_bn(vit.head)
    vit.eval()
    sd = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in vit.state_dict().items()})
    sd.update({f"module.predictor.{k}": v for k, v in MLPHead(24, 64, 24, 2).state_dict().items()})
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {}}, path)

    t = load_teacher(path)  # auto-detected
    assert "MoCo v3" in t.source and t.encoder.backbone.blocks[0].attn.num_heads == 12
    _same_attention_kernel(vit, t)
    with torch.no_grad():
        tokens = vit.forward_features(X)
        assert torch.equal(t(X), tokens)
        assert torch.equal(t.project(tokens[:, 0]), vit(X))  # timm pools the CLS token into the projector
    assert t.projector_dim == 24


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights(tmp_path, suffix):
    torch.manual_seed(0)
    kwargs = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=40, depth=2, num_heads=2)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **kwargs).eval()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    else:
        torch.save(vit.state_dict(), path)
    t = load_teacher(path, timm_name="vit_tiny_patch16_224", timm_kwargs=kwargs)  # classifier head dropped
    assert t.projector is None and t.embed_dim == 40
    _same_attention_kernel(vit, t)
    with torch.no_grad():
        assert torch.equal(t(X), vit.forward_features(X))
    with pytest.raises(TeacherError, match="teacher_timm_name"):
        load_teacher(path)


def test_fit_checks(tmp_path):
    cfg = load_config(None, TINY)
    student = build_encoder(cfg.model, 16, 3)
    other = build_encoder(load_config(None, [*TINY, "data.img_size=32"]).model, 32, 3)
    with pytest.raises(TeacherError, match="patch grid 8x8") as e:
        check_fits(FrozenTeacher(other, None, "x"), student, 3)
    assert "\n" not in str(e.value)
    with pytest.raises(TeacherError, match="3-channel"):
        check_fits(FrozenTeacher(build_encoder(cfg.model, 16, 3), None, "x"), student, 1)
    wide = build_encoder(load_config(None, [*TINY, "model.embed_dim=48"]).model, 16, 3)
    check_fits(FrozenTeacher(wide, None, "x"), student, 3)  # width may differ: the student heads adapt
    with pytest.raises(TeacherError, match="not found"):
        load_teacher(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot read"):
        load_teacher(tmp_path / "junk.pt")


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_teacher_loader_and_evaluation_take_the_same_encoder(tmp_path, mocov3, which):
    """One rule (cmim.models.stored_encoder): MimCo's teacher loader and cmim eval/export cut the same weights."""
    from cmim.eval.loading import load_source
    from cmim.methods import declared_encoder_prefixes

    m, cfg = mocov3
    path = tmp_path / "checkpoint.pt"
    torch.save(_cmim_checkpoint(m, cfg), path)
    evaluated = load_source(path, which).encoder.state_dict()
    for declared in (None, declared_encoder_prefixes):
        taught = load_teacher(path, which=which, declared_prefixes=declared).encoder.state_dict()
        assert taught.keys() == evaluated.keys()
        assert all(torch.equal(taught[k], evaluated[k]) for k in taught)


def test_the_encoder_rule_prefers_what_the_method_declares():
    from cmim.core.errors import CheckpointError
    from cmim.models.stored_encoder import encoder_prefix

    sd = {f"{p}{k}": torch.zeros(1) for p in ("student.", "ema.", "head.enc.")
          for k in ("mask_token", "backbone.patch_embed.proj.weight")}
    assert encoder_prefix(sd, "teacher") == "student."  # no "teacher." encoder: the student
    assert encoder_prefix(sd, "teacher", {"teacher": "ema.", "student": "student."}) == "ema."
    assert encoder_prefix(sd, "teacher", {"teacher": "gone."}) == "student."  # declared but absent: by name
    only = {k: v for k, v in sd.items() if k.startswith("ema.")}
    assert encoder_prefix(only, "student") == "ema."  # the only encoder there is
    with pytest.raises(CheckpointError, match="cannot tell"):
        encoder_prefix({k: v for k, v in sd.items() if not k.startswith("student.")}, "student")
    with pytest.raises(CheckpointError, match="must be teacher or student"):
        encoder_prefix(sd, "ema")
