"""ConMIM and SimMIM called with plain tensors (what the data stage hands a method): gradients, masking,
EMA coverage and the losses against hand computations; the method registry and per-method config checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from cmim.config import ConfigError, load_config
from cmim.methods import build_method, method_spec, method_specs
from cmim.methods.conmim import ConMIM
from cmim.methods.simmim import SimMIM


def _views(n: int, views: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(views)]


def _mask(n: int, grid: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, grid, generator=g).argsort(dim=1) < grid // 2  # exactly half of the 4x4 patches


def conmim(*extra: str) -> ConMIM:
    torch.manual_seed(0)
    m = build_method(load_config(None, [*TINY, "method=conmim", *extra]))
    assert isinstance(m, ConMIM)
    return m.train()


def test_conmim_teacher_gets_no_gradient_and_student_does():
    m = conmim()
    out = m(_views(4, 2), _mask(4))
    out["loss"].backward()
    assert all(p.grad is None for p in [*m.teacher.parameters(), *m.teacher_projector.parameters()])
    assert all(not p.requires_grad for p in [*m.teacher.parameters(), *m.teacher_projector.parameters()])
    assert m.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.student_projector[0].weight.grad.abs().sum() > 0
    assert m.student.mask_token.grad.abs().sum() > 0  # the masked positions read the mask token


def test_conmim_masks_only_the_student_view_and_loss_is_the_per_image_contrast():
    m = conmim()
    student_view, teacher_view = _views(4, 2)
    mask = _mask(4)
    calls: list[tuple[str, torch.Tensor | None]] = []
    for name, enc in (("student", m.student), ("teacher", m.teacher)):
        forward = enc.forward
        enc.forward = (lambda f, n: lambda x, mask=None: (calls.append((n, mask)), f(x, mask))[1])(forward, name)
    out = m([student_view, teacher_view], mask)
    assert [n for n, _ in calls] == ["teacher", "student"]
    assert calls[0][1] is None and torch.equal(calls[1][1], mask)
    # by hand: masked student token (b, i) must pick teacher patch i among the patches of image b
    with torch.no_grad():
        t = F.normalize(m.teacher_projector(m.teacher.forward(teacher_view))[:, 1:], dim=-1)
        s = F.normalize(m.student_projector(m.student.forward(student_view, mask))[:, 1:], dim=-1)
    terms = [F.cross_entropy(s[b, i] @ t[b].T / 0.1, torch.tensor(i)) for b, i in mask.nonzero().tolist()]
    assert torch.allclose(out["loss"], torch.stack(terms).mean(), atol=1e-5)


def test_conmim_ema_covers_encoder_and_projector():
    m = conmim("conmim.momentum=0.9", "conmim.momentum_final=0.9")
    with torch.no_grad():
        for p in [*m.student.parameters(), *m.student_projector.parameters()]:
            p.add_(torch.randn_like(p))
    pairs = [(m.student, m.teacher), (m.student_projector, m.teacher_projector)]
    before = [[t.detach().clone() for t in tm.parameters()] for _, tm in pairs]
    info = m.after_step(1, 10, torch.tensor(True))
    assert info["momentum"] == pytest.approx(0.9)
    for (sm, tm), old in zip(pairs, before, strict=True):
        for s, t, t0 in zip(sm.parameters(), tm.parameters(), old, strict=True):
            assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)


def test_simmim_loss_is_masked_l1_on_normalized_patch_pixels():
    torch.manual_seed(0)
    m = build_method(load_config(None, [*TINY, "method=simmim"]))
    assert isinstance(m, SimMIM)
    (view,) = _views(2, 1)
    mask = _mask(2)
    out = m([view], mask)
    with torch.no_grad():
        pred = m.decoder(m.student(view, mask)[:, 1:])
    # patch (b, r, c) of a 16x16 image with 4 px patches, (row, col, channel) inside, normalized per patch
    patches = view.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 48)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    target = (patches - mean) / (var + 1e-6).sqrt()
    ref = (pred - target).abs().mean(-1)[mask].mean()
    assert torch.allclose(out["loss"], ref, atol=1e-5)
    out["loss"].backward()
    assert m.decoder.weight.grad.abs().sum() > 0


def test_registry_lists_every_method_with_its_section():
    specs = method_specs()
    assert set(specs) == {"conmim", "mocov3", "mimco", "simmim"}
    cfg = load_config(None, [*TINY])
    for name, spec in specs.items():
        assert spec.name == name and name in cfg  # each method's section is part of the config
    assert method_spec("conmim").encoder_prefixes == {"teacher": "teacher.", "student": "student."}
    assert method_spec("mimco").encoder_prefixes["teacher"] == "student."
    # BatchNorm over all processes by default, except ConMIM, whose reference uses per-GPU BatchNorm
    assert {n: s.sync_bn for n, s in specs.items()} == {"conmim": False, "mimco": True, "mocov3": True,
                                                         "simmim": True}
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("nope")


@pytest.mark.parametrize("method", ["mocov3", "mimco"])
def test_accumulation_is_refused_where_it_would_shrink_negatives(method):
    extra = [f"mimco.teacher={__file__}"] if method == "mimco" else []
    load_config(None, [*TINY, f"method={method}", *extra])  # fine without accumulation
    with pytest.raises(ConfigError, match=r"^train\.accum_steps: .*negatives"):
        load_config(None, [*TINY, f"method={method}", "train.batch_size=16", "train.accum_steps=2", *extra])
    # ConMIM's negatives are the patches of each image: accumulating is fine
    load_config(None, [*TINY, "method=conmim", "train.batch_size=16", "train.accum_steps=2"])
