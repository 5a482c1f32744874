"""Pictures: each ``cmim viz`` command writes a non-empty PNG; ``cmim report`` embeds them in one page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from cmim.cli import main
from cmim.config import load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.data.augment import normalize
from cmim.eval.loading import load_source
from cmim.train import pretrain
from cmim.viz.maps import cls_attention, patch_similarity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA = ["data.num_workers=0", "precision=fp32"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny ConMIM run with a metrics log (train + online k-NN records) and a checkpoint."""
    root = tmp_path_factory.mktemp("viz")
    cfg = load_config(None, tiny_overrides(root, "train.epochs=1", "train.log_every_steps=1"))
    return Path(pretrain(cfg)["checkpoint"]).parent


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_viz_commands_write_pngs(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CMIM_CACHE", str(tmp_path / "cache"))
    ckpt = str(run_dir / CHECKPOINT_FILE)
    cmds = {
        "tsne": ["viz", "tsne", ckpt, f"{ckpt}@student", "--random-init", "--points", "48", "test_subset=48",
                 "train_subset=48", "linear.epochs=5", *DATA],
        "patches": ["viz", "patches", ckpt, "--random-init", "--images", "2", "--query", "1,1",
                    "--query", "2,3", *DATA],
        "attention": ["viz", "attention", ckpt, "--images", "2", *DATA],
        "curves": ["viz", "curves", str(run_dir)],
    }
    for name, args in cmds.items():
        out = tmp_path / f"{name}.png"
        assert main([*args, "--out", str(out)]) == 0, name
        assert _is_png(out), name
        assert capsys.readouterr().out.startswith(f"cmim viz {name}:")


def test_maps_are_well_formed(run_dir):
    src = load_source(run_dir / CHECKPOINT_FILE)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    sim = patch_similarity(src, images, [0.5] * 3, [0.25] * 3, [(0, 0), (2, 1)])
    assert sim.shape == (2, 2, 4, 4)
    assert torch.allclose(sim[:, 0, 0, 0], torch.ones(2), atol=1e-5)  # a query is identical to itself
    assert torch.allclose(sim[:, 1, 2, 1], torch.ones(2), atol=1e-5)
    att = cls_attention(src, images, [0.5] * 3, [0.25] * 3)
    assert att.shape == (2, 2, 4, 4)  # 2 heads over the 4x4 grid
    assert (att >= 0).all() and (att.sum(dim=(-1, -2)) <= 1 + 1e-5).all()  # the rest goes to CLS


def test_bad_query_and_missing_metrics_are_one_line(run_dir, tmp_path, capsys):
    assert main(["viz", "patches", str(run_dir / CHECKPOINT_FILE), "--query", "9,9", *DATA]) == 2
    err = capsys.readouterr().err.strip()
    assert "--query" in err and "\n" not in err
    assert main(["viz", "curves", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "metrics" in err and "\n" not in err


def test_report_embeds_pictures(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CMIM_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "knn", str(run_dir / CHECKPOINT_FILE), *DATA]) == 0
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out), *DATA, "linear.epochs=5"]) == 0
    page = out.read_text()
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,', page)
    assert {"curves", "tsne", "patches", "attention"} <= set(images)
    assert "<table>" in page and "knn" in page and "method: conmim" in page
    assert "report.html" in capsys.readouterr().out


def _hooked_cls_attention(enc, x):
    """The reference: the last block's attention weights caught where they leave the softmax (at ``attn_drop``)."""
    attn, caught = enc.backbone.blocks[-1].attn, []
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: caught.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            enc(x)
    finally:
        attn.fused_attn = fused
        hook.remove()
    gh, gw = enc.grid_size
    return caught[-1][:, :, 0, -gh * gw:].reshape(x.shape[0], -1, gh, gw)


@pytest.mark.parametrize("family", ["vit", "beit-shared", "beit-own"])
def test_cls_attention_is_the_softmax_of_the_last_block(family):
    """timm's AttentionExtract gives exactly the weights a hook on the encoder's own forward sees, for ViT and for
    Beit with a shared or per-block relative position bias, and leaves the encoder as it was."""
    from cmim.eval.loading import EncoderSource
    from cmim.models import MaskedEncoder

    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    name = "vit_tiny_patch16_224"
    if family != "vit":
        name = "beit_base_patch16_224"
        shared = family == "beit-shared"
        kw.update(use_abs_pos_emb=not shared, use_shared_rel_pos_bias=shared, use_rel_pos_bias=not shared)
    torch.manual_seed(0)
    enc = MaskedEncoder(name, kw)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))  # tables and biases away from their zero init
    enc.backbone.blocks[-1].attn.fused_attn = True  # as on a GPU: must be back to it afterwards
    src = EncoderSource(enc, "x", "0" * 64, "checkpoint", "teacher", None, {})
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = cls_attention(src, images, [0.5] * 3, [0.25] * 3)
    want = _hooked_cls_attention(enc, normalize(images, [0.5] * 3, [0.25] * 3))
    assert got.shape == (3, 2, 4, 4) and torch.equal(got, want)
    assert enc.backbone.blocks[-1].attn.fused_attn is True
    assert not any(m._forward_hooks for m in enc.modules())
