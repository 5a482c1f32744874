"""train.strategy=fsdp (FSDP2) and activation checkpointing: 2 sharded processes train like one process, a
checkpointed step has the gradients of a plain one, and a torchrun job that loses a rank restarts and ends with
the weights of an uninterrupted job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmim.config import load_config
from cmim.core.distributed import DistInfo
from cmim.engine.run import build_run
from cmim.models import MaskedEncoder
from cmim.train import pretrain

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from conftest import assert_same_tensors, tiny_overrides  # noqa: E402

RECIPE = REPO / "configs" / "conmim_fmnist_cpu.yaml"
QUIET = ["monitor.every_epochs=0", "train.resume=auto"]
# AdamW with a large eps updates linearly in the gradient, so the comparison tests the gradients themselves
# (see tests/test_engine.py::test_two_process_ddp_equals_one_process)
EXACT = ["model.drop_path=0.0", "optim.eps=1.0", "optim.lr=0.05", "train.log_every_steps=1"]


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def _torchrun(tmp: Path, out: Path, *extra: str, restarts: int = 0, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", "cmim.cli", "pretrain", str(RECIPE),
           *tiny_overrides(tmp, *QUIET, f"train.out_dir={out}", *extra)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]




@pytest.mark.parametrize("method,extra", [
    # with activation checkpointing under FSDP
    ("conmim", ["train.max_steps=3"]),
    # gathered keys and the heads' global BatchNorm; the k-NN monitor on a gathered encoder
    ("mocov3", ["train.max_steps=3", "monitor.at_start=true", "monitor.health=false", "monitor.raw_pixels=false"]),
])
def test_fsdp_equals_one_process(tmp_path, method, extra):
    """torchrun, 2 FSDP processes x 8 images == 1 process x 16 images: loss at every step and all weights (EMA
    teachers, heads, BatchNorm statistics) after 3 steps, to 1e-5."""
    common = [f"method={method}", "train.sync_bn=true", *EXACT, *extra]
    if method == "mocov3":
        common.append("monitor.every_epochs=1")
    single = tmp_path / "single"
    pretrain(load_config(RECIPE, tiny_overrides(tmp_path, *QUIET, f"train.out_dir={single}", *common)))
    out = tmp_path / "fsdp"
    _torchrun(tmp_path, out, *common, "train.strategy=fsdp",
              *(["train.grad_checkpointing=true"] if method == "conmim" else []))
    a, b = _state(single), _state(out)
    assert_same_tensors(a["model"], b["model"], atol=1e-5)
    assert len(_losses(single)) == 3 and _losses(single) == pytest.approx(_losses(out), abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["world_size"] == 2
    # the optimizer state was gathered too (keyed by parameter name under FSDP) and matches the single run's
    moments = {k: v["exp_avg"] for k, v in b["optimizer"]["state"].items()}
    names = [n for n, p in _named_trainable(a["config"])]
    assert sorted(moments) == sorted(names)
    if method == "mocov3":  # the same random-init weights: the gathered encoder's k-NN equals the single run's
        knn = [json.loads((d / "summary.json").read_text())["knn"][0] for d in (single, out)]
        assert knn[0]["step"] == knn[1]["step"] == 0 and knn[0]["knn_top1"] == knn[1]["knn_top1"]
    # the runs really trained: the student moved away from the (EMA-lagging) teacher
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert (b["model"][f"student.{qkv}"] - b["model"][f"teacher.{qkv}"]).abs().max() > 1e-4


def test_fsdp_accumulation_equals_ddp(tmp_path):
    """Gradient accumulation under FSDP (gradient sync off for all but the last micro-batch) trains exactly as
    under DDP. (Not as one process: with 2 micro-batches per step, each process's micro-batch holds other images
    than a single process's, and BatchNorm normalizes over those.)"""
    common = ["train.sync_bn=true", "train.accum_steps=2", "train.max_steps=3", *EXACT]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(tmp_path, ddp, *common, "train.strategy=ddp")
    _torchrun(tmp_path, fsdp, *common, "train.strategy=fsdp")
    assert_same_tensors(_state(ddp)["model"], _state(fsdp)["model"], atol=1e-6)
    assert _losses(ddp) == pytest.approx(_losses(fsdp), abs=1e-6)


def _named_trainable(config_yaml: str) -> list[tuple[str, torch.nn.Parameter]]:
    from cmim.config import from_yaml_string
    from cmim.methods import build_method

    return [(n, p) for n, p in build_method(from_yaml_string(config_yaml)).named_parameters() if p.requires_grad]


def test_grad_checkpointing_gives_the_same_gradients(tiny_cfg):
    """train.grad_checkpointing=true recomputes every student block in backward: the same loss and gradients
    (drop path on: the recomputation replays the same random masks)."""
    grads = []
    for flag in (False, True):
        run = build_run(tiny_cfg(f"train.grad_checkpointing={str(flag).lower()}", "model.drop_path=0.2"),
                        DistInfo(), data=False, total_steps=10)
        encoders = [m for m in run.method.modules() if isinstance(m, MaskedEncoder)]
        assert all(e.backbone.grad_checkpointing is flag for e in encoders) and len(encoders) == 2
        torch.manual_seed(1)
        views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
        mask = torch.rand(8, 16, generator=torch.Generator().manual_seed(2)) < 0.5
        torch.manual_seed(3)
        loss = run.method(views, mask)["loss"]
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in run.method.named_parameters()
                                      if p.grad is not None}))
    (loss_a, ga), (loss_b, gb) = grads
    assert torch.equal(loss_a, loss_b)
    assert ga.keys() == gb.keys() and any(k.startswith("student.backbone.blocks.1.") for k in ga)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-6, rtol=1e-5), (k, (ga[k] - gb[k]).abs().max())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rank_killed_mid_epoch_restarts_and_resumes(tmp_path, strategy):
    """torchrun --max-restarts 1: rank 1 kills itself (SIGKILL) after step 3 of 8 (mid-epoch; a checkpoint every
    2 steps); torchrun restarts both processes, they resume from step 2 and end with the uninterrupted job's
    weights, bit for bit."""
    common = [f"train.strategy={strategy}", "train.ckpt_every_steps=2", "model.drop_path=0.1"]
    straight = tmp_path / "straight"
    _torchrun(tmp_path, straight, *common)
    out = tmp_path / "killed"
    r = _torchrun(tmp_path, out, *common, restarts=1, env={"CMIM_TEST_KILL_AT_STEP": "3"})
    assert "resumed from" in r.stderr and "at step 2" in r.stderr, r.stderr[-3000:]
    a, b = _state(straight), _state(out)
    assert a["step"] == b["step"] == 8
    assert_same_tensors(a["model"], b["model"], atol=0.0)


