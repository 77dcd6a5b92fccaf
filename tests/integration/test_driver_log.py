"""What a person sees running `orpo-ray train CONFIG` through Ray (the `make demo` path): every line the
Ray Train worker prints reaches the driver's console once (Ray Train's print patch used to send each one to
stdout and stderr, and Ray forwarded both)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.ray_train_helpers import DEMO, TINY, env_without_start_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_print_patch_switch_is_ray_trains_own():
    from ray.train.v2._internal.constants import ENABLE_PRINT_PATCH_ENV_VAR

    from orpo_ray.launch.session import PRINT_PATCH_ENV

    assert PRINT_PATCH_ENV == ENABLE_PRINT_PATCH_ENV_VAR


def test_the_preemption_watcher_switch_and_cleaner_logger_are_ray_trains_own():
    import importlib

    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR

    from orpo_ray.launch.session import PG_CLEANER_LOGGER, PREEMPTION_WATCHER_ENV

    assert PREEMPTION_WATCHER_ENV == ENABLE_PREEMPTION_WATCHER_ENV_VAR
    assert importlib.import_module(PG_CLEANER_LOGGER).logger.name == PG_CLEANER_LOGGER


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`orpo-ray train` as `make demo` runs it (2 steps): its console and results.json."""
    out = tmp_path_factory.mktemp("driver_log") / "run"
    env = env_without_start_settings()
    cmd = [sys.executable, "-m", "orpo_ray.cli", "train", DEMO, *TINY, "train.max_steps=2", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"console": proc.stdout + proc.stderr, "results": json.loads((out / "results.json").read_text())}


def test_the_worker_runs_on_rays_bundled_jemalloc(demo_run):
    """scaling.allocator: auto on the instance the run starts: the worker's LD_PRELOAD (job runtime env) put
    jemalloc in the Ray Train worker, as its own memory map says, and its MALLOC_CONF arrived with it (the worker's
    jemalloc reports that it keeps freed pages)."""
    assert demo_run["results"]["plan"]["allocator"] == "jemalloc (keeps freed pages)"
    plan = [line for line in demo_run["console"].splitlines() if "[orpo-ray] plan:" in line and "| malloc" in line]
    assert len(plan) == 1 and "| malloc jemalloc (keeps freed pages) |" in plan[0], plan


def test_the_worker_starts_with_the_openmp_spin_count_of_the_run(demo_run):
    """scaling.omp_spin_count: auto -> GOMP_SPINCOUNT=10000 in the job's runtime env, so in the Ray Train worker's
    environment when it started (libgomp reads it then; test_objectives_train checks libgomp honours it)."""
    assert demo_run["results"]["plan"]["omp_spin_count"] == "10000"
    plan = [line for line in demo_run["console"].splitlines() if "[orpo-ray] plan:" in line and "| malloc" in line]
    assert plan[0].endswith("| OpenMP spin 10000"), plan


def test_worker_lines_reach_the_driver_once(demo_run):
    console = demo_run["console"]
    lines = [line for line in console.splitlines() if "[orpo-ray]" in line and "RayTrainWorker" in line]
    plan = [line for line in lines if "[orpo-ray] plan: fast path" in line]
    start = [line for line in lines if "2 steps of 16 pairs" in line]
    assert len(plan) == 1 and len(start) == 1, "\n".join(lines)
    assert len(lines) == len(set(lines)), "\n".join(lines)
    # scaling.local_dashboard: false (the default): a local instance without the dashboard, whose absence Ray
    # Train's placement-group cleaner would report every second (silenced by the worker setup hook).
    assert "View the dashboard" not in console
    # Nothing else per step: the worker prints the plan, its own log lines and Ray Train's few of its own.
    ours = ("[orpo-ray]", "step ", "Setting up process group", "Reporting training result")
    worker = [re.sub(r"^.*?RayTrainWorker pid=\d+\)\S*\s*", "", line) for line in console.splitlines()
              if "RayTrainWorker" in line]
    stray = [line for line in worker if line.strip() and not line.startswith(ours)]
    assert not stray, "\n".join(stray[:5])
    noise = [line for line in console.splitlines() if "State API" in line or "placement_group_cleaner" in line]
    assert not noise, "\n".join(noise[:5])
