"""Storage URIs, checkpoint hygiene and one writer per output_dir (the rules; Ray runs in tests/integration)."""

import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orpo_ray.config import ConfigError, load_config, with_absolute_paths
from orpo_ray.launch.local import run_local
from orpo_ray.output_staging import STAGING_ENV, staged_output, staging_dir
from orpo_ray.tracking.mlflow_tracker import resolve_tracking_uri
from orpo_ray.launch.run_state import (
    LOCK_FILE,
    checkpoint_staging_root,
    output_dir_lock,
    read_state,
    run_state_file,
    save_state,
    storage_path,
)
from orpo_ray.train.engine import load_rng_state, save_rng_state
from orpo_ray.train.runtime import LocalRuntime, latest_step_dir, require_complete


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/runs", "file:///mnt/shared/ray"])
def test_storage_uris_go_to_ray_untouched(tmp_path, uri):
    cfg = with_absolute_paths(load_config(None, [f"scaling.storage_path={uri}", f"output_dir={tmp_path}"]))
    assert cfg.scaling.storage_path == uri and storage_path(cfg) == uri
    assert run_state_file(cfg).startswith(uri + "/orpo-")
    assert checkpoint_staging_root(cfg) == tmp_path / ".checkpoint_staging"  # staging stays on local disk


def test_local_storage_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["scaling.storage_path=shared/ray", "output_dir=out"])
    assert storage_path(cfg) == str(tmp_path / "shared/ray")
    assert with_absolute_paths(cfg).scaling.storage_path == str(tmp_path / "shared/ray")
    assert storage_path(load_config(None, ["output_dir=out"])) == str(tmp_path / "out/ray")
    assert checkpoint_staging_root(cfg).parent.parent == tmp_path / "shared/ray"  # next to the checkpoints


@pytest.mark.parametrize("uri", ["s3://bucket/runs/exp1", "gs://bucket/runs/exp1/", "file:///mnt/shared/exp1"])
def test_a_uri_output_dir_is_kept_and_its_staging_dir_is_local(tmp_path, monkeypatch, uri):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    cfg = with_absolute_paths(load_config(None, [f"output_dir={uri}"]))
    assert cfg.output_dir == uri  # never Path(uri).resolve() (<cwd>/s3:/bucket/...)
    local = staging_dir(uri)
    assert local.parent.parent == tmp_path / "staging" and local.name == "exp1"
    assert staging_dir(uri) == local and staging_dir(uri.replace("exp1", "exp2")) != local


def test_a_staged_run_keeps_every_derived_default_local_and_uploads_its_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    uri = f"file://{tmp_path}/bucket/exp1"
    with staged_output(with_absolute_paths(load_config(None, [f"output_dir={uri}"]))) as cfg:
        local = Path(cfg.output_dir)
        assert local == staging_dir(uri) and local.is_absolute()
        assert storage_path(cfg) == str(local / "ray")
        assert resolve_tracking_uri(cfg.tracking.mlflow_uri, cfg.output_dir) == f"sqlite:///{local}/mlflow.db"
        assert run_state_file(cfg, local=True).startswith(str(local))
        for rel in ("results.json", "model/config.json", "trials/t1/history.json", "mlflow.db",  # outputs
                    "cache/x.parquet", "ray/run/ckpt.pt", "checkpoints/step_1/a.pt", "trials/t1/ray/c.pt"):  # not
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_text(rel)
        with output_dir_lock(cfg.output_dir):
            pass
    arrived = sorted(p.relative_to(tmp_path / "bucket/exp1").as_posix()
                     for p in (tmp_path / "bucket/exp1").rglob("*") if p.is_file())
    assert arrived == ["mlflow.db", "model/config.json", "results.json", "trials/t1/history.json"]
    assert (tmp_path / "bucket/exp1/model/config.json").read_text() == "model/config.json"


