"""Fast tests of orpo_ray.tracking: nothing here imports mlflow (importing it alone costs
over a second); paths that need a real MLflow store live in
tests/integration/test_mlflow_server.py."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orpo_ray.tracking import mlflow_tracker, plots
from orpo_ray.tracking import (
    Tracker,
    flatten_params,
    plot_heatmap,
    plot_training_curves,
    resolve_tracking_uri,
    sanitize_key,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


def _tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "orpo_ray.tracking" and r.levelno >= logging.WARNING
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))  # axes, labels and lines, not a blank canvas


# ---------------------------------------------------------------- URIs


def test_default_uri_is_absolute_sqlite_in_output_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite:///{tmp_path.resolve()}/out/mlflow.db"
    assert resolve_tracking_uri(None, "out") == expected
    assert resolve_tracking_uri("", "out") == expected
    assert resolve_tracking_uri("  ", tmp_path / "out") == expected
    assert expected.startswith("sqlite:////")


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "https://mlflow.example.com",
        "sqlite:////abs/path/mlflow.db",
        "postgresql://u:p@db:5432/mlflow",
        "databricks",
    ],
)
def test_uris_pass_through(uri: str) -> None:
    assert resolve_tracking_uri(uri, "/ignored") == uri


def test_relative_sqlite_and_plain_db_path_become_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///runs/m.db", "x") == f"sqlite:///{tmp_path}/runs/m.db"
    assert resolve_tracking_uri("runs/m.db", "x") == f"sqlite:///{tmp_path}/runs/m.db"
    assert resolve_tracking_uri(str(tmp_path / "a.db"), "x") == f"sqlite:///{tmp_path}/a.db"


@pytest.mark.parametrize("bad", ["runs/mlruns", "ftp://host/x", "sqlite://", "http://"])
def test_bad_uris_raise_naming_the_value(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        resolve_tracking_uri(bad, "out")
    assert repr(bad) in str(err.value)


# ---------------------------------------------------------------- params / names


@dataclasses.dataclass
class _Optim:
    lr: float = 1e-4
    betas: tuple = (0.9, 0.95)


def test_flatten_params_dotted_keys() -> None:
    cfg = {
        "model": {"dim": 64, "attn": {"heads": 4}},
        "optim": _Optim(),
        "seed": 0,
        "tags": ["a", "b"],
        "resume": None,
        "extra": {},
        "out": Path("/tmp/o"),
    }
    assert flatten_params(cfg) == {
        "model.dim": "64",
        "model.attn.heads": "4",
        "optim.lr": "0.0001",
        "optim.betas": "[0.9, 0.95]",
        "seed": "0",
        "tags": '["a", "b"]',
        "resume": "None",
        "extra": "{}",
        "out": "/tmp/o",
    }


def test_prepare_params_truncates_and_keeps_first_value(caplog) -> None:
    t = Tracker.disabled()
    first = t._prepare_params({"x": "y" * 7000, "a": {"b": 1}})
    assert len(first["x"]) == mlflow_tracker.MAX_PARAM_VALUE_LENGTH
    assert first["a.b"] == "1"
    t._logged_params.update(first)
    assert t._prepare_params({"a": {"b": 1}}) == {}  # same value: nothing to send
    assert t._prepare_params({"a": {"b": 2}, "c": 3}) == {"c": "3"}  # changed: skipped
    assert t._prepare_params({"a": {"b": 3}}) == {}
    changed = [r for r in _tracking_warnings(caplog) if "immutable" in r.getMessage()]
    assert len(changed) == 1


def test_metric_names_with_slashes_are_kept() -> None:
    for name in ("rewards/chosen", "eval_rewards/accuracies", "logps/rejected", "loss"):
        assert sanitize_key(name) == name
    assert sanitize_key("grad norm [l2]") == "grad norm _l2_"
    assert sanitize_key("/a//b/") == "a/b"
    assert sanitize_key("../x") == "x"
    assert len(sanitize_key("k" * 400)) == mlflow_tracker.MAX_KEY_LENGTH


def test_prepare_metrics_skips_non_finite_with_one_warning(caplog) -> None:
    t = Tracker.disabled()

    class Scalar:  # stands in for a 0-d tensor
        def item(self) -> float:
            return 0.25

    good = t._prepare_metrics({"loss": 1, "rewards/margins": Scalar()}, step=0)
    assert good == [("loss", 1.0), ("rewards/margins", 0.25)]
    for step in range(3):
        out = t._prepare_metrics(
            {"loss": float("nan"), "nll_loss": float("inf"), "x": "n/a", "ok": 2.0}, step
        )
        assert out == [("ok", 2.0)]
    skipped = [r.getMessage() for r in _tracking_warnings(caplog)]
    assert len(skipped) == 3  # one per bad metric name, not one per step
    assert any("'loss'" in m for m in skipped)


# ---------------------------------------------------------------- never fatal


def test_unreachable_server_warns_once_and_is_a_noop(tmp_path, caplog) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    t = Tracker(uri, preflight_timeout_s=1.0)
    t0 = time.monotonic()
    with t:
        assert t.start("orpo", run_name="r", tags={"a": 1}) is None
        t.log_params({"model": {"dim": 64}})
        for step in range(5):
            t.log_metrics({"loss": 1.0, "rewards/chosen": -0.5}, step=step)
        t.set_tags({"x": "y"})
        (tmp_path / "f.txt").write_text("x")
        t.log_artifact(tmp_path / "f.txt")
        t.log_artifacts(tmp_path, "dir")
        assert t.start("orpo", run_name="again") is None
    assert time.monotonic() - t0 < 1.0
    assert not t.enabled
    assert t.run_id is None
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert uri in warnings[0].getMessage()
    assert "ConnectionRefusedError" in warnings[0].getMessage()


class _ExplodingClient:
    """An MlflowClient stand-in whose every call fails like a dead server."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            self.calls += 1
            raise RuntimeError(f"API request to {name} failed: connection reset")

        return fail


