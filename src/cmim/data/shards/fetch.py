"""Where shards come from: local paths, brace patterns, ``http(s)://`` URLs and ``pipe:`` commands.

A local shard is read in place. A remote one (``http(s)://``, or ``pipe:CMD`` whose standard output is the
shard, e.g. ``pipe:aws s3 cp s3://bucket/shard-000001.tar -``) is fetched once, whole, into a cache folder and
read there by seeking, as ``wids`` does: random access to any sample then costs a local read, whatever the order
the sampler asks for. The download goes to a temporary name under a file lock (so the processes and loader
workers that want one shard fetch it once between them) and is renamed when complete and checked against the
index's byte size and SHA-256.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from cmim.core.errors import ConfigError

__all__ = ["expand", "fetch_shard", "is_remote", "read_source", "shard_name", "sibling"]

_TIMEOUT_S = 60.0


def expand(spec: str) -> list[str]:
    """A brace pattern (``shard-{000000..000009}.tar``, ``{a,b}``) as its list of shard sources."""
    import braceexpand

    return list(braceexpand.braceexpand(spec))


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://", "pipe:"))


def _local(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def shard_name(source: str) -> str:
    """The file name of a shard source: the last path part, of a ``pipe:`` command's last ``.tar`` word."""
    if source.startswith("pipe:"):
        words = [w for w in shlex.split(source[5:]) if ".tar" in w]
        if not words:
            raise ConfigError(f"{source}: a pipe: shard command must name its .tar file (e.g. `pipe:cat a.tar`)")
        source = words[-1]
    return source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def sibling(source: str, name: str) -> str:
    """The source of file ``name`` in the same place as ``source`` (the index beside a shard): the same folder
    or URL prefix, or for ``pipe:`` the same command with the shard's file name replaced."""
    old = shard_name(source)
    if source.startswith("pipe:"):
        head, sep, tail = source.rpartition(old)
        return f"{head}{name}{tail}" if sep else source
    head, sep, _ = source.split("?", 1)[0].rstrip("/").rpartition("/")
    return f"{head}{sep}{name}"


def _run_pipe(command: str, dest: Path) -> None:
    with open(dest, "wb") as f:
        proc = subprocess.run(command, shell=True, stdout=f, stderr=subprocess.PIPE, check=False)  # noqa: S602
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"`{command}` exited with status {proc.returncode}" + (f": {err[-1]}" if err else ""))


def _download(url: str, dest: Path, tries: int = 3) -> None:
    """``url`` into ``dest``; a dropped connection is retried (``tries`` in all) before it is an error."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(dest, "wb") as f:  # noqa: S310
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
            return
        except urllib.error.HTTPError:
            raise  # the server answered: trying again changes nothing
        except (OSError, urllib.error.URLError):
            if attempt == tries - 1:
                raise


def read_source(source: str) -> bytes | None:
    """The whole content of a small file (an index) at ``source``, or None when there is none there."""
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=_TIMEOUT_S) as response:  # noqa: S310
                return response.read()
        if source.startswith("pipe:"):
            proc = subprocess.run(source[5:], shell=True, capture_output=True, check=False)  # noqa: S602
            return proc.stdout if proc.returncode == 0 and proc.stdout else None
        return Path(_local(source)).read_bytes()
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_shard(source: str, cache_dir: str | os.PathLike, size: int | None = None,
                sha256: str | None = None) -> str:
    """A local path holding shard ``source``: the file itself, or its copy in ``cache_dir`` (fetched now when
    missing). ``size`` / ``sha256`` (from the index) are checked on every fetch; a cached copy of the wrong size
    is fetched again."""
    if not is_remote(source):
        path = _local(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard not found: {path}")
        return path
    tag = hashlib.sha1(source.encode()).hexdigest()[:16]
    dest = Path(cache_dir) / "shards" / f"{tag}-{shard_name(source)}"
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per shard; the others wait for it
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            return str(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            if source.startswith("pipe:"):
                _run_pipe(source[5:], tmp)
            else:
                _download(source, tmp)
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise OSError(f"got {got} bytes, the index says {size}")
            if sha256 is not None and _sha256(tmp) != sha256:
                raise OSError("its SHA-256 differs from the index's")
            os.replace(tmp, dest)
        except (OSError, urllib.error.URLError, ValueError) as e:
            raise ConfigError(f"shard {source}: cannot fetch it ({e})") from None
        finally:
            tmp.unlink(missing_ok=True)
    return str(dest)
