"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), read without ever running a pickle's code.

Out of the box DCP breaks the rule that no file can run code: it reads ``.metadata`` with ``pickle.load`` and
every non-tensor entry with ``torch.load(weights_only=False)``. So cmim
- writes tensors only: a checkpoint's plain values (counters, config, optimizer groups, ...) go into one JSON
  document stored as a uint8 tensor (:data:`PLAIN_KEY`), with a placeholder where each tensor was; a DTensor is
  written by every process (its shards), a plain tensor by rank 0 only (the value the single file would hold);
- reads with :class:`SafeFileSystemReader`: ``.metadata`` through an unpickler that builds only DCP's own metadata
  classes (and torch.Size, dtypes, layouts, paths), every entry must be a tensor, every data file a plain name in
  the checkpoint's folder, and tensors are read by DCP with ``weights_only=True``.

Reading into a live run (:func:`read_into`) loads the plain part first, lets the run check it, then loads the
model and optimizer tensors straight into their (possibly sharded) places, so another world size reshards them.
:func:`read_full` loads everything as whole tensors on one process without a process group (``cmim checkpoint
consolidate``).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import pickle
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException as DCPException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.tensor import DTensor

from cmim.core.checkpoint_paths import DCP_METADATA
from cmim.core.distributed import is_dist
from cmim.core.errors import CheckpointError, UnsafeCheckpointError, first_line

__all__ = ["PLAIN_KEY", "SafeFileSystemReader", "read_full", "read_into", "write"]

PLAIN_KEY = "__cmim__"  # the JSON document of a checkpoint's plain values, as a uint8 tensor
_FORMAT = {"format": "cmim-dcp", "version": 1}
SEP = "/"  # between an entry and its path in the tree (parameter names hold dots, never a slash)

# --- plain values <-> JSON, tensors <-> flat keys -----------------------------------------------------------


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as tagged JSON with ``{"tensor": key}`` where each tensor was (collected into ``tensors``)."""
    if torch.is_tensor(value):
        tensors[key] = value
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {"dict": [[_split(k, f"{key}{SEP}?", {}), _split(v, f"{key}{SEP}{k}", tensors)]
                         for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_split(v, f"{key}{SEP}{i}", tensors) for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    raise TypeError(f"{key}: a {type(value).__name__} cannot go into a checkpoint (tensors and plain values only)")


def _join(doc: Any, tensors: dict[str, Any]) -> Any:
    """Inverse of :func:`_split`; a tensor missing from ``tensors`` stays as its key in a :class:`Slot`."""
    if not isinstance(doc, dict):
        return doc
    if len(doc) != 1:
        raise CheckpointError("its plain values are not in cmim's format (an untagged object)")
    (tag, body), = doc.items()
    if tag == "tensor" and isinstance(body, str):
        return tensors.get(body, Slot(body))
    if tag in ("list", "tuple") and isinstance(body, list):
        items = [_join(v, tensors) for v in body]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict" and isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
        return {_join(k, tensors): _join(v, tensors) for k, v in body}
    raise CheckpointError(f"its plain values are not in cmim's format (tag {str(tag)[:20]!r})")


class Slot(str):
    """Where a tensor not yet loaded goes (its key)."""


def _encode(doc: dict[str, Any]) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps({**_FORMAT, "entries": doc}).encode()), dtype=torch.uint8)


def _decode(blob: torch.Tensor) -> dict[str, Any]:
    try:
        doc = json.loads(bytes(blob.numpy().tobytes()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"its plain values are not JSON ({first_line(e)})") from None
    if not isinstance(doc, dict) or {k: doc.get(k) for k in _FORMAT} != _FORMAT \
            or not isinstance(doc.get("entries"), dict):
        raise CheckpointError(f"its plain values are not {_FORMAT['format']} version {_FORMAT['version']}")
    return doc["entries"]


# --- the safe reader ----------------------------------------------------------------------------------------
_META = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(_META, c.__name__): c for c in (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
                                        TensorProperties, StorageMeta, MetadataIndex, _MEM_FORMAT_ENCODING)},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id: the folder DCP wrote to
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and nothing else: any other global (a function a payload would call, a class
    with a harmful ``__setstate__``) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")


class _Refused(pickle.UnpicklingError):
    pass


def _check_metadata(md: Any, where: Path) -> Metadata:
    """The structure DCP will trust: tensor entries only, data files inside the checkpoint's folder."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where} is not a usable DCP checkpoint ({why})")

    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise bad("its metadata is not DCP metadata")
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            raise UnsafeCheckpointError(f"{where}: refused: entry {str(key)[:80]!r} is pickled bytes, which only "
                                        "full unpickling can read and can run code; cmim writes tensors only")
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata) \
                or not isinstance(entry.size, torch.Size) or not isinstance(entry.properties, TensorProperties) \
                or not isinstance(entry.properties.dtype, torch.dtype):
            raise bad(f"entry {str(key)[:80]!r} is not a tensor description")
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad("its storage table is not DCP's")
        name = info.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
                or not all(isinstance(x, int) and x >= 0 for x in (info.offset, info.length)) \
                or info.transform_descriptors:
            raise bad(f"entry {str(index.fqn)[:80]!r} points outside its folder or uses stream transforms")
    if PLAIN_KEY not in md.state_dict_metadata:
        raise bad(f"no '{PLAIN_KEY}' entry: not written by cmim")
    return md


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, with the metadata read by :class:`_MetadataUnpickler`, checked, and read once (later
    calls return the checked copy), and with pickled-bytes entries refused."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(str(path))
        self.folder = Path(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            f = self.folder / DCP_METADATA
            if not f.is_file():
                raise CheckpointError(f"{self.folder} is not a complete DCP checkpoint (no {DCP_METADATA})")
            try:
                with open(f, "rb") as fh:
                    md = _MetadataUnpickler(fh).load()
            except _Refused as e:
                raise UnsafeCheckpointError(
                    f"{f}: refused: the file needs {e}, which only full unpickling can build and can run code; "
                    "cmim reads DCP metadata with DCP's own classes only") from None
            except Exception as e:  # noqa: BLE001 - truncated, not a pickle, wrong opcodes: unusable
                raise CheckpointError(f"cannot read DCP checkpoint {self.folder}: its {DCP_METADATA} is "
                                      f"unreadable ({type(e).__name__}: {first_line(e)})") from None
            self._metadata = _check_metadata(md, self.folder)
        md = self._metadata
        md.storage_meta = StorageMeta(load_id=self.load_id)
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
            raise UnsafeCheckpointError(f"{self.folder}: refused: a pickled-bytes entry was requested")
        return super().read_data(plan, planner)


# --- write and read ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _cause(e: BaseException) -> str:
    """The first underlying failure of a DCP error (DCP wraps each rank's exception and traceback)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    return f"{type(e).__name__}: {first_line(e)}"


def write(ckpt: dict[str, Any], folder: Path, is_main: bool) -> None:
    """Write ``ckpt`` (call on every process) as a DCP checkpoint in the fresh folder ``folder``: plain tensors
    and the plain values from rank 0, DTensors' shards from every process. Complete once ``.metadata`` exists."""
    tensors: dict[str, torch.Tensor] = {}
    doc = {entry: _split(value, entry, tensors) for entry, value in ckpt.items()}
    flat = {k: v for k, v in tensors.items() if isinstance(v, DTensor) or is_main}
    if is_main:
        flat[PLAIN_KEY] = _encode(doc)
    with _quiet():
        dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(folder), thread_count=1), no_dist=not is_dist())