def test_a_staged_command_refused_by_the_lock_uploads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    uri = f"file://{tmp_path}/bucket/exp1"
    (staging_dir(uri)).mkdir(parents=True)
    (staging_dir(uri) / "results.json").write_text("{}")  # the other command's half-written output
    with output_dir_lock(staging_dir(uri)):  # that command (this process) is still running
        with pytest.raises(ConfigError, match="in use by another run"):
            with staged_output(load_config(None, [f"output_dir={uri}"])) as cfg:
                with output_dir_lock(cfg.output_dir):
                    pass
    assert not (tmp_path / "bucket").exists()


def test_an_output_dir_uri_pyarrow_cannot_open_is_refused_before_anything_runs(tmp_path):
    cfg = load_config(None, ["output_dir=nosuchfs://bucket/run"])
    with pytest.raises(ConfigError, match="output_dir 'nosuchfs://bucket/run' is not a URI pyarrow can write to"):
        with staged_output(cfg):
            raise AssertionError("ran with an unusable output_dir")


def test_run_state_reads_and_writes_through_a_pyarrow_uri(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", f"scaling.storage_path=file://{tmp_path}/store"])
    save_state(run_state_file(cfg), cfg, completed=False)
    written = list((tmp_path / "store").rglob("orpo_run.json"))
    assert len(written) == 1 and read_state(run_state_file(cfg), cfg, "run")["completed"] is False


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with output_dir_lock(tmp_path) as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on host"):
            with output_dir_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with output_dir_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "another-host", "pid": int(dead.stdout)}))
    with pytest.raises(ConfigError, match=f"if that run is gone, delete {tmp_path / LOCK_FILE}"):
        with output_dir_lock(tmp_path):
            pass


