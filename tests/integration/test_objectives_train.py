"""SimPO and CPO end to end: `orpo-ray train CONFIG --local` (CLI subprocess) on their demo configs, a Ray
Train fit (DeepSpeed, 1 worker), and a small `tune` sweep of SimPO's beta x gamma; every metric finite."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_ray.config import load_config, with_absolute_paths
from orpo_ray.launch.trainer import run_training
from orpo_ray.launch.tune import run_sweep
from orpo_ray.objectives import get_objective
from tests.integration.ray_train_helpers import ROOT, TINY, env_without_start_settings

pytestmark = pytest.mark.integration


def _assert_finite_metrics(results: dict, objective: str) -> None:
    names = get_objective(objective).metric_names
    assert results["objective"] == objective
    assert sorted(results["train"]) == sorted([*names, "learning_rate", "epoch"])
    assert sorted(results["eval"]) == sorted(f"eval_{n}" for n in names)
    for value in (*results["train"].values(), *results["eval"].values()):
        assert math.isfinite(value), results


@pytest.mark.parametrize("objective, allocator", [("simpo", "auto"), ("cpo", "system")])
def test_cli_local_run(objective, allocator, tmp_path):
    """`train --local` from the command line restarts itself on the malloc a local instance's workers get
    (scaling.allocator: auto -> Ray's jemalloc), as the process's own memory map says; `system` keeps glibc's.
    Either way with their OpenMP spin count (scaling.omp_spin_count: auto), which libgomp reports it runs with
    (OMP_DISPLAY_ENV prints its settings as it loads, in each process that loads it: the last is the one that trained)."""
    out = tmp_path / objective
    cmd = [sys.executable, "-m", "orpo_ray.cli", "train", f"configs/{objective}_demo.yaml", "--local", *TINY,
           f"output_dir={out}", f"scaling.allocator={allocator}"]
    env = env_without_start_settings() | {"PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    _assert_finite_metrics(results, objective)
    assert results["num_steps"] == 6
    assert results["plan"]["allocator"] == {"auto": "jemalloc (keeps freed pages)", "system": "system"}[allocator]
    assert results["plan"]["omp_spin_count"] == "10000"
    spin_counts = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", proc.stdout + proc.stderr)
    assert spin_counts and spin_counts[-1] == "10000", spin_counts


def test_ray_train_run(_ray_local_session, tmp_path):
    cfg = load_config(str(ROOT / "configs" / "cpo_demo.yaml"), [*TINY, f"output_dir={tmp_path / 'cpo'}"])
    _assert_finite_metrics(run_training(cfg), "cpo")


def test_simpo_sweep_covers_beta_and_gamma(ray_local, tmp_path):
    cfg = with_absolute_paths(load_config(str(ROOT / "configs" / "simpo_demo.yaml"), [
        *TINY, f"output_dir={tmp_path / 'sweep'}", "train.max_steps=2", "tune.beta=[2.0]", "tune.gamma=[0.5,1.5]",
        "tune.learning_rate=[3e-3]", "tune.asha=false", "tune.metric=eval_preference_loss", "tune.mode=min"]))
    summary = run_sweep(cfg)
    trials = summary["trials"]
    assert sorted((t["beta"], t["gamma"], t["status"]) for t in trials) == [
        (2.0, 0.5, "completed"), (2.0, 1.5, "completed")]
    for t in trials:
        assert json.loads((Path(t["output_dir"]) / "results.json").read_text())["objective"] == "simpo"
        assert "_gamma" in t["output_dir"] and all(math.isfinite(v) for v in t["metrics"].values())
    # Each trial trained with its own gamma: -log sigmoid(beta * margin - gamma) is larger for the larger margin
    # target (after 2 steps the log-prob margins are nearly the same in both trials).
    low, high = sorted(trials, key=lambda t: t["gamma"])
    assert high["metrics"]["eval_preference_loss"] > low["metrics"]["eval_preference_loss"] + 0.3
    assert "γ" in (tmp_path / "sweep" / "trials.md").read_text()
