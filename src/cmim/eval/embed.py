"""``cmim embed SOURCE OUT``: one pooled feature vector per image, for search, clustering or any tool outside cmim.

SOURCE is whatever evaluation opens (a checkpoint, a ``cmim export`` file or Hub folder, or ``--arch RECIPE``
for fresh weights); the images are a folder (``--images DIR``, read by cmim's folder dataset: any mode,
unreadable files skipped and listed) or any configured dataset (``-c RECIPE`` and ``key=value`` like ``cmim
eval``). Every image gets the run's eval transform (resize, centre crop, normalization) and goes through the
feature extractor that k-NN and the linear probe use (:func:`cmim.eval.extract.pooled_batches`).

Output by OUT's suffix: ``.npy`` (+ ``.paths.txt``, ``.labels.npy`` with class folders, ``.json`` description),
``.safetensors`` (tensors ``embeddings`` and ``labels``; paths and classes as JSON metadata) or ``.parquet``
(columns ``path``, ``label``, ``embedding``). Rows follow the sorted relative paths and nothing is random, so
the same input gives the same bytes. Work is kept in ``OUT.partial/``, one checked file per chunk of images;
a re-run of an interrupted job reuses the chunks whose images, weights and settings are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from cmim.core.cli_args import is_override
from cmim.core.distributed import resolve_device
from cmim.core.errors import ConfigError, first_line
from cmim.core.io import atomic_path, atomic_write_text
from cmim.core.precision import resolve_precision
from cmim.data.folder import ImageFolderDataset, folder_parts
from cmim.data.skips import write_skip_list
from cmim.data.views import build_eval_dataset
from cmim.eval.datasets import check_data_fits, eval_dataset
from cmim.eval.extract import pooled_batches
from cmim.eval.loading import EncoderSource
from cmim.models.stored_encoder import ENCODER_ROLES

__all__ = ["CHUNK_SIZE", "SUFFIXES", "ImageList", "add_parser", "embed", "image_list", "read_embeddings"]

log = logging.getLogger("cmim")

SUFFIXES = (".npy", ".safetensors", ".parquet")
CHUNK_SIZE = 4096  # images per resumable unit: minutes of work at most, a few MB on disk
META_KEY = "cmim_embed"  # safetensors / parquet metadata key of the JSON description
_VERSION = 1  # of the chunk files; a change makes old partial folders unusable (recomputed)


# --- the images ------------------------------------------------------------------------------------------
@dataclass
class ImageList:
    """The items to embed, in output order: dataset rows, their relative paths and what identifies them."""

    dataset: Dataset  # yields {"image", "label", "index"} (cmim's eval transform)
    order: list[int]  # dataset row of each output position (sorted by path)
    paths: list[str]  # relative path of each output position
    stamps: list[str]  # per position: what changes when the file does (size, mtime) - resume checks it
    classes: list[str]
    folder: ImageFolderDataset | None  # set when the items are files (unreadable ones are skipped)
    files: list[int]  # per position: the folder's file index (empty without a folder)
    where: str  # for messages

    def unreadable(self, pos: int) -> bool:
        return self.folder is not None and bool(self.folder._bad[self.files[pos]])


def _classes(ds: Any) -> list[str]:
    for _ in range(8):
        if getattr(ds, "classes", None) is not None:
            return [str(c) for c in ds.classes]
        inner = getattr(ds, "base", None)
        ds = inner if inner is not None else getattr(ds, "dataset", None)
        if ds is None:
            break
    return []


def _row_index(ds: Dataset, i: int) -> int:
    """Row ``i`` of ``ds`` as an index of the dataset under the eval subset (a :class:`Subset`)."""
    return int(ds.indices[i]) if isinstance(ds, Subset) else i


def image_list(cfg: DictConfig, images: str | os.PathLike | None = None) -> ImageList:
    """The images of ``--images DIR`` (every image file below it, recursively; class sub-folders give labels)
    or else of the configured eval split, with the eval transform of ``cfg.data``."""
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise ConfigError(f"--images: not a folder: {root}")
        # the run's transform settings, cmim's folder reader, the folder itself as the only split
        data = OmegaConf.merge(cfg.data, {"name": "folder", "root": str(root), "val_fraction": 0.0, "subset": None})
        try:
            ds: Dataset = build_eval_dataset(data, "")
        except ValueError as e:
            raise ConfigError(f"--images: {e}") from None
        where = str(root)
    else:
        ds = eval_dataset(cfg, "test")
        where = f"{cfg.data.name} {cfg.data.eval_split}" + (f" at {cfg.data.root}" if cfg.data.root else "")
    n = len(ds)  # type: ignore[arg-type]
    parts = folder_parts(ds)
    if parts is not None:
        folder, sel = parts
        files = sel if sel is not None else list(range(n))
        rel = [os.path.relpath(folder.paths[f], folder.root).replace(os.sep, "/") for f in files]
        order = sorted(range(n), key=rel.__getitem__)
        stamps = []
        for i in order:
            st = os.stat(folder.paths[files[i]])
            stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
        return ImageList(ds, order, [rel[i] for i in order], stamps, list(folder.classes), folder,
                         [files[i] for i in order], where)
    width = len(str(max(n - 1, 0)))
    name, split = str(cfg.data.name), str(cfg.data.eval_split)
    paths = [f"{name}/{split}/{_row_index(ds, i):0{width}d}" for i in range(n)]
    return ImageList(ds, list(range(n)), paths, [""] * n, _classes(ds), None, [], where)


# --- resumable chunks ------------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class ChunkStore:
    """``OUT.partial/``: ``manifest.json`` (what the job is) + ``chunk-NNNNNN.safetensors`` (rows done).

    A chunk holds the embeddings of its readable images, their output positions and labels; its metadata names
    the job and the chunk's own images (paths, sizes, mtimes), so it is reused only by the same job over the
    same files. Everything is written atomically, so a killed run leaves whole chunks or none.
    """

    def __init__(self, folder: Path, job: dict[str, Any]) -> None:
        self.folder, self.job = folder, _digest(job)
        manifest = folder / "manifest.json"
        if folder.exists():
            if not folder.is_dir() or (any(folder.iterdir()) and not manifest.is_file()):
                raise ConfigError(f"{folder} exists and was not written by cmim embed; move it away")
            try:
                same = json.loads(manifest.read_text()).get("job") == self.job
            except (OSError, ValueError):
                same = False
            if not same:
                if manifest.is_file():
                    log.info("embed: %s belongs to another job (weights, images or settings changed); starting "
                             "over", folder)
                self.remove()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(manifest, json.dumps({"job": self.job, "about": job}, indent=2) + "\n")

    def path(self, c: int) -> Path:
        return self.folder / f"chunk-{c:06d}.safetensors"

    def load(self, c: int, items: str) -> dict[str, Any] | None:
        """Chunk ``c`` if it is there, whole, and of this job and these images (``items``: their digest)."""
        from safetensors import safe_open

        p = self.path(c)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
                if meta.get("job") != self.job or meta.get("items") != items:
                    return None
                return {"embeddings": f.get_tensor("embeddings"), "positions": f.get_tensor("positions"),
                        "labels": f.get_tensor("labels"), "skipped": meta["skipped"]}
        except Exception as e:  # noqa: BLE001 - a damaged chunk is recomputed
            log.warning("embed: recomputing unreadable chunk %s (%s)", p, first_line(e))
            return None

    def save(self, c: int, items: str, chunk: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        meta = {"job": self.job, "items": items, "skipped": chunk["skipped"], "version": _VERSION}
        tensors = {k: chunk[k].contiguous() for k in ("embeddings", "positions", "labels")}
        with atomic_path(self.path(c)) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})

    def remove(self) -> None:
        """Delete the folder: only cmim's own files are in it (checked when it was opened)."""
        shutil.rmtree(self.folder, ignore_errors=True)