def test_local_runs_refuse_an_output_dir_holding_another_config(tmp_path):
    """`--local` gets the changed-config check of Ray runs (before any training starts)."""
    first = load_config(None, [f"output_dir={tmp_path}"])
    save_state(run_state_file(first, local=True), first, completed=False)
    with pytest.raises(ConfigError, match=r"holds a run with a different config \(orpo\.beta\)"):
        run_local(load_config(None, [f"output_dir={tmp_path}", "orpo.beta=0.5"]))
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_step_dir_without_its_marker_is_never_resumed_and_is_pruned(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    runtime = LocalRuntime(cfg)
    for step, complete in ((10, True), (20, True), (30, False)):  # step 30: a save that died half-way
        d = Path(runtime.checkpoint_staging_dir(step))
        d.mkdir(parents=True)
        (d / "engine_state.pt").write_text("x")
        if complete:
            (d / "COMPLETE").touch()
    with runtime.latest_checkpoint() as directory:
        assert directory == str(tmp_path / "checkpoints" / "step_20")
    runtime.report({}, str(tmp_path / "checkpoints" / "step_20"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_20"]
    with pytest.raises(RuntimeError, match="no COMPLETE marker"):
        require_complete(str(tmp_path / "checkpoints" / "missing"))


def test_staging_a_step_again_starts_from_an_empty_dir(tmp_path):
    runtime = LocalRuntime(load_config(None, [f"output_dir={tmp_path}"]))
    stale = Path(runtime.checkpoint_staging_dir(5))
    stale.mkdir(parents=True)
    (stale / "leftover").touch()
    assert not Path(runtime.checkpoint_staging_dir(5)).exists()
    assert latest_step_dir(tmp_path / "checkpoints") is None


def test_rng_state_round_trips_as_json(tmp_path):
    random.seed(1)
    torch.manual_seed(1)
    save_rng_state(str(tmp_path), rank=3)
    json.loads((tmp_path / "rng_state_rank3.json").read_text())  # plain JSON, no pickle
    expected = (random.random(), torch.rand(2))
    random.seed(2)
    torch.manual_seed(2)
    assert load_rng_state(str(tmp_path), rank=3) and not load_rng_state(str(tmp_path), rank=0)
    got = (random.random(), torch.rand(2))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_cli_refuses_a_second_local_run_on_a_locked_output_dir(tmp_path, capsys):
    from orpo_ray.cli import main

    with output_dir_lock(tmp_path):  # a live run (this process) holds the directory
        assert main(["train", "configs/demo.yaml", "--local", f"output_dir={tmp_path}"]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_the_driver_fetches_results_that_rank0_uploaded_from_another_host(tmp_path, monkeypatch):
    from orpo_ray.output_staging import OUTPUT_URI_ENV, fetch_results

    bucket, local = tmp_path / "bucket", tmp_path / "driver_staging"
    bucket.mkdir()
    (bucket / "results.json").write_text('{"num_steps": 7}')
    fetch_results(local)  # no URI output_dir being written: nothing to fetch
    assert not (local / "results.json").exists()
    monkeypatch.setenv(OUTPUT_URI_ENV, f"file://{bucket}")
    fetch_results(local)
    assert (local / "results.json").read_text() == '{"num_steps": 7}'
    (bucket / "results.json").write_text('{"num_steps": 8}')
    fetch_results(local)  # already here (rank 0 ran on this host): left as it is
    assert (local / "results.json").read_text() == '{"num_steps": 7}'


def test_ray_workers_learn_which_uri_and_host_own_the_staging_dir(tmp_path, monkeypatch):
    import socket

    from orpo_ray.config import load_config
    from orpo_ray.launch.session import worker_env
    from orpo_ray.output_staging import OUTPUT_HOST_ENV, OUTPUT_URI_ENV, STAGING_ENV, staged_output

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    monkeypatch.delenv(OUTPUT_URI_ENV, raising=False)
    assert OUTPUT_URI_ENV not in worker_env()
    uri = f"file://{tmp_path / 'bucket' / 'run'}"
    with staged_output(load_config(None, [f"output_dir={uri}"])):
        env = worker_env()
        assert env[OUTPUT_URI_ENV] == uri and env[OUTPUT_HOST_ENV] == socket.gethostname()
    assert OUTPUT_URI_ENV not in worker_env()  # restored after the command


def test_eval_downloads_a_uri_checkpoint_a_run_or_a_model_dir(tmp_path, monkeypatch):
    from orpo_ray.commands.eval import resolve_checkpoint
    from orpo_ray.output_staging import STAGING_ENV

    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    model = tmp_path / "bucket" / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    for uri in (f"file://{model.parent}", f"file://{model}"):  # a run's output_dir, or the model dir itself
        local = resolve_checkpoint(uri)
        assert local.is_relative_to(tmp_path / "staging") and (local / "model.safetensors").read_bytes() == b"weights"
    with pytest.raises(FileNotFoundError, match="neither it nor its model/ holds a saved model"):
        resolve_checkpoint(f"file://{tmp_path / 'bucket'}")


@pytest.mark.parametrize("overrides, dashboard, expected", [
    ([], None, False),                                    # `orpo-ray train`'s default: scaling.local_dashboard false
    (["scaling.local_dashboard=true"], None, True),
    ([], True, True),                                     # `orpo-ray tune` asks for it whatever the config says
])
def test_a_local_ray_instance_runs_the_dashboard_only_when_asked(monkeypatch, ray_init_calls, overrides, dashboard,
                                                                  expected):
    """Without the dashboard the setup hook quiets the placement-group cleaner and the preemption watcher is off
    (tests/integration/test_driver_log.py runs the real thing and reads the console)."""
    from orpo_ray.config import load_config
    from orpo_ray.launch import session

    monkeypatch.delenv(session.PREEMPTION_WATCHER_ENV, raising=False)
    session.ensure_ray(load_config(None, overrides), dashboard=dashboard)
    (kwargs,) = ray_init_calls
    assert kwargs["include_dashboard"] is expected
    hook = kwargs["runtime_env"].get("worker_process_setup_hook")
    assert (hook is None) is expected and (os.environ.get(session.PREEMPTION_WATCHER_ENV) is None) is expected
    if hook:
        module, name = hook.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is session.quiet_placement_group_cleaner
