"""What a step costs in model FLOPs (counted, not modelled) and the device's matmul peak, whose ratio to the
achieved rate is the MFU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from cmim.bench.timing import timeit

__all__ = ["CPU_PEAK_SIZES", "GPU_PEAK_SIZES", "count_step_flops", "matmul_peak"]

_ATEN = torch.ops.aten
#: square matmul sizes of the peak MFU is measured against (large enough to reach the device's best GEMM speed)
CPU_PEAK_SIZES, GPU_PEAK_SIZES = [2048, 4096], [4096, 8192]


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: list[int],
                reps: int = 4) -> dict[str, float]:
    """Best FLOP/s of square ``n x n @ n x n`` matmuls (2 n^3 FLOPs) over ``sizes`` and ``reps``."""
    best, best_n = 0.0, 0
    inner = 10 if device.type == "cuda" else 1
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: library initialisation, page faults, clocks
        sec = min(timeit(lambda a=a, b=b: torch.mm(a, b), device, reps, inner))
        rate = 2.0 * n**3 / sec
        if rate > best:
            best, best_n = rate, n
        del a, b
    return {"flops": best, "n": best_n}


def _cpu_sdpa_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode has no formula for the CPU flash-attention kernels that SDPA dispatches to on CPU."""
    def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping: dict[Any, Callable[..., int]] = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(_ATEN, name, None)
        if op is not None:
            mapping[op] = fn
    return mapping


def count_step_flops(step: Callable[[], None]) -> dict[str, int]:
    """Model FLOPs of one call of ``step`` (matmul, conv, attention; forward and backward), in all and by
    top-level module. The on-device augmentation (the ``ViewMaker``: the blur convolution) is data work, not
    model work, and is left out."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
    with counter:
        step()
    counts = counter.get_flop_counts()
    data = sum(sum(v.values()) for k, v in counts.items() if k.split(".")[-1] == "ViewMaker")
    top = {k: int(sum(v.values())) for k, v in counts.items()
           if k.count(".") == 1 and k.split(".")[-1] != "ViewMaker"}
    total = int(counter.get_total_flops()) - data
    # "other": outside any submodule's forward (losses; modules called through another method)
    return {"total": total, **top, "other": total - sum(top.values())}
