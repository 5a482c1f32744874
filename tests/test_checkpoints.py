"""Checkpoints: keep-N, a save killed half-way, DCP written by 2 processes and resumed on 1, consolidation, and
the no-code rule for DCP (a crafted ``.metadata``, pickled-bytes entries) and for torch files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import Payload, assert_same_tensors, tiny_overrides
from torch.distributed.checkpoint.api import CheckpointException

from cmim.cli import main
from cmim.config import load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE, CHECKPOINTS_DIR, DCP_METADATA, is_dcp_checkpoint
from cmim.engine.checkpoint.dcp import PLAIN_KEY, read_full
from cmim.engine.trainer import Trainer
from cmim.train import pretrain

REPO = Path(__file__).resolve().parents[1]
CONMIM = str(REPO / "configs" / "conmim_fmnist_cpu.yaml")
QUIET = ["monitor.every_epochs=0", "train.resume=auto"]

pytestmark = pytest.mark.usefixtures("one_thread")



def _run(tmp: Path, name: str, *extra: str) -> dict:
    return pretrain(load_config(CONMIM, tiny_overrides(tmp, *QUIET, f"train.out_dir={tmp / name}", *extra)))




def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmim: error:"), lines
    return lines[0]


@pytest.mark.parametrize("fmt", ["file", "dcp"])
def test_keep_last_n(tmp_path, fmt):
    """keep_checkpoints=2, a checkpoint every step: the last two are left, the newest is what resume takes."""
    s = _run(tmp_path, "run", f"train.checkpoint_format={fmt}", "train.keep_checkpoints=2",
             "train.ckpt_every_steps=1", "train.max_steps=5")
    kept = sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS_DIR).iterdir())
    if fmt == "file":
        assert kept == ["step_00000004.pt", "step_00000005.pt"]
        newest = tmp_path / "run" / CHECKPOINTS_DIR / "step_00000005.pt"
        assert os.path.samefile(newest, tmp_path / "run" / CHECKPOINT_FILE)
        assert torch.load(tmp_path / "run" / CHECKPOINTS_DIR / kept[0], weights_only=True)["step"] == 4
    else:
        assert kept == ["step_00000004", "step_00000005"] and all(
            is_dcp_checkpoint(tmp_path / "run" / CHECKPOINTS_DIR / k) for k in kept)
        assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()
        assert s["checkpoint"].endswith("step_00000005") and read_full(Path(s["checkpoint"]))["step"] == 5
    # keep_checkpoints=1 (the default) keeps no history for the file format, one folder for DCP
    _run(tmp_path, "one", f"train.checkpoint_format={fmt}", "train.ckpt_every_steps=1", "train.max_steps=2")
    history = sorted(p.name for p in (tmp_path / "one" / CHECKPOINTS_DIR).glob("*")) \
        if (tmp_path / "one" / CHECKPOINTS_DIR).exists() else []
    assert history == ([] if fmt == "file" else ["step_00000002"])


def test_killed_dcp_save_leaves_the_previous_one_in_use(tmp_path, monkeypatch):
    """A DCP save that dies before its .metadata is written (all shards on disk) is not a checkpoint: the run
    resumes from the one before, ends exactly where an uninterrupted run does, and the torn folder goes."""
    straight = _run(tmp_path, "straight", "model.drop_path=0.1")
    real_finish = dcp.FileSystemWriter.finish
    calls = {"n": 0}

    def dying_finish(self, metadata, results):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint: its data files are written, its metadata never is
            raise RuntimeError("killed")
        return real_finish(self, metadata, results)

    monkeypatch.setattr(dcp.FileSystemWriter, "finish", dying_finish)
    args = ("model.drop_path=0.1", "train.checkpoint_format=dcp", "train.ckpt_every_steps=1",
            "train.keep_checkpoints=3")
    with pytest.raises(CheckpointException, match="killed"):  # DCP wraps each rank's exception
        _run(tmp_path, "killed", *args)
    monkeypatch.setattr(dcp.FileSystemWriter, "finish", real_finish)
    folder = tmp_path / "killed" / CHECKPOINTS_DIR
    torn = folder / "step_00000003"
    assert torn.is_dir() and any(torn.iterdir()) and not (torn / DCP_METADATA).exists()
    s = _run(tmp_path, "killed", *args)
    assert s["steps"] == 8
    assert_same_tensors(torch.load(straight["checkpoint"], weights_only=True)["model"],
                        read_full(Path(s["checkpoint"]))["model"])
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000006", "step_00000007", "step_00000008"]


def test_dcp_from_two_processes_resumes_on_one_and_consolidates(tmp_path, capsys):
    """2 processes (torchrun, gloo, DDP) write DCP checkpoints at steps 3 and 4; one process resumes step 3 with
    exactly its state, and its step 4 matches the 2-process step 4 (loss and weights, 1e-5 as in
    test_engine's 2-process test); step 4 consolidates to a file that `cmim eval knn` reads."""
    common = ["train.sync_bn=true", "model.drop_path=0.0", "optim.eps=1.0", "optim.lr=0.05",
              "train.log_every_steps=1", "train.checkpoint_format=dcp", "train.ckpt_every_steps=1",
              "train.keep_checkpoints=2"]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cmim.cli",
           "pretrain", CONMIM, *tiny_overrides(tmp_path, *QUIET, f"train.out_dir={out}", "train.max_steps=4",
                                               *common)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    step3, step4 = (out / CHECKPOINTS_DIR / f"step_0000000{i}" for i in (3, 4))
    assert is_dcp_checkpoint(step3) and is_dcp_checkpoint(step4)
    # one process: the state it restores is the checkpoint's, bit for bit
    cfg = load_config(CONMIM, tiny_overrides(tmp_path, *QUIET, f"train.out_dir={tmp_path / 'one'}",
                                             f"train.resume={step3}", "train.max_steps=4", *common))
    trainer = Trainer(cfg)
    assert trainer.maybe_resume() and trainer.step == 3
    full = read_full(step3)
    assert_same_tensors(full["model"], trainer.method.state_dict())
    names = {id(p): n for n, p in trainer.method.named_parameters()}
    for p, st in trainer.optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], full["optimizer"]["state"][names[id(p)]][key]), (names[id(p)], key)
    # ... and its next step is the 2-process run's step 4
    s = _run(tmp_path, "one", f"train.resume={step3}", "train.max_steps=4", *common)
    assert s["steps"] == 4 and s["world_size"] == 1
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, tmp_path /
                                                                                                     "one")]
    assert losses[1][-1] == pytest.approx(losses[0][3], abs=1e-5)
    assert_same_tensors(read_full(step4)["model"], read_full(Path(s["checkpoint"]))["model"], atol=1e-5)
    # consolidation: one process, no process group, a file every reader takes
    assert main(["checkpoint", "consolidate", str(out), str(tmp_path / "c.pt")]) == 0
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2
    assert_same_tensors(ckpt["model"], read_full(step4)["model"])
    assert main(["eval", "knn", str(tmp_path / "c.pt"), "data.num_workers=0", "precision=fp32"]) == 0
    # the run folder itself is not an eval source: one line that says how to make one
    capsys.readouterr()
    assert main(["eval", "knn", str(out), "data.num_workers=0"]) == 2
    assert "cmim checkpoint consolidate" in _one_line(capsys)


