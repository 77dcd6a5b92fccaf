"""The Ray session: join the configured cluster (or the one `ray job submit` put us on), or start a local one,
and the environment every Ray worker gets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from orpo_ray import ONEDNN_CACHE_ENV
from orpo_ray.config import Config


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
                     num_cpus=max(os.cpu_count() or 1, cfg.scaling.num_workers * _explicit_cpus(cfg)))
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _explicit_cpus(cfg: Config) -> int:
    return 1 if cfg.scaling.cpus_per_worker == "auto" else cfg.scaling.cpus_per_worker


def cpus_per_worker(cfg: Config) -> int:
    """scaling.cpus_per_worker, with 'auto' resolved (Ray must be initialised): on a one-node Ray instance
    (a local run, or a cluster that is one machine) its CPUs split across the workers, so a 1-worker run gets
    every core instead of 1 (Ray also sets the worker's OMP_NUM_THREADS to it); on a multi-node cluster 1,
    as node sizes may differ."""
    if cfg.scaling.cpus_per_worker != "auto":
        return cfg.scaling.cpus_per_worker
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) != 1:
        return 1
    return max(1, int(nodes[0].get("Resources", {}).get("CPU", 1)) // cfg.scaling.num_workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