# --- writers --------------------------------------------------------------------------------------------
def sidecar(out: Path, what: str) -> Path:
    """``emb.npy`` -> ``emb.paths.txt`` etc.: the files that go with an output."""
    return out.with_suffix(f".{what}")


def _write_npy(out: Path, emb: np.ndarray, paths: list[str], labels: np.ndarray, meta: dict[str, Any]) -> list[Path]:
    if any("\n" in p or "\r" in p for p in paths):
        raise ConfigError("a file name contains a line break, which OUT.paths.txt cannot hold; write .safetensors "
                          "or .parquet instead")
    written = [sidecar(out, "paths.txt")]
    atomic_write_text(written[0], "".join(f"{p}\n" for p in paths))
    labels_file = sidecar(out, "labels.npy")
    if meta["labelled"]:
        with atomic_path(labels_file) as tmp:
            np.save(tmp, labels)
        written.append(labels_file)
    else:
        labels_file.unlink(missing_ok=True)  # no stale labels of an earlier run beside new vectors
    written.append(sidecar(out, "json"))
    atomic_write_text(written[-1], json.dumps(meta, indent=2) + "\n")
    with atomic_path(out) as tmp:
        np.save(tmp, emb)
    return written


def _write_safetensors(out: Path, emb: np.ndarray, paths: list[str], labels: np.ndarray,
                       meta: dict[str, Any]) -> list[Path]:
    from safetensors.torch import save_file

    tensors = {"embeddings": torch.from_numpy(emb), "labels": torch.from_numpy(labels)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(dict(meta, paths=paths))})
    return []


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401 - the writer
    except ImportError:
        raise ConfigError("writing .parquet needs pyarrow: pip install 'cmim[parquet]'") from None
    return pa


