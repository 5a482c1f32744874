"""MimCo: the losses through MimCo's code path, the frozen teacher, and MoCo v3 -> MimCo via the CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import Tensor

from cmim.cli import main
from cmim.config import load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.core.weights import load_checkpoint
from cmim.data.augment import ViewMaker, sample_photometric_params
from cmim.engine.run import build_optimizer
from cmim.losses import info_nce, patch_contrastive_loss
from cmim.methods import build_method
from cmim.methods.mimco import MimCo
from cmim.models import build_encoder
from cmim.models.teachers import FrozenTeacher, TeacherError, load_teacher


def make_teacher(embed_dim: int = 32, projector: bool = True) -> FrozenTeacher:
    """A MoCo v3-shaped teacher (momentum encoder + projector with non-trivial BN statistics)."""
    torch.manual_seed(1)
    moco = build_method(load_config(None, [*TINY, "method=mocov3", f"model.embed_dim={embed_dim}"]))
    for m in moco.teacher_projector.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
    proj = copy.deepcopy(moco.teacher_projector) if projector else None
    return FrozenTeacher(copy.deepcopy(moco.teacher), proj, "test teacher")


def make_mimco(*extra: str, teacher: FrozenTeacher | None = None) -> MimCo:
    cfg = load_config(None, [*TINY, "method=mimco", f"mimco.teacher={__file__}", *extra])
    torch.manual_seed(0)
    return MimCo(cfg, teacher=teacher or make_teacher()).train()


def make_batch(method: MimCo, n: int = 6, seed: int = 0) -> dict[str, Tensor]:
    spec = method.view_spec()
    rng = np.random.default_rng(seed)
    size = method.cfg.data.img_size
    crops = torch.from_numpy(rng.integers(0, 256, (n, 1, 3, size, size), dtype=np.uint8))
    aug = torch.from_numpy(np.stack([np.stack([sample_photometric_params(p, rng) for p in spec.profiles])
                                     for _ in range(n)]))
    mask = torch.from_numpy(np.stack([spec.mask_generator(rng).reshape(-1) for _ in range(n)]))
    return {"crops": crops, "aug": aug, "mask": mask}


def views_of(method: MimCo, batch: dict[str, Tensor]) -> list[Tensor]:
    """The data stage's on-device views of ``batch``."""
    d = method.cfg.data
    return ViewMaker(method.view_spec(), d.mean, d.std, d.in_chans)(batch["crops"], batch["aug"])


def test_view_spec():
    spec = make_mimco().view_spec()
    assert spec.num_crops == 1 and spec.crop_of_view == [0, 0] and spec.profiles == ["none", "none"]
    assert spec.mask_generator is not None


def test_losses_through_mimco_code_path():
    m = make_mimco("mimco.image_weight=0.5")
    batch = make_batch(m)
    student_view, teacher_view = views_of(m, batch)
    out = m([student_view, teacher_view], batch["mask"])
    mask = batch["mask"]
    t = m.contrastive_teacher
    with torch.no_grad():
        t_tokens = t.projector(t.encoder(teacher_view))  # eval mode: per token
        s_tokens = m.student(student_view, mask)
        pred = m.patch_head(s_tokens[:, 1:])
        img = m.image_head(s_tokens[:, 0])
    ref_patch = patch_contrastive_loss(pred, t_tokens[:, 1:], mask, 0.1, negatives="image")
    assert torch.allclose(out["loss_patch"], ref_patch, atol=1e-6)
    # the same by hand: masked token (b, i) against the teacher patches of image b only
    s, k = F.normalize(pred, dim=-1), F.normalize(t_tokens[:, 1:], dim=-1)
    terms = [F.cross_entropy(s[b, i] @ k[b].T / 0.1, torch.tensor(i)) for b, i in mask.nonzero().tolist()]
    assert torch.allclose(out["loss_patch"], torch.stack(terms).mean(), atol=1e-5)
    ref_image = info_nce(img, t_tokens[:, 0], 0.2)
    assert torch.allclose(out["loss_image"], ref_image, atol=1e-6)
    assert torch.allclose(out["loss"], ref_patch + 0.5 * ref_image, atol=1e-6)


