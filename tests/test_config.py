"""Each bad-config case fails in one clear line, before any work starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from cmim.config import ConfigError, from_yaml_string, load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
BASE = ["data.name=synthetic", "data.img_size=32", "model.patch_size=16"]


@pytest.mark.parametrize("override,needle", [
    ("model.nonexistent=3", "nonexistent"),
    ("train.epochs=many", "epochs"),
    ("mask.ratio=1.5", "mask.ratio"),
    ("mask.ratio=0", "mask.ratio"),
    ("data.img_size=30", "not divisible"),
    ("method=byol", "unknown method"),
    ("train.precision=fp8", "train.precision"),
    ("train.batch_size=10", "accum_steps"),
    ("model.family=resnet", "model.family"),
    ("mask.cell=3", "mask.cell"),
])
def test_bad_values(override, needle):
    extra = ["train.accum_steps=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + extra + [override])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("override,allowed", [
    ("data.decode=gpu", "[cpu, device]"),
    ("data.bit_depth=16", "[auto, 8, full]"),
    ("data.interpolation=nearest", "[bicubic, bilinear]"),
    ("mask.kind=grid", "[block, random]"),
    ("model.size=huge", "[tiny, small, base, large]"),
    ("model.global_pool=max", "[avg, token]"),
    ("train.device=tpu", "[auto, cpu, cuda]"),
    ("monitor.encoder=ema", "[teacher, student]"),
])
def test_closed_choices_are_refused_at_merge_in_one_line(override, allowed):
    """A closed choice is an enum field: OmegaConf refuses another value while merging, before validate runs, and
    the line names the key and the allowed values."""
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + [override])
    msg = str(e.value)
    assert msg.startswith(override.split("=")[0] + ":") and allowed in msg and "\n" not in msg


def test_choices_read_as_written_and_saved_as_strings():
    """``data.bit_depth=8`` (an integer to YAML) is the choice "8"; members compare equal to their strings, and
    the saved YAML holds the plain strings."""
    cfg = load_config(None, BASE + ["data.bit_depth=8", "train.precision=fp32", "model.size=tiny"])
    assert cfg.data.bit_depth == "8" and cfg.train.precision == "fp32" and cfg.model.size == "tiny"
    text = to_yaml(cfg)
    assert "bit_depth: '8'" in text and "precision: fp32" in text and "size: tiny" in text
    assert to_yaml(from_yaml_string(text)) == text


@pytest.mark.parametrize("feature", ["grid0", "grid", "gridx", "max"])
def test_monitor_feature_follows_the_pooling_rule(feature):
    """monitor.feature takes what the encoder can pool (is_pooled_feature): grid0 has no cells."""
    with pytest.raises(ConfigError, match="monitor.feature"):
        load_config(None, BASE + [f"monitor.feature={feature}"])
    assert load_config(None, BASE + ["monitor.feature=grid2"]).monitor.feature == "grid2"


def test_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, ["data.name=folder", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_config(None, BASE + [f"train.resume={tmp_path / 'x.pt'}"])
    with pytest.raises(ConfigError, match="data.root"):  # mandatory ??? in the ImageNet recipe
        load_config(REPO / "configs" / "conmim_vit_small_in1k.yaml")


def test_not_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_recipes_load_and_override(tmp_path):
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        if recipe.name.startswith(("eval_", "finetune_")):
            continue  # evaluation recipes have their own schema (tests/test_eval.py)
        text = recipe.read_text()
        extra = []
        if "root: ???" in text:
            extra.append(f"data.root={tmp_path}")
        if "teacher: ???" in text or recipe.name.startswith("mimco_"):  # a teacher file must exist
            (tmp_path / "t.pt").write_bytes(b"x")
            extra.append(f"mimco.teacher={tmp_path / 't.pt'}")
        if "fashion-mnist" in text:
            extra.append("data.name=synthetic")
        cfg = load_config(recipe, extra + ["train.epochs=7"])
        assert cfg.train.epochs == 7


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  name: synthetic\n  img_size: 32\ntrain:\n  epochs: 3\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  batch_size: 8\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 8 and cfg.data.img_size == 32


def test_cli_reports_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cmim.cli", "pretrain", str(REPO / "configs" / "conmim_fmnist_cpu.yaml"),
                        "mask.ratio=2", f"train.out_dir={out}"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("cmim: error:") and "mask.ratio" in lines[0]
    assert not out.exists()
