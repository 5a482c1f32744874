"""Evaluation: k-NN on planted features, linear probe and fine-tuning beating chance, feature cache, result
files, encoder lookup in any method's state dict, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from omegaconf import OmegaConf

from cmim.cli import main
from cmim.config import load_config
from cmim.core.errors import CheckpointError
from cmim.core.knn import knn_accuracy
from cmim.eval.config import LinearConfig
from cmim.eval.linear import linear_on_features
from cmim.eval.loading import encoder_prefix, encoder_prefixes, load_source
from cmim.eval.run import open_source, run_eval, summary_line
from cmim.train import pretrain

# Small synthetic eval data: 128 train / 128 test images of 4 classes at 16 px.
EVAL = ["data.synthetic_size=128", "data.num_workers=0", "precision=fp32", "batch_size=64"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny ConMIM checkpoint (two steps: its weights are what matters here, not their quality)."""
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config(None, tiny_overrides(root, "train.max_steps=2", "monitor.every_epochs=0"))
    return Path(pretrain(cfg)["checkpoint"])


def planted(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    """Class c = a random unit direction + small noise: separable by construction."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    centers = torch.nn.functional.normalize(directions, dim=1)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_planted_separable_is_100_percent():
    trx, try_ = planted(60, 5, 32, 0.05, seed=1)
    tex, tey = planted(20, 5, 32, 0.05, seed=2)
    for k in (10, 20, 100, 200):
        res = knn_accuracy(trx, try_, tex, tey, k=k, temperature=0.07)
        assert res["top1"] == 100.0 and res["top5"] == 100.0, (k, res)


def test_linear_probe_on_features_beats_chance():
    trx, try_ = planted(50, 4, 16, 0.6, seed=3)
    tex, tey = planted(25, 4, 16, 0.6, seed=4)
    lin = OmegaConf.merge(OmegaConf.structured(LinearConfig), {"epochs": 10, "batch_size": 32, "blr": 0.5})
    res = linear_on_features(trx, try_, tex, tey, lin, seed=0)
    assert res["top1"] > 60.0, res  # chance: 25%
    assert res["history"][-1]["epoch"] == 10


def test_knn_from_checkpoint_writes_result_and_caches(ckpt, tmp_path):
    over = [*EVAL, f"cache_dir={tmp_path / 'cache'}"]
    src, cfg = open_source(ckpt, None, over)
    r1 = run_eval("knn", src, cfg, out=tmp_path / "knn.json")
    assert not r1["features"]["cached"]
    r2 = run_eval("knn", src, cfg, out=tmp_path / "knn.json")
    assert r2["features"]["cached"] and r2["top1"] == r1["top1"]
    saved = json.loads((tmp_path / "knn.json").read_text())
    for key in ("top1", "top5", "protocol", "features", "checkpoint", "config", "details"):
        assert key in saved
    assert saved["checkpoint"]["sha256"] == src.sha256 and len(src.sha256) == 64
    assert set(saved["details"]["per_k"]) == {"10", "20", "100", "200"}
    assert saved["features"]["test_samples"] == 128
    line = summary_line(r2)
    assert "\n" not in line and "top-1" in line and "knn" in line


def test_linear_cli_and_random_init_baseline(ckpt, tmp_path, capsys):
    out = tmp_path / "lin.json"
    args = ["eval", "linear", str(ckpt), *EVAL, f"cache_dir={tmp_path / 'c'}", "linear.epochs=30",
            "linear.batch_size=32", "linear.blr=1.0", "--random-init", "--out", str(out)]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("cmim eval linear: top-1") and "random" in line
    r = json.loads(out.read_text())
    assert r["features"]["init"].startswith("random") and r["protocol"] == "linear"
    assert r["top1"] > 35.0, r["top1"]  # chance: 25%


def test_linear_reference_mode_runs(ckpt, tmp_path):
    src, cfg = open_source(ckpt, None, [*EVAL, "linear.mode=reference", "linear.epochs=1",
                                        "linear.batch_size=32", "data.synthetic_size=64"])
    r = run_eval("linear", src, cfg, write=False)
    assert r["details"]["mode"] == "reference" and r["details"]["steps"] == 2
    assert 0.0 <= r["top1"] <= 100.0


def test_finetune_beats_chance(ckpt, tmp_path):
    """A short fine-tune (no Mixup/RandAugment, so a few dozen steps suffice) on synthetic data."""
    over = [*EVAL, "finetune.epochs=12", "finetune.batch_size=32", "finetune.lr=4e-3",
            "finetune.warmup_epochs=1", "finetune.mixup=0", "finetune.cutmix=0", "finetune.auto_augment=null",
            "finetune.reprob=0",
            "finetune.smoothing=0", "finetune.color_jitter=null", "finetune.drop_path=0",
            "finetune.layer_decay=0.9", "finetune.crop_scale=[0.7,1.0]", "finetune.eval_every_epochs=0",
            "finetune.hflip=0"]  # a flip turns a 45-degree bar into a 135-degree one: another class here
    src, cfg = open_source(ckpt, None, over)
    r = run_eval("finetune", src, cfg, out=tmp_path / "ft.json")
    assert r["top1"] > 40.0, r["details"]["history"]  # chance: 25%
    assert r["details"]["steps"] == 12 * 4


def test_finetune_recipe_ingredients_run(ckpt):
    """Mixup + CutMix + RandAugment + random erasing + layer decay + drop path: the full recipe, two steps."""
    src, cfg = open_source(ckpt, None, [*EVAL, "finetune.max_steps=2", "finetune.batch_size=16",
                                        "finetune.epochs=2", "finetune.pool=token", "test_subset=16"])
    r = run_eval("finetune", src, cfg, write=False)
    assert r["details"]["steps"] == 2 and r["features"]["feature"].startswith("fine-tuned (token")
    # the same seed repeats exactly (Mixup and RandAugment draw from numpy's and Python's global RNGs)
    again = run_eval("finetune", src, cfg, write=False)
    assert again["details"]["history"][-1]["train_loss"] == r["details"]["history"][-1]["train_loss"]


def test_randaugment_posterize_survives_zero_bits(ckpt):
    """m9 + mstd0.5 reaches magnitude 10, where timm's PosterizeIncreasing asks Pillow for 0 bits."""
    import numpy as np
    from PIL import Image

    from cmim.eval.finetune import train_transform

    _, cfg = open_source(ckpt, None, EVAL)
    tf = train_transform(cfg)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", []) if op.name.startswith("Posterize")]
    assert ops
    img = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    assert np.asarray(ops[0].aug_fn(img, 0)).max() == 0
    assert np.asarray(ops[0].aug_fn(img, 1)).max() == 128


def _image_folder(root: Path, n: int) -> None:
    """ImageNet layout: root/{train,val}/<class>/*.png; class = bright square left or right."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("left", "right")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                a[5:15, 1 + 9 * c:10 + 9 * c] = 230
                Image.fromarray(a).save(root / split / name / f"{i}.png")


def _cifar10(root: Path, n: int) -> None:
    """The python pickle batches; class = brightness band (40 / 130 / 220, three of the ten labels)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(1)
    sub = root / "cifar-10-batches-py"
    sub.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 3, n)
        data = np.clip(40 + 90 * labels[:, None] + rng.integers(0, 20, (n, 3072)), 0, 255).astype(np.uint8)
        with open(sub / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)


