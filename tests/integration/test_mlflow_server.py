"""orpo_ray.tracking against real MLflow stores: a live ``mlflow server`` and local SQLite."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from orpo_ray.tracking import Tracker, plot_training_curves, resolve_tracking_uri
from tests.integration.mlflow_fixtures import (  # noqa: F401  (fixture import)
    MlflowServer,
    mlflow_server,
    start_mlflow_server,
)

pytestmark = pytest.mark.integration

HTTP_ENV = (
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)


@pytest.fixture(autouse=True)
def _restore_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the Tracker set its own HTTP defaults, and undo them after the test."""
    for name in HTTP_ENV:
        monkeypatch.setenv(name, "0")  # records the original value for teardown
        monkeypatch.delenv(name)


def _tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "orpo_ray.tracking" and r.levelno >= logging.WARNING
    ]


def _history(n: int = 6) -> list[dict]:
    rows: list[dict] = []
    for step in range(1, n + 1):
        rows.append(
            {
                "step": step,
                "loss": 2.0 / step,
                "nll_loss": 1.5 / step,
                "rewards/chosen": -0.1 * step,
                "rewards/rejected": -0.2 * step,
                "rewards/margins": 0.1 * step,
                "rewards/accuracies": min(1.0, 0.5 + 0.1 * step),
                "logps/chosen": -1.0 / step,
                "logps/rejected": -1.2 - 0.05 * step,
                "log_odds_ratio": -0.7 + 0.05 * step,
            }
        )
        if step % 3 == 0:
            rows.append(
                {
                    "step": step,
                    "eval_loss": 2.1 / step,
                    "eval_rewards/accuracies": 0.6,
                    "eval_rewards/margins": 0.05 * step,
                    "eval_logps/chosen": -1.1,
                    "eval_logps/rejected": -1.4,
                }
            )
    return rows


