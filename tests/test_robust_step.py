"""Robust steps: a non-finite step is skipped without touching weights, AdamW state or the EMA teacher; K in a
row stop the run with one error line that names the intact last checkpoint; a batch that cannot fit in memory
is refused with one line before any step (and a step's OutOfMemoryError becomes one)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from cmim.config import load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.engine import memory
from cmim.engine.run import build_optimizer
from cmim.engine.step import optimizer_update
from cmim.engine.trainer import Trainer
from cmim.methods import build_method
from cmim.methods.conmim import ConMIM

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "conmim_fmnist_cpu.yaml"  # the CLI runs start from a recipe, as in test_engine
QUIET = ["monitor.every_epochs=0", "train.resume=auto"]

# Injects NaN losses into ConMIM on the (1-based) steps in CMIM_NAN_STEPS, e.g. "2" or "6-99" (plain code, so
# that a subprocess could run it too). The step being computed is one more than the last after_step's.
NAN_PATCH = """
import os
from cmim.methods.conmim import ConMIM

def _steps():
    spec = os.environ.get("CMIM_NAN_STEPS", "")
    lo, _, hi = spec.partition("-")
    return range(int(lo), int(hi or lo) + 1) if spec else range(0)

_forward, _after = ConMIM.forward, ConMIM.after_step

def forward(self, views, mask=None):
    out = _forward(self, views, mask)
    if getattr(self, "_steps_done", 0) + 1 in _steps():
        out["loss"] = out["loss"] * float("nan")
    return out

def after_step(self, step, total_steps, ok=None):
    self._steps_done = step
    return _after(self, step, total_steps, ok)

ConMIM.forward, ConMIM.after_step = forward, after_step
"""


@pytest.fixture
def nan_steps(monkeypatch):
    """Patch ConMIM in this process; returns a setter for the steps whose loss is NaN."""
    monkeypatch.setattr(ConMIM, "forward", ConMIM.forward)  # restored after the test
    monkeypatch.setattr(ConMIM, "after_step", ConMIM.after_step)
    exec(NAN_PATCH, {})

    def set_steps(spec: str) -> None:
        monkeypatch.setenv("CMIM_NAN_STEPS", spec)

    return set_steps


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_clone(v) for v in x)
    return x


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _run_recording(cfg) -> tuple[dict, list[dict]]:
    """Train; the model (student, EMA teacher) and optimizer state after every step."""
    trainer = Trainer(cfg)
    states = [{"model": _clone(trainer.method.state_dict()), "optim": _clone(trainer.optimizer.state_dict())}]
    after = trainer.method.after_step

    def record(step, total_steps, ok=None):
        info = after(step, total_steps, ok)
        states.append({"model": _clone(trainer.method.state_dict()), "optim": _clone(trainer.optimizer.state_dict())})
        return info

    trainer.method.after_step = record
    return trainer.train(), states


@pytest.mark.parametrize("extra", [[], ["optim.fused=false", "optim.clip_grad=null"]], ids=["fused", "unfused"])
def test_nan_step_is_skipped_and_counted(tmp_path, nan_steps, one_thread, extra):
    nan_steps("2")
    cfg = load_config(None, tiny_overrides(tmp_path, *QUIET, "train.log_every_steps=1", *extra))
    summary, states = _run_recording(cfg)
    assert summary["steps"] == 8 and summary["nonfinite_steps"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["nonfinite_steps"] == 1
    # states[s] = after step s: the bad step 2 changed nothing (student, teacher, moments, step counters) ...
    assert _equal(states[2]["model"], states[1]["model"])
    assert _equal(states[2]["optim"]["state"], states[1]["optim"]["state"])  # (only the scheduled lr moved on)
    assert all(float(s["step"]) == 1 for s in states[2]["optim"]["state"].values())  # AdamW's step counters
    # ... while the steps around it trained
    assert not _equal(states[1]["model"], states[0]["model"]) and not _equal(states[3]["model"], states[2]["model"])
    assert all(torch.isfinite(v).all() for v in states[-1]["model"].values() if v.is_floating_point())
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["nonfinite_steps"] for r in train] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert train[1]["loss"] is None and all(r["loss"] is not None for r in train[2:])


def test_nonfinite_gradient_with_finite_loss_is_skipped(tmp_path, one_thread, monkeypatch):
    """An inf gradient (finite loss) is caught through the gradient norm, also without clipping."""
    cfg = load_config(None, tiny_overrides(tmp_path, *QUIET, "optim.clip_grad=null", "train.max_steps=2"))
    trainer = Trainer(cfg)
    p = trainer.method.student.backbone.patch_embed.proj.weight
    hook = p.register_hook(lambda g: torch.full_like(g, float("inf")) if trainer.step == 1 else g)
    states = []
    after = trainer.method.after_step

    def record(step, total_steps, ok=None):
        info = after(step, total_steps, ok)
        states.append(_clone(trainer.method.state_dict()))
        return info

    trainer.method.after_step = record
    summary = trainer.train()
    hook.remove()
    assert summary["nonfinite_steps"] == 1 and _equal(states[1], states[0])


def test_masked_ema_and_optimizer_match_the_plain_path(tiny_cfg, one_thread):
    """ok=True is bit-identical to the old scalar lerp / plain step; ok=False leaves everything as it was."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    m = build_method(cfg)
    for p in m.student.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    teacher0 = _clone(m.teacher.state_dict())
    for momentum in (0.97, 0.0):
        m.teacher.load_state_dict(teacher0)
        m.ema_update(momentum)
        plain = _clone(m.teacher.state_dict())
        m.teacher.load_state_dict(teacher0)
        m.ema_update(momentum, torch.tensor(True))
        assert _equal(m.teacher.state_dict(), plain)
        m.teacher.load_state_dict(teacher0)
        m.ema_update(momentum, torch.tensor(False))
        assert _equal(m.teacher.state_dict(), teacher0)
    for fused in (True, False):
        cfg = tiny_cfg(f"optim.fused={str(fused).lower()}")
        opt = build_optimizer(m, cfg, torch.device("cpu"))
        params = [p for g in opt.param_groups for p in g["params"]]
        m(*_inputs(cfg, m))["loss"].backward()
        optimizer_update(opt, params, 3.0)  # a good step: moments exist
        before = (_clone(dict(m.named_parameters())), _clone(opt.state_dict()))
        m(*_inputs(cfg, m))["loss"].backward()
        _, ok = optimizer_update(opt, params, 3.0, finite=torch.tensor(False))
        assert not ok and _equal((dict(m.named_parameters()), opt.state_dict()), before)