@pytest.mark.parametrize("dataset", ["folder", "cifar10"])
def test_knn_on_folder_and_cifar(ckpt, tmp_path, dataset):
    """Other datasets than the run's own: resized + centre-cropped to the encoder's 16 px input."""
    root = tmp_path / dataset
    if dataset == "folder":
        _image_folder(root, 6)
        over = ["data.name=folder", "data.train_split=train", "data.eval_split=val"]
    else:
        _cifar10(root, 8)
        over = ["data.name=cifar10"]
    src, cfg = open_source(ckpt, None, [*over, f"data.root={root}", "data.num_workers=0", "precision=fp32",
                                        f"cache_dir={tmp_path / 'c'}"])
    r = run_eval("knn", src, cfg, write=False)
    assert r["dataset"]["name"] == dataset and r["top1"] > 60.0, r["top1"]  # chance: 50% / 33%


def test_encoder_prefix_rules():
    sd = {f"{p}{k}": torch.zeros(1) for p in ("student.", "teacher.")
          for k in ("mask_token", "backbone.patch_embed.proj.weight")}
    assert encoder_prefixes(sd) == ["student.", "teacher."]
    assert encoder_prefix(sd, "conmim", "teacher") == "teacher."
    assert encoder_prefix(sd, "conmim", "student") == "student."
    assert encoder_prefix(sd, "mimco", "teacher") == "student."  # MimCo's teacher is the frozen input model
    with pytest.raises(CheckpointError):
        encoder_prefix({"x.weight": torch.zeros(1)}, "conmim", "teacher")