def _tiny_dcp(folder: Path, **extra) -> Path:
    """A minimal cmim DCP checkpoint (no training needed)."""
    state = {"model/w": torch.ones(3), PLAIN_KEY: torch.frombuffer(bytearray(b"{}"), dtype=torch.uint8), **extra}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_crafted_dcp_metadata_is_refused(tmp_path, capsys):
    folder = _tiny_dcp(tmp_path / "run" / CHECKPOINTS_DIR / "step_00000001")
    with open(folder / DCP_METADATA, "wb") as f:
        pickle.dump(Payload(tmp_path / "control"), f)
    with open(folder / DCP_METADATA, "rb") as f:  # guard: plain unpickling (what DCP does) runs the payload
        pickle.load(f)
    assert (tmp_path / "control").exists()
    with open(folder / DCP_METADATA, "wb") as f:
        pickle.dump(Payload(tmp_path / "pwned"), f)
    assert main(["checkpoint", "consolidate", str(folder), str(tmp_path / "out.pt")]) == 2
    line = _one_line(capsys)
    assert f"{folder / DCP_METADATA}: refused: the file needs posix.system" in line, line
    assert not (tmp_path / "out.pt").exists()
    # the same file met by a resume (train.resume=auto finds the folder)
    assert main(["pretrain", CONMIM, *tiny_overrides(tmp_path, *QUIET, "train.checkpoint_format=dcp")]) == 2
    assert "refused: the file needs posix.system" in _one_line(capsys)
    assert not (tmp_path / "pwned").exists()


