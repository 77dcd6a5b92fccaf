"""`RayRuntime`: the `WorkerRuntime` (contract in train/runtime.py) of a Ray Train worker.

DeepSpeed wraps the process group Ray created; data arrives through `ray.train.get_dataset_shard`; checkpoints
go through `ray.train.report`.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from pathlib import Path
from typing import Iterator

import torch

from orpo_ray.config import Config, is_uri
from orpo_ray.data.order import TrainingOrder
from orpo_ray.launch.run_state import checkpoint_staging_root, run_name, storage_path
from orpo_ray.train.runtime import require_complete


class RayRuntime:
    """`WorkerRuntime` for a Ray Train worker (see runtime.py for the contract)."""

    supports_deepspeed = True

    def __init__(self, cfg: Config, extras: dict):
        import ray.train

        ctx = ray.train.get_context()
        self.cfg, self.extras = cfg, extras
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        if cfg.scaling.use_gpu and torch.cuda.is_available():
            self.device = torch.device("cuda", ctx.get_local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.order = TrainingOrder.for_run(cfg.train, self.world_size)
        # A rank killed between save and report (no `finally` runs) leaves its staging dirs behind: this rank's
        # restart removes them before writing new ones, so failed attempts do not fill the disk.
        self.staging_root = checkpoint_staging_root(cfg)
        for stale in self.staging_root.glob(f"step*_rank{self.rank}"):
            shutil.rmtree(stale, ignore_errors=True)

    def setup_data(self, cfg: Config, tokenizer) -> dict:
        import ray.train

        self.train_shard = ray.train.get_dataset_shard("train")
        self.eval_shard = ray.train.get_dataset_shard("eval")
        return dict(self.extras["data_stats"])

    def micro_batches_per_epoch(self) -> int:
        return self.order.micro_batches_per_epoch(self.extras["data_stats"]["train_pairs"])

    def train_batches(self, epoch: int) -> Iterator[dict]:
        # The train set is not split across ranks: every rank streams all of it, one shuffle window at a time,
        # and keeps its slice of each global micro-batch (data/order.py), so the order does not depend on the
        # number of workers and is the order of an in-process (--local) run.
        windows = self.train_shard.iter_batches(batch_size=self.order.window_rows, batch_format="numpy")
        yield from self.order.rank_micro_batches(windows, epoch, self.rank)

    def eval_batches(self) -> Iterator[dict]:
        # The eval dataset is not split by Ray; ranks take every world_size-th batch.
        batches = self.eval_shard.iter_batches(batch_size=self.cfg.train.per_device_batch_size, batch_format="numpy")
        yield from itertools.islice(batches, self.rank, None, self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """All ranks call this equally often (it is a barrier); every rank hands over its ZeRO shard."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        reported_at = time.time()
        try:
            ray.train.report(_finite(metrics), checkpoint=checkpoint)
        finally:  # persisted by report, or failed: the local copy is not needed either way
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if checkpoint_dir and self.cfg.train.fail_at_step is not None:
            self._wait_until_registered(reported_at)

    def _wait_until_registered(self, reported_at: float, timeout: float = 60.0) -> None:
        """Fault-injection runs only: Ray Train's controller collects reports by polling the workers (every
        2 s); a worker killed before that loses the report, and the restart resumes from the checkpoint
        before. Waiting until the controller has rewritten its checkpoint snapshot makes the injected fault
        land after the checkpoint is registered, so the fault test is deterministic."""
        if is_uri(storage_path(self.cfg)):  # the fault tests use local storage
            return
        snapshot = Path(storage_path(self.cfg)) / run_name(self.cfg) / "checkpoint_manager_snapshot.json"
        deadline = time.time() + timeout
        while time.time() < deadline and not (snapshot.exists() and snapshot.stat().st_mtime >= reported_at):
            time.sleep(0.2)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield require_complete(directory)

    def checkpoint_staging_dir(self, step: int) -> str:
        """Empty local dir for this rank's part of the step's checkpoint; `report` removes it on every path."""
        path = self.staging_root / f"step{step}_rank{self.rank}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return str(path)


def _finite(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
