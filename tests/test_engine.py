"""Engine: exact resume (also after a kill), 2-process DDP == 1 process, CLI run on synthetic data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmim.config import load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.engine.sampler import GlobalBatchSampler
from cmim.train import pretrain

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from conftest import assert_same_tensors, tiny_overrides  # noqa: E402

QUIET = ["monitor.every_epochs=0", "train.resume=auto"]
# in-process runs and CLI runs must start from the same recipe to be comparable
RECIPE = REPO / "configs" / "conmim_fmnist_cpu.yaml"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["model"]


def _run(tmp: Path, name: str, *extra: str) -> Path:
    out = tmp / name
    pretrain(load_config(RECIPE, tiny_overrides(tmp, *QUIET, f"train.out_dir={out}", *extra)))
    return out




@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(tmp_path, precision):
    straight = _run(tmp_path, "straight", f"train.precision={precision}", "model.drop_path=0.1")
    # stop mid-epoch (3 of 8 steps; 4 steps per epoch), then resume from the checkpoint
    _run(tmp_path, "split", f"train.precision={precision}", "model.drop_path=0.1", "train.max_steps=3")
    ck = torch.load(tmp_path / "split" / CHECKPOINT_FILE, weights_only=True)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (3, 0, 3)
    _run(tmp_path, "split", f"train.precision={precision}", "model.drop_path=0.1")
    assert_same_tensors(_weights(straight), _weights(tmp_path / "split"))
    opt_a = torch.load(straight / CHECKPOINT_FILE, weights_only=True)["optimizer"]
    opt_b = torch.load(tmp_path / "split" / CHECKPOINT_FILE, weights_only=True)["optimizer"]
    for k in opt_a["state"]:
        assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])


def test_resume_after_kill(tmp_path):
    """SIGKILL a CLI run (2 data workers) after its first checkpoints, resume it, compare with a straight run."""
    args = ["train.epochs=6", "data.num_workers=2", "train.ckpt_every_steps=1"]
    straight = _run(tmp_path, "straight", *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cmim.cli", "pretrain", str(REPO / "configs" / "conmim_fmnist_cpu.yaml"),
           *tiny_overrides(tmp_path, *QUIET, f"train.out_dir={out}", *args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpt = out / CHECKPOINT_FILE
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_tensors(_weights(straight), _weights(out))
    assert step_at_kill >= 1


def test_two_process_ddp_equals_one_process(tmp_path):
    """torchrun, 2 processes x 8 images (gloo, global BatchNorm) == 1 process x 16 images.

    AdamW's first steps divide each gradient by its own magnitude, which turns float round-off in
    near-zero gradients into full-size sign flips; a large eps makes the update linear in the gradient, so
    the comparison tests the gradients themselves (loss logged at every step is compared too).
    """
    common = ["train.max_steps=3", "train.sync_bn=true", "model.drop_path=0.0", "optim.eps=1.0",
              "optim.lr=0.05", "train.log_every_steps=1"]
    single = _run(tmp_path, "single", *common)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cmim.cli",
           "pretrain", str(REPO / "configs" / "conmim_fmnist_cpu.yaml"),
           *tiny_overrides(tmp_path, *QUIET, f"train.out_dir={out}", *common)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(single), _weights(out)
    assert_same_tensors(a, b, atol=1e-5)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, out)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    # the runs really trained: the student moved away from the (EMA-lagging) teacher
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert (a[f"student.{qkv}"] - a[f"teacher.{qkv}"]).abs().max() > 1e-4


def test_global_batch_sampler_shards_the_same_global_batch():
    one = GlobalBatchSampler(50, 8, seed=3)
    two = [GlobalBatchSampler(50, 8, world_size=2, rank=r, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(1)
    b1 = list(one)
    b2 = [list(s) for s in two]
    assert len(b1) == 6 and all(len(b) == 8 for b in b1)
    for step, batch in enumerate(b1):
        assert batch == b2[0][step] + b2[1][step]
    one.set_epoch(1, start_step=4)
    assert list(one) == b1[4:]
    acc = GlobalBatchSampler(50, 8, accum_steps=2, seed=3)
    acc.set_epoch(1)
    micro = list(acc)
    assert [micro[2 * i] + micro[2 * i + 1] for i in range(6)] == b1


def test_cli_pretrain_on_synthetic(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cmim.cli", "pretrain", str(REPO / "configs" / "conmim_fmnist_cpu.yaml"),
           *tiny_overrides(tmp_path, f"train.out_dir={out}", "train.tensorboard=true")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "random init" in r.stdout and "pre-trained" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and len(summary["knn"]) == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if x["kind"] == "train"]
    assert train and all({"loss", "lr", "img_per_s", "momentum"} <= x.keys() for x in train)
    assert list((out / "tb").glob("events.*"))
    assert (out / "config.yaml").exists()
    # a finished run resumed again does nothing more and keeps its weights
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0


def test_incompatible_checkpoint_is_one_line_error(tmp_path):
    out = tmp_path / "run"
    _run(tmp_path, "run", "train.max_steps=1")
    cmd = [sys.executable, "-m", "cmim.cli", "pretrain", str(REPO / "configs" / "conmim_fmnist_cpu.yaml"),
           *tiny_overrides(tmp_path, *QUIET, f"train.out_dir={out}", "model.embed_dim=48")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit" in lines[0], r.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cmd2 = cmd[:-1] + [f"train.resume={tmp_path / 'bad.pt'}"]
    r = subprocess.run(cmd2, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_compiled_forward_is_the_steps_model(tiny_cfg):
    """train.compile=true: the step runs the compiled module (building it must not call the module's __bool__,
    which a compiled module answers with a TypeError); compilation itself is lazy, so this costs nothing."""
    from cmim.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg("train.compile=true"))
    assert trainer.train_step.model is trainer.forward and trainer.forward is not trainer.method
