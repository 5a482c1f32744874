"""The data directory each design's runs read: Fashion-MNIST where scripts/get_fashion_mnist.sh finds it, or the
clip-art as a folder of category links built in the work dir."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .design import CLIPART_MIN_IMAGES, REPO, StudyError


@functools.cache
def fmnist_root() -> str:
    r = subprocess.run(["bash", str(REPO / "scripts" / "get_fashion_mnist.sh")], cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise StudyError("Fashion-MNIST not found: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    return r.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class ClipArt:
    """The study's view of a clip-art tree: one link per top-level category with at least ``min_images`` images
    (cmim reads each category's nested sub-folders as that one class), in ``folder``."""

    source: str  # the tree, e.g. /usr/share/openclipart/png
    folder: str  # <work>/clipart: the links, the data.root of every run
    kept: dict[str, int]  # category -> images
    dropped: dict[str, int]
    min_images: int
    files_sha256: str  # of the sorted relative paths of the kept images: what the runs read

    def manifest(self) -> dict:
        return {"source": self.source, "min_images": self.min_images, "kept": self.kept, "dropped": self.dropped,
                "images": sum(self.kept.values()), "files_sha256": self.files_sha256}


def clipart_folder(source: Path, work: Path, min_images: int = CLIPART_MIN_IMAGES) -> ClipArt:
    """Count each category's images as cmim lists them (its own folder reader), then make ``<work>/clipart``
    hold exactly the links of the kept categories (deterministic: sorted, a link's target is the category's
    real path) and write ``<work>/clipart.json``. Links that differ (another --clipart-root) are replaced."""
    from cmim.data import ImageFolderDataset

    source = source.resolve()
    if not source.is_dir():
        raise StudyError(f"--clipart-root: {source} is not a folder (Debian: apt install openclipart-png)")
    try:
        tree = ImageFolderDataset(source, in_chans=3)  # lists files only, decodes nothing
    except (FileNotFoundError, ValueError) as e:
        raise StudyError(f"--clipart-root: {e}") from None
    if not tree.classes:
        raise StudyError(f"--clipart-root: {source} has no category sub-folders")
    counts = {c: 0 for c in tree.classes}
    for t in tree.targets.tolist():
        counts[tree.classes[t]] += 1
    kept = {c: n for c, n in counts.items() if n >= min_images}
    dropped = {c: n for c, n in counts.items() if n < min_images}
    if len(kept) < 2:
        raise StudyError(f"--clipart-root: fewer than 2 categories of {source} have {min_images} images")
    folder = work / "clipart"
    folder.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(folder):
        if entry.name not in kept or not entry.is_symlink() or os.readlink(entry.path) != str(source / entry.name):
            if entry.is_symlink() or entry.is_file():
                os.unlink(entry.path)
            else:
                raise StudyError(f"{folder} holds {entry.name}/, which the study did not make: move it away")
    for c in kept:
        link = folder / c
        if not link.is_symlink():
            link.symlink_to(source / c, target_is_directory=True)
    rel = sorted(os.path.relpath(p, source) for p, t in zip(tree.paths, tree.targets.tolist())
                 if tree.classes[t] in kept)
    digest = hashlib.sha256("\n".join(rel).encode()).hexdigest()
    art = ClipArt(str(source), str(folder), kept, dropped, min_images, digest)
    from cmim.core.io import atomic_write_text

    atomic_write_text(work / "clipart.json", json.dumps(art.manifest(), indent=1) + "\n")
    return art