def test_tracker_logs_everything_to_live_server(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    history = _history()
    config = {
        "model": {"hidden_size": 64, "num_layers": 2, "dtype": "float32"},
        "train": {"learning_rate": 1e-4, "beta": 0.1, "seeds": [1, 2]},
        "output_dir": str(tmp_path),
    }
    tracker = Tracker(mlflow_server.uri)
    with tracker:
        run_id = tracker.start("orpo-it", run_name="parent", tags={"task": "demo"})
        assert run_id is not None
        tracker.log_params(config)
        for row in history:
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        pngs = plot_training_curves(history, tmp_path / "plots")
        for png in pngs:
            tracker.log_artifact(png, artifact_path="plots")
        child_id = tracker.start("orpo-it", run_name="trial-0", nested=True)
        assert child_id not in (None, run_id)
        assert tracker.run_id == child_id
        tracker.log_metrics({"eval_rewards/accuracies": 0.75}, step=3)
        tracker.end()
        assert tracker.run_id == run_id
        tracker.set_tags({"best_trial": child_id})

    assert tracker.enabled, _tracking_warnings(caplog)
    assert _tracking_warnings(caplog) == []

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "parent"
    assert run.data.tags["task"] == "demo"
    assert run.data.tags["best_trial"] == child_id
    assert run.data.params["model.hidden_size"] == "64"
    assert run.data.params["train.learning_rate"] == "0.0001"
    assert run.data.params["train.seeds"] == "[1, 2]"

    hist = client.get_metric_history(run_id, "rewards/margins")
    assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    assert sorted(hist, key=lambda m: m.step)[-1].value == pytest.approx(0.6)
    eval_hist = client.get_metric_history(run_id, "eval_rewards/accuracies")
    assert sorted(m.step for m in eval_hist) == [3, 6]

    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert artifacts == {f"plots/{p.name}" for p in pngs}
    assert "plots/logps.png" in artifacts
    # proxied artifacts really landed in the server's --artifacts-destination
    assert list((mlflow_server.root / "mlartifacts").rglob("logps.png"))

    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == run_id
    assert child.info.status == "FINISHED"
    assert child.info.experiment_id == run.info.experiment_id
    assert client.get_metric_history(child_id, "eval_rewards/accuracies")[0].value == 0.75


def test_child_tracker_and_parent_run_id(mlflow_server: MlflowServer) -> None:
    from mlflow import MlflowClient

    parent = Tracker(mlflow_server.uri)
    parent_id = parent.start("orpo-sweep", run_name="sweep")
    kid = parent.child(run_name="trial-a", tags={"lr": "1e-4"})
    kid_id = kid.run_id
    assert kid_id not in (None, parent_id)
    assert parent.run_id == parent_id  # the child has its own run stack
    kid.log_metrics({"rewards/accuracies": 0.5}, step=0)
    kid.end("FAILED")
    # a run in another process would get the parent's id through its config:
    other = Tracker(mlflow_server.uri)
    other_id = other.start("orpo-sweep", run_name="trial-b", parent_run_id=parent_id)
    other.end()
    parent.end()

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert client.get_run(kid_id).data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_run(kid_id).data.tags["lr"] == "1e-4"
    assert client.get_run(other_id).data.tags["mlflow.parentRunId"] == parent_id
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    assert {r.info.run_name for r in children} == {"trial-a", "trial-b"}
    assert {r.info.status for r in children} == {"FAILED", "FINISHED"}


def test_server_killed_mid_run_warns_once_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_mlflow_server(tmp_path / "doomed")
    try:
        tracker = Tracker(server.uri)
        run_id = tracker.start("orpo-crash", run_name="victim")
        assert run_id is not None
        tracker.log_metrics({"loss": 1.0}, step=0)
        assert _tracking_warnings(caplog) == []

        server.kill()
        assert not server.healthy()

        t0 = time.monotonic()
        for step in range(1, 6):  # training goes on
            tracker.log_metrics({"loss": 1.0 / step, "rewards/margins": 0.1}, step=step)
        tracker.log_params({"late": 1})
        tracker.set_tags({"k": "v"})
        png = plot_training_curves(_history(), tmp_path / "plots")[0]
        tracker.log_artifact(png)
        tracker.end("FINISHED")
        elapsed = time.monotonic() - t0
    finally:
        server.stop()

    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    message = warnings[0].getMessage()
    assert server.uri in message
    assert "disabled" in message
    assert not tracker.enabled
    # default short timeouts: one failed request with 2 quick retries, then no-ops
    assert elapsed < 15, elapsed
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


def test_local_sqlite_default_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No server: <output_dir>/mlflow.db, artifacts next to it, FAILED on exception."""
    from mlflow import MlflowClient

    out = tmp_path / "run out"  # a space in the path must survive the URI
    uri = resolve_tracking_uri(None, out)
    tracker = Tracker(uri)
    t0 = time.monotonic()
    run_id = tracker.start("orpo-local", run_name="local")
    first_use_s = time.monotonic() - t0
    assert run_id is not None, _tracking_warnings(caplog)
    with pytest.raises(ZeroDivisionError):
        with tracker:
            tracker.log_params({"a": {"b": 1}})
            tracker.log_params({"a": {"b": 2}})  # immutable: warned and skipped, not fatal
            tracker.log_metrics({"rewards/chosen": float("nan"), "logps/chosen": -1.0}, step=1)
            tracker.log_metrics({"rewards/chosen": float("inf"), "logps/chosen": -0.9}, step=2)
            tracker.log_artifact(out / "does-not-exist.txt")
            (out / "notes.txt").write_text("hello")
            tracker.log_artifact(out / "notes.txt", artifact_path="misc")
            1 / 0  # noqa: B018
    print(f"sqlite first use (incl. mlflow import + migrations): {first_use_s:.2f}s")

    assert tracker.enabled
    assert (out / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params == {"a.b": "1"}
    assert "rewards/chosen" not in run.data.metrics
    assert [m.value for m in client.get_metric_history(run_id, "logps/chosen")] == [-1.0, -0.9]
    assert run.info.artifact_uri.startswith((out / "mlartifacts").resolve().as_uri())
    assert (out / "mlartifacts").is_dir()
    assert [a.path for a in client.list_artifacts(run_id, "misc")] == ["misc/notes.txt"]
    messages = [w.getMessage() for w in _tracking_warnings(caplog)]
    assert len([m for m in messages if "rewards/chosen" in m]) == 1  # once per metric
    assert len([m for m in messages if "immutable" in m]) == 1
    assert len([m for m in messages if "does-not-exist" in m]) == 1
    assert not [m for m in messages if "disabled" in m]
