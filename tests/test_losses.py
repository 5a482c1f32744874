"""Tests for cmim.losses, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cmim.losses import (
    info_nce,
    masked_pixel_loss,
    normalize_patch_pixels,
    patch_contrastive_loss,
    patchify,
)

E = math.e


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- patch_contrastive_loss

# B=1, N=2, D=2. After normalization s = [(1,0), (0,1)], t = [(1,0), (-1,0)]:
#   row 0 cosines [1, -1], target 0 -> CE = log(1 + exp(-2/T))
#   row 1 cosines [0,  0], target 1 -> CE = log(2)
STUDENT_2 = _t([[2.0, 0.0], [0.0, 3.0]]).unsqueeze(0)
TEACHER_2 = _t([[5.0, 0.0], [-0.5, 0.0]]).unsqueeze(0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.1])
def test_patch_contrastive_hand_all_masked(temperature):
    mask = torch.tensor([[True, True]])
    loss = patch_contrastive_loss(STUDENT_2, TEACHER_2, mask, temperature=temperature)
    expected = (math.log(1 + math.exp(-2 / temperature)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_patch_contrastive_hand_partial_mask():
    only_row1 = patch_contrastive_loss(STUDENT_2, TEACHER_2, torch.tensor([[False, True]]), temperature=0.5)
    assert only_row1.item() == pytest.approx(math.log(2), rel=1e-5)
    only_row0 = patch_contrastive_loss(STUDENT_2, TEACHER_2, torch.tensor([[True, False]]), temperature=0.5)
    assert only_row0.item() == pytest.approx(math.log(1 + math.exp(-4.0)), rel=1e-5)


def test_patch_contrastive_hand_n3():
    # s = [(1,0), (0,1), (1,1)/sqrt2], t = [(1,0), (0,1), (-1,0)], T = 1, c = 1/sqrt2
    # row 0: cos [1, 0, -1] target 0 -> -1 + log(e + 1 + 1/e)
    # row 1: cos [0, 1,  0] target 1 -> -1 + log(1 + e + 1)
    # row 2: cos [c, c, -c] target 2 ->  c + log(2 e^c + e^-c)
    student = _t([[1, 0], [0, 1], [1, 1]]).unsqueeze(0)
    teacher = _t([[1, 0], [0, 1], [-1, 0]]).unsqueeze(0)
    c = 1 / math.sqrt(2)
    rows = [
        -1 + math.log(E + 1 + 1 / E),
        -1 + math.log(2 + E),
        c + math.log(2 * math.exp(c) + math.exp(-c)),
    ]
    all_rows = patch_contrastive_loss(student, teacher, torch.ones(1, 3, dtype=torch.bool), temperature=1.0)
    assert all_rows.item() == pytest.approx(sum(rows) / 3, rel=1e-5)
    rows_0_2 = patch_contrastive_loss(student, teacher, torch.tensor([[True, False, True]]), temperature=1.0)
    assert rows_0_2.item() == pytest.approx((rows[0] + rows[2]) / 2, rel=1e-5)


def test_patch_contrastive_averages_over_masked_tokens_of_batch():
    # image 0 has 1 masked row (log 2), image 1 repeats image 0 with both rows masked
    student = STUDENT_2.repeat(2, 1, 1)
    teacher = TEACHER_2.repeat(2, 1, 1)
    mask = torch.tensor([[False, True], [True, True]])
    loss = patch_contrastive_loss(student, teacher, mask, temperature=1.0)
    expected = (math.log(2) + math.log(1 + math.exp(-2.0)) + math.log(2)) / 3  # not a mean of image means
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_patch_contrastive_batch_negatives_hand():
    # B=2, N=2, T=1. Image 0: s = t = [(1,0), (0,1)]. Image 1: s = [(1,0), (0,1)], t = [(0,1), (1,0)].
    # "batch": keys [(1,0), (0,1), (0,1), (1,0)]; every row has cosines two 1s and two 0s.
    #   rows of image 0 hit a 1 -> log(2e + 2) - 1 ; rows of image 1 hit a 0 -> log(2e + 2)
    # "image": image 0 rows -> log(e + 1) - 1 ; image 1 rows -> log(e + 1)
    student = _t([[1, 0], [0, 1]]).unsqueeze(0).repeat(2, 1, 1)
    teacher = torch.stack([_t([[1, 0], [0, 1]]), _t([[0, 1], [1, 0]])])
    mask = torch.ones(2, 2, dtype=torch.bool)
    batch = patch_contrastive_loss(student, teacher, mask, temperature=1.0, negatives="batch")
    assert batch.item() == pytest.approx(math.log(2 * E + 2) - 0.5, rel=1e-5)
    image = patch_contrastive_loss(student, teacher, mask, temperature=1.0, negatives="image")
    assert image.item() == pytest.approx(math.log(E + 1) - 0.5, rel=1e-5)
    one_row = patch_contrastive_loss(
        student, teacher, torch.tensor([[False, False], [True, False]]), temperature=1.0, negatives="batch"
    )
    assert one_row.item() == pytest.approx(math.log(2 * E + 2), rel=1e-5)


def test_patch_contrastive_image_is_default_and_batch_differs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    default = patch_contrastive_loss(s, t, mask, temperature=0.2)
    image = patch_contrastive_loss(s, t, mask, temperature=0.2, negatives="image")
    batch = patch_contrastive_loss(s, t, mask, temperature=0.2, negatives="batch")
    assert torch.equal(default, image)
    assert batch.item() > image.item()  # more negatives, same positives: the loss can only grow


def test_patch_contrastive_empty_mask_is_zero_not_nan():
    loss = patch_contrastive_loss(STUDENT_2, TEACHER_2, torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0


def test_patch_contrastive_gradients():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    patch_contrastive_loss(s, t, mask).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is not None and t.grad.abs().sum() > 0  # teacher is not detached inside
    # unmasked student rows receive no gradient
    assert torch.all(s.grad[~mask] == 0) and torch.all(s.grad[mask].abs().sum(-1) > 0)
    s.grad = None
    patch_contrastive_loss(s, t.detach(), mask).backward()
    assert s.grad.abs().sum() > 0


def test_patch_contrastive_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 16, 32, generator=g).bfloat16()
    t = torch.randn(2, 16, 32, generator=g).bfloat16()
    mask = torch.ones(2, 16, dtype=torch.bool)
    ref = patch_contrastive_loss(s.float(), t.float(), mask, temperature=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_contrastive_loss(s, t, mask, temperature=0.05)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)


def test_patch_contrastive_invalid():
    s = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        patch_contrastive_loss(s, torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        patch_contrastive_loss(s, s, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="negatives"):
        patch_contrastive_loss(s, s, torch.ones(1, 2, dtype=torch.bool), negatives="all")
    with pytest.raises(ValueError, match="temperature"):
        patch_contrastive_loss(s, s, torch.ones(1, 2, dtype=torch.bool), temperature=0.0)


# ---------------------------------------------------------------- info_nce


def test_info_nce_hand():
    # q = k = [(1,0), (0,1)] (k scaled), T = 1: each row cosines [1, 0] / [0, 1] -> log(e + 1) - 1
    q = _t([[1, 0], [0, 1]])
    k = _t([[3, 0], [0, 0.2]])
    assert info_nce(q, k, 1.0).item() == pytest.approx(math.log(E + 1) - 1, rel=1e-5)
    # T = 0.5 doubles the logits: log(e^2 + 1) - 2
    assert info_nce(q, k, 0.5).item() == pytest.approx(math.log(E**2 + 1) - 2, rel=1e-5)


def test_info_nce_label_offset():
    # k (M=4) = [(0,1), (-1,0), (1,0), (0,1)], offset 2, T = 1
    # q0 = (1,0): cos [0, -1, 1, 0] target 2 -> -1 + log(1 + 1/e + e + 1)
    # q1 = (0,1): cos [1,  0, 0, 1] target 3 -> -1 + log(2e + 2)
    q = _t([[1, 0], [0, 1]])
    k = _t([[0, 1], [-1, 0], [1, 0], [0, 1]])
    expected = (-1 + math.log(2 + 1 / E + E) - 1 + math.log(2 * E + 2)) / 2
    assert info_nce(q, k, 1.0, label_offset=2).item() == pytest.approx(expected, rel=1e-5)
    # offset 0 on the same keys: q0 target (0,1) -> cos 0 ; q1 target (-1,0) -> cos 0
    expected0 = (math.log(2 + 1 / E + E) + math.log(2 * E + 2)) / 2
    assert info_nce(q, k, 1.0).item() == pytest.approx(expected0, rel=1e-5)


def test_info_nce_gradient_and_dtype():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 64, generator=g).bfloat16().float().requires_grad_()
    k = torch.randn(8, 64, generator=g).bfloat16().float()
    ref = info_nce(q, k, 0.05, label_offset=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(q, k, 0.05, label_offset=4)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)  # logits were not computed in bf16
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_info_nce_invalid():
    with pytest.raises(ValueError):
        info_nce(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError):
        info_nce(torch.zeros(2, 3), torch.zeros(3, 3), 0.1, label_offset=2)
    with pytest.raises(ValueError):
        info_nce(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


# ---------------------------------------------------------------- masked_pixel_loss


def test_masked_pixel_loss_hand():
    pred = _t([[1, 2], [3, 4]]).unsqueeze(0)  # B=1, N=2, P=2
    target = torch.zeros(1, 2, 2)
    assert masked_pixel_loss(pred, target, torch.tensor([[True, False]])).item() == pytest.approx(1.5)
    assert masked_pixel_loss(pred, target, torch.tensor([[False, True]])).item() == pytest.approx(3.5)
    assert masked_pixel_loss(pred, target, torch.tensor([[True, True]])).item() == pytest.approx(2.5)
    assert masked_pixel_loss(pred, target, torch.tensor([[False, False]])).item() == 0.0


def test_masked_pixel_loss_batch_and_sign():
    pred = torch.stack([_t([[1, -1], [0, 0]]), _t([[0, 0], [2, 2]])])
    target = torch.stack([_t([[0, 0], [9, 9]]), _t([[0, 0], [-1, 5]])])
    mask = torch.tensor([[True, False], [False, True]])
    # masked errors: |1|,|-1| and |3|,|-3| -> 8 / (2 patches * 2 values)
    assert masked_pixel_loss(pred, target, mask).item() == pytest.approx(2.0)


def test_masked_pixel_loss_invalid():
    with pytest.raises(ValueError):
        masked_pixel_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        masked_pixel_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool))


# ---------------------------------------------------------------- patchify / normalize


def test_patchify_hand_single_channel():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = patchify(img, 2)
    assert patches.shape == (1, 4, 4)
    assert patches[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_patchify_channel_is_fastest():
    img = torch.arange(32.0).reshape(1, 2, 4, 4)  # channel 1 = channel 0 + 16
    assert patchify(img, 2)[0, 0].tolist() == [0, 16, 1, 17, 4, 20, 5, 21]


def test_patchify_matches_loop_and_roundtrips():
    b, c, h, w, p = 2, 3, 6, 8, 2
    img = torch.randn(b, c, h, w)
    patches = patchify(img, p)
    assert patches.shape == (b, (h // p) * (w // p), p * p * c)
    for n in range(b):
        for r in range(h // p):
            for col in range(w // p):
                idx = r * (w // p) + col
                flat = [
                    img[n, ch, r * p + i, col * p + j] for i in range(p) for j in range(p) for ch in range(c)
                ]
                assert torch.equal(patches[n, idx], torch.stack(flat))


def test_patchify_invalid():
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 3, 6, 6), 4)


def test_normalize_patch_pixels_hand():
    # [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3 (MAE convention)
    out = normalize_patch_pixels(_t([[1, 2, 3, 4]]), eps=0.0)
    s = math.sqrt(5 / 3)
    assert out[0].tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], rel=1e-6)
    # a constant patch maps to zeros thanks to eps
    assert normalize_patch_pixels(torch.full((1, 2, 4), 7.0)).abs().max().item() == 0.0
