"""Ray: start or join a cluster, tokenize with Ray Data, train with a Ray Train TorchTrainer.

The only module (with `tune.py`) that knows Ray's APIs. Flow of `run_training(cfg)`:

1. `ray.init` - joins `scaling.address` (or `RAY_ADDRESS`, as under `ray job submit`), else starts a
   local instance.
2. `tokenized_datasets` - Ray Data reads the preference files, parses rows (bad rows become quarantine
   records with file, row and reason), tokenizes with the pure `tokenize.tokenize_pair`, and caches the
   result as Parquet under `data.cache_dir` keyed by a fingerprint of inputs and settings, so repeated runs
   and every trial of a sweep tokenize once.
3. A `TorchTrainer` runs `train_loop.train_loop_per_worker` on `scaling.num_workers` workers with a
   `RayRuntime`: DeepSpeed wraps the process group Ray created; data arrives through
   `ray.train.get_dataset_shard`; checkpoints go through `ray.train.report`; `FailureConfig` restarts
   failed worker groups from the latest checkpoint; re-running with the same output_dir resumes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from orpo_ray.config import Config, with_absolute_paths
from orpo_ray.train_loop import RUN_EXTRAS_KEY, train_loop_per_worker

# Ray Train run name inside scaling.storage_path. Fixed, because Ray Train V2 resumes a run from its latest
# checkpoint when the same (name, storage_path) is fitted again: that is how re-running a command resumes.
RUN_NAME = "train"


# ------------------------------------------------------------------------------------------- ray session
def worker_env() -> dict:
    """Environment for Ray workers: DeepSpeed on CPU, and a persistent cache for its JIT-built comm op."""
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "orpo_ray_torch_extensions"))
    return env


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress bars flood the log of every worker; our own tqdm bar shows progress."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def ensure_ray(cfg: Config) -> None:
    """Join the configured cluster, the one `ray job submit` put us on, or start a local instance."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": worker_env()}, log_to_driver=True)
    else:
        ray.init(runtime_env={"env_vars": worker_env()},
                 num_cpus=max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker))


# --------------------------------------------------------------------------------------------- runtime
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
        self._staging: list[str] = []

    def setup_data(self, cfg: Config, tokenizer) -> dict:
        import ray.train

        self.train_shard = ray.train.get_dataset_shard("train")
        self.eval_shard = ray.train.get_dataset_shard("eval")
        return dict(self.extras["data_stats"])

    def micro_batches_per_epoch(self) -> int:
        # streaming_split(equal=True) gives each rank floor(N / world) rows; drop_last batches of B.
        rows_per_rank = self.extras["data_stats"]["train_pairs"] // self.world_size
        return max(1, rows_per_rank // self.cfg.train.per_device_batch_size)

    def train_batches(self, epoch: int) -> Iterator[dict]:
        per_epoch = self.micro_batches_per_epoch()
        batches = self.train_shard.iter_batches(
            batch_size=self.cfg.train.per_device_batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=self.cfg.train.per_device_batch_size * 16,
            local_shuffle_seed=self.cfg.train.seed + epoch * 1000 + self.rank,
        )
        # A tiny shard may hold fewer rows than one batch: repeat it rather than run fewer steps than
        # the other ranks (a rank that stops early deadlocks the gradient all-reduce).
        yield from itertools.islice(itertools.chain.from_iterable(itertools.repeat(list(batches), per_epoch)), per_epoch)

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
        ray.train.report(_finite(metrics), checkpoint=checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def checkpoint_staging_dir(self, step: int) -> str:
        return tempfile.mkdtemp(prefix=f"orpo_ckpt_step{step}_rank{self.rank}_")


def _finite(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}


def ray_train_loop(config: dict) -> None:
    """What each Ray Train worker runs: the project's one loop with a RayRuntime."""
    from orpo_ray.train_loop import split_loop_config

    cfg, extras = split_loop_config(config)
    quiet_ray_data()
    train_loop_per_worker(config, runtime=RayRuntime(cfg, extras))


# --------------------------------------------------------------------------------------------- trainer
def storage_path(cfg: Config) -> str:
    return str(Path(cfg.scaling.storage_path or Path(cfg.output_dir) / "ray").resolve())


def make_trainer(cfg: Config, datasets: dict, extras: dict, *, run_name: str = RUN_NAME, callbacks=None):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = with_absolute_paths(cfg)  # workers run in another directory
    s = cfg.scaling
    loop_config = {**cfg.to_dict(), RUN_EXTRAS_KEY: extras}
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": 1} if s.use_gpu else {})
    return TorchTrainer(
        ray_train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def run_training(cfg: Config) -> dict:
    """`orpo-ray train`: tokenize with Ray Data (cached), train with Ray Train, return results.json."""
    from orpo_ray.ray_data import tokenized_datasets

    ensure_ray(cfg)
    datasets, data_stats = tokenized_datasets(cfg)
    make_trainer(cfg, datasets, {"data_stats": data_stats}).fit()
    return json.loads((Path(cfg.output_dir) / "results.json").read_text())
