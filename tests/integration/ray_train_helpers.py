"""Shared by the Ray Train integration tests: tiny demo overrides, runs, and a report recorder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ray.train

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")

# Tiny model, tiny data, one metric row per step: a Ray Train fit takes ~20-40 s on 2 cores.
TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1",
        "data.synthetic.num_train=256", "data.synthetic.num_eval=32", "train.learning_rate=3e-3",
        "train.warmup_steps=2", "train.max_steps=6", "train.log_interval=1", "train.eval_interval=0",
        "train.eval_max_batches=2", "train.precision=fp32", "train.progress_bar=false", "tracking.enabled=false"]

# A 2 λ x 2 lr sweep with ASHA. Grid order: λ varies fastest, so trials 0-1 use lr 3e-3 and trials 2-3 lr 1e-6.
# With eval_nll_loss as the metric, a 1e-6 trial still sits at the untrained NLL (~ln 259) at ASHA's first rung
# (step 4), above the median of the trials before it, so ASHA stops both; trial 0 has no rival at that point and
# always completes.
SWEEP = ["tune.beta=[0.1,1.0]", "tune.learning_rate=[3e-3,1e-6]", "tune.metric=eval_nll_loss", "tune.mode=min",
         "tune.asha=true", "tune.asha_grace_period=1", "train.max_steps=24", "train.eval_interval=4"]
REVIEW_EXPERIMENT = "ui-review"  # the experiment of conftest's `reviewed_runs`


# What a run puts into the processes it starts (session.process_start_env): a test that checks the run's own choice
# starts the CLI without any the test process may have been given.
START_SETTINGS = ("LD_PRELOAD", "MALLOC_CONF", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def env_without_start_settings() -> dict[str, str]:
    """This process's environment less START_SETTINGS."""
    return {k: v for k, v in os.environ.items() if k not in START_SETTINGS}


def losses(output_dir) -> dict[int, float]:
    """step -> train loss from history.json (written by the run's final attempt)."""
    rows = json.loads((Path(output_dir) / "history.json").read_text())
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


class ReportRecorder(ray.train.UserCallback):
    """Runs in the Train controller: one JSON line per `ray.train.report` of the worker group, with the
    wall-clock time, every rank's `step` and loss, and whether a checkpoint came with it. Unlike
    history.json it survives worker-group restarts, so it shows every attempt."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        row = {"time": time.time(), "steps": [m.get("step") for m in metrics],
               "losses": [m.get("loss") for m in metrics], "checkpoint": checkpoint.path if checkpoint else None}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_reports(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()] if os.path.exists(path) else []
