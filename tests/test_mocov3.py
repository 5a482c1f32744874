"""MoCo v3: loss formula, EMA, and the gathered-key loss of a 2-process gloo run equal to 1 process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY
from torch import Tensor, nn

from cmim.config import load_config
from cmim.data.augment import ViewMaker, sample_photometric_params
from cmim.losses import info_nce
from cmim.methods import build_method
from cmim.methods.mocov3 import MoCoV3
from cmim.models.sync_bn import convert_global_batchnorm

GLOBAL_BATCH = 8


def make_method() -> MoCoV3:
    cfg = load_config(None, [*TINY, "method=mocov3"])
    torch.manual_seed(0)
    method = build_method(cfg)
    assert isinstance(method, MoCoV3)
    return method


def to_double(method: MoCoV3) -> MoCoV3:
    """float64 weights (the global BatchNorm still computes in float32): less rounding noise."""
    return method.double()


def views_of(method: MoCoV3, batch: dict[str, Tensor]) -> list[Tensor]:
    """The data stage's on-device views of ``batch``, in the method's dtype."""
    d = method.cfg.data
    views = ViewMaker(method.view_spec(), d.mean, d.std, d.in_chans)(batch["crops"], batch["aug"])
    return [v.to(method.student.mask_token.dtype) for v in views]


def make_batch(method: MoCoV3, n: int = GLOBAL_BATCH, seed: int = 0) -> dict[str, Tensor]:
    """A fixed batch in the data pipeline's format: uint8 crops + sampled photometric parameters."""
    spec = method.view_spec()
    g = torch.Generator().manual_seed(seed)
    size = method.cfg.data.img_size
    crops = torch.randint(0, 256, (n, spec.num_crops, 3, size, size), generator=g, dtype=torch.uint8)
    rng = np.random.default_rng(seed)
    aug = torch.from_numpy(np.stack([np.stack([sample_photometric_params(p, rng) for p in spec.profiles])
                                     for _ in range(n)]))
    return {"crops": crops, "aug": aug}


def test_view_spec_and_heads():
    m = make_method()
    spec = m.view_spec()
    assert spec.num_crops == 2 and spec.profiles == ["byol1", "byol2"] and spec.crop_of_view == [0, 1]
    assert spec.mask_generator is None
    # projector D -> h -> h -> out with a last BN without affine; predictor out -> h -> out
    lin = [x for x in m.student_projector if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(32, 64), (64, 64), (64, 32)]
    assert all(x.bias is None for x in lin)
    assert isinstance(m.student_projector[-1], nn.BatchNorm1d) and not m.student_projector[-1].affine
    lin = [x for x in m.predictor if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in lin] == [(32, 64), (64, 32)]
    assert not m.predictor[-1].affine
    # momentum encoder = ViT + projector only, frozen; no predictor copy; unused mask token not trainable
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert not any(p.requires_grad for p in m.teacher_projector.parameters())
    assert not m.student.mask_token.requires_grad
    assert m.encoder("teacher") is m.teacher and m.encoder("student") is m.student


def test_loss_is_symmetric_ctr_times_2t():
    m = make_method().train()
    batch = make_batch(m)
    x1, x2 = views_of(m, batch)
    loss = m([x1, x2])["loss"]
    t = m.temperature
    with torch.no_grad():
        q1 = m.predictor(m.student_projector(m.student(x1)[:, 0]))
        q2 = m.predictor(m.student_projector(m.student(x2)[:, 0]))
        k1 = m.teacher_projector(m.teacher(x1)[:, 0])
        k2 = m.teacher_projector(m.teacher(x2)[:, 0])
    ref = 2 * t * (info_nce(q1, k2, t) + info_nce(q2, k1, t))
    assert torch.allclose(loss, ref, atol=1e-5)
    loss.backward()
    assert m.student.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in m.teacher.parameters())


def test_momentum_update_cosine():
    m = make_method()
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    before = m.teacher.backbone.cls_token.clone()
    student = m.student.backbone.cls_token.clone()
    info = m.after_step(1, 100)  # first step: m(0) = 0.99
    assert info["momentum"] == pytest.approx(0.99)
    assert torch.allclose(m.teacher.backbone.cls_token, 0.99 * before + 0.01 * student)
    assert m.after_step(101, 100)["momentum"] == pytest.approx(1.0)


# --- 2 processes (gloo) == 1 process on the global batch ---------------------------------------------------
def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = to_double(convert_global_batchnorm(make_method(), "cpu")).train()  # the engine's conversion
        batch = make_batch(m)
        b = GLOBAL_BATCH // world
        local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
        loss = m(views_of(m, local))["loss"]
        loss.backward()
        # what DDP does: average the gradients and (for the report) the loss over processes
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            torch.save({"loss": total / world, "grads": grads}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_process_gathered_loss_equals_single_process(tmp_path):
    out_file = str(tmp_path / "rank0.pt")
    # fork (as DataLoader workers do; each child runs single-threaded): no re-import of torch per process
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True,
                       start_method="fork")
    got = torch.load(out_file, weights_only=True)

    m = to_double(make_method()).train()
    loss = m(views_of(m, make_batch(m)))["loss"]
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-5), (got["loss"], loss)
    ref = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(ref) == set(got["grads"]) and len(ref) > 10
    for name, g in ref.items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5, rtol=1e-5), name