RESTART_RACE = """
import os, time, torch, torch.distributed as dist
from cmim.core.distributed import cleanup, init_distributed
attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], int(os.environ["RANK"])
if attempt == "1" and rank == 0:
    time.sleep(3)  # rank 1 of the new attempt looks up rank 0's address first
init_distributed("cpu")
x = torch.ones(1)
dist.all_reduce(x)
print(f"attempt {attempt} rank {rank} sum {x.item():.0f}", flush=True)
if attempt == "0" and rank == 1:
    os._exit(1)
cleanup()  # leave the group together (a process exiting with a live gloo group can abort)
"""


def test_restarted_job_does_not_read_the_lost_attempts_addresses(tmp_path):
    """torchrun keeps its store across restarts: without a per-attempt prefix, a new process can read the gloo
    address of a process of the lost attempt and fail with 'connection refused' (it did, once rank 0 was slow)."""
    script = tmp_path / "race.py"
    script.write_text(RESTART_RACE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--max-restarts=1", str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "attempt 1 rank 0 sum 2" in r.stdout and "attempt 1 rank 1 sum 2" in r.stdout


@pytest.mark.parametrize("launched", [True, False])
def test_a_torchrun_worker_ends_without_the_interpreter_teardown(launched):
    """`cmim` under torchrun ends with its exit code right after its output is flushed, skipping the teardown in
    which a worker could abort now and then; a plain launch ends normally."""
    code = ("import atexit; from cmim.core.distributed import end_worker; "
            "atexit.register(lambda: print('teardown')); print('done', end=''); end_worker(3)")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    if launched:
        env["TORCHELASTIC_RUN_ID"] = "test"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode, r.stdout) == ((3, "done") if launched else (0, "doneteardown\n"))
