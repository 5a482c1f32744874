"""``cmim export --format hub|onnx``: a Hub-style folder that timm alone (cmim not importable) rebuilds with the
encoder's outputs and the run's preprocessing, for ViT, Beit and MoCo v3's sin-cos/frozen-patch ViT; refusals
are one line and leave nothing behind; ONNX matches PyTorch under onnxruntime for any batch size; exported
files are readable like any other file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import cmim
from cmim.cli import main
from cmim.config import load_config
from cmim.core.io import atomic_write_text
from cmim.eval.loading import load_source
from cmim.export import export_hub
from cmim.models import MaskedEncoder
from cmim.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = {
    "vit": [],
    "beit": ["model.family=beit", "model.layer_scale_init=0.1"],
    "mocov3": ["method=mocov3", "model.pos_embed=sincos", "model.frozen_patch_embed=true", "model.global_pool=token",
               "model.init=mocov3"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, extra in RUNS.items():
        cfg = load_config(None, tiny_overrides(root / name, "train.max_steps=1", "monitor.every_epochs=0",
                                               "model.depth=1", "data.eval_crop_pct=0.875", *extra))
        out[name] = Path(pretrain(cfg)["checkpoint"])
    return out


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# Runs with cmim blocked: only timm, torch and safetensors. Writes what timm built and computed.
_TIMM_ONLY = """
import sys
sys.modules["cmim"] = None  # any import of cmim now fails
import json, timm, torch
from safetensors.torch import load_file, save_file
folders, probe, result = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
x = load_file(probe)
out, data = {}, {}
for i, folder in enumerate(folders):
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    with torch.no_grad():
        out[f"{i}.tokens"] = model.forward_features(x[str(i)])
        out[f"{i}.pooled"] = model(x[str(i)]).contiguous()
    cfg = timm.data.resolve_data_config({}, model=model)
    data[folder] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    data[folder]["type"] = type(model).__name__