def _inputs(cfg, method):
    """A synthetic batch of 4 as the method takes it: the data stage's views and the mask."""
    from cmim.bench import synthetic_batches
    from cmim.data.augment import ViewMaker

    batch = synthetic_batches(cfg, method, 4, 1)[0]
    d = cfg.data
    return ViewMaker(method.view_spec(), d.mean, d.std, d.in_chans)(batch["crops"], batch["aug"]), batch["mask"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_consecutive_nonfinite_steps_stop_with_one_line(tmp_path, nan_steps, one_thread, capsys):
    """K NaN steps in a row: exit 2, one `cmim: error:` line naming the last checkpoint, which stays as it was."""
    from cmim.cli import main

    out = tmp_path / "run"
    argv = ["pretrain", str(RECIPE), *tiny_overrides(tmp_path, *QUIET, "train.epochs=4", "train.max_nonfinite_steps=3")]
    assert main([*argv, "train.max_steps=4"]) == 0
    ckpt = out / CHECKPOINT_FILE
    sha = _sha(ckpt)
    capsys.readouterr()
    # resume at step 4; steps 6, 7, 8 are NaN; step 8 ends epoch 1, where a checkpoint would be written
    nan_steps("6-99")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cmim: error: 3 consecutive non-finite steps") and "by step 8" in err[0], err
    assert f"the last good checkpoint is {ckpt} (step 4)" in err[0], err
    assert _sha(ckpt) == sha
    assert not list(out.glob(".checkpoint*"))
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert train[-1]["step"] == 8 and train[-1]["nonfinite_steps"] == 3


def test_memory_check_refuses_a_batch_before_any_step(tmp_path, monkeypatch, capsys):
    from cmim.cli import main

    seen = {"data_batches": 1}
    estimate = memory.estimate_step_memory

    def spy(*a, **k):
        seen["est"] = estimate(*a, **k)
        return seen["est"]

    monkeypatch.setattr(memory, "estimate_step_memory", spy)
    # exactly 4 images per step fit (pretrain without loader workers: one host batch in flight; bench: two)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: seen["est"].need(4, seen["data_batches"]) + 1)
    monkeypatch.setattr(ConMIM, "after_step", lambda *a, **k: pytest.fail("a training step ran"))
    out = tmp_path / "run"
    assert main(["pretrain", str(RECIPE), *tiny_overrides(tmp_path, *QUIET, "monitor.every_epochs=1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cmim: error: a batch of 16 needs about ") and " MB of CPU RAM (estimate), " in err[0]
    assert err[0].endswith("are available; try train.batch_size=4 or train.accum_steps=4"), err[0]
    assert not (out / CHECKPOINT_FILE).exists() and not (out / "metrics.jsonl").exists()
    # cmim bench stops the same way, before its matmul peaks and timing
    seen["data_batches"] = 2
    assert main(["bench", *tiny_overrides(tmp_path, "train.batch_size=8"), "--data-items", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmim: error: a batch of 8 needs about "), err
    assert err[0].endswith("try train.batch_size=4 or train.accum_steps=2"), err[0]


def test_memory_probe_changes_nothing(tmp_path, one_thread):
    """Same weights (BatchNorm statistics included: MoCo v3 heads) with and without the probe."""
    weights = []
    for check in ("true", "false"):
        out = tmp_path / check
        cfg = load_config(None, tiny_overrides(tmp_path, *QUIET, "method=mocov3", "train.max_steps=2",
                                               f"train.check_memory={check}", f"train.out_dir={out}"))
        Trainer(cfg).train()
        weights.append(torch.load(out / CHECKPOINT_FILE, weights_only=True)["model"])
    assert _equal(weights[0], weights[1])


def test_out_of_memory_in_a_step_is_one_line(tmp_path, monkeypatch, capsys):
    from cmim.cli import main
    from cmim.engine import step

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(step, "optimizer_update", oom)
    assert main(["pretrain", str(RECIPE), *tiny_overrides(tmp_path, *QUIET)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cmim: error: out of CPU memory at step 1 with a batch of 16 (16 images per process and "
                   "micro-batch); try train.batch_size=8 or train.accum_steps=2"]


def test_suggestions():
    assert memory.suggestion(2048, 1, 1, 300) == "try train.batch_size=256 or train.accum_steps=8"
    assert memory.suggestion(2048, 2, 4, 100) == "try train.batch_size=512 or train.accum_steps=8"  # 64 per process
    assert memory.suggestion(48, 1, 1, 20) == "try train.batch_size=16 or train.accum_steps=3"
    assert memory.suggestion(16, 1, 1, 0).startswith("not even one image")
