"""A resumable batch sampler that makes N processes see exactly the global batch one process would.

Each epoch has one global permutation (from seed and epoch); global batch g is a contiguous slice of it;
process r takes its contiguous share of that slice, cut into ``accum_steps`` micro-batches. So the union of
the processes' batches equals the single-process batch, and ``start_step`` skips whole global batches when a
run resumes mid-epoch (the data position in the checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, global_batch: int, *, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if global_batch % (world_size * accum_steps):
            raise ValueError(f"global batch {global_batch} is not divisible by world size x accumulation steps "
                             f"({world_size} x {accum_steps})")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch})")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.seed, self.shuffle = seed, shuffle
        self.micro_batch = global_batch // (world_size * accum_steps)
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # the incomplete last batch is dropped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = order[step * self.global_batch + self.rank * per_rank:][:per_rank]
            for a in range(self.accum_steps):
                yield chunk[a * self.micro_batch:(a + 1) * self.micro_batch]
