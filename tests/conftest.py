"""Shared test fixtures: tiny configs on synthetic data, so nothing is downloaded and runs stay fast."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
# decoded folder images and split fingerprints go to a cache of the test session, not the user's
os.environ["CMIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="cmim-test-cache-")

FMNIST_ROOT = os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist")

# A tiny ViT on 16x16 synthetic images with 4x4 patches (16 tokens): a ConMIM step takes milliseconds.
TINY = [
    "data.name=synthetic", "data.img_size=16", "data.in_chans=3", "data.synthetic_size=64",
    "data.synthetic_classes=4", "data.num_workers=0", "data.crop_scale=[0.5,1.0]",
    "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
    "model.size=tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
    "mask.kind=random", "mask.ratio=0.5",
    "conmim.proj_hidden_dim=64", "conmim.proj_out_dim=32",
    "mocov3.proj_hidden_dim=64", "mocov3.proj_out_dim=32", "mocov3.pred_hidden_dim=64",
    "mimco.proj_hidden_dim=64",
    "optim.warmup_epochs=1", "optim.lr=1e-3",
    "train.epochs=2", "train.batch_size=16", "train.log_every_steps=2", "train.progress=false",
    "train.tensorboard=false", "train.precision=fp32",
    "monitor.every_epochs=1", "monitor.train_subset=48", "monitor.test_subset=32", "monitor.k=5",
]


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra]


@pytest.fixture
def tiny_cfg(tmp_path):
    from cmim.config import load_config

    def make(*extra: str):
        return load_config(None, tiny_overrides(tmp_path, *extra))

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread, and far faster on busy shared cores (no thrashing)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint does (the safety tests' payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    """Two state dicts hold the same tensors: bit-equal (``atol=0``) or within ``atol``."""
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def minimal_recipe(tmp_path: Path) -> str:
    """A recipe that names only the method: every other value is the schema's default or an override."""
    path = tmp_path / "recipe.yaml"
    path.write_text("method: conmim\n")
    return str(path)
