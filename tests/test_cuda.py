"""The GPU code paths (run by benchmarks/gpu_check.sh with `pytest -m cuda`; skipped without a GPU, as in CI):
no host syncs in the training step, SDPA attention, fused AdamW, global BatchNorm under bf16, pinned memory,
nvJPEG decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

CUDA = [*TINY, "train.device=cuda", "train.precision=bf16", "data.img_size=32", "model.embed_dim=64"]


def _cfg(*extra: str):
    from cmim.config import load_config

    return load_config(None, [*CUDA, *extra])


@pytest.mark.parametrize("method", ["conmim", "mocov3", "simmim"])
def test_training_step_makes_no_host_sync(method):
    from cmim.bench import StepRunner, count_host_syncs

    runner = StepRunner(_cfg(f"method={method}", "train.check_memory=false"), torch.device("cuda"))
    for _ in range(3):  # warm up: lazy allocations and the fused optimizer's state
        runner.run()
    assert count_host_syncs(runner) == 0
    assert torch.isfinite(runner.loss).item()


def test_attention_uses_sdpa_on_cuda_and_explicit_on_cpu():
    from cmim.models import build_encoder

    enc = build_encoder(_cfg().model, 32, 3)
    flags = lambda: {m.fused_attn for m in enc.backbone.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    assert flags() == {False}
    enc.cuda()
    assert flags() == {True}
    qkv_dtypes = []
    enc.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: qkv_dtypes.append(o.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = enc(torch.randn(4, 3, 32, 32, device="cuda"))
    # the attention's inputs are bf16; the final LayerNorm is on CUDA autocast's fp32 list (not on CPU's)
    assert qkv_dtypes == [torch.bfloat16]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fused_adamw_and_pinned_loader_on_cuda(tmp_path):
    from cmim.engine.trainer import Trainer

    trainer = Trainer(_cfg(f"train.out_dir={tmp_path}", "data.num_workers=1"))
    assert trainer.optimizer.defaults.get("fused") is True
    assert trainer._loader().pin_memory
    assert next(trainer.method.parameters()).is_cuda


def test_global_batchnorm_under_bf16(tmp_path):
    """The conversion to SyncBatchNorm and a bf16 forward/backward through it. With one process SyncBatchNorm
    computes plain batch statistics: its cross-GPU kernels need two GPUs, which this check does not have."""
    import torch.distributed as dist

    from cmim.methods import build_method
    from cmim.models.sync_bn import convert_global_batchnorm

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        method = convert_global_batchnorm(build_method(_cfg("method=mocov3")), "cuda").cuda().train()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in method.modules())
        views = [torch.randn(8, 3, 32, 32, device="cuda") for _ in range(2)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method(views)["loss"]
        loss.backward()
        assert torch.isfinite(loss).item()
    finally:
        dist.destroy_process_group()


def test_jpeg_decode_on_the_gpu_matches_the_cpu(tmp_path):
    """data.decode=device with nvJPEG: the same crops as CPU decoding, up to IDCT and resize rounding."""
    from test_decode import _datasets, write_jpeg_folder

    from cmim.data.decode import DeviceDecoder, collate_pretrain

    root = tmp_path / "imgs"
    write_jpeg_folder(root)
    _, dev_set, cpu_set = _datasets(root)
    batch = collate_pretrain([dev_set[i] for i in range(len(dev_set))])
    batch["aug"] = batch["aug"].cuda()
    if "crop_rows" in batch:
        batch["crops"] = batch["crops"].cuda()
    crops = DeviceDecoder(16, 3, "cuda", dev_set.decoded_item)(batch)
    ref = collate_pretrain([cpu_set[i] for i in range(len(cpu_set))])["crops"]
    assert crops.is_cuda and crops.shape == ref.shape
    assert (crops.cpu().float() - ref.float()).abs().mean() < 2.0