def test_batch_negatives_and_backbone_targets():
    wide = make_teacher(embed_dim=48, projector=False)  # a width the student does not have, no projector
    with pytest.raises(TeacherError, match="projector"):
        make_mimco(teacher=wide)
    m = make_mimco("mimco.target=backbone", "mimco.patch_negatives=batch", teacher=wide)
    assert m.patch_head[-2].out_features == 48 and m.image_head[-2].out_features == 48
    batch = make_batch(m)
    sv, tv = views_of(m, batch)
    out = m([sv, tv], batch["mask"])
    with torch.no_grad():
        target = wide.encoder(tv)[:, 1:]
        pred = m.patch_head(m.student(sv, batch["mask"])[:, 1:])
    ref = patch_contrastive_loss(pred, target, batch["mask"], 0.1, negatives="batch")
    assert torch.allclose(out["loss_patch"], ref, atol=1e-6)


def test_teacher_frozen_and_never_trained():
    m = make_mimco()
    teacher_state = copy.deepcopy(m.contrastive_teacher.state_dict())
    opt = build_optimizer(m, m.cfg, torch.device("cpu"))
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in m.contrastive_teacher.parameters())
    for step in range(2):
        m.train()
        assert not m.contrastive_teacher.training and m.student.training
        batch = make_batch(m, seed=step)
        m(views_of(m, batch), batch["mask"])["loss"].backward()
        assert all(p.grad is None for p in m.contrastive_teacher.parameters())
        assert m.student.mask_token.grad is not None and m.image_head[0].weight.grad is not None
        opt.step()
        opt.zero_grad()
        m.after_step(step + 1, 2)
    for k, v in m.contrastive_teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k  # weights and BatchNorm statistics untouched
    assert m.encoder("teacher") is m.student and m.encoder("student") is m.student
    assert m.encoder("contrastive_teacher") is m.contrastive_teacher.encoder


def test_grid_mismatch_is_one_line_error():
    cfg = load_config(None, [*TINY, "data.img_size=32"])
    other = FrozenTeacher(build_encoder(cfg.model, 32, 3), None, "big")
    with pytest.raises(TeacherError, match="patch grid") as e:
        make_mimco("mimco.target=backbone", teacher=other)
    assert "\n" not in str(e.value)


def test_cli_mocov3_then_mimco(tmp_path, capsys):
    common = [*TINY, "train.epochs=1", "monitor.every_epochs=0", "data.synthetic_size=16"]
    assert main(["pretrain", "configs/mocov3_fmnist_cpu.yaml", *common, f"train.out_dir={tmp_path / 'moco'}",
                 "data.img_size=16", "data.in_chans=3"]) == 0
    moco_ckpt = tmp_path / "moco" / CHECKPOINT_FILE
    assert main(["pretrain", "configs/mimco_fmnist_cpu.yaml", *common, f"train.out_dir={tmp_path / 'mimco'}",
                 f"mimco.teacher={moco_ckpt}"]) == 0
    assert "mimco finished 1/1 steps" in capsys.readouterr().out
    moco, mimco = load_checkpoint(moco_ckpt), load_checkpoint(tmp_path / "mimco" / CHECKPOINT_FILE)
    # the teacher in the MimCo checkpoint is stage 1's momentum encoder, untouched by stage 2
    for k, v in moco["model"].items():
        if k.startswith("teacher."):
            assert torch.equal(mimco["model"][f"contrastive_teacher.encoder.{k[len('teacher.'):]}"], v)
    # a MimCo checkpoint is itself a valid teacher: its downstream encoder is the student
    t = load_teacher(tmp_path / "mimco" / CHECKPOINT_FILE)
    assert "(student)" in t.source and t.projector is None
