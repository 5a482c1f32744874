"""The one prediction loop of evaluation (cmim.eval.predict): dataset order, normalization on the device, no
gradients, the run's autocast around the model only, modes restored; and the callers built on it (feature
extraction, the raw-pixel baseline, fine-tuning's test pass) give what a hand-written pass gives."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import Dataset

from cmim.core.knn import topk_accuracy
from cmim.core.precision import resolve_precision
from cmim.data.augment import normalize
from cmim.eval.config import load_eval_config
from cmim.eval.datasets import eval_dataset
from cmim.eval.extract import extract_features, pixel_features
from cmim.eval.finetune import evaluate
from cmim.eval.predict import eval_mode, predict, predict_batches
from cmim.models import MaskedEncoder

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]

pytestmark = pytest.mark.usefixtures("one_thread")


class Images(Dataset):
    """``n`` random uint8 images; label i for image i, so the order is visible in the labels."""

    def __init__(self, n: int = 10, size: int = 16) -> None:
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": i}


@pytest.fixture
def bf16_autocast(monkeypatch):
    """bf16 autocast on the CPU even where bf16 would resolve to fp32 (no native bf16), so it is visible."""
    import cmim.eval.predict as predict_module

    monkeypatch.setattr(predict_module, "autocast", lambda device, precision: torch.autocast("cpu", torch.bfloat16))


def test_batches_in_order_normalized_without_grad_under_autocast(bf16_autocast):
    ds, seen = Images(10), []

    def forward(x):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return x * 1.0

    batches = list(predict_batches(forward, ds, mean=MEAN, std=STD, precision="bf16", batch_size=4))
    assert [len(b["label"]) for _, b in batches] == [4, 4, 2]
    out = torch.cat([o for o, _ in batches])
    assert torch.equal(out, normalize(ds.images, MEAN, STD))
    assert torch.equal(torch.cat([b["label"] for _, b in batches]), torch.arange(10))
    assert seen == [(False, True)] * 3


def test_autocast_follows_the_precision():
    seen = []
    for precision in ("bf16", "fp32"):
        list(predict_batches(lambda x: seen.append(torch.is_autocast_enabled("cpu")), Images(2), mean=MEAN, std=STD,
                             precision=precision))
    assert seen == [resolve_precision("bf16", "cpu") == "bf16", False]  # without native bf16: fp32


def test_head_runs_outside_autocast_and_outputs_are_float32_on_cpu(bf16_autocast):
    ds, seen = Images(6), []

    def head(f):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return f[:, :3]

    out, labels = predict(lambda x: x.flatten(1), ds, head=head, mean=MEAN, std=STD, precision="bf16", batch_size=4)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (6, 3)
    assert torch.equal(labels, torch.arange(6))
    assert seen == [(False, False)] * 2


def test_eval_mode_restores_each_module():
    a, b = nn.Dropout(0.5).train(), nn.Dropout(0.5).eval()
    with eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError), eval_mode(a):
        raise RuntimeError
    assert a.training


def test_pixel_features_are_the_normalized_flattened_images():
    ds = Images(7)
    feats, labels = pixel_features(ds, mean=MEAN, std=STD, batch_size=3)
    assert torch.equal(feats, normalize(ds.images, MEAN, STD).flatten(1))
    assert torch.equal(labels, torch.arange(7))


@pytest.mark.parametrize("feature", ["mean", "cls", "grid2"])
def test_extracted_features_are_the_pooled_tokens(feature):
    torch.manual_seed(0)
    enc = MaskedEncoder("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                                     num_classes=0)).train()
    ds = Images(9)
    feats, labels = extract_features(enc, ds, feature=feature, mean=MEAN, std=STD, batch_size=4, precision="fp32")
    assert enc.training  # back in the mode it came in
    with torch.no_grad():
        want = MaskedEncoder.pool(enc.eval()(normalize(ds.images, MEAN, STD)), feature)
    assert torch.allclose(feats, want, atol=1e-5) and torch.equal(labels, torch.arange(9))


def test_finetune_test_pass_is_the_plain_forward():
    cfg = load_eval_config(None, ["data.name=synthetic", "data.img_size=16", "data.in_chans=3",
                                  "data.synthetic_size=24", "data.synthetic_classes=4", "data.num_workers=0",
                                  f"data.mean={MEAN}", f"data.std={STD}", "precision=fp32", "batch_size=5",
                                  "device=cpu"])
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=4).train()
    res = evaluate(model, cfg, torch.device("cpu"))
    assert model.training
    ds = eval_dataset(cfg, "test")
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        logits = model.eval()(normalize(torch.stack([it["image"] for it in items]), MEAN, STD))
    assert res == topk_accuracy(logits, torch.tensor([int(it["label"]) for it in items]))