def _write_parquet(out: Path, emb: np.ndarray, paths: list[str], labels: np.ndarray,
                   meta: dict[str, Any]) -> list[Path]:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    n, dim = emb.shape
    large = n * dim >= 2**31  # list offsets are int32
    offsets = np.arange(n + 1, dtype=np.int64 if large else np.int32) * dim
    values = pa.array(emb.reshape(-1), type=pa.float32())
    column = (pa.LargeListArray if large else pa.ListArray).from_arrays(pa.array(offsets), values)
    table = pa.table({"path": pa.array(paths, type=pa.string()), "label": pa.array(labels, type=pa.int64()),
                      "embedding": column})
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta)})
    with atomic_path(out) as tmp:
        pq.write_table(table, str(tmp))
    return []


_WRITERS: dict[str, Callable[..., list[Path]]] = {
    ".npy": _write_npy, ".safetensors": _write_safetensors, ".parquet": _write_parquet,
}


def _writer(out: Path) -> Callable[..., list[Path]]:
    """The writer for OUT's suffix, checked (and its library found) before any image is read."""
    if out.suffix not in _WRITERS:
        raise ConfigError(f"OUT must end in {', '.join(SUFFIXES)} (it chooses the format), got {out.name!r}")
    if out.suffix == ".parquet":
        _pyarrow()
    return _WRITERS[out.suffix]


