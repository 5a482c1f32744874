"""keep_freed_memory: a large block freed by one step stays in the process for the next (no page faults)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import torch
from cmim.core.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.empty(64 * 2**20, dtype=torch.uint8)
x.fill_(1)
info = libc.mallinfo2()
mapped_while_alive = info.hblkhd  # bytes in mmap'd blocks
del x
print(mapped_while_alive, libc.mallinfo2().fordblks)  # ... and free bytes kept in the heap after the free
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_are_kept_after_free():
    def probe(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        mapped, kept = out.stdout.split()
        return int(mapped), int(kept)

    mb = 2**20
    mapped, kept = probe("default")
    assert mapped >= 64 * mb and kept < 64 * mb  # glibc's default: mmap'd, handed back on free
    mapped, kept = probe("keep")
    assert mapped < 64 * mb and kept >= 64 * mb  # from the heap, and still there for the next step


def test_trainer_default_keeps_freed_memory(tiny_cfg):
    assert tiny_cfg().train.keep_freed_memory is True
