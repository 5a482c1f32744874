"""Loading cannot run code: every checkpoint is read weights-only, and every unusable file gives one
``cmim: error:`` line (exit 2) at every entry point: eval, export, viz, report, resume and MimCo teachers."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import Payload, tiny_overrides

from cmim.cli import main
from cmim.config import load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.engine.checkpoint import rng_state, set_rng_state
from cmim.models import MLPHead
from cmim.models.teachers import load_teacher
from cmim.train import pretrain

REPO = Path(__file__).resolve().parents[1]
CONMIM = str(REPO / "configs" / "conmim_fmnist_cpu.yaml")
MIMCO = str(REPO / "configs" / "mimco_fmnist_cpu.yaml")
QUIET = ["monitor.every_epochs=0", "train.resume=auto"]

pytestmark = pytest.mark.usefixtures("one_thread")



def payload(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "method": "conmim"}, path)
    return path


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmim: error:"), lines
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A real tiny ConMIM checkpoint (2 of 8 steps), to cut and corrupt."""
    root = tmp_path_factory.mktemp("safety")
    return Path(pretrain(load_config(None, tiny_overrides(root, "train.max_steps=2", *QUIET)))["checkpoint"])


def test_the_payload_is_live(tmp_path):
    """Guard for the tests below: full unpickling of the file really runs its command."""
    p = payload(tmp_path / "p.pt", tmp_path / "control")
    torch.load(p, weights_only=False)
    assert (tmp_path / "control").exists()


def _refused(line: str, path: Path) -> None:
    assert f"{path}: refused: the file needs full unpickling (it references posix.system)" in line
    assert "cmim loads weights only" in line


@pytest.mark.parametrize("command", ["eval-knn", "eval-linear", "eval-finetune", "export", "viz-tsne",
                                     "viz-patches", "viz-attention"])
def test_payload_is_refused_by_checkpoint_commands(tmp_path, capsys, command):
    p = payload(tmp_path / "evil.pt", tmp_path / "pwned")
    args = {"export": ["export", str(p), str(tmp_path / "out.safetensors")]}.get(
        command, [*command.split("-"), str(p), "data.num_workers=0"])
    assert main(args) == 2
    _refused(one_error_line(capsys), p)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_payload_is_refused_by_report(tmp_path, capsys):
    run = tmp_path / "run"
    p = payload(run / CHECKPOINT_FILE, tmp_path / "pwned")
    assert main(["report", str(run), "data.num_workers=0"]) == 2
    _refused(one_error_line(capsys), p)
    assert not (tmp_path / "pwned").exists()


def test_payload_is_refused_at_resume(tmp_path, capsys):
    p = payload(tmp_path / "run" / CHECKPOINT_FILE, tmp_path / "pwned")
    assert main(["pretrain", CONMIM, *tiny_overrides(tmp_path, *QUIET)]) == 2
    _refused(one_error_line(capsys), p)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("fmt", ["auto", "cmim", "mocov3", "timm"])
def test_payload_is_refused_as_mimco_teacher(tmp_path, capsys, fmt):
    p = payload(tmp_path / "teacher.pt", tmp_path / "pwned")
    assert main(["pretrain", MIMCO, *tiny_overrides(tmp_path, *QUIET), f"mimco.teacher={p}",
                 f"mimco.teacher_format={fmt}", "mimco.teacher_timm_name=vit_tiny_patch16_224"]) == 2
    _refused(one_error_line(capsys), p)
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_plain_pickle_payload_is_not_run(tmp_path, capsys):
    """A payload pickled without torch (any protocol) is not a weights file either."""
    for proto in (2, 4):
        p = tmp_path / f"plain{proto}.pkl"
        with open(p, "wb") as f:
            pickle.dump({"model": Payload(tmp_path / "pwned")}, f, protocol=proto)
        assert main(["eval", "knn", str(p)]) == 2
        line = one_error_line(capsys)
        assert str(p) in line and ("refused" in line or "cannot read checkpoint" in line)
    assert not (tmp_path / "pwned").exists()


