"""Ray: start or join a cluster, tokenize with Ray Data, train with a Ray Train TorchTrainer.

Flow of `run_training(cfg)`:

1. `session.ensure_ray` - joins `scaling.address` (or `RAY_ADDRESS`, as under `ray job submit`), else starts a
   local instance.
2. `tokenized_datasets` - Ray Data reads the preference files, parses rows (bad rows become quarantine
   records with file, row and reason), tokenizes with the pure `tokenize.tokenize_pair`, and caches the
   result as Parquet under `data.cache_dir` keyed by a fingerprint of inputs and settings, so repeated runs
   and every trial of a sweep tokenize once.
3. A `TorchTrainer` runs `train/loop.train_loop_per_worker` on `scaling.num_workers` workers with a
   `RayRuntime` (ray_runtime.py): DeepSpeed wraps the process group Ray created; data arrives through
   `ray.train.get_dataset_shard`; checkpoints go through `ray.train.report`; `FailureConfig` restarts
   failed worker groups from the latest checkpoint; re-running with the same output_dir resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from orpo_ray.config import Config, loop_config, split_loop_config, with_absolute_paths
from orpo_ray.launch.run_state import (
    finished_results,
    output_dir_lock,
    run_name,
    run_state_file,
    save_state,
    storage_path,
)
from orpo_ray.launch.session import cpus_per_worker, ensure_ray, quiet_ray_data, worker_env
from orpo_ray.output_staging import fetch_results


def ray_train_loop(config: dict) -> None:
    """What each Ray Train worker runs: the project's one loop with a RayRuntime.

    The model code is imported here, in the worker, and not at the top of this module: the driver and Ray Train's
    controller import this module too (the controller to unpickle this function), and neither builds a model.
    transformers' model classes bring torch's compiler stack with them: ~4 s and ~200 MB per process on 2 cores.
    """
    from orpo_ray.launch.ray_runtime import RayRuntime
    from orpo_ray.threads import use_compute_threads
    from orpo_ray.train.loop import train_loop_per_worker

    cfg, extras = split_loop_config(config)
    quiet_ray_data()
    # make_trainer resolved 'auto'; torch's intra-op pool then matches the CPUs Ray reserved for this worker, set
    # so that MKL keeps its dynamic threading (threads.py: a plain torch.set_num_threads cost 15-20% here).
    use_compute_threads(cfg.scaling.cpus_per_worker)
    train_loop_per_worker(config, runtime=RayRuntime(cfg, extras))


def make_trainer(cfg: Config, datasets: dict, extras: dict, *, callbacks=None):
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = with_absolute_paths(cfg)  # workers run in another directory
    cfg = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, cpus_per_worker=cpus_per_worker(cfg)))
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": 1} if s.use_gpu else {})
    return TorchTrainer(
        ray_train_loop,
        train_loop_config=loop_config(cfg, extras),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(use_gpu=s.use_gpu)},
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Nothing is split: each rank takes a deterministic slice of every global batch (RayRuntime).
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def run_training(cfg: Config, callbacks=None) -> dict:
    """`orpo-ray train`: tokenize with Ray Data (cached), train with Ray Train, return results.json.

    Re-running with the same output_dir resumes from the latest checkpoint (same config required). A run
    that already finished is not trained again: its results.json is returned as it is.
    """
    from orpo_ray.data.ray_pipeline import tokenized_datasets

    cfg = with_absolute_paths(cfg)
    with output_dir_lock(cfg.output_dir):  # one writer per output_dir
        finished = finished_results(cfg)
        if finished is not None:
            return finished
        ensure_ray(cfg)
        datasets, data_stats = tokenized_datasets(cfg)
        return fit_run(cfg, datasets, {"data_stats": data_stats}, callbacks=callbacks)


def fit_run(cfg: Config, datasets: dict, extras: dict, *, callbacks=None) -> dict:
    """Fit one Ray Train run on already tokenized datasets (resuming its latest checkpoint, if any)."""
    save_state(run_state_file(cfg), cfg, completed=False)
    make_trainer(cfg, datasets, extras, callbacks=callbacks).fit()
    save_state(run_state_file(cfg), cfg, completed=True)
    fetch_results(Path(cfg.output_dir))  # rank 0 ran on another host and wrote to a URI output_dir
    return json.loads((Path(cfg.output_dir) / "results.json").read_text())