def read_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`embed` wrote, from any of the formats: embeddings (N, D) float32, labels (N,) int64 (-1:
    none), paths, classes and the description."""
    p = Path(path)
    if p.suffix == ".npy":
        meta = json.loads(sidecar(p, "json").read_text())
        emb = np.load(p, allow_pickle=False)
        paths = sidecar(p, "paths.txt").read_text(encoding="utf-8").splitlines()
        lab = sidecar(p, "labels.npy")
        labels = np.load(lab, allow_pickle=False) if meta["labelled"] else np.full(len(paths), -1, np.int64)
    elif p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="np") as f:
            meta = json.loads(f.metadata()[META_KEY])
            emb, labels = f.get_tensor("embeddings"), f.get_tensor("labels")
        paths = meta.pop("paths")
    elif p.suffix == ".parquet":
        _pyarrow()
        import pyarrow.parquet as pq

        table = pq.read_table(str(p))
        meta = json.loads(table.schema.metadata[META_KEY.encode()])
        paths = table.column("path").to_pylist()
        labels = table.column("label").to_numpy()
        emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        emb = emb.reshape(len(paths), -1)
    else:
        raise ConfigError(f"not an embeddings file: {p}")
    return {"embeddings": emb, "labels": labels, "paths": paths, "classes": meta.get("classes", []), "meta": meta}


# --- the job --------------------------------------------------------------------------------------------
def _transform(cfg: DictConfig) -> dict[str, Any]:
    d = cfg.data
    return {"img_size": int(d.img_size), "in_chans": int(d.in_chans), "mean": [float(v) for v in d.mean],
            "std": [float(v) for v in d.std], "eval_crop_pct": float(d.eval_crop_pct),
            "interpolation": str(d.interpolation), "background": [int(v) for v in d.background],
            "max_image_pixels": d.max_image_pixels}


def _embed_chunk(enc: torch.nn.Module, items: ImageList, start: int, stop: int, cfg: DictConfig,
                 device: torch.device, bar: Any) -> dict[str, Any]:
    """Rows ``start:stop`` of the output: embeddings of the readable images, their positions and labels."""
    sub = Subset(items.dataset, items.order[start:stop])
    rows, labels = [], []
    try:
        for pooled, batch in pooled_batches(enc, sub, (cfg.feature,), mean=list(cfg.data.mean),
                                            std=list(cfg.data.std), device=device, batch_size=int(cfg.batch_size),
                                            num_workers=int(cfg.data.num_workers), precision=cfg.precision):
            rows.append(pooled[cfg.feature])
            labels.append(batch["label"])
            bar.update(len(batch["label"]))
    except RuntimeError as e:
        if "no readable image left" in str(e):
            raise ConfigError(f"no readable image in {items.where}") from None
        raise
    emb, lab = torch.cat(rows), torch.cat(labels)
    # an unreadable file's row holds the next readable image (the folder dataset never fails an item): drop it
    keep = [p - start for p in range(start, stop) if not items.unreadable(p)]
    skipped = [[items.paths[p], items.folder.why_unreadable(items.files[p])]  # type: ignore[union-attr]
               for p in range(start, stop) if items.unreadable(p)]
    idx = torch.tensor(keep, dtype=torch.int64)
    return {"embeddings": emb[idx].contiguous(), "labels": lab[idx].to(torch.int64),
            "positions": idx + start, "skipped": skipped}


def embed(src: EncoderSource, cfg: DictConfig, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
          chunk_size: int = CHUNK_SIZE, progress: bool | None = None) -> dict[str, Any]:
    """Embed the images (``images`` folder, else the configured eval split) with ``src``'s encoder into ``out``;
    return a summary (counts, files written, skipped files, chunks reused)."""
    from tqdm import tqdm

    out = Path(out)
    write = _writer(out)
    if chunk_size < 1:
        raise ConfigError(f"--chunk-size: must be positive, got {chunk_size}")
    check_data_fits(src, cfg.data)
    items = image_list(cfg, images)
    n = len(items.order)
    device = resolve_device(cfg.device, key="device")
    precision = resolve_precision(cfg.precision, device)
    where = str(Path(images).resolve()) if images is not None else items.where
    job = {"weights": src.tag, "feature": cfg.feature, "transform": _transform(cfg), "where": where,
           "count": n, "chunk_size": chunk_size, "batch_size": int(cfg.batch_size), "precision": precision,
           "device": device.type, "version": _VERSION}
    store = ChunkStore(Path(f"{out}.partial"), job)
    enc = src.encoder.to(device)
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    chunks, reused = [], 0
    # progress None: a bar when stderr is a terminal (tqdm's rule)
    with tqdm(total=n, desc="cmim embed", unit="img", disable=None if progress is None else not progress) as bar:
        for c, (start, stop) in enumerate(bounds):
            key = _digest([items.paths[start:stop], items.stamps[start:stop]])
            chunk = store.load(c, key)
            if chunk is None:
                chunk = _embed_chunk(enc, items, start, stop, cfg, device, bar)
                store.save(c, key, chunk)
            else:
                reused += 1
                bar.update(stop - start)
            chunks.append(chunk)
    emb = torch.cat([c["embeddings"] for c in chunks]).float().numpy()
    labels = torch.cat([c["labels"] for c in chunks]).numpy().astype(np.int64)
    positions = torch.cat([c["positions"] for c in chunks]).tolist()
    skipped = [(p, why) for c in chunks for p, why in c["skipped"]]
    if not positions:
        raise ConfigError(f"no readable image in {items.where} ({len(skipped)} unreadable)")
    paths = [items.paths[p] for p in positions]
    labelled = bool(items.classes) and bool((labels >= 0).any())
    meta = {"format": "cmim-embeddings", "version": _VERSION, "count": len(paths), "dim": int(emb.shape[1]),
            "feature": cfg.feature, "labelled": labelled, "classes": items.classes if labelled else [],
            "images": items.where, "skipped": [p for p, _ in skipped], "source": src.describe(),
            "transform": _transform(cfg), "precision": precision}
    written = write(out, emb, paths, labels, meta)
    skip_file = sidecar(out, "skipped.txt")
    write_skip_list(skip_file, skipped)  # removed when nothing was skipped
    store.remove()
    return {"out": str(out), "count": len(paths), "dim": int(emb.shape[1]), "files": [str(p) for p in written],
            "skipped": skipped, "skip_file": str(skip_file) if skipped else None, "images": n,
            "chunks": len(bounds), "reused_chunks": reused, "labelled": labelled, "classes": len(meta["classes"])}


# --- command line ---------------------------------------------------------------------------------------
def _split_words(args: argparse.Namespace) -> tuple[str | None, str, list[str]]:
    """``[SOURCE] OUT [key=value ...]`` in any order with options: overrides are the words shaped key=value."""
    overrides = [w for w in args.words if is_override(w)]
    rest = [w for w in args.words if w not in overrides]
    want = 1 if args.arch else 2
    if len(rest) != want:
        usage = "OUT (with --arch)" if args.arch else "SOURCE OUT"
        raise ConfigError(f"cmim embed takes {usage} and key=value overrides, got {rest}")
    return (None if args.arch else rest[0]), rest[-1], overrides


def _run(args: argparse.Namespace) -> int:
    from cmim.eval.run import open_source

    source, out, overrides = _split_words(args)
    for flag, key in ((args.encoder, "encoder"), (args.feature, "feature"), (args.batch_size, "batch_size")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.split:
        overrides.append(f"data.eval_split={args.split}")
    if args.random_init:
        overrides.append("init=random")
    src, cfg = open_source(source, args.config, overrides, arch=args.arch)
    r = embed(src, cfg, out, images=args.images, chunk_size=args.chunk_size,
              progress=False if args.no_progress else None)
    extra = f" (+ {', '.join(r['files'])})" if r["files"] else ""
    skipped = (f"; {len(r['skipped'])} unreadable file{'s' if len(r['skipped']) != 1 else ''} skipped (listed in "
               f"{r['skip_file']})" if r["skipped"] else "")
    reused = f"; {r['reused_chunks']}/{r['chunks']} chunks reused" if r["reused_chunks"] else ""
    labels = f", labels of {r['classes']} classes" if r["labelled"] else ""
    print(f"cmim embed: {r['count']} images -> {out}{extra}: {r['count']} x {r['dim']} float32, {cfg.feature} "
          f"features of the {src.which} encoder ({src.init}, sha256 {src.sha256[:12]}){labels}{skipped}{reused}")
    return 0


def add_parser(subparsers: Any) -> None:
    desc = ("One pooled feature vector per image, with its relative path (and label, with class folders). The "
            "images get the run's eval transform (resize, centre crop, normalization). OUT's suffix picks the "
            "format: .npy (+ .paths.txt, .labels.npy, .json), .safetensors or .parquet (cmim[parquet]). Rows are "
            "sorted by path and the output is byte-for-byte reproducible; an interrupted run resumes from "
            "OUT.partial/ when re-run with the same command.")
    usage = ("cmim embed SOURCE OUT [key=value ...] [options]\n"
             "       cmim embed --arch RECIPE OUT [key=value ...] [options]")
    p = subparsers.add_parser("embed", help="write one feature vector per image (.npy, .safetensors, .parquet)",
                              description=desc, usage=usage, intermixed=True)
    p.add_argument("words", nargs="+", metavar="SOURCE OUT key=value",
                   help="SOURCE: checkpoint.pt, exported .safetensors or Hub folder (omitted with --arch); OUT: "
                        "emb.npy | emb.safetensors | emb.parquet; key=value: eval-config overrides (data.*, "
                        "batch_size, device, precision, test_subset, ...)")
    p.add_argument("--images", metavar="DIR", help="embed every image file below DIR (class sub-folders give "
                                                   "labels); default: the configured dataset's eval split")
    p.add_argument("-c", "--config", help="eval recipe YAML (the dataset, when no --images)")
    p.add_argument("--split", help="the configured dataset's split to embed (default: data.eval_split)")
    p.add_argument("--feature", help="pooled feature: mean (default) | cls | gridG (G x G mean-pooled cells)")
    p.add_argument("--encoder", choices=ENCODER_ROLES, help="checkpoints: which encoder (default: teacher)")
    p.add_argument("--random-init", action="store_true", help="the same architecture with fresh weights")
    p.add_argument("--arch", metavar="RECIPE", help="no SOURCE: the encoder of this pre-training recipe, fresh "
                                                    "weights")
    p.add_argument("--batch-size", type=int, help="images per forward pass (batch_size=N)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                   help=f"images per resumable chunk in OUT.partial/ (default {CHUNK_SIZE})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
