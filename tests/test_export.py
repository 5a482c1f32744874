"""Export: a checkpoint's encoder -> safetensors -> plain ``timm.create_model(..., pretrained=True)`` with no
key surgery, and the same features as cmim's own encoder; for ViT and Beit, from ConMIM and MimCo runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from conftest import tiny_overrides

import cmim
from cmim.cli import main
from cmim.config import load_config
from cmim.eval.loading import load_source
from cmim.eval.run import open_source, run_eval
from cmim.export import export_encoder
from cmim.models import MaskedEncoder
from cmim.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(root: Path, *extra: str) -> Path:
    cfg = load_config(None, tiny_overrides(root, "train.max_steps=1", "monitor.every_epochs=0", *extra))
    return Path(pretrain(cfg)["checkpoint"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """ConMIM runs for a ViT and a Beit backbone, and MimCo runs taught by them."""
    root = tmp_path_factory.mktemp("export")
    out = {
        "conmim-vit": _train(root / "cv"),
        "conmim-beit": _train(root / "cb", "model.family=beit", "model.layer_scale_init=0.1"),
    }
    out["mimco-vit"] = _train(root / "mv", "method=mimco", f"mimco.teacher={out['conmim-vit']}")
    out["mimco-beit"] = _train(root / "mb", "method=mimco", "model.family=beit",
                               f"mimco.teacher={out['conmim-beit']}")
    return out


CASES = ["conmim-vit", "conmim-beit", "mimco-vit", "mimco-beit"]


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_plain_timm_with_identical_features(case, checkpoints, tmp_path, caplog):
    ckpt = checkpoints[case]
    out = tmp_path / "enc.safetensors"
    meta = export_encoder(ckpt, out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["timm_name"] == meta["timm_name"] and sidecar["timm_kwargs"] == meta["timm_kwargs"]

    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model(meta["timm_name"], pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(out)), **meta["timm_kwargs"])
    assert not [r for r in caplog.records if "Missing keys" in r.message or "Unexpected keys" in r.message]
    from safetensors.torch import load_file

    stored = load_file(str(out))
    assert set(stored) == set(model.state_dict())  # nothing missing, nothing extra (no head: num_classes=0)

    src = load_source(ckpt, "teacher")
    enc: MaskedEncoder = src.encoder.eval()
    model.eval()
    x = torch.randn(3, enc.backbone.patch_embed.proj.in_channels, *[enc.grid_size[0] * enc.patch_size] * 2)
    with torch.no_grad():
        tokens = enc(x)
        diff_tokens = (model.forward_features(x) - tokens).abs().max().item()
        pool = "cls" if meta["timm_kwargs"]["global_pool"] == "token" else "mean"
        diff_pooled = (model(x) - MaskedEncoder.pool(tokens, pool)).abs().max().item()
    assert diff_tokens <= 1e-5 and diff_pooled <= 1e-5, (diff_tokens, diff_pooled)

    # the trained encoder is what gets exported: MimCo's teacher name gives its student, not the frozen input
    expected = "student." if case.startswith("mimco") else "teacher."
    assert src.extra["prefix"] == expected
    if case.startswith("mimco"):
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
        assert torch.equal(stored["cls_token"], sd["student.backbone.cls_token"])


def test_load_encoder_api_and_cli(checkpoints, tmp_path, capsys):
    ckpt = checkpoints["conmim-vit"]
    out = tmp_path / "student.safetensors"
    assert main(["export", str(ckpt), str(out), "--encoder", "student"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("cmim export:") and "\n" not in line
    from_file = cmim.load_encoder(out)
    from_ckpt = cmim.load_encoder(ckpt, "student")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (from_file(x) - from_ckpt(x)).abs().max().item() <= 1e-6
    run_cfg = load_source(ckpt).config
    assert tuple(from_file.pretrained_cfg["mean"]) == tuple(run_cfg.data.mean)  # the run's normalization
    assert from_file.pretrained_cfg["input_size"] == (3, 16, 16)
    with_head = cmim.load_encoder(out, num_classes=7)
    assert with_head(x).shape == (2, 7)


def test_eval_on_exported_file(checkpoints, tmp_path):
    out = tmp_path / "t.safetensors"
    export_encoder(checkpoints["conmim-beit"], out)
    src, cfg = open_source(out, None, ["data.num_workers=0", "precision=fp32", f"cache_dir={tmp_path / 'c'}"])
    assert src.kind == "export" and cfg.data.img_size == 16 and cfg.data.name == "synthetic"
    r = run_eval("knn", src, cfg, write=False)
    ref_src, ref_cfg = open_source(checkpoints["conmim-beit"], None,
                                   ["data.num_workers=0", "precision=fp32", f"cache_dir={tmp_path / 'c'}"])
    ref = run_eval("knn", ref_src, ref_cfg, write=False)
    assert r["top1"] == ref["top1"]


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmim: error: checkpoint not found") and "\n" not in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert main(["eval", "knn", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmim: error:") and "\n" not in err
