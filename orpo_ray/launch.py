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
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from orpo_ray import ONEDNN_CACHE_ENV
from orpo_ray.config import Config, ConfigError, with_absolute_paths
from orpo_ray.ray_data import micro_batches_per_epoch, rank_micro_batches, window_rows
from orpo_ray.train_loop import RUN_EXTRAS_KEY, train_loop_per_worker

# Config keys that may change between the attempts of one run (re-running a command resumes it): they do
# not change what is trained. Anything else differing means a different run: refused, not silently resumed.
VOLATILE_KEYS = ("train.fail_at_step", "train.progress_bar", "tracking", "scaling.address",
                 "scaling.max_failures", "export")
RUN_STATE_FILE = "orpo_run.json"  # next to Ray's checkpoints: {"config": ..., "completed": bool}


# ------------------------------------------------------------------------------------------- ray session
def worker_env(address: str | None = None) -> dict:
    """Environment for Ray workers: DeepSpeed on CPU, a persistent cache for its JIT-built comm op, the bounded
    oneDNN primitive cache, and the cluster's address. Without RAY_ADDRESS, Ray's State API inside a worker scans
    the machine for clusters and fails when there are several ("Found multiple active Ray instances"); Ray Train's placement-group cleaner
    uses it to free the resources of a Train run whose controller died (a Tune trial ASHA stopped), so the
    next trial would wait for CPUs forever."""
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    env[ONEDNN_CACHE_ENV] = os.environ[ONEDNN_CACHE_ENV]  # from process start (see orpo_ray/__init__.py)
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "orpo_ray_torch_extensions"))
    if address and address != "auto" and "://" not in address:
        env["RAY_ADDRESS"] = address
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
        ray.init(address=address, runtime_env={"env_vars": worker_env(address)}, log_to_driver=True)
    else:
        # A local instance: pick its GCS port here so the workers can be told the address (see worker_env).
        port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts a head node
        try:
            ray.init(runtime_env={"env_vars": worker_env(f"{ray.util.get_node_ip_address()}:{port}")},
                     num_cpus=max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker))
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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

    def setup_data(self, cfg: Config, tokenizer) -> dict:
        import ray.train

        self.train_shard = ray.train.get_dataset_shard("train")
        self.eval_shard = ray.train.get_dataset_shard("eval")
        return dict(self.extras["data_stats"])

    def micro_batches_per_epoch(self) -> int:
        t = self.cfg.train
        return micro_batches_per_epoch(self.extras["data_stats"]["train_pairs"], t.per_device_batch_size,
                                       self.world_size, t.gradient_accumulation_steps)

    def train_batches(self, epoch: int) -> Iterator[dict]:
        # The train set is not split across ranks: every rank streams all of it and keeps its slice of
        # each global micro-batch, so the order does not depend on the number of workers (ray_data.py).
        t = self.cfg.train
        windows = self.train_shard.iter_batches(
            batch_size=window_rows(t.per_device_batch_size, self.world_size, t.gradient_accumulation_steps),
            batch_format="numpy")
        yield from rank_micro_batches(windows, per_device=t.per_device_batch_size, world_size=self.world_size,
                                      rank=self.rank, grad_accum=t.gradient_accumulation_steps,
                                      seed=t.seed, epoch=epoch)

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
        ray.train.report(_finite(metrics), checkpoint=checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            if self.cfg.train.fail_at_step is not None:
                self._wait_until_registered(reported_at)

    def _wait_until_registered(self, reported_at: float, timeout: float = 60.0) -> None:
        """Fault-injection runs only: Ray Train's controller collects reports by polling the workers (every
        2 s); a worker killed before that loses the report, and the restart resumes from the checkpoint
        before. Waiting until the controller has rewritten its checkpoint snapshot makes the injected fault
        land after the checkpoint is registered, so the fault test is deterministic."""
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


def run_name(cfg: Config) -> str:
    """Ray Train run name, one per output_dir: Ray Train V2 resumes a run from its latest checkpoint when
    the same (name, storage_path) is fitted again - that is how re-running a command resumes - and a
    shared `scaling.storage_path` must not hand one output_dir's checkpoints to another."""
    out = str(Path(cfg.output_dir).resolve())
    return f"orpo-{Path(out).name}-{hashlib.sha1(out.encode()).hexdigest()[:8]}"


def run_identity(cfg: Config) -> dict:
    """The config without VOLATILE_KEYS: equal identities = the same training run."""
    flat = _flatten(cfg.to_dict())
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in VOLATILE_KEYS)}


def changed_keys(cfg: Config, stored_identity: dict) -> list[str]:
    """Keys whose value differs between cfg and an identity stored (as JSON) by an earlier run."""
    mine = json.loads(json.dumps(run_identity(cfg)))  # same JSON types as the stored one
    return sorted(k for k in mine.keys() | stored_identity.keys() if mine.get(k) != stored_identity.get(k))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_state(state_file: Path, cfg: Config, what: str) -> dict | None:
    """What `save_state` wrote for an earlier `what` ("run", "sweep") of this output_dir, or None.
    Raises ConfigError naming the keys if its config differs: re-running resumes only the same one."""
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    changed = changed_keys(cfg, state["config"])
    if changed:
        raise ConfigError(
            f"{cfg.output_dir} holds a {what} with a different config ({', '.join(changed[:8])}); re-running resumes "
            f"only the same {what} - use a new output_dir (or delete this one) to train with other settings")
    return state


def save_state(state_file: Path, cfg: Config, **fields) -> None:
    """{"config": run_identity(cfg), **fields} as JSON: how `read_state` recognises the same run later."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"config": run_identity(cfg), **fields}, indent=1, default=str))


def _run_state_file(cfg: Config) -> Path:
    return Path(storage_path(cfg)) / run_name(cfg) / RUN_STATE_FILE


def make_trainer(cfg: Config, datasets: dict, extras: dict, *, callbacks=None):
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
            name=run_name(cfg),
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env()},
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
    from orpo_ray.ray_data import tokenized_datasets

    cfg = with_absolute_paths(cfg)
    finished = finished_results(cfg)
    if finished is not None:
        return finished
    ensure_ray(cfg)
    datasets, data_stats = tokenized_datasets(cfg)
    return fit_run(cfg, datasets, {"data_stats": data_stats}, callbacks=callbacks)


def finished_results(cfg: Config) -> dict | None:
    """results.json of an earlier, finished run of this config in this output_dir (None: train it).
    Raises ConfigError if the output_dir holds a run with another config."""
    results_file = Path(cfg.output_dir) / "results.json"
    state = read_state(_run_state_file(cfg), cfg, "run")
    if state and state["completed"] and results_file.exists():
        print(f"[orpo-ray] {cfg.output_dir} already holds this finished run; nothing to do "
              "(use a new output_dir to train again)", flush=True)
        return json.loads(results_file.read_text())
    return None


def fit_run(cfg: Config, datasets: dict, extras: dict, *, callbacks=None) -> dict:
    """Fit one Ray Train run on already tokenized datasets (resuming its latest checkpoint, if any)."""
    save_state(_run_state_file(cfg), cfg, completed=False)
    make_trainer(cfg, datasets, extras, callbacks=callbacks).fit()
    save_state(_run_state_file(cfg), cfg, completed=True)
    return json.loads((Path(cfg.output_dir) / "results.json").read_text())
