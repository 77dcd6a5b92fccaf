"""The training order: which pairs form global micro-batch k of epoch e, and which slice of it is rank r's.

Both runtimes use this module and nothing else to order training pairs: `LocalRuntime` (--local) indexes its
in-memory rows with `rank_positions`, `RayRuntime` applies `rank_micro_batches` to the windows it streams from
the Parquet cache. So `orpo-ray train --local` and a 1-worker Ray run of the same config visit the same pairs
in the same order, and W workers x b pairs visit the same global batches as 1 worker x W*b.

Positions are indices 0..n-1 into the split's rows in their canonical order (by source, then row: the order
`prepare.prepare_data` returns them and the Ray cache stores them). The order is a *local* shuffle, because
the Ray path streams: the rows are cut into consecutive windows of `window_rows` positions (SHUFFLE_WINDOW_STEPS
optimizer steps' worth, which a streaming reader holds in memory at once); each window is permuted with a seed
made of (train.seed, epoch, window index) and cut into global micro-batches of per_device x world_size pairs;
rank r takes the r-th per_device-slice of each. The window depends only on the global batch, never on the
world size. The last, short window yields whole optimizer steps only (drop_last), so every optimizer step has
the same number of pairs and the gradient scale never changes.

Pure: numpy only (no torch, no ray).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

SHUFFLE_WINDOW_STEPS = 16  # optimizer steps' worth of pairs permuted together (the local-shuffle window)


@dataclass(frozen=True)
class TrainingOrder:
    per_device: int  # pairs per micro-batch per rank (train.per_device_batch_size)
    world_size: int
    grad_accum: int  # micro-batches per optimizer step (train.gradient_accumulation_steps)
    seed: int  # train.seed

    @classmethod
    def for_run(cls, train, world_size: int) -> "TrainingOrder":
        """The order of a run with the TrainSection `train` on `world_size` ranks."""
        return cls(train.per_device_batch_size, world_size, train.gradient_accumulation_steps, train.seed)

    @property
    def global_micro(self) -> int:
        """Pairs in one global micro-batch (all ranks together)."""
        return self.per_device * self.world_size

    @property
    def step_rows(self) -> int:
        """Pairs per optimizer step (the global batch)."""
        return self.global_micro * self.grad_accum

    @property
    def window_rows(self) -> int:
        """Rows per shuffle window: a whole number of optimizer steps, depending only on the global batch."""
        return SHUFFLE_WINDOW_STEPS * self.step_rows

    def micro_batches_per_epoch(self, num_rows: int) -> int:
        """Micro-batches each rank runs per epoch: whole optimizer steps only (drop_last)."""
        return num_rows // self.step_rows * self.grad_accum

    def window_slices(self, window_len: int, epoch: int, window: int, rank: int) -> list[np.ndarray]:
        """Rank `rank`'s micro-batches of window number `window` (`window_len` rows), as positions in the window."""
        order = np.random.default_rng([self.seed, epoch, window]).permutation(window_len)
        usable = window_len // self.step_rows * self.step_rows
        lo, hi = rank * self.per_device, (rank + 1) * self.per_device
        return [order[start + lo:start + hi] for start in range(0, usable, self.global_micro)]

    def rank_positions(self, num_rows: int, epoch: int, rank: int) -> Iterator[np.ndarray]:
        """Rank `rank`'s micro-batches of `epoch` as positions in the whole split (the in-memory path)."""
        for window, start in enumerate(range(0, num_rows, self.window_rows)):
            for positions in self.window_slices(min(self.window_rows, num_rows - start), epoch, window, rank):
                yield start + positions

    def rank_micro_batches(self, windows: Iterable[dict], epoch: int, rank: int) -> Iterator[dict]:
        """Rank `rank`'s micro-batches from consecutive windows of `window_rows` rows (dicts of numpy columns,
        as `iter_batches(batch_size=window_rows)` yields them; the streaming path)."""
        for window, columns in enumerate(windows):
            window_len = len(next(iter(columns.values())))
            for positions in self.window_slices(window_len, epoch, window, rank):
                yield {k: v[positions] for k, v in columns.items()}
