"""`cmim bench` end to end on a tiny model (no timing assertions), and the CPU attention FLOP formula."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from cmim.bench import count_step_flops
from cmim.cli import main
from cmim.core.precision import native_bf16


def test_bench_tiny_conmim(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    argv = ["bench", *tiny_overrides(tmp_path, "train.precision=bf16", "train.batch_size=8"),
            "--steps", "2", "--warmup", "1", "--rounds", "1", "--data-items", "8", "--peak-sizes", "64,128",
            "--json-out", str(out_json)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res == json.loads(out_json.read_text())
    assert any(line.startswith("MFU") for line in lines)
    native = native_bf16("cpu")  # without it bf16 runs as fp32 and its emulated peak is not measured
    assert res["method"] == "conmim" and res["batch"] == 8 and res["precision_requested"] == "bf16"
    assert res["precision"] == ("bf16" if native else "fp32")
    assert res["img_per_s"] > 0 and res["flops_per_img"] > 0 and res["mfu"] > 0
    # the ceiling: every counted FLOP at the measured matmul peak, so img/s / ceiling is the MFU
    assert abs(res["img_per_s"] / res["img_per_s_at_peak"] - res["mfu"]) < 1e-9 * res["mfu"]
    assert res["peak_fp32_tflops"] > 0 and (res["peak_bf16_tflops"] > 0 if native else res["peak_bf16_tflops"] is None)
    assert res["data_items_per_s_per_core"] > 0 and res["viewmaker_img_per_s"] > 0
    # teacher forward + student forward and backward: the student side costs about 3x the teacher's
    by = res["flops_by_module"]
    assert 2.0 < by["ConMIM.student"] / by["ConMIM.teacher"] < 4.0
    assert not any("view_maker" in k for k in by)


def test_bench_times_device_decode_of_jpeg_files(tmp_path, capsys):
    """--data-decode device: the workers' share per core, and the step's JPEG decoding (here on the CPU)."""
    argv = ["bench", *tiny_overrides(tmp_path, "train.batch_size=8"), "--steps", "1", "--warmup", "0",
            "--rounds", "1", "--data-items", "16", "--no-peak", "--data-source", "jpeg", "--data-decode", "device"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert "decode on the device" in res["data_source"]
    assert res["device_decode_img_per_s"] > 0 and res["data_items_per_s_per_core"] > 0
    assert any(line.startswith("JPEG decode (device)") for line in lines)


def test_cpu_sdpa_flops_are_counted():
    b, h, n, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    flops = count_step_flops(step)["total"]
    fwd = 4 * b * h * n * n * d  # q k^T and p v, 2 FLOPs per multiply-add
    assert flops >= 3 * fwd  # forward + backward (about 2.5x forward)


def test_photometric_subset_path_matches_sync_free_path(monkeypatch):
    """The CPU fast path (hue/blur on the selected samples only) equals the accelerator path (torch.where)."""
    import numpy as np

    from cmim.data import augment as A

    x = torch.rand(32, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    params = torch.from_numpy(np.stack([A.sample_photometric_params(p, rng)
                                        for p in ["conmim_strong", "byol1", "byol2", "none"] * 8]))
    fast = A.apply_photometric(x, params, 3)
    monkeypatch.setattr(A, "_SUBSET_DEVICES", ())
    assert torch.allclose(fast, A.apply_photometric(x, params, 3), atol=1e-6)


def test_bench_vs_eager_interleaves_rounds(tmp_path, capsys, monkeypatch):
    """--vs-eager: one eager round after each compiled one, and the ratio of their best and median times.
    torch.compile is replaced by the identity here (the plumbing is under test, not Inductor)."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    argv = ["bench", *tiny_overrides(tmp_path, "train.batch_size=8", "train.compile=true"), "--steps", "1",
            "--warmup", "1", "--rounds", "3", "--data-items", "0", "--no-peak", "--vs-eager"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert len(res["eager_img_per_s"]) == len(res["compiled_img_per_s"]) == 3
    assert res["img_per_s"] == max(res["compiled_img_per_s"])
    assert abs(res["compile_speedup_best"] - max(res["compiled_img_per_s"]) / max(res["eager_img_per_s"])) < 1e-9
    assert any(line.startswith("compiled vs eager") for line in lines)


def test_bench_vs_eager_needs_compile(tmp_path, capsys):
    argv = ["bench", *tiny_overrides(tmp_path, "train.batch_size=8"), "--steps", "1", "--warmup", "0",
            "--rounds", "1", "--data-items", "0", "--no-peak", "--vs-eager"]
    assert main(argv) == 2
    assert "train.compile=true" in capsys.readouterr().err


def test_device_memory_rule():
    """FSDP divides weights, gradients and AdamW moments by the shards and adds the units in flight; the
    batch-independent activations (autocast's weight copies) are DDP's only."""
    from cmim.engine.memory import TRANSIENT_FACTOR, StepMemory, device_memory

    acts = StepMemory(constant=100.0, linear=10.0, quadratic=1.0, state=0.0, data_per_image=0.0)
    ddp = device_memory(1000, 500, 50, acts, 8)
    fsdp = device_memory(1000, 500, 50, acts, 8, shards=4)
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.gathered) == (6000, 4000, 8000, 0)
    assert ddp.activations == TRANSIENT_FACTOR * (100 + 80 + 64)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (1500, 1000, 2000)
    assert fsdp.gathered == (2 * 2 + 4) * 50 and fsdp.activations == TRANSIENT_FACTOR * (80 + 64)
    assert ddp.total == ddp.weights + ddp.gradients + ddp.optimizer + ddp.activations


def test_memory_table_of_vit_small():
    """bench --memory on one model: the EMA teacher is as large as what is trained, FSDP shards the state, and
    activation checkpointing cuts the activations."""
    from cmim.bench.memory import format_memory_table, memory_table
    from cmim.config import load_config

    res = memory_table(load_config(None, ["data.name=synthetic"]), gpus=4, batch=16, models=["ViT-S/16"])
    row = res["rows"][0]
    assert row["depth"] == 12 and row["trained_params"] == row["teacher_params"] > 30e6
    m = row["memory"]
    assert m["fsdp"]["weights"] == m["ddp"]["weights"] / 4 and m["fsdp"]["gathered"] > 0
    assert m["ddp+ac"]["activations"] < m["ddp"]["activations"] / 1.5
    assert m["fsdp+ac"]["total"] < m["fsdp"]["total"] < m["ddp"]["total"]
    assert "| ViT-S/16 |" in format_memory_table(res)