save_file(out, result, metadata={"data": json.dumps(data)})
"""


def test_hub_folder_loads_in_timm_without_cmim(checkpoints, tmp_path, capsys, umask_022):
    folders, probes, refs = [], {}, {}
    for i, (name, ckpt) in enumerate(checkpoints.items()):
        folder = tmp_path / f"{name}-hub"
        assert main(["export", str(ckpt), str(folder), "--format", "hub"]) == 0
        line = capsys.readouterr().out.strip()
        assert "\n" not in line and f"local-dir:{folder}" in line and "max abs diff" in line
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        assert folder.stat().st_mode & 0o777 == 0o755
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
        enc: MaskedEncoder = load_source(ckpt).encoder.eval()
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            tokens = enc(x)
        pool = "cls" if name == "mocov3" else "mean"
        folders.append(str(folder))
        probes[str(i)] = x
        refs[i] = (tokens, MaskedEncoder.pool(tokens, pool))

    from safetensors.torch import safe_open, save_file

    save_file(probes, str(tmp_path / "probe.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-c", _TIMM_ONLY, ",".join(folders), str(tmp_path / "probe.safetensors"),
                          str(tmp_path / "result.safetensors")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with safe_open(str(tmp_path / "result.safetensors"), framework="pt") as f:
        data = json.loads(f.metadata()["data"])
        for i, (tokens, pooled) in refs.items():
            assert (f.get_tensor(f"{i}.tokens") - tokens).abs().max().item() <= 1e-5
            assert (f.get_tensor(f"{i}.pooled") - pooled).abs().max().item() <= 1e-5
    for name, folder in zip(checkpoints, folders):
        run_data = load_source(checkpoints[name]).data
        d = data[folder]
        assert d["type"] == ("Beit" if name == "beit" else "VisionTransformer")
        assert d["mean"] == list(run_data["mean"]) and d["std"] == list(run_data["std"])  # the training normalization
        assert d["input_size"] == [3, 16, 16] and d["crop_pct"] == 0.875 and d["interpolation"] == "bicubic"
        config = json.loads((Path(folder) / "config.json").read_text())
        args = config["model_args"]
        assert args["num_classes"] == 0 and args["embed_dim"] == 32 and args["depth"] == 1
        assert args["patch_size"] == 4 and args["in_chans"] == 3 and args["img_size"] == [16, 16]
        if name != "beit":
            assert args["class_token"] is True and args["no_embed_class"] is False and args["pos_embed"] == "learn"
        assert "license" not in config["pretrained_cfg"] and config["cmim"]["method"] in ("conmim", "mocov3")
        card = (Path(folder) / "README.md").read_text()
        assert f'timm.create_model("local-dir:{folder}", pretrained=True)' in card
        assert "library_name: timm" in card and "synthetic" in card and "| steps | 1 of" in card
        if name == "mocov3":
            assert "sin-cos" in card


def test_hub_folder_is_a_cmim_source(checkpoints, tmp_path):
    ckpt = checkpoints["beit"]
    export_hub(ckpt, tmp_path / "hub")
    src = load_source(tmp_path / "hub")
    assert src.kind == "export" and src.path == str(tmp_path / "hub") and src.method == "conmim"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (cmim.load_encoder(tmp_path / "hub")(x) - cmim.load_encoder(ckpt)(x)).abs().max() <= 1e-6
        assert torch.equal(src.encoder(x), load_source(ckpt).encoder(x))


def test_model_card_lists_the_runs_evaluations(checkpoints, tmp_path):
    ckpt = checkpoints["vit"]
    result = {"protocol": "knn", "top1": 61.25, "top5": 99.0, "features": {"feature": "mean", "init": "pretrained"},
              "dataset": {"name": "synthetic"}}
    atomic_write_text(ckpt.parent / "eval" / "knn-synthetic-teacher-mean.json", json.dumps(result))
    try:
        export_hub(ckpt, tmp_path / "hub")
    finally:
        (ckpt.parent / "eval" / "knn-synthetic-teacher-mean.json").unlink()
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "| knn (`eval/knn-synthetic-teacher-mean.json`) | mean | synthetic | 61.25 | 99.00 |" in card


def test_hub_refuses_what_timm_cannot_rebuild(checkpoints, tmp_path, capsys, monkeypatch):
    import cmim.export as export

    # a config.json that describes another model: timm's build no longer matches the weights / outputs
    monkeypatch.setattr(export, "_explicit_args", lambda model: {"no_embed_class": True})
    target = tmp_path / "hub"
    assert main(["export", str(checkpoints["vit"]), str(target), "--format", "hub"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmim: error: cannot export the vit_tiny_patch16_224 encoder as a Hub folder")
    assert "\n" not in err
    assert not target.exists() and not list(tmp_path.iterdir())

    assert "timm does not rebuild it from config.json (size mismatch for pos_embed" in err

    # one that builds and loads, but pools differently (the CLS token joins the mean): the outputs tell
    monkeypatch.setattr(export, "_explicit_args", lambda model: {"pool_include_prefix": True})
    assert main(["export", str(checkpoints["vit"]), str(target), "--format", "hub"]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json does not reproduce it (max abs diff" in err and "\n" not in err and not target.exists()

    (tmp_path / "file").write_text("x")
    assert main(["export", str(checkpoints["vit"]), str(tmp_path / "file"), "--format", "hub"]) == 2
    assert "writes a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit", "beit"])
def test_onnx_matches_pytorch(checkpoints, tmp_path, capsys, umask_022, name):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "enc.onnx"
    assert main(["export", str(checkpoints[name]), str(out), "--format", "onnx"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "max abs diff" in line
    assert out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.onnx", "enc.onnx.json"]
    meta = json.loads((tmp_path / "enc.onnx.json").read_text())
    assert meta["max_abs_diff"] <= 1e-4 and meta["exporter"] in ("dynamo", "torchscript")
    assert meta["preprocessing"]["input_size"] == [3, 16, 16]
    enc = load_source(checkpoints[name]).encoder.eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)
    tokens, pooled = session.run(["tokens", "embedding"], {"images": x.numpy()})
    with torch.no_grad():
        ref = enc(x)
    assert (torch.from_numpy(tokens) - ref).abs().max() <= 1e-4
    assert (torch.from_numpy(pooled) - MaskedEncoder.pool(ref, "mean")).abs().max() <= 1e-4


def test_onnx_needs_its_extra(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", str(checkpoints["vit"]), str(tmp_path / "e.onnx"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cmim: error: --format onnx needs the onnx and onnxruntime packages: pip install 'cmim[onnx]'")
    assert main(["export", str(checkpoints["vit"]), str(tmp_path / "e.bin"), "--format", "onnx"]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600

