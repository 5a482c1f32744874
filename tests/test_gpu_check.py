"""benchmarks/gpu_check.sh, rehearsed on the CPU (GPU_CHECK_REHEARSE=1): every part's command line, the JSON
each bench writes and the final table, so that the first GPU a session is lent is not spent on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PARTS = ("bench_vitb_eager", "bench_vitb_compiled", "bench_vits_eager", "bench_vits_compiled")


def test_gpu_check_rehearsal_runs_every_part(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, GPU_CHECK_REHEARSE="1", GPU_CHECK_WORK=str(work), OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what the device tool brings back: two files, the table and the logs without checkpoints
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_logs.tgz", "gpu_check_table.md"]
    with tarfile.open(out / "gpu_check_logs.tgz") as tar:
        names = tar.getnames()
    assert "./bench_vits_eager.json" in names and "./ddp_smoke/summary.json" in names
    assert not any(n.endswith(".pt") for n in names)
    for part in ("cuda_tests", *BENCH_PARTS, "ddp_smoke"):
        rc = (work / f"{part}.rc").read_text().strip()
        assert rc == "0", f"{part}: rc {rc}\n" + (work / f"{part}.log").read_text()[-3000:]
    for part in BENCH_PARTS:
        r = json.loads((work / f"{part}.json").read_text())
        assert r["device"] == "cpu" and r["embed_dim"] == 64 and r["batch"] == 4  # the rehearsal's overrides won
        assert r["compile"] is False and r["img_per_s"] > 0 and r["flops_per_img"] > 0
        assert r["mfu"] > 0 and r["data_cores_needed"] > 0
    assert "device_decode_img_per_s" in json.loads((work / "bench_vits_eager.json").read_text())
    summary = json.loads((work / "ddp_smoke" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["nonfinite_steps"] == 0
    assert summary["ddp"] is True and summary["world_size"] == 1  # torchrun with one process takes the DDP path
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 1 + len(BENCH_PARTS) + 1, proc.stdout[-3000:]  # header, rule, tests, benches, DDP
    assert all("| rc 0 |" in line for line in table[2:]), "\n".join(table)
