"""model.init_from: a timm-shaped ViT saved in the usual release layouts starts a cmim encoder on another grid and
channel count; its EMA teacher / momentum encoder start from the same weights; nothing else is ever unpickled."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv

from cmim.config import ConfigError, load_config
from cmim.core.errors import CheckpointError, UnsafeCheckpointError
from cmim.core.weights import read_encoder_weights
from cmim.methods import build_method
from cmim.models.init_from import init_encoder_from

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """A ViT-B-shaped timm model, tiny: 32 px, 8 px patches (4 x 4 grid), 3 channels, width 32, depth 2."""
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_224", embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8,
                          num_classes=0)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _files(tmp: Path, sd: dict[str, torch.Tensor]) -> dict[str, Path]:
    """The same weights in each layout model.init_from reads."""
    out = {"safetensors": tmp / "vit.safetensors", "pth_model_module": tmp / "vit.pth", "mocov3": tmp / "moco.pth.tar",
           "hub": tmp / "hub", "dino": tmp / "dino.pth", "cmim": tmp / "cmim.pt"}
    save_file({k: v.contiguous() for k, v in sd.items()}, out["safetensors"])
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()} | {"module.head.weight": torch.zeros(7, 32)},
                "epoch": 3}, out["pth_model_module"])
    noise = {k: v + 1.0 for k, v in sd.items()}  # the momentum encoder: must not be the one taken
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in sd.items()}
                | {f"module.momentum_encoder.{k}": v for k, v in noise.items()}}, out["mocov3"])
    out["hub"].mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, out["hub"] / "model.safetensors")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                "student": {f"module.backbone.{k}": v for k, v in noise.items()}}, out["dino"])
    cmim_model = {f"teacher.backbone.{k}": v for k, v in sd.items()} | {"teacher.mask_token": torch.ones(1, 1, 32)}
    torch.save({"model": cmim_model | {f"student.backbone.{k}": v for k, v in noise.items()},
                "config": "method: conmim\n", "encoder": {"timm_name": "vit_base_patch16_224", "timm_kwargs": {}},
                "method": "conmim"}, out["cmim"])
    return out


def _cfg(init_from: Path, method: str = "conmim", *extra: str):
    return load_config(None, [
        f"method={method}", "data.name=synthetic", "data.img_size=48", "data.in_chans=5", "data.mean=auto",
        "data.std=auto", "model.size=tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "model.patch_size=8", "conmim.proj_hidden_dim=64", "conmim.proj_out_dim=32", "mocov3.proj_hidden_dim=64",
        "mocov3.proj_out_dim=32", "mocov3.pred_hidden_dim=64", f"model.init_from={init_from}", *extra])


@pytest.mark.parametrize("fmt", ["safetensors", "pth_model_module", "mocov3", "hub", "dino", "cmim"])
def test_init_on_another_grid_and_channel_count(tmp_path: Path, source, fmt: str, caplog) -> None:
    path = _files(tmp_path, source)[fmt]
    with caplog.at_level(logging.INFO, logger="cmim"):
        method = build_method(_cfg(path))
    bb = method.student.backbone
    assert torch.equal(bb.blocks[1].attn.qkv.weight, source["blocks.1.attn.qkv.weight"])
    assert torch.equal(bb.cls_token, source["cls_token"]) and torch.equal(bb.norm.bias, source["norm.bias"])
    # 4 x 4 -> 6 x 6 grid: timm's bicubic resampling, CLS position kept
    assert bb.pos_embed.shape == (1, 37, 32)
    assert torch.allclose(bb.pos_embed, resample_abs_pos_embed(source["pos_embed"], [6, 6], [4, 4], 1))
    # 3 -> 5 channels: RGB filters repeated and scaled by 3/5
    assert bb.patch_embed.proj.weight.shape == (32, 5, 8, 8)
    assert torch.allclose(bb.patch_embed.proj.weight, adapt_input_conv(5, source["patch_embed.proj.weight"]))
    # the EMA teacher is a copy of the loaded student
    for (name, s), (_, t) in zip(method.student.named_parameters(), method.teacher.named_parameters(), strict=True):
        assert torch.equal(s, t), name
    if fmt == "cmim":
        assert torch.equal(method.student.mask_token, torch.ones(1, 1, 32))  # a cmim encoder's own mask token
    table = caplog.text
    assert "matched" in table and "resized        2" in table and "pos_embed (1, 17, 32) -> (1, 37, 32)" in table
    if fmt == "pth_model_module":
        assert "unexpected     1  head.weight" in table and "prefix 'module.'" in table


def test_momentum_encoder_starts_from_the_same_weights(tmp_path: Path, source) -> None:
    method = build_method(_cfg(_files(tmp_path, source)["safetensors"], "mocov3"))
    assert torch.equal(method.teacher.backbone.blocks[0].mlp.fc1.weight, source["blocks.0.mlp.fc1.weight"])
    assert all(torch.equal(s, t) for s, t in zip(method.student.parameters(), method.teacher.parameters(), strict=True))


def test_same_geometry_loads_everything_and_sincos_is_kept(tmp_path: Path, source) -> None:
    path = _files(tmp_path, source)["safetensors"]
    cfg = load_config(None, ["data.name=synthetic", "data.img_size=32", "model.size=tiny", "model.embed_dim=32",
                             "model.depth=2", "model.num_heads=2", "model.patch_size=8", "conmim.proj_hidden_dim=64",
                             "conmim.proj_out_dim=32", "model.pos_embed=sincos"])
    enc = build_method(cfg).student
    sincos = enc.backbone.pos_embed.clone()
    report = init_encoder_from(enc, path, keep_pos_embed=True)
    assert not report.resized and not report.mismatched and report.kept == ["pos_embed"]
    assert torch.equal(enc.backbone.pos_embed, sincos)
    assert all(torch.equal(v, source[k]) for k, v in enc.backbone.state_dict().items() if k != "pos_embed")


def test_bad_files_are_one_line(tmp_path: Path, source) -> None:
    with pytest.raises(ConfigError, match="model.init_from: not found"):
        _cfg(tmp_path / "nope.safetensors")
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="holds no ViT weights"):
        read_encoder_weights(tmp_path / "resnet.pth")
    wide = {k: torch.zeros(*[64 if n == 32 else n for n in v.shape]) for k, v in source.items()}
    save_file(wide, tmp_path / "wide.safetensors")  # another width: nothing fits
    with pytest.raises(CheckpointError, match=r"tensors do not fit this encoder .*set model.embed_dim"):
        build_method(_cfg(tmp_path / "wide.safetensors"))
    save_file({"patch_embed.proj.weight": torch.zeros(64, 3, 8, 8)}, tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="no tensor fits this encoder"):
        build_method(_cfg(tmp_path / "none.safetensors"))
    (tmp_path / "empty_hub").mkdir()
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        read_encoder_weights(tmp_path / "empty_hub")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")  # unpickling it would call print: refused, never run
    with pytest.raises(UnsafeCheckpointError) as e:
        build_method(_cfg(tmp_path / "evil.pth"))
    assert "\n" not in str(e.value) and "refused" in str(e.value)