def test_student_and_teacher_load(ckpt):
    t, s = load_source(ckpt, "teacher"), load_source(ckpt, "student")
    assert t.extra["prefix"] == "teacher." and s.extra["prefix"] == "student."
    diff = [(a - b).abs().max().item() for a, b in zip(t.encoder.parameters(), s.encoder.parameters())]
    assert max(diff) > 0  # two optimizer steps moved the student away from its EMA


def test_bad_input_is_one_line(ckpt, tmp_path, capsys):
    assert main(["eval", "knn", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmim: error: checkpoint not found") and "\n" not in err
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, bad)
    assert main(["eval", "knn", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmim: error:") and "no encoder found" in err and "\n" not in err
    assert main(["eval", "knn", str(ckpt), "data.img_size=32", *EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.img_size" in err and "\n" not in err
    assert main(["eval", "knn", str(ckpt), "knn.ks=[0]"]) == 2
    assert "knn.ks" in capsys.readouterr().err


def test_monitor_prints_linear_probe_and_verdict(tmp_path, capsys):
    """monitor.linear_epochs: the quick linear probe beside k-NN for random init, raw pixels and the trained
    encoder, and the one-line verdict computed from them."""
    import json as _json

    from conftest import tiny_overrides

    from cmim.cli import main as cli_main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: conmim\n")
    assert cli_main(["pretrain", str(recipe), *tiny_overrides(tmp_path, "monitor.linear_epochs=3",
                                                               "train.epochs=1")]) == 0
    out = capsys.readouterr().out
    summary = _json.loads((tmp_path / "run" / "summary.json").read_text())
    first, last, pixels = summary["knn"][0], summary["knn"][-1], summary["knn_raw_pixels"]
    assert all("linear_top1" in r for r in (first, last, pixels))
    gain, over = last["knn_top1"] - first["knn_top1"], last["knn_top1"] - pixels["knn_top1"]
    lin_gain = last["linear_top1"] - first["linear_top1"]
    assert f"verdict: pre-training gained {gain:+.2f} (k-NN) / {lin_gain:+.2f} (linear) points over random init" in out
    assert f"and {over:+.2f} / " in out and "linear probe top-1 (same images): raw pixels" in out


@pytest.mark.parametrize("override", ["linear.mode=fast", "linear.optimizer=adam", "finetune.pool=max", "encoder=ema",
                                      "init=zeros", "device=tpu", "precision=fp8", "finetune.head_norm=ln"])
def test_closed_choices_are_refused_at_merge_in_one_line(override):
    from cmim.core.errors import ConfigError
    from cmim.eval.config import load_eval_config

    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_eval_config(None, ["data.name=synthetic", override])
    assert str(e.value).startswith(f"{key}: ") and "expected one of" in str(e.value) and "\n" not in str(e.value)


def test_enum_values_read_and_write_as_their_strings():
    from cmim.eval.config import load_eval_config

    cfg = load_eval_config(None, ["data.name=synthetic", "linear.mode=reference", "encoder=student"])
    assert cfg.linear.mode == "reference" and f"{cfg.encoder}" == "student"
    stored = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))
    assert stored["linear"]["mode"] == "reference" and stored["precision"] == "bf16"
    assert load_eval_config(stored) == cfg  # a result file's config loads back as it was
