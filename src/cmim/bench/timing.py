"""Wall-clock timing of device work, and the machine the numbers come from."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine", "sync", "timeit"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, reps: int, inner: int = 1) -> list[float]:
    """Seconds per call of ``fn`` for ``reps`` repetitions of ``inner`` back-to-back calls each."""
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / inner)
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
