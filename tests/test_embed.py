"""``cmim embed``: the vectors are the encoder's own on the eval-transformed images, unreadable files are skipped
and listed, every format round-trips, the same input gives the same bytes, and an interrupted run resumes to
the same bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import tiny_overrides
from PIL import Image
from torchvision.transforms import InterpolationMode

from cmim.cli import main
from cmim.config import load_config
from cmim.data.pixels import load_image
from cmim.eval import embed as embed_mod
from cmim.eval.embed import embed, read_embeddings
from cmim.eval.extract import extract_features
from cmim.eval.run import open_source
from cmim.models import MaskedEncoder
from cmim.train import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

FP32 = ["precision=fp32", "data.num_workers=0", "device=cpu"]
BROKEN = ["cats/empty.png", "dogs/text.png", "dogs/trunc.png"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    cfg = load_config(None, tiny_overrides(root, "train.max_steps=1", "monitor.every_epochs=0", "model.depth=1",
                                           "data.eval_crop_pct=0.875"))
    return Path(pretrain(cfg)["checkpoint"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two class folders of odd sizes and modes (RGB, L, RGBA, P, a nested folder) plus three broken files."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c / "nested").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 27, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (19, 23), dtype=np.uint8)).save(root / c / "nested" / "grey.png")
        Image.fromarray(rng.integers(0, 255, (18, 18, 4), dtype=np.uint8)).save(root / c / "alpha.png")
        Image.fromarray(rng.integers(0, 255, (22, 17, 3), dtype=np.uint8)).convert("P").save(root / c / "pal.png")
    (root / "cats" / "empty.png").write_bytes(b"")
    (root / "dogs" / "text.png").write_text("not an image at all")
    png = (root / "cats" / "0.png").read_bytes()
    (root / "dogs" / "trunc.png").write_bytes(png[: len(png) // 2])
    return root


def _run(ckpt: Path, out: Path, images: Path | None = None, chunk_size: int = 4,
         overrides: tuple[str, ...] = ()) -> dict:
    src, cfg = open_source(ckpt, None, [*FP32, *overrides])
    return embed(src, cfg, out, images=images, chunk_size=chunk_size, progress=False)


def _reference(ckpt: Path, images: Path, paths: list[str], feature: str) -> torch.Tensor:
    """The encoder called directly: decode, resize the shorter side to img_size / crop_pct, centre crop,
    normalize with the run's statistics, forward, pool."""
    src, cfg = open_source(ckpt, None, FP32)
    d = cfg.data
    size, resize = int(d.img_size), int(round(d.img_size / d.eval_crop_pct))
    batch = []
    for rel in paths:
        im = load_image(images / rel, int(d.in_chans))
        im = TF.center_crop(TF.resize(im, resize, interpolation=InterpolationMode.BICUBIC, antialias=True), [size] * 2)
        x = torch.from_numpy(np.asarray(im).reshape(size, size, -1).transpose(2, 0, 1).copy()).float() / 255
        batch.append((x - torch.tensor(d.mean).view(-1, 1, 1)) / torch.tensor(d.std).view(-1, 1, 1))
    with torch.no_grad():
        return MaskedEncoder.pool(src.encoder.eval()(torch.stack(batch)), feature)


@pytest.mark.parametrize("feature", ["mean", "cls", "grid2"])
def test_vectors_are_the_encoders_own(ckpt, images, tmp_path, feature):
    r = _run(ckpt, tmp_path / "e.npy", images=images, overrides=(f"feature={feature}",))
    got = read_embeddings(tmp_path / "e.npy")
    assert got["embeddings"].dtype == np.float32 and got["embeddings"].shape == (r["count"], r["dim"])
    assert got["paths"] == sorted(got["paths"])
    ref = _reference(ckpt, images, got["paths"], feature)
    assert np.abs(got["embeddings"] - ref.numpy()).max() <= 1e-5


