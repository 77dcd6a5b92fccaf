"""The Ray session: join the configured cluster (or the one `ray job submit` put us on), or start a local one,
and the environment every Ray worker gets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from orpo_ray import CACHE_BOUNDS
from orpo_ray.allocator import WorkerAllocator, bundled_jemalloc, worker_allocator
from orpo_ray.config import Config
from orpo_ray.console import VERBOSE_ENV, verbose
from orpo_ray.omp_wait import omp_wait_env
from orpo_ray.output_staging import OUTPUT_HOST_ENV, OUTPUT_URI_ENV


# Exported NCCL settings (interface, InfiniBand, debug level) reach the GPU workers: NCCL reads them in the
# worker process, and a cluster whose pods need NCCL_SOCKET_IFNAME set would otherwise hang at the first all-reduce.
NCCL_PREFIXES = ("NCCL_", "TORCH_NCCL_")
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # ray.train.v2._internal.constants.ENABLE_PRINT_PATCH_ENV_VAR


def worker_env(address: str | None = None, use_gpu: bool = False) -> dict:
    """Environment for Ray workers: DeepSpeed's accelerator, a persistent cache for its JIT-built ops, the bounded
    oneDNN/ideep caches, and the cluster's address. Without RAY_ADDRESS, Ray's State API inside a worker scans
    the machine for clusters and fails when there are several ("Found multiple active Ray instances"); Ray Train's placement-group cleaner
    uses it to free the resources of a Train run whose controller died (a Tune trial ASHA stopped), so the
    next trial would wait for CPUs forever.

    DS_ACCELERATOR: with `scaling.use_gpu` it is "cuda" whatever the driver exported - a CPU head node's
    DS_ACCELERATOR=cpu must not make DeepSpeed on the GPU workers pick its CPU accelerator (gloo, no NCCL).
    On CPU it is "cpu" unless the user exported another value.

    RAY_TRAIN_ENABLE_PRINT_PATCH=0 (unless exported): Ray Train replaces a worker's `print` with one that writes
    the line to stdout *and* logs it through the root logger, whose console handler writes it to stderr, as
    soon as sys.stdout is wrapped (it always is in a Ray worker); Ray forwards both streams, so every line a
    worker printed (the plan, the start-up line) reached the driver twice."""
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else os.environ.get("DS_ACCELERATOR", "cpu")}
    env[PRINT_PATCH_ENV] = os.environ.get(PRINT_PATCH_ENV, "0")
    env.update({k: os.environ[k] for k in CACHE_BOUNDS})  # from process start (see orpo_ray/__init__.py)
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "orpo_ray_torch_extensions"))
    # A URI output_dir (output_staging.py): rank 0 on another host than the driver's uploads its own outputs.
    env.update({k: os.environ[k] for k in (OUTPUT_URI_ENV, OUTPUT_HOST_ENV) if k in os.environ})
    if verbose():  # --verbose on a cluster the driver did not start
        env[VERBOSE_ENV] = "1"
    if use_gpu:
        env.update({k: v for k, v in os.environ.items() if k.startswith(NCCL_PREFIXES)})
    if address and address != "auto" and "://" not in address:
        env["RAY_ADDRESS"] = address
    return env


def quiet_ray_data() -> None:
    """Ray Data's per-dataset progress bars and INFO lines flood the console; our own tqdm bar shows progress."""
    import ray.data

    from orpo_ray.console import quiet_ray_data as quiet

    quiet(ray.data.DataContext.get_current())


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # ray.train.v2._internal.constants
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """`worker_process_setup_hook` of a local instance without the dashboard: Ray Train's placement-group cleaner
    asks the State API (served by the dashboard) every second whether the controller lives, and would warn every
    time. Its job - freeing the resources of a run whose controller died - has no use on a one-run local instance
    that ends with this process."""
    import logging

    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def ensure_ray(cfg: Config, dashboard: bool | None = None) -> None:
    """Join the configured cluster, the one `ray job submit` put us on, or start a local instance.

    dashboard: whether a local instance runs Ray's dashboard (and with it the State API); None takes
    ``scaling.local_dashboard``. Without it Ray Train's preemption watcher is off too (it polls for node drains,
    which only an autoscaled cluster does): two fewer sources of wake-ups on the cores the training runs on."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = cfg.scaling.cluster_address()
    # The job's runtime env reaches every worker it starts (Ray Train's and Ray Data's), before their first malloc
    # and before libgomp loads.
    start_env = process_start_env(cfg, local_instance=not address)
    if address:
        ray.init(address=address, runtime_env={"env_vars": worker_env(address, cfg.scaling.use_gpu) | start_env},
                 log_to_driver=True)
    else:
        # A local instance: pick its GCS port here so the workers can be told the address (see worker_env).
        port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts a head node
        address_env = worker_env(f"{ray.util.get_node_ip_address()}:{port}", cfg.scaling.use_gpu)
        runtime_env = {"env_vars": address_env | start_env}
        dashboard = cfg.scaling.local_dashboard if dashboard is None else dashboard
        if not dashboard:
            runtime_env["worker_process_setup_hook"] = f"{__name__}.{quiet_placement_group_cleaner.__name__}"
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # read by the Train controller this driver creates
        try:
            ray.init(runtime_env=runtime_env, include_dashboard=dashboard,
                     num_cpus=max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.resolved_cpus(None)))
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def run_allocator(cfg: Config, *, local_instance: bool) -> WorkerAllocator:
    """scaling.allocator resolved for this run's workers (orpo_ray/allocator.py)."""
    return worker_allocator(cfg.scaling.allocator, local_instance=local_instance,
                            inherited_preload=os.environ.get("LD_PRELOAD"), library=bundled_jemalloc())


def process_start_env(cfg: Config, *, local_instance: bool) -> dict:
    """What a training process must have in its environment when it starts, as it is read only then: its malloc
    (LD_PRELOAD, MALLOC_CONF; scaling.allocator) and its OpenMP threads' spin at a barrier (GOMP_SPINCOUNT;
    scaling.omp_spin_count)."""
    return (run_allocator(cfg, local_instance=local_instance).env(os.environ)
            | omp_wait_env(cfg.scaling.omp_spin_count, os.environ))


def local_process_env(cfg: Config) -> dict | None:
    """The environment an in-process run (`train --local`, the bench's in-process legs) starts under so that its
    one process starts as a local instance's workers do (process_start_env); None when this process already has
    it (restarted once, or the user's own LD_PRELOAD / GOMP_SPINCOUNT kept, or the settings ask for nothing)."""
    wanted = process_start_env(cfg, local_instance=True)
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return None
    return {**os.environ, **wanted}


def cpus_per_worker(cfg: Config) -> int:
    """scaling.cpus_per_worker, with 'auto' resolved (Ray must be initialised): on a one-node Ray instance
    (a local run, or a cluster that is one machine) its CPUs split across the workers, so a 1-worker run gets
    every core instead of 1 (Ray also sets the worker's OMP_NUM_THREADS to it); on a multi-node cluster 1,
    as node sizes may differ."""
    if cfg.scaling.cpus_per_worker != "auto":
        return cfg.scaling.cpus_per_worker
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    one_node_cpus = int(nodes[0].get("Resources", {}).get("CPU", 1)) if len(nodes) == 1 else None
    return cfg.scaling.resolved_cpus(one_node_cpus)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