def _load(flat: dict[str, torch.Tensor], reader: SafeFileSystemReader) -> None:
    try:
        with _quiet():
            dcp.load(flat, storage_reader=reader, no_dist=not is_dist())
    except CheckpointError:
        raise
    except (Exception, DCPException) as e:  # noqa: BLE001 - a missing or torn data file: one line
        raise CheckpointError(f"cannot read DCP checkpoint {reader.folder}: {_cause(e)}") from None


def _empty(md: Metadata, key: str) -> torch.Tensor:
    entry = md.state_dict_metadata[key]
    assert isinstance(entry, TensorStorageMetadata)
    return torch.empty(entry.size, dtype=entry.properties.dtype)


def _in(entries: tuple[str, ...], key: str) -> bool:
    return key.split(SEP, 1)[0] in entries


def read_full(folder: Path) -> dict[str, Any]:
    """The whole checkpoint as whole CPU tensors and plain values (one process, no process group needed)."""
    reader = SafeFileSystemReader(folder)
    md = reader.read_metadata()
    flat = {k: _empty(md, k) for k in md.state_dict_metadata}
    _load(flat, reader)
    try:
        doc = _decode(flat.pop(PLAIN_KEY))
        return {entry: _join(value, flat) for entry, value in doc.items()}
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None


def read_into(folder: Path, sharded: tuple[str, ...], live: Callable[[], dict[str, Any]],
              check_plain: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The checkpoint in ``folder`` for a running job (call on every process).

    Plain values and the other entries' tensors are read first and given to ``check_plain`` (which refuses
    before anything is touched); then the ``sharded`` entries' tensors are loaded into the places ``live()``
    gives (this run's model and optimizer state, sharded as this run shards them), after their names and shapes
    are checked against the checkpoint's."""
    reader = SafeFileSystemReader(folder)
    md = reader.read_metadata()
    first = {k: _empty(md, k) for k in md.state_dict_metadata if not _in(sharded, k)}
    _load(first, reader)
    try:
        doc = _decode(first.pop(PLAIN_KEY))
        ckpt = {entry: _join(value, first) for entry, value in doc.items()}
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    check_plain(ckpt)
    places: dict[str, torch.Tensor] = {}
    for entry, value in live().items():
        if entry in sharded:
            _split(value, entry, places)
    stored = {k for k in md.state_dict_metadata if _in(sharded, k)}
    for entry in sharded:
        want = {k for k in places if _in((entry,), k)}
        have = {k for k in stored if _in((entry,), k)}
        missing, unexpected = sorted(want - have), sorted(have - want)
        shapes = [k for k in sorted(want & have) if tuple(places[k].shape) != tuple(_empty_size(md, k))]
        if missing or unexpected or shapes:
            what = {"model": " does not fit this model configuration",
                    "optimizer": ": its optimizer state does not fit this run's optimizer"}.get(entry, f": '{entry}'")
            detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected else
                      f"size mismatch for {shapes[0]}: {tuple(_empty_size(md, shapes[0]))} in the checkpoint, "
                      f"{tuple(places[shapes[0]].shape)} here")
            raise CheckpointError(f"{folder}{what}: {detail}")
    _load(places, reader)
    for entry in sharded:
        if entry in doc:
            ckpt[entry] = _join(doc[entry], places)
    return ckpt


def _empty_size(md: Metadata, key: str) -> torch.Size:
    entry = md.state_dict_metadata[key]
    assert isinstance(entry, TensorStorageMetadata)
    return entry.size