def test_any_mlflow_exception_switches_tracking_off_once(monkeypatch, caplog) -> None:
    client = _ExplodingClient()
    monkeypatch.setattr(Tracker, "_client", lambda self: client)
    t = Tracker("http://mlflow.invalid:5000")
    assert t.start("orpo", run_name="r") is None
    assert t.start("orpo", run_name="r2") is None
    t.end()
    assert client.calls == 1  # after the first failure nothing reaches MLflow
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "http://mlflow.invalid:5000" in msg and "connection reset" in msg


def test_disabled_tracker_is_a_noop(tmp_path, caplog) -> None:
    t = Tracker.disabled()
    with t:
        assert t.start("e", "r") is None
        t.log_params({"a": 1})
        t.log_metrics({"loss": 1.0}, step=1)
        t.log_artifact(tmp_path / "missing.txt")
        t.set_tags({"a": "b"})
        t.end("FAILED")
    assert not t.enabled and t.run_id is None
    assert _tracking_warnings(caplog) == []


def test_http_env_defaults_do_not_override_user_values(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    mlflow_tracker._configure_http_env(10, 2, 1)
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"


def test_importing_tracking_is_cheap() -> None:
    code = (
        "import sys, orpo_ray.tracking; "
        "heavy = [m for m in ('mlflow', 'matplotlib', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- plots


def _history() -> list[dict]:
    rows = []
    for step in range(0, 50, 5):
        rows.append(
            {
                "step": step,
                "loss": 2 - step / 50,
                "nll_loss": 1.5 - step / 60,
                "logps/chosen": -1.0 + step / 100,
                "logps/rejected": -1.0 - step / 100,
                "rewards/margins": step / 500,
                "rewards/accuracies": min(1.0, 0.5 + step / 100),
            }
        )
    rows += [
        {"step": s, "eval_logps/chosen": -0.9, "eval_logps/rejected": -1.3,
         "eval_rewards/accuracies": 0.7, "eval_rewards/margins": 0.04, "eval_loss": 1.8}
        for s in (20, 45)
    ]
    return rows


def test_plot_training_curves_writes_pngs(tmp_path) -> None:
    paths = plot_training_curves(_history(), tmp_path / "plots")
    names = {p.name for p in paths}
    assert {"logps.png", "reward_margins.png", "reward_accuracies.png"} <= names
    for p in paths:
        assert p.parent == tmp_path / "plots"
        _assert_png(p)


def test_plot_training_curves_train_only_and_empty(tmp_path) -> None:
    train_only = [r for r in _history() if "loss" in r]
    train_only[3]["logps/chosen"] = float("nan")  # gaps are fine
    paths = plot_training_curves(train_only, tmp_path / "a")
    assert {p.name for p in paths} == {
        "logps.png", "reward_margins.png", "reward_accuracies.png", "loss.png"
    }
    assert plot_training_curves([{"step": 0}], tmp_path / "b") == []
    assert not (tmp_path / "b").exists()


def test_plot_heatmap_lambda_by_learning_rate(tmp_path) -> None:
    rows = [
        {"learning_rate": lr, "beta": beta, "eval_rewards/accuracies": 0.5 + beta * lr * 1e3}
        for lr in (1e-5, 3e-5, 1e-4)
        for beta in (0.05, 0.1, 0.5)
        if (lr, beta) != (1e-5, 0.5)  # a missing cell is drawn as n/a
    ]
    rows.append({"learning_rate": 1e-4, "beta": 0.1, "eval_rewards/accuracies": 0.9})  # 2 seeds
    out = plot_heatmap(
        rows, "learning_rate", "beta", "eval_rewards/accuracies", tmp_path / "s" / "heat.png"
    )
    assert out == tmp_path / "s" / "heat.png"
    _assert_png(out)


def test_heatmap_tick_labels_are_compact() -> None:
    assert [plots._tick_label(v) for v in (1e-4, 3e-5, 2.5e-4, 0.1, 0.05, 1, "adamw")] == [
        "1e-4", "3e-5", "2.5e-4", "0.1", "0.05", "1", "adamw",
    ]


def test_the_output_dir_tag_is_where_outputs_end_up_the_uri_for_a_uri_output_dir(tmp_path, monkeypatch):
    from orpo_ray.config import load_config
    from orpo_ray.output_staging import OUTPUT_URI_ENV
    from orpo_ray.tracking.run import run_tags

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    monkeypatch.delenv(OUTPUT_URI_ENV, raising=False)
    assert run_tags(cfg)["output_dir"] == str(tmp_path / "run") and "output_staging_dir" not in run_tags(cfg)
    monkeypatch.setenv(OUTPUT_URI_ENV, "s3://bucket/runs/a")  # set by output_staging.staged_output
    assert run_tags(cfg)["output_dir"] == "s3://bucket/runs/a"
    assert run_tags(cfg)["output_staging_dir"] == str(tmp_path / "run")
