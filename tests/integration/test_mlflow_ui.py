"""Review in MLflow as a person does: a real `mlflow server` on 127.0.0.1 (SQLite), a short train and a 2 λ x 2 lr
sweep logged into it by the CLI (conftest's `reviewed_runs`), then the UI in headless Chromium. Every assertion
reads the rendered page; screenshots of the pages go to this test's tmp_path (printed)."""

from __future__ import annotations

import time

import pytest
from mlflow import MlflowClient

from tests.integration.browser import browser_page, chromium_missing
from tests.integration.ray_train_helpers import REVIEW_EXPERIMENT

pytestmark = pytest.mark.integration

TRAINING_VIEW = "?workflowType=machine_learning"  # the link orpo-ray prints (see tracking.Tracker.ui_link)


def _wait_text(page, text, timeout_ms=120_000):
    page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=timeout_ms)


def _row_text(page, run_name):
    """The text of the runs-table row of `run_name` (ag-grid splits a row into pinned and scrolling parts that
    share a row-index)."""
    index = page.locator("[role=row]").filter(has_text=run_name).first.get_attribute("row-index")
    return " ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts())


def test_review_runs_in_the_mlflow_ui(reviewed_runs, tmp_path):
    assert not chromium_missing(), chromium_missing()
    assert "workflowType=machine_learning" in reviewed_runs.train_stdout  # the printed link opens the training view
    started = time.perf_counter()
    shots = review_in_browser(reviewed_runs.server.uri, tmp_path)
    print(f"\nbrowser review: {time.perf_counter() - started:.1f} s; screenshots: {[str(s) for s in shots]}")


def review_in_browser(uri, out_dir):
    """Open the UI on the store the test filled and assert what a reviewer sees; returns the screenshots."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(REVIEW_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    train_name = "ui-train λ=0.1 lr=0.003"
    parent = runs["sweep ui-sweep"]
    children = [n for n, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and train_name in runs, sorted(runs)

    shots = []
    with browser_page() as page:
        base = f"{uri}/#/experiments/{exp.experiment_id}"
        # 1. The experiment opens as model training (the link orpo-ray prints): a runs table, not the GenAI
        #    overview of traces, token usage and latency.
        page.goto(f"{base}/runs{TRAINING_VIEW}")
        _wait_text(page, train_name)
        page.get_by_role("button", name="Close").last.click()  # the assistant side panel, for the screenshot
        body = page.inner_text("body")
        assert "Token Usage" not in body and "Latency" not in body
        # 2. The runs table lists the runs with their dataset (name and digest) and their logged model.
        train_input = runs[train_name].inputs.dataset_inputs[0].dataset
        _wait_text(page, f"{train_input.name} ({train_input.digest[:8]}")
        _wait_text(page, "model")
        row = _row_text(page, train_name)
        assert f"{train_input.name} ({train_input.digest[:8]}" in row, row
        assert "\nmodel" in row, row  # the Models column: the run's logged model
        # 3. The sweep's children nest under its run: hidden until the parent row is expanded.
        assert all(page.get_by_text(name, exact=True).count() == 0 for name in children)
        parent_row = page.locator("[role=row]").filter(has_text=parent.info.run_name)
        parent_row.locator("[role=gridcell][col-id*='Run Name'] button").first.click()  # the expander
        for name in children:
            _wait_text(page, name)
        shots.append(out_dir / "mlflow_runs.png")
        page.screenshot(path=shots[-1])

        # 4. A run's charts include the held-out accuracy, and its system metrics.
        page.goto(f"{base}/runs/{runs[train_name].info.run_id}/model-metrics{TRAINING_VIEW}")
        page.get_by_placeholder("Search metric charts").fill("rewards/accuracies")
        _wait_text(page, "(eval_rewards/accuracies)")  # the chart's legend: run name (metric)
        page.locator(".js-plotly-plot .scatterlayer path").first.wait_for(state="attached")  # the curve, drawn
        shots.append(out_dir / "mlflow_run_charts.png")
        page.screenshot(path=shots[-1])
        page.get_by_text("System metrics", exact=True).first.click()
        _wait_text(page, "cpu_utilization_percentage")

        # 5. The best trial's model is in the registry, with what chose it as version tags.
        page.goto(f"{uri}/#/models/orpo-ray-best/versions/1")
        _wait_text(page, "orpo.beta")
        _wait_text(page, "eval_nll_loss")
        shots.append(out_dir / "mlflow_registry.png")
        page.screenshot(path=shots[-1])
    return shots
