"""Review in MLflow as a person does: a real `mlflow server` on 127.0.0.1 (SQLite), a short train and a 2 λ x 2 lr
sweep logged into it by the CLI, then the UI in headless Chromium. Every assertion reads the rendered page;
screenshots of the pages go to this test's tmp_path (printed)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from tests.integration.browser import browser_page, chromium_missing
from tests.integration.mlflow_fixtures import start_mlflow_server
from tests.integration.ray_train_helpers import DEMO, ROOT, TINY
from tests.integration.test_tune import SWEEP

pytestmark = pytest.mark.integration

EXPERIMENT = "ui-review"
TRAINING_VIEW = "?workflowType=machine_learning"  # the link orpo-ray prints (see tracking.Tracker.ui_link)


def _cli(args, env, timeout=1200):
    p = subprocess.run([sys.executable, "-m", "orpo_ray.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def _wait_text(page, text, timeout_ms=120_000):
    page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=timeout_ms)


def test_review_runs_in_the_mlflow_ui(local_ray_env, tmp_path):
    assert not chromium_missing(), chromium_missing()
    server = start_mlflow_server(tmp_path / "mlflow")
    try:
        common = [*TINY, "tracking.enabled=true", f"tracking.mlflow_uri={server.uri}",
                  f"tracking.experiment={EXPERIMENT}", "tracking.system_metrics_interval_s=1", "train.eval_interval=3"]
        train = _cli(["train", DEMO, "--local", *common, f"output_dir={tmp_path / 'ui-train'}"], local_ray_env)
        sweep = _cli(["tune", DEMO, *common, *SWEEP, f"output_dir={tmp_path / 'ui-sweep'}"], local_ray_env)
        assert "workflowType=machine_learning" in train.stdout  # the printed link opens the training view

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        train_name = "ui-train λ=0.1 lr=0.003"
        parent = runs["sweep ui-sweep"]
        children = [n for n, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 4 and train_name in runs, sorted(runs)

        started = time.perf_counter()
        shots = []
        with browser_page() as page:
            base = f"{server.uri}/#/experiments/{exp.experiment_id}"
            # 1. The experiment opens as model training: a runs table, not the GenAI overview of traces.
            page.goto(f"{base}/runs{TRAINING_VIEW}")
            _wait_text(page, train_name)
            body = page.inner_text("body")
            assert "Token Usage" not in body and "Training runs" not in body
            # 2. The runs table lists the runs with their dataset (name and digest).
            train_input = runs[train_name].inputs.dataset_inputs[0].dataset
            _wait_text(page, f"{train_input.name} ({train_input.digest[:8]}")
            # 3. The sweep's children nest under the parent: hidden until the parent row is expanded.
            assert not any(page.get_by_text(name, exact=True).count() for name in children)
            page.locator(f"[data-testid='expander-{parent.info.run_id}'], button[aria-label*='xpand']").first.click()
            for name in children:
                _wait_text(page, name)
            shots.append(tmp_path / "mlflow_runs.png")
            page.screenshot(path=shots[-1])

            # 4. A run's charts include the held-out accuracy.
            page.goto(f"{base}/runs/{runs[train_name].info.run_id}/model-metrics{TRAINING_VIEW}")
            _wait_text(page, "eval_rewards/accuracies")
            _wait_text(page, "system/cpu_utilization_percentage")
            shots.append(tmp_path / "mlflow_run_charts.png")
            page.screenshot(path=shots[-1])

            # 5. The best trial's model is in the registry.
            page.goto(f"{server.uri}/#/models{TRAINING_VIEW}")
            _wait_text(page, "orpo-ray-best")
            shots.append(tmp_path / "mlflow_registry.png")
            page.screenshot(path=shots[-1])
        print(f"\nbrowser review: {time.perf_counter() - started:.1f} s; screenshots: {[str(s) for s in shots]}")
    finally:
        server.stop()
