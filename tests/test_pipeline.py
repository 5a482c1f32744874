"""`cmim pipeline` end to end on tiny synthetic data, and its checks before any work."""

from __future__ import annotations

import json

from conftest import TINY

from cmim.cli import main
from cmim.core.checkpoint_paths import CHECKPOINT_FILE

RECIPES = ["configs/mocov3_fmnist_cpu.yaml", "configs/mimco_fmnist_cpu.yaml"]
COMMON = [*TINY, "train.epochs=1", "monitor.every_epochs=0", "data.synthetic_size=16"]


def test_pipeline_runs_and_summarizes(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", *RECIPES, *COMMON, "--out-dir", str(out), "--teacher", "train.seed=3"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert list(summary["knn_top1"]) == ["random init", "mocov3 teacher", "mimco student"]
    assert all(set(v) == {"cls", "mean"} for v in summary["knn_top1"].values())
    assert set(summary["seconds"]) >= {"stage 1 (mocov3, 1 ep)", "stage 2 (mimco, 1 ep)", "total"}
    assert summary["teacher"]["steps"] == 1 and summary["student"]["steps"] == 1
    assert "| mimco student |" in printed and "| total |" in printed
    assert (out / "teacher" / CHECKPOINT_FILE).is_file() and (out / "student" / CHECKPOINT_FILE).is_file()
    # rerunning resumes: both stages are already complete, so nothing is trained again (options may also
    # come before the overrides, or between them)
    assert main(["pipeline", "--out-dir", str(out), *RECIPES, *COMMON[:3], "--teacher", "train.seed=3",
                 *COMMON[3:]]) == 0
    again = json.loads((out / "pipeline_summary.json").read_text())
    assert again["knn_top1"] == summary["knn_top1"]


def test_pipeline_checks_before_work(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", *RECIPES, *COMMON, "--out-dir", str(out), "--student", "data.img_size=32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not fit" in err[0]
    assert main(["pipeline", RECIPES[0], RECIPES[0], *COMMON, "--out-dir", str(out)]) == 2
    assert "method=mimco" in capsys.readouterr().err
    assert not out.exists()
