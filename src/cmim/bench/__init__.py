"""``cmim bench``: what a recipe's training step costs (time, FLOPs, MFU, memory) and what its data pipeline
costs, in a few files by idea: :mod:`~cmim.bench.step` (the trainer's step on synthetic batches),
:mod:`~cmim.bench.data` (the loader's items/s), :mod:`~cmim.bench.peak` (FLOPs counted and the matmul peak),
:mod:`~cmim.bench.memory` (memory per GPU of large models under DDP and FSDP), :mod:`~cmim.bench.timing`, and
:mod:`~cmim.bench.cli` (the command)."""

from cmim.bench.cli import add_parser, format_table, load_bench_config, run_bench
from cmim.bench.peak import CPU_PEAK_SIZES, GPU_PEAK_SIZES, count_step_flops, matmul_peak
from cmim.bench.step import StepRunner, count_host_syncs, synthetic_batches
from cmim.bench.timing import machine

__all__ = ["CPU_PEAK_SIZES", "GPU_PEAK_SIZES", "StepRunner", "add_parser", "count_host_syncs", "count_step_flops",
           "format_table", "load_bench_config", "machine", "matmul_peak", "run_bench", "synthetic_batches"]