def test_dcp_bytes_entries_and_escaping_paths_are_refused(tmp_path, capsys):
    """DCP would torch.load a non-tensor entry with weights_only=False: such an entry is refused unread."""
    folder = _tiny_dcp(tmp_path / "bytes", extra=1)
    assert main(["checkpoint", "consolidate", str(folder), str(tmp_path / "out.pt")]) == 2
    assert "refused: entry 'extra' is pickled bytes" in _one_line(capsys)
    folder = _tiny_dcp(tmp_path / "escape")
    md = dcp.FileSystemReader(str(folder)).read_metadata()
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    with open(folder / DCP_METADATA, "wb") as f:
        pickle.dump(md, f)
    assert main(["checkpoint", "consolidate", str(folder), str(tmp_path / "out.pt")]) == 2
    assert "points outside its folder" in _one_line(capsys)
    assert main(["checkpoint", "consolidate", str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert "no complete DCP checkpoint" in _one_line(capsys)


def test_unsafe_globals_are_named_from_torchs_own_list(tmp_path, capsys):
    """The refusal names what torch.serialization.get_unsafe_globals_in_checkpoint lists, nothing is unpickled."""
    path = tmp_path / "c.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload(tmp_path / "pwned")}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert main(["eval", "knn", str(path)]) == 2
    line = _one_line(capsys)
    assert f"{path}: refused: the file needs full unpickling (it references posix.system" in line
    assert not (tmp_path / "pwned").exists()


def test_old_checkpoint_with_index_keyed_optimizer_resumes_exactly(tmp_path):
    """Checkpoints written before this layout keyed AdamW's state by parameter index (optimizer.state_dict()):
    they still resume, and bit-exactly."""
    from cmim.engine.checkpoint.state import _param_names

    straight = _run(tmp_path, "straight", "model.drop_path=0.1")
    split = _run(tmp_path, "split", "model.drop_path=0.1", "train.max_steps=3")
    ckpt = torch.load(split["checkpoint"], weights_only=True)
    trainer = Trainer(load_config(CONMIM, tiny_overrides(tmp_path, *QUIET, f"train.out_dir={tmp_path / 'x'}")))
    order = {n: i for i, n in enumerate(n for g in _param_names(trainer.method, trainer.optimizer) for n in g)}
    osd = ckpt["optimizer"]
    groups = [{**g, "params": [order[n] for n in g["params"]]} for g in osd["param_groups"]]
    ckpt["optimizer"] = {"state": {order[n]: v for n, v in osd["state"].items()}, "param_groups": groups}
    torch.save(ckpt, split["checkpoint"])
    s = _run(tmp_path, "split", "model.drop_path=0.1")
    assert s["steps"] == 8
    assert_same_tensors(torch.load(straight["checkpoint"], weights_only=True)["model"],
          torch.load(s["checkpoint"], weights_only=True)["model"])
