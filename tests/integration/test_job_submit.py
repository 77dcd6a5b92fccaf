"""`ray job submit` end to end: a real `ray start --head` cluster with token auth and the dashboard, the
repository uploaded as the job's working dir, `python -m orpo_ray.cli train ...` as the entrypoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.integration.conftest import HAVE_DASHBOARD, ROOT
from tests.integration.ray_train_helpers import TINY

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not HAVE_DASHBOARD, reason="ray job submit needs ray[default] (the dashboard)")]

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RUNTIME_ENV = {"excludes": [".venv", "outputs", ".git", "__pycache__", "*.egg-info", "mlruns", ".pytest_cache"]}


def test_job_submit_trains_and_writes_results(ray_cluster, tmp_path):
    env, out, job_id = ray_cluster["env"], tmp_path / "job_out", f"orpo-{uuid.uuid4().hex[:8]}"
    entrypoint = [sys.executable, "-m", "orpo_ray.cli", "train", "configs/demo.yaml", *TINY,
                  "train.checkpoint_interval=3", f"output_dir={out}"]
    submit = [RAY, "job", "submit", "--address", ray_cluster["dashboard"], "--submission-id", job_id,
              "--working-dir", ROOT, "--runtime-env-json", json.dumps(RUNTIME_ENV), "--", *entrypoint]
    start, deadline = time.perf_counter(), time.time() + 120
    while True:  # the job agent registers a few seconds after the dashboard port opens
        p = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode == 0 or "No available agent" not in p.stdout + p.stderr or time.time() > deadline:
            break
        time.sleep(3)
    print(f"\njob submit -> finished: {time.perf_counter() - start:.1f} s")
    status = subprocess.run([RAY, "job", "status", "--address", ray_cluster["dashboard"], job_id],
                            env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"{job_id}' succeeded" in status.stdout, p.stdout[-3000:] + p.stderr[-3000:] + status.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["num_steps"] == 6 and results["world_size"] == 1 and results["resumed_from_step"] == 0
    assert results["plan"]["allocator"] == "system"  # scaling.allocator: auto keeps a cluster's own malloc
    assert results["plan"]["omp_spin_count"] == "10000"  # but the spin count goes into the job's runtime env
    assert (out / "model" / "model.safetensors").exists()
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_cluster["dashboard"], job_id],
                          env=env, capture_output=True, text=True, timeout=120).stdout
    assert "6 steps of 16 pairs" in logs  # rank 0's start-up line, from the Ray Train worker
    assert '"num_steps": 6' in logs      # the CLI's summary, printed by the job's driver
