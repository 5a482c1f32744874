"""Tar shards: ``cmim shards`` (deterministic, resumable, unreadable files listed) and ``data.name=shards``
(every sample once per epoch over processes x workers, HTTP, ``pipe:``, exact mid-epoch resume)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from cmim.cli import main
from cmim.config import ConfigError, DataConfig, load_config
from cmim.core.checkpoint_paths import CHECKPOINT_FILE
from cmim.data import ImageFolderDataset, SyntheticDataset, build_base_dataset
from cmim.data.augment import ViewSpec
from cmim.data.shards import ShardDataset, write_shards
from cmim.data.shards import writer as shard_writer
from cmim.data.skips import read_skip_list, skip_report
from cmim.data.views import PretrainDataset
from cmim.engine.sampler import GlobalBatchSampler

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, PER_CLASS, SHARD_SIZE, MAX_SIDE = 4, 16, 10, 20
BAD = {"c1/zero.png": b"", "c2/text.jpg": b"not a JPEG at all\n"}


def write_folder(root: Path) -> None:
    """4 class folders of 16 small images (PNG, JPEG, and one RGBA each), plus the BAD files."""
    synth = SyntheticDataset(CLASSES * PER_CLASS, CLASSES, 24, 3, seed=3)
    for i in range(len(synth)):
        folder = root / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(synth[i][0])
        if i % 7 == 0:
            img.save(folder / f"{i:03d}.jpg", quality=90)
        elif i % 11 == 0:
            rgba = img.convert("RGBA")
            rgba.putalpha(128)
            rgba.save(folder / f"{i:03d}.png")
        else:
            img.save(folder / f"{i:03d}.png")
    for rel, data in BAD.items():
        (root / rel).write_bytes(data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    """(source folder, its shards: 64 samples in 7 shards, the last one uneven)."""
    base = tmp_path_factory.mktemp("shards")
    write_folder(base / "src")
    write_shards(base / "src", base / "out", SHARD_SIZE, max_side=MAX_SIDE)
    return base / "src", base / "out"


def data_cfg(root: str, cache: Path, **kw):
    return OmegaConf.structured(DataConfig(**{"name": "shards", "root": root, "img_size": 16, "in_chans": 3,
                                              "cache_dir": str(cache), "num_workers": 0, **kw}))


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


# ----------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------


def test_writer_is_deterministic(shards, tmp_path):
    src, out = shards
    assert main(["shards", str(src), str(tmp_path / "again"), "--shard-size", str(SHARD_SIZE),
                 "--max-side", str(MAX_SIDE), "--workers", "2"]) == 0
    first, second = tar_bytes(out), tar_bytes(tmp_path / "again")
    assert len(first) == 7 and first == second
    with tarfile.open(out / "shard-000000.tar") as tar:  # nothing of the moment or the machine in the headers
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {(0, 0, 0, "cmim", "cmim", 0o444)}
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [10] * 6 + [4]
    assert index["classes"] == ["c0", "c1", "c2", "c3"] and index["complete"]


def test_writer_resumes_after_a_kill(shards, tmp_path, monkeypatch):
    """A run stopped while writing its fourth shard keeps three; the re-run writes only the rest, to the same bytes."""
    src, out = shards
    real, calls = shard_writer.prepare_image, []

    def dies_on_the_35th(path, **kw):
        calls.append(path)
        if len(calls) == 35:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(shard_writer, "prepare_image", dies_on_the_35th)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, tmp_path / "w", SHARD_SIZE, max_side=MAX_SIDE)
    index = json.loads((tmp_path / "w" / "index.json").read_text())
    assert len(index["shards"]) == 3 and not index["complete"]
    assert not list((tmp_path / "w").glob(".*"))  # the shard cut short left nothing behind
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w").glob("*.tar")}
    monkeypatch.setattr(shard_writer, "prepare_image", real)
    calls.clear()
    write_shards(src, tmp_path / "w", SHARD_SIZE, max_side=MAX_SIDE)
    assert tar_bytes(tmp_path / "w") == tar_bytes(out)
    assert all((tmp_path / "w" / name).stat().st_mtime_ns == t for name, t in kept.items())
    assert read_skip_list(tmp_path / "w" / "skipped.txt") == read_skip_list(out / "skipped.txt")
    with pytest.raises(ConfigError, match="another folder or other settings"):
        write_shards(src, tmp_path / "w", SHARD_SIZE + 1, max_side=MAX_SIDE)


def test_unreadable_images_are_skipped_and_listed(shards, tmp_path):
    src, out = shards
    listed = read_skip_list(out / "skipped.txt")
    assert sorted(Path(p).relative_to(src.resolve()).as_posix() for p, _ in listed) == sorted(BAD)
    assert all(why for _, why in listed)
    ds = build_base_dataset(data_cfg(str(out), tmp_path), "train")
    folder = ImageFolderDataset(src)
    assert len(ds) == len(folder) - len(BAD) == CLASSES * PER_CLASS
    paths = [ds.member(i, "path").decode() for i in range(len(ds))]
    good = [p for p in (Path(f).relative_to(src).as_posix() for f in folder.paths) if p not in BAD]
    assert paths == good  # the folder's order, labels from its class folders
    assert ds.targets.tolist() == [int(p[1]) for p in good]
    # a shrunk sample is the folder's image, downsized; an unshrunk JPEG keeps its bytes
    img, label = ds[0]
    assert img.mode == "RGB" and max(img.size) == MAX_SIDE and label == 0
    jpg = next(i for i, p in enumerate(paths) if p.endswith(".jpg"))
    assert ds.shard(0)[1].image_ext[jpg] == "jpg" and ds.member(jpg)[:3] == b"\xff\xd8\xff"  # a JPEG stays one


def test_unreadable_sample_in_a_shard_falls_through(shards, tmp_path):
    """A corrupt image inside a shard is skipped like an unreadable file: next sample, counted once."""
    _, out = shards
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    ds = build_base_dataset(data_cfg(str(broken), tmp_path), "train")
    path, table = ds.shard(0)
    offset, size = table.image[2].tolist()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    ds = build_base_dataset(data_cfg(str(broken), tmp_path), "train")
    _, label = ds[2]
    assert ds.num_skipped == 1 and "#000000002" in ds.skipped_paths[0]
    assert np.array_equal(np.asarray(ds[2][0]), np.asarray(ds[3][0])) and label == ds.targets[3]
    # the run's skip list (skipped.txt) names it with its reason, also through a view's wrappers
    (name, why), = skip_report(Subset(ds, list(range(len(ds)))))
    assert name == ds.skipped_paths[0] and why


def test_a_missing_shard_is_an_error_not_a_skip(shards, tmp_path):
    _, out = shards
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "shard-000002.tar").unlink()
    ds = build_base_dataset(data_cfg(str(partial), tmp_path), "train")
    ds[0]
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        ds[25]
    assert ds.num_skipped == 0


# ----------------------------------------------------------------------------------------------------
# Reader: sources
# ----------------------------------------------------------------------------------------------------


def _pixels(ds: Dataset) -> list[np.ndarray]:
    return [np.asarray(ds[i][0]) for i in range(len(ds))]


@pytest.fixture
def http_root(shards):
    """The shards served over HTTP from 127.0.0.1."""
    _, out = shards
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shards_stream_over_http(shards, http_root, tmp_path):
    _, out = shards
    local = build_base_dataset(data_cfg(str(out), tmp_path / "a"), "train")
    expected = _pixels(local)
    for root in (f"{http_root}/shard-{{000000..000006}}.tar", f"{http_root}/index.json"):
        cache = tmp_path / root.rsplit("/", 1)[-1][:5]
        ds = build_base_dataset(data_cfg(root, cache), "train")
        assert isinstance(ds, ShardDataset) and ds.targets.tolist() == local.targets.tolist()
        got = _pixels(ds)
        assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
        assert len(list((cache / "shards").glob("*.tar"))) == 7  # each shard fetched once, whole


def test_http_shard_that_differs_from_its_index_is_refused(shards, tmp_path):
    _, out = shards
    served = tmp_path / "served"
    shutil.copytree(out, served)
    with open(served / "shard-000003.tar", "r+b") as f:
        f.seek(2000)
        f.write(b"X")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ds = build_base_dataset(data_cfg(f"http://127.0.0.1:{server.server_address[1]}/index.json", tmp_path), "x")
        ds[0]
        with pytest.raises(ConfigError, match="shard-000003.tar: cannot fetch it .*SHA-256"):
            ds[35]
    finally:
        server.shutdown()
        server.server_close()


def test_pipe_sources(shards, tmp_path):
    """``pipe:cat``: the command runs once per shard into the cache; the index is found by the same command."""
    _, out = shards
    local = _pixels(build_base_dataset(data_cfg(str(out), tmp_path / "a"), "train"))
    ds = build_base_dataset(data_cfg(f"pipe:cat {out}/shard-{{000000..000006}}.tar", tmp_path / "p"), "train")
    assert ds.sizes[0] is not None  # from the index beside the shards
    assert all(np.array_equal(a, b) for a, b in zip(local, _pixels(ds), strict=True))
    # without an index (foreign WebDataset shards): counts and labels scanned from the shards
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in out.glob("*.tar"):
        shutil.copy(p, bare)
    ds = build_base_dataset(data_cfg(f"pipe:cat {bare}/shard-{{000000..000006}}.tar", tmp_path / "q"), "train")
    assert ds.sizes[0] is None and len(ds) == len(local)
    assert ds.classes == ["0", "1", "2", "3"]
    with pytest.raises(ConfigError, match="cannot fetch"):
        build_base_dataset(data_cfg(f"pipe:cat {bare}/missing-{{0..1}}.tar", tmp_path / "r"), "train")


def test_config_takes_shard_patterns(shards, tmp_path):
    _, out = shards
    pattern = f"data.root={out}/shard-{{000000..000006}}.tar"
    cfg = load_config(None, tiny_overrides(tmp_path, "data.name=shards", pattern))
    assert cfg.data.name == "shards"
    with pytest.raises(ConfigError, match="8-bit images"):
        load_config(None, tiny_overrides(tmp_path, "data.name=shards", pattern, "data.bit_depth=full"))
    with pytest.raises(SystemExit) as e:
        main(["shards", "--help"])
    assert e.value.code == 0


# ----------------------------------------------------------------------------------------------------
# Reader: the split over processes and workers, resume
# ----------------------------------------------------------------------------------------------------


class _Tagged(Dataset):
    """Index -> (index, the sample's original path, decoded size): what a worker really read."""

    def __init__(self, ds: ShardDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, str, tuple[int, int]]:
        img, _ = self.ds[i]
        return i, self.ds.member(i, "path").decode(), img.size


def test_every_sample_once_per_epoch_over_2_processes_x_2_workers(shards, tmp_path):
    _, out = shards
    ds = build_base_dataset(data_cfg(str(out), tmp_path), "train")
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in (0, 1):
            sampler = GlobalBatchSampler(len(ds), 16, world_size=2, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            loader = DataLoader(_Tagged(ds), batch_sampler=sampler, num_workers=2, collate_fn=list)
            seen += [path for batch in loader for _, path, _ in batch]
        assert len(seen) == len(ds) == 64 and sorted(seen) == sorted(set(seen))
        assert set(seen) == {ds.member(i, "path").decode() for i in range(len(ds))}


def _global_batches(ds: PretrainDataset, world: int, workers: int, epoch: int, start: int) -> list[torch.Tensor]:
    """Each global batch from ``start`` on (crops, then photometric parameters, flattened per sample), the
    processes' parts in rank order."""
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchSampler(len(ds), 16, world_size=world, rank=rank, seed=7)
        sampler.set_epoch(epoch, start)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        per_rank.append([torch.cat([b["crops"].flatten(1).float(), b["aug"].flatten(1)], 1) for b in loader])
    return [torch.cat(parts) for parts in zip(*per_rank, strict=True)]


def test_mid_epoch_resume_is_exact_on_another_world_size(shards, tmp_path):
    _, out = shards
    base = build_base_dataset(data_cfg(str(out), tmp_path), "train")
    spec = ViewSpec(num_crops=2, profiles=["conmim_strong", "none"], crop_of_view=[0, 1])
    ds = PretrainDataset(base, spec, img_size=16, seed=3)
    straight = _global_batches(ds, world=2, workers=2, epoch=1, start=0)
    resumed = _global_batches(ds, world=1, workers=1, epoch=1, start=2)  # 1 process, 1 worker, from step 2
    assert len(straight) == 4 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(straight[2:], resumed, strict=True))


def test_pretraining_on_shards_resumes_exactly(shards, tmp_path):
    """The trainer on shards: stopped after 3 of 8 steps and resumed == one uninterrupted run."""
    _, out = shards
    common = ["data.name=shards", f"data.root={out}", f"data.cache_dir={tmp_path / 'cache'}",
              "monitor.every_epochs=0", "train.resume=auto", "data.num_workers=1"]
    from cmim.train import pretrain

    def run(name: str, *extra: str) -> dict[str, torch.Tensor]:
        pretrain(load_config(None, tiny_overrides(tmp_path, *common, f"train.out_dir={tmp_path / name}", *extra)))
        return torch.load(tmp_path / name / CHECKPOINT_FILE, weights_only=True)["model"]

    runs = {"straight": run("straight")}
    run("split", "train.max_steps=3")
    runs["split"] = run("split")
    assert runs["straight"].keys() == runs["split"].keys()
    assert all(torch.equal(runs["straight"][k], runs["split"][k]) for k in runs["straight"])