def _broken_files(ckpt: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its error line must say)."""
    root.mkdir(parents=True, exist_ok=True)
    data = ckpt.read_bytes()
    files = {"truncated": (data[: len(data) // 2], "cannot read {kind} {path}: truncated or corrupted"),
             "random": (random.Random(0).randbytes(4096), "cannot read {kind} {path}: not a PyTorch weights file"),
             "empty": (b"", "cannot read {kind} {path}: empty or truncated file")}
    out = {}
    for name, (blob, msg) in files.items():
        (root / f"{name}.pt").write_bytes(blob)
        out[name] = (root / f"{name}.pt", msg)
    torch.save({"model": 3}, root / "model3.pt")
    out["model3"] = (root / "model3.pt", "{path} is not a cmim checkpoint ('model' is not a state dict of tensors)")
    torch.save({"model": {"w": "not a tensor"}}, root / "strings.pt")
    out["strings"] = (root / "strings.pt", "{path} is not a cmim checkpoint ('model' holds str at 'w'")
    torch.save([1, 2, 3], root / "list.pt")
    out["list"] = (root / "list.pt", "{path} is not a cmim checkpoint (no 'model' entry)")
    return out


@pytest.mark.parametrize("case", ["truncated", "random", "empty", "model3", "strings", "list"])
def test_unusable_files_are_one_line_at_eval(ckpt, tmp_path, capsys, case):
    path, msg = _broken_files(ckpt, tmp_path)[case]
    assert main(["eval", "knn", str(path)]) == 2
    assert msg.format(kind="checkpoint", path=path) in one_error_line(capsys)


@pytest.mark.parametrize("case", ["truncated", "random", "model3", "strings"])
def test_unusable_files_are_one_line_at_export_and_viz(ckpt, tmp_path, capsys, case):
    path, msg = _broken_files(ckpt, tmp_path)[case]
    assert main(["export", str(path), str(tmp_path / "o.safetensors")]) == 2
    assert msg.format(kind="checkpoint", path=path) in one_error_line(capsys)
    assert main(["viz", "tsne", str(path)]) == 2
    assert msg.format(kind="checkpoint", path=path) in one_error_line(capsys)


@pytest.mark.parametrize("case", ["truncated", "random", "model3", "strings"])
def test_unusable_files_are_one_line_as_teacher(ckpt, tmp_path, capsys, case):
    path, _ = _broken_files(ckpt, tmp_path / "files")[case]
    assert main(["pretrain", MIMCO, *tiny_overrides(tmp_path, *QUIET), f"mimco.teacher={path}"]) == 2
    line = one_error_line(capsys)
    assert str(path) in line
    if case in ("truncated", "random"):
        assert f"cannot read teacher {path}" in line


def _resume_with(ckpt: Path, tmp_path: Path, capsys, edit=None, *extra: str) -> str:
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    if edit is None:
        shutil.copy(ckpt, run / CHECKPOINT_FILE)
    else:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        edit(state)
        torch.save(state, run / CHECKPOINT_FILE)
    assert main(["pretrain", CONMIM, *tiny_overrides(tmp_path, *QUIET, *extra)]) == 2
    return one_error_line(capsys)


def test_unusable_checkpoints_at_resume(ckpt, tmp_path, capsys):
    path = tmp_path / "run" / CHECKPOINT_FILE
    for case in ("truncated", "random", "model3"):
        src, msg = _broken_files(ckpt, tmp_path / "files")[case]
        line = _resume_with(src, tmp_path, capsys)
        assert msg.format(kind="checkpoint", path=path) in line, line
    line = _resume_with(ckpt, tmp_path, capsys, None, "method=simmim")
    assert f"{path} was written by method 'conmim', not 'simmim'" in line
    line = _resume_with(ckpt, tmp_path, capsys, None, "model.embed_dim=48")
    assert f"{path} does not fit this model configuration" in line
    line = _resume_with(ckpt, tmp_path, capsys, lambda s: s.pop("rng"))
    assert f"{path} cannot be resumed: it has no 'rng' entry" in line
    line = _resume_with(ckpt, tmp_path, capsys, lambda s: s.update(step_in_epoch="3"))
    assert f"{path} cannot be resumed: 'step_in_epoch' is '3', not a count" in line
    line = _resume_with(ckpt, tmp_path, capsys, lambda s: s.update(step="3"))
    assert f"{path} is not a cmim checkpoint ('step' is str, not an int)" in line
    line = _resume_with(ckpt, tmp_path, capsys, lambda s: s.update(optimizer=[]))
    assert "'optimizer' is not an optimizer state dict" in line
    line = _resume_with(ckpt, tmp_path, capsys, lambda s: s["rng"].update(numpy=(1, 2)))
    assert "RNG state is not in cmim's format" in line
    line = _resume_with(ckpt, tmp_path, capsys, lambda s: s["optimizer"].update(param_groups=[]))
    assert f"{path}: its optimizer state does not fit this run's optimizer" in line


def test_old_checkpoint_with_numpy_rng_is_refused_with_a_hint(ckpt, tmp_path, capsys):
    """Checkpoints from before weights-only loading held np.random.get_state() (a NumPy array)."""
    line = _resume_with(ckpt, tmp_path, capsys, lambda s: s["rng"].update(numpy=np.random.get_state()))
    assert "refused: the file needs full unpickling (it references numpy." in line
    assert "must be re-created, or converted by someone who trusts the file" in line


def test_checkpoints_load_weights_only_and_rng_round_trip_is_exact(ckpt, tmp_path):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "rng", "config", "encoder", "knn_history"} <= state.keys()
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == want


def test_official_mocov3_release_loads_weights_only(tmp_path):
    """The release's layout (state_dict of module.* tensors, epoch, arch, optimizer state) needs no trust."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=3,
                            embed_dim=48, depth=2, num_heads=12, num_classes=0, global_pool="token").eval()
    vit.head = MLPHead(48, 64, 24, num_layers=2)
    sd = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": v.clone() for k, v in vit.state_dict().items()})
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    vit(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 1, "arch": "vit_small", "state_dict": sd, "optimizer": opt.state_dict()}, path)
    torch.load(path, weights_only=True)
    t = load_teacher(path)
    assert "MoCo v3" in t.source and t.projector_dim == 24
    assert main(["pretrain", MIMCO, *tiny_overrides(tmp_path, *QUIET, "train.max_steps=1"),
                 f"mimco.teacher={path}"]) == 0


def test_cifar_batch_with_a_payload_is_refused(tmp_path):
    """CIFAR's python batches are pickles: only arrays and containers are unpickled, anything else refused."""
    from cmim.data.arrays import CIFAR

    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch", "batches.meta"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": Payload(tmp_path / "pwned"), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="refused: the file references"):
        CIFAR(tmp_path, "train", 10)
    assert not (tmp_path / "pwned").exists()
