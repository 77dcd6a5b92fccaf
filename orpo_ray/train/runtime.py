"""What the training loop needs from its surroundings, and the in-process implementation.

The loop (`train/loop.py`) is written once. Where it runs - one process on a laptop, or N Ray Train
workers - only changes *this* object: who my rank is, which batches are mine (data/order.py decides, for
every runtime), how to average a tensor across ranks, and where checkpoints go. `launch/ray_runtime.RayRuntime`
is the Ray Train implementation; this file stays free of ray so a unit test can run the whole loop in a second.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Iterator, Protocol

import torch

from orpo_ray.config import Config
from orpo_ray.data.order import TrainingOrder
from orpo_ray.data.prepare import PreparedData, prepare_data, save_quarantine


class WorkerRuntime(Protocol):
    rank: int
    world_size: int
    device: torch.device
    supports_deepspeed: bool  # False in-process: DeepSpeed needs a process group, the plain engine does not

    def setup_data(self, cfg: Config, tokenizer) -> dict:
        """Prepare (or attach to) the data; returns stats: train_pairs, eval_pairs, quarantined, ..."""

    def micro_batches_per_epoch(self) -> int:
        """Micro-batches *each rank* gets per epoch (whole optimizer steps); the same on every rank so no rank
        waits forever."""

    def train_batches(self, epoch: int) -> Iterator[list[dict] | dict]:
        """Exactly micro_batches_per_epoch() micro-batches of tokenized rows for this rank, in data/order.py's
        order (every runtime uses it, so where a run executes does not change which pairs it sees when)."""

    def eval_batches(self) -> Iterator[list[dict] | dict]:
        """This rank's share of the eval rows, in order (the last batch may be short)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (metrics travel as sums and counts, so means stay exact)."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """Hand metrics (and optionally a checkpoint written by this rank) to the runtime."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """A local directory holding the checkpoint to resume from, or None for a fresh start."""

    def checkpoint_staging_dir(self, step: int) -> str:
        """Where this rank writes the checkpoint of `step` before reporting it."""


_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE"  # written into a checkpoint dir after every file of it is: a dir without it is partial


def require_complete(directory: str) -> str:
    """A checkpoint Ray Train hands back must carry the marker; resuming from a partial one would load a model
    and optimizer that do not belong together."""
    if not (Path(directory) / COMPLETE_MARKER).exists():
        raise RuntimeError(f"checkpoint {directory} has no {COMPLETE_MARKER} marker (its save did not finish); "
                           "refusing to resume from it")
    return directory


class LocalRuntime:
    """One process, no Ray: rank 0 of 1. Checkpoints live in output_dir/checkpoints/step_N."""

    rank = 0
    world_size = 1
    supports_deepspeed = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        use_cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.prepared: PreparedData | None = None
        self.checkpoint_root = Path(cfg.output_dir) / "checkpoints"
        self.order = TrainingOrder.for_run(cfg.train, self.world_size)  # the same order as a Ray run's

    # ------------------------------------------------------------------------------------- data
    def setup_data(self, cfg: Config, tokenizer) -> dict:
        self.prepared = prepare_data(cfg, tokenizer)
        save_quarantine(self.prepared, cfg.output_dir)
        return self.prepared.stats

    def micro_batches_per_epoch(self) -> int:
        return self.order.micro_batches_per_epoch(len(self.prepared.train_rows))

    def train_batches(self, epoch: int) -> Iterator[list[dict]]:
        rows = self.prepared.train_rows
        for positions in self.order.rank_positions(len(rows), epoch, self.rank):
            yield [rows[i] for i in positions]

    def eval_batches(self) -> Iterator[list[dict]]:
        rows, size = self.prepared.eval_rows, self.cfg.train.per_device_batch_size
        for i in range(0, len(rows), size):
            yield rows[i:i + size]

    # ------------------------------------------------------------------------------ communication
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is not None:
            _prune_checkpoints(self.checkpoint_root, keep=2)

    # -------------------------------------------------------------------------------- checkpoints
    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield latest_step_dir(self.checkpoint_root)

    def checkpoint_staging_dir(self, step: int) -> str:
        # The step dir IS the checkpoint here (no copy to other storage); a partial one from a killed attempt at
        # the same step is cleared first so no stale file mixes into the new one.
        path = self.checkpoint_root / f"step_{step}"
        shutil.rmtree(path, ignore_errors=True)
        return str(path)


def latest_step_dir(root: Path) -> str | None:
    """The step_N directory with the largest N that finished writing (has a COMPLETE marker)."""
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE_MARKER).exists()]
    return str(max(done)[1]) if done else None


def _prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; partial ones (no marker: a save that died) go too, so a
    leftover partial dir with a high step can never push a complete one out."""
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    complete = [p for _, p in steps if (p / COMPLETE_MARKER).exists()]
    for _, path in steps:
        if path not in complete[-keep:]:
            shutil.rmtree(path, ignore_errors=True)
