"""Baselines as evaluations: raw pixels, an architecture from a recipe with fresh weights, class-balanced label
fractions, and the grid-pooled feature, each against a hand-computed expectation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY

from cmim.cli import main
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.eval.baselines import balanced_label_indices
from cmim.models import MaskedEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

# eval-side data and model settings of the tiny synthetic recipe (tests/conftest.py)
DATA = [o for o in TINY if o.startswith("data.")] + ["data.synthetic_size=96", "precision=fp32", "batch_size=32"]


def test_balanced_label_indices_hand_case():
    labels = np.array([0] * 4 + [1] * 8 + [2] * 2 + [-1] * 3)
    idx = balanced_label_indices(labels, 0.25, seed=0)
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [1, 2, 1]  # round(0.25 * 4), round(0.25 * 8), at least one of 2; no unlabeled
    assert (np.diff(idx) > 0).all()
    assert np.array_equal(idx, balanced_label_indices(torch.from_numpy(labels), 0.25, seed=0))
    others = {tuple(balanced_label_indices(labels, 0.25, seed=s)) for s in range(10)}
    assert len(others) > 1  # the seed chooses which samples


def test_grid_pool_hand_case():
    # 4 patch tokens on a 2 x 2 grid (row-major), D = 2, plus a CLS token that pooling must ignore
    patches = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    tokens = torch.cat([torch.full((1, 2), 99.0), patches]).unsqueeze(0)
    assert torch.equal(MaskedEncoder.pool(tokens, "grid1"), torch.tensor([[2.5, 25.0]]))
    # grid2 keeps every cell: channel-major (D, G, G) flattened
    assert torch.equal(MaskedEncoder.pool(tokens, "grid2"), torch.tensor([[1.0, 2, 3, 4, 10, 20, 30, 40]]))
    assert torch.equal(MaskedEncoder.pool(tokens, "mean"), torch.tensor([[2.5, 25.0]]))
    assert torch.equal(MaskedEncoder.pool(tokens, "cls"), torch.tensor([[99.0, 99.0]]))


def _result(capsys) -> dict:
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return json.loads(open(line.rsplit("-> ", 1)[1]).read())


def test_raw_pixel_knn_equals_knn_on_flattened_normalized_images(tmp_path, capsys):
    from cmim.config import load_config
    from cmim.core.knn import knn_accuracy
    from cmim.data.augment import normalize
    from cmim.data.views import build_eval_dataset

    out = tmp_path / "pix.json"
    assert main(["eval", "knn", "--raw-pixels", *DATA, f"cache_dir={tmp_path}", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["features"]["feature"] == "pixels" and res["checkpoint"]["kind"] == "pixels"
    # the same protocol by hand
    d = load_config(None, [*TINY, "data.synthetic_size=96"]).data
    mean, std = list(d.mean), list(d.std)

    def feats(split: str):
        ds = build_eval_dataset(d, split)
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])
        return normalize(x, mean, std).flatten(1), torch.tensor([ds[i]["label"] for i in range(len(ds))])

    (trx, trl), (tex, tel) = feats("train"), feats("val")
    assert res["top1"] == pytest.approx(knn_accuracy(trx, trl, tex, tel, k=20, temperature=0.07)["top1"])
    assert "no encoder" in capsys.readouterr().out


def test_label_fraction_reaches_knn_linear_and_finetune(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("method: conmim\n")
    arch = [f"--arch={recipe}"]
    # the architecture comes from the recipe; the data comes from the eval overrides
    tiny_model = [o.replace("model.", "") for o in TINY if o.startswith("model.")]
    assert tiny_model  # the recipe must carry the tiny model, written below
    recipe.write_text("method: conmim\nmodel:\n" + "".join(f"  {o.split('=')[0]}: {o.split('=')[1]}\n"
                                                           for o in tiny_model)
                      + "data:\n  name: synthetic\n  img_size: 16\n  in_chans: 3\n"
                        "  mean: [0.5, 0.5, 0.5]\n  std: [0.25, 0.25, 0.25]\n")
    common = [*DATA, f"cache_dir={tmp_path}", "label_fraction=0.25"]
    assert main(["eval", "knn", *arch, *common, "--out", str(tmp_path / "k.json")]) == 0
    k = json.loads((tmp_path / "k.json").read_text())
    assert k["features"]["label_fraction"] == 0.25 and k["features"]["init"] == "random-s0"
    assert k["features"]["train_samples"] == 24  # 96 images, 4 classes of 24: 6 each
    assert main(["eval", "linear", *arch, *common, "linear.epochs=2", "--out", str(tmp_path / "l.json")]) == 0
    assert json.loads((tmp_path / "l.json").read_text())["features"]["train_samples"] == 24
    ft = ["finetune.steps=5", "finetune.batch_size=8", "finetune.epochs=1", "finetune.eval_every_epochs=0",
          "finetune.auto_augment=null", "finetune.mixup=0", "finetune.cutmix=0", "finetune.reprob=0"]
    assert main(["eval", "finetune", *arch, *common, *ft, "--out", str(tmp_path / "f.json")]) == 0
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["features"]["train_samples"] == 24
    assert f["details"]["steps"] == 5  # steps replace epochs: 3 steps per epoch, cycled into a second epoch
    assert "25% of the labels" in capsys.readouterr().out


def test_arch_of_a_folder_recipe_takes_the_eval_folder(tmp_path, monkeypatch):
    """A folder recipe leaves data.root to its user (???): --arch builds its encoder from the eval's folder."""
    from PIL import Image

    monkeypatch.setenv("CMIM_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    tiny_model = [o.replace("model.", "") for o in TINY if o.startswith("model.")]
    recipe = tmp_path / "folder.yaml"
    recipe.write_text("method: conmim\nmodel:\n" + "".join(f"  {o.split('=')[0]}: {o.split('=')[1]}\n"
                                                           for o in tiny_model)
                      + "data:\n  name: folder\n  root: ???\n  img_size: 16\n  in_chans: 3\n")
    out = tmp_path / "k.json"
    assert main(["eval", "knn", f"--arch={recipe}", f"data.root={tmp_path / 'imgs'}", "data.val_fraction=0.25",
                 "data.num_workers=0", "data.eval_crop_pct=1.0", "precision=fp32", "knn.ks=[3]",
                 f"cache_dir={tmp_path}", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["features"]["init"] == "random-s0" and res["features"]["train_samples"] + \
        res["features"]["test_samples"] == 12


def test_eval_without_checkpoint_or_baseline_is_one_line(capsys):
    assert main(["eval", "knn", *DATA]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmim: error:") and "--raw-pixels" in err[0]


def test_monitor_prints_raw_pixels_beside_random_init_and_pretrained(tmp_path, capsys):
    from conftest import tiny_overrides

    assert main(["pretrain", "configs/conmim_fmnist_cpu.yaml", *tiny_overrides(tmp_path), "train.epochs=1",
                 "monitor.encoder=student"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    pix = summary["knn_raw_pixels"]
    assert 0 <= pix["knn_top1"] <= 100 and pix["k"] == 5
    line = next(ln for ln in out.splitlines() if ln.startswith("k-NN top-1"))
    assert f"raw pixels {pix['knn_top1']:.2f}%" in line and "random init" in line and "pre-trained" in line
    # the same protocol as `cmim eval knn --raw-pixels` on the monitor's subsets
    assert main(["eval", "knn", "--raw-pixels", *[o for o in TINY if o.startswith("data.")],
                 "train_subset=48", "test_subset=32", "knn.ks=[5]", "precision=fp32", f"cache_dir={tmp_path}",
                 "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["top1"] == pytest.approx(pix["knn_top1"])


def test_report_adds_the_raw_pixel_baseline_beside_eval_results(tmp_path):
    from conftest import tiny_overrides

    from cmim.report import write_report

    assert main(["pretrain", "configs/conmim_fmnist_cpu.yaml", *tiny_overrides(tmp_path), "train.max_steps=1",
                 "monitor.every_epochs=0"]) == 0
    ckpt = tmp_path / "run" / CHECKPOINT_FILE
    assert main(["eval", "knn", str(ckpt), "data.synthetic_size=96", "precision=fp32", "batch_size=32",
                 f"cache_dir={tmp_path}"]) == 0
    html = write_report(tmp_path / "run", pictures=False).read_text()
    pix = list((tmp_path / "run" / "eval").glob("knn-*-pixels-*.json"))
    assert len(pix) == 1
    enc = json.loads(next(p for p in (tmp_path / "run" / "eval").glob("knn-*.json") if p not in pix).read_text())
    base = json.loads(pix[0].read_text())
    assert base["checkpoint"]["kind"] == "pixels" and base["features"]["feature"] == "pixels"
    assert [base["features"][k] for k in ("train_samples", "test_samples")] == [
        enc["features"][k] for k in ("train_samples", "test_samples")]
    assert f"{base['top1']:.2f}" in html and f"{enc['top1']:.2f}" in html
    write_report(tmp_path / "run", pictures=False)  # a second report reuses the baseline: still one
    assert len(list((tmp_path / "run" / "eval").glob("knn-*-pixels-*.json"))) == 1


def test_folder_recipe_runs_on_one_labeled_folder_of_mixed_images(tmp_path, capsys):
    """The folder recipe as a user runs it: one folder, class sub-folders, images of any size and mode."""
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P", "LA", "CMYK"]
    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
            arr = (rng.random((h, w, 3)) * 80 + 60 * c).astype(np.uint8)
            im = Image.fromarray(arr).convert(modes[i % len(modes)])
            im.save(tmp_path / "imgs" / f"class{c}" / f"{i}.{'jpg' if im.mode in ('CMYK', 'L') else 'png'}")
    small = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "conmim.proj_hidden_dim=32",
             "conmim.proj_out_dim=16", "data.img_size=32", "data.num_workers=0", "train.batch_size=8",
             "train.epochs=1", "monitor.every_epochs=1", "monitor.k=3", "train.progress=false",
             "train.tensorboard=false", "train.precision=fp32"]
    assert main(["pretrain", "configs/conmim_folder_cpu.yaml", f"data.root={tmp_path / 'imgs'}",
                 f"train.out_dir={tmp_path / 'run'}", *small]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["knn_raw_pixels"] is not None and len(summary["knn"]) == 2
    assert "raw pixels" in capsys.readouterr().out


def test_raw_pixels_of_a_folder_checkpoint_under_a_memory_limit(tmp_path):
    """`cmim eval knn CKPT --raw-pixels` takes the checkpoint's folder, size and split (it once fell back to the
    schema's 224 px Fashion-MNIST and was killed for memory), and fits in 4 GB of address space."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import tiny_overrides
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: conmim\n")
    assert main(["pretrain", str(recipe), *tiny_overrides(tmp_path, "data.name=folder", f"data.root={root}",
                                                           "data.val_fraction=0.3", "data.eval_split=val",
                                                           "train.max_steps=1", "monitor.every_epochs=0")]) == 0
    out = tmp_path / "pixels.json"
    code = ("import sys; from cmim.cli import main; "
            f"sys.exit(main(['eval', 'knn', {str(tmp_path / 'run' / CHECKPOINT_FILE)!r}, '--raw-pixels', "
            f"'precision=fp32', 'data.num_workers=0', 'cache_dir={tmp_path / 'cache'}', 'out={out}']))")
    run = subprocess.run(["bash", "-c", f'ulimit -v 4000000; exec "{sys.executable}" -c "{code}"'],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dataset"]["root"] == str(root) and result["features"]["test_split"] == "val"
    assert result["features"]["train_samples"] + result["features"]["test_samples"] == 20


def test_raw_pixels_that_cannot_fit_are_refused_in_one_line(monkeypatch, capsys, tmp_path):
    import cmim.eval.feature_cache as features

    monkeypatch.setattr(features, "host_available_bytes", lambda: 10_000)  # 10 kB
    assert main(["eval", "knn", "--raw-pixels", "--no-cache", *DATA, "train_subset=64", "test_subset=32",
                 f"out={tmp_path / 'r.json'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "raw-pixel features of" in err[0] and "GiB" in err[0], err