def test_unreadable_files_are_skipped_and_listed(ckpt, images, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["embed", str(ckpt), str(out), "--images", str(images), *FP32, "--chunk-size", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("cmim embed: 12 images") and "3 unreadable files skipped" in line
    got = read_embeddings(out)
    readable = sorted(str(p.relative_to(images)) for p in images.rglob("*.png")
                      if str(p.relative_to(images)) not in BROKEN)
    assert got["paths"] == readable and len(got["embeddings"]) == 12  # one vector per readable file, no stand-ins
    assert got["meta"]["skipped"] == BROKEN
    listed = (tmp_path / "e.skipped.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in listed] == BROKEN and all("\t" in ln for ln in listed)
    assert got["classes"] == ["cats", "dogs"]
    assert got["labels"].tolist() == [0 if p.startswith("cats/") else 1 for p in got["paths"]]
    assert not (tmp_path / "e.safetensors.partial").exists()


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".parquet"])
def test_formats_round_trip(ckpt, images, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    ref_run = _run(ckpt, tmp_path / "ref.npy", images=images)
    ref = read_embeddings(tmp_path / "ref.npy")
    out = tmp_path / f"e{suffix}"
    _run(ckpt, out, images=images)
    # read back with the format's own library, no cmim
    if suffix == ".npy":
        emb = np.load(out)
        paths = (tmp_path / "e.paths.txt").read_text().splitlines()
        labels = np.load(tmp_path / "e.labels.npy")
        classes = json.loads((tmp_path / "e.json").read_text())["classes"]
    elif suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        tensors = load_file(str(out))
        emb, labels = tensors["embeddings"], tensors["labels"]
        with safe_open(str(out), framework="np") as f:
            meta = json.loads(f.metadata()["cmim_embed"])
        paths, classes = meta["paths"], meta["classes"]
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert table.schema.field("embedding").type == pa.list_(pa.float32())
        assert table.schema.field("label").type == pa.int64() and table.schema.field("path").type == pa.string()
        emb = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
        paths, labels = table.column("path").to_pylist(), table.column("label").to_numpy()
        classes = json.loads(table.schema.metadata[b"cmim_embed"])["classes"]
    assert emb.dtype == np.float32 and np.array_equal(emb, ref["embeddings"])
    assert paths == ref["paths"] and labels.tolist() == ref["labels"].tolist() and classes == ["cats", "dogs"]
    assert ref_run["count"] == len(paths)


def test_same_input_same_bytes(ckpt, images, tmp_path):
    names = ["e.npy", "e.paths.txt", "e.labels.npy", "e.json", "e.skipped.txt"]
    first = {}
    for k in range(2):
        _run(ckpt, tmp_path / "e.npy", images=images, chunk_size=5)
        got = {n: (tmp_path / n).read_bytes() for n in names}
        if k == 0:
            first = got
    assert got == first


def test_resume_after_interruption_gives_the_same_bytes(ckpt, images, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    fresh = tmp_path / "fresh" / "e.parquet"
    _run(ckpt, fresh, images=images, chunk_size=4)

    out = tmp_path / "resumed" / "e.parquet"
    saved = []
    real_save = embed_mod.ChunkStore.save

    def save_then_die(self, c, items, chunk):
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed while computing the third chunk
        real_save(self, c, items, chunk)
        saved.append(c)

    monkeypatch.setattr(embed_mod.ChunkStore, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(ckpt, out, images=images, chunk_size=4)
    partial = Path(f"{out}.partial")
    assert sorted(p.name for p in partial.glob("chunk-*")) == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    assert not out.exists()
    monkeypatch.setattr(embed_mod.ChunkStore, "save", real_save)

    computed = []
    real_chunk = embed_mod._embed_chunk
    monkeypatch.setattr(embed_mod, "_embed_chunk", lambda *a, **k: computed.append(a[2]) or real_chunk(*a, **k))
    r = _run(ckpt, out, images=images, chunk_size=4)
    assert r["reused_chunks"] == 2 and computed == [8, 12]  # the unfinished chunks (15 files: 0-3, 4-7, 8-11, 12-14)
    assert out.read_bytes() == fresh.read_bytes()
    assert not partial.exists()

    # a changed file, other settings or other weights never reuse a chunk of another job
    monkeypatch.setattr(embed_mod.ChunkStore, "save", save_then_die)
    saved.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(ckpt, out, images=images, chunk_size=4)
    monkeypatch.setattr(embed_mod.ChunkStore, "save", real_save)
    os.utime(images / "cats" / "0.png", ns=(1, 1))  # chunk 0 has a new file now
    computed.clear()
    r = _run(ckpt, out, images=images, chunk_size=4)
    assert r["reused_chunks"] == 1 and computed == [0, 8, 12]
    computed.clear()
    monkeypatch.setattr(embed_mod.ChunkStore, "remove", lambda self: None)  # keep the chunks this time
    _run(ckpt, out, images=images, chunk_size=4)
    computed.clear()
    r = _run(ckpt, out, images=images, chunk_size=4, overrides=("feature=cls",))
    assert r["reused_chunks"] == 0 and len(computed) == 4


def test_configured_dataset_matches_the_eval_features(ckpt, tmp_path):
    """No --images: the checkpoint's own data (synthetic here), through the extractor k-NN uses."""
    out = tmp_path / "s.npy"
    r = _run(ckpt, out, overrides=("test_subset=24",), chunk_size=10)
    got = read_embeddings(out)
    src, cfg = open_source(ckpt, None, [*FP32, "test_subset=24"])
    from cmim.eval.datasets import eval_dataset

    feats, labels = extract_features(src.encoder, eval_dataset(cfg, "test"), feature="mean", mean=list(cfg.data.mean),
                                     std=list(cfg.data.std), precision="fp32")
    assert np.abs(got["embeddings"] - feats.numpy()).max() <= 1e-6
    assert got["labels"].tolist() == labels.tolist() and got["classes"][0] == "class_0"
    assert got["paths"][0].startswith("synthetic/test/") and len(set(got["paths"])) == 24 == r["count"]


def test_sources_hub_folder_and_fresh_architecture(ckpt, images, tmp_path):
    from cmim.export import export_hub

    export_hub(ckpt, tmp_path / "hub")
    _run(ckpt, tmp_path / "a.npy", images=images)
    src, cfg = open_source(tmp_path / "hub", None, FP32)
    embed(src, cfg, tmp_path / "b.npy", images=images, progress=False)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()

    recipe = tmp_path / "arch.yaml"
    recipe.write_text("model: {size: tiny, embed_dim: 32, depth: 1, num_heads: 2, patch_size: 4}\n"
                      "data: {name: synthetic, img_size: 16, in_chans: 3}\n")
    assert main(["embed", "--random-init", "--arch", str(recipe), str(tmp_path / "r.npy"), "--images", str(images),
                 *FP32, "--no-progress"]) == 0
    assert read_embeddings(tmp_path / "r.npy")["meta"]["source"]["init"].startswith("random")


def test_errors_are_one_line(ckpt, images, tmp_path, capsys, monkeypatch):
    cases = [
        (["embed", str(ckpt), str(tmp_path / "e.txt"), "--images", str(images)], "OUT must end in"),
        (["embed", str(ckpt)], "takes SOURCE OUT"),
        (["embed", str(ckpt), str(tmp_path / "e.npy"), "--images", str(tmp_path / "nope")], "not a folder"),
        (["embed", str(tmp_path / "missing.pt"), str(tmp_path / "e.npy")], "checkpoint not found"),
        (["embed", str(ckpt), str(tmp_path / "e.npy"), "--feature", "max"], "feature:"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"")
    cases.append((["embed", str(ckpt), str(tmp_path / "e.npy"), "--images", str(empty), *FP32], "no readable image"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("cmim: error:") and expected in err, (argv, err)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    assert main(["embed", str(ckpt), str(tmp_path / "e.parquet"), "--images", str(images)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cmim: error: writing .parquet needs pyarrow: pip install 'cmim[parquet]'"
