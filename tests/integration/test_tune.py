"""`orpo-ray tune` on real Ray: a 2 λ x 2 learning-rate sweep run by the CLI (its own local Ray) into a live
`mlflow server`, with ASHA; and re-running an interrupted sweep (Tuner.restore + Ray Train resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orpo_ray.config import load_config, with_absolute_paths
from orpo_ray.launch.tune import run_sweep
from tests.integration.ray_train_helpers import DEMO, REVIEW_EXPERIMENT, TINY

pytestmark = pytest.mark.integration

def _sweep_config(tmp_path, *overrides):
    return with_absolute_paths(load_config(DEMO, [*TINY, f"output_dir={tmp_path / 'sweep'}", *overrides]))


def test_rerunning_an_interrupted_sweep_resumes_it(ray_local, tmp_path, capsys):
    """The only trial dies at step 3 (max_failures=0): the sweep ends with an errored trial. The same command
    again restores the Tune experiment and the trial's Train run resumes from its step-2 checkpoint; a third
    time returns the finished sweep as it is."""
    cfg = _sweep_config(tmp_path, "tune.beta=[0.5]", "tune.learning_rate=[]", "tune.learning_rate_min=1e-3",
                        "tune.learning_rate_max=3e-3", "tune.asha=false",
                        "train.max_steps=6", "train.checkpoint_interval=2", "train.fail_at_step=3",
                        "scaling.max_failures=0")
    first = run_sweep(cfg)
    (failed,) = first["trials"]
    assert failed["status"] == "error" and first["best"] is None
    assert 1e-3 <= failed["learning_rate"] <= 3e-3  # sampled log-uniformly (tune.learning_rate: [])
    assert (Path(failed["output_dir"]) / ".fault_injected_step_3").exists()

    second = run_sweep(cfg)
    assert "resuming the sweep" in capsys.readouterr().out
    (trial,) = second["trials"]
    results = json.loads((Path(trial["output_dir"]) / "results.json").read_text())
    assert trial["status"] == "completed" and results["resumed_from_step"] == 2 and results["num_steps"] == 6
    # The same trial (id, sampled learning rate, directory), not a new one.
    assert [trial[k] for k in ("trial_id", "learning_rate", "output_dir")] == \
        [failed[k] for k in ("trial_id", "learning_rate", "output_dir")]
    assert second["best"]["trial_id"] == failed["trial_id"]

    third = run_sweep(cfg)
    assert "already holds this finished sweep" in capsys.readouterr().out
    assert third["best"] == json.loads(json.dumps(second["best"]))


def test_sweep_logs_parent_and_children_to_a_live_mlflow_server(reviewed_runs):
    """`orpo-ray tune` as a user runs it (conftest's `reviewed_runs`): it starts its own local Ray (with the
    dashboard - Ray Train's placement-group cleaner needs its State API to free the CPUs of trials ASHA stopped),
    possibly while the test session's Ray runs too (two instances on one machine: the workers must be told their
    cluster's address, or the cleaner fails and the next trial waits for CPUs forever)."""
    out = reviewed_runs.sweep_dir
    summary = json.loads((out / "tune_results.json").read_text())
    print(f"\nsweep of {len(summary['trials'])} trials: {summary['wall_seconds']:.0f} s in run_sweep; best "
          f"λ={summary['best']['beta']:g} lr={summary['best']['learning_rate']:.3g} "
          f"eval_nll_loss={summary['best']['metrics']['eval_nll_loss']:.4f}")
    assert "(best)" in reviewed_runs.tune_stdout and "best trial" in reviewed_runs.tune_stdout  # table and verdict

    # tune_results.json: every trial with its config, status, final metrics; the best trial; its model exported.
    saved = summary
    trials = {(t["beta"], t["learning_rate"]): t for t in saved["trials"]}
    assert sorted(trials) == [(0.1, 1e-6), (0.1, 3e-3), (1.0, 1e-6), (1.0, 3e-3)]
    assert {t["status"] for t in trials.values()} <= {"completed", "stopped early"}
    assert trials[(0.1, 3e-3)]["status"] == "completed"
    stopped = [t for t in trials.values() if t["status"] == "stopped early"]
    assert all(trials[(b, 1e-6)]["status"] == "stopped early" for b in (0.1, 1.0))
    assert all(t["step"] < 24 and t["model_dir"] is None for t in stopped)  # ASHA cut them short
    best = saved["best"]
    assert best["learning_rate"] == 3e-3 and best["status"] == "completed"
    assert best["metrics"]["eval_nll_loss"] == min(t["metrics"]["eval_nll_loss"] for t in trials.values()
                                                   if t["status"] == "completed")
    assert (out / "best_model" / "model.safetensors").exists()
    assert (out / "best_model" / "model.safetensors").read_bytes() == \
        (Path(best["model_dir"]) / "model.safetensors").read_bytes()
    assert "(best)" in (out / "trials.md").read_text()

    # MLflow: one parent, four children with metrics, params and artifacts; the best child tagged.
    client = MlflowClient(reviewed_runs.server.uri)
    exp = client.get_experiment_by_name(REVIEW_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    # Top level: the sweep's parent and the experiment's one training run, nothing else.
    train_run_id = json.loads((reviewed_runs.train_dir / "results.json").read_text())["mlflow_run_id"]
    top_level = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(top_level) == {saved["mlflow_parent_run_id"], train_run_id}
    parent = top_level[saved["mlflow_parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    for child in children:
        assert child.data.params["orpo.beta"] in ("0.1", "1.0")
        assert "eval_nll_loss" in child.data.metrics and "rewards/margins" in child.data.metrics
        if child.info.status == "FINISHED":
            names = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"results.json", "config.yaml", "plots"} <= names
            models = client.search_logged_models([exp.experiment_id],
                                                 filter_string=f"source_run_id = '{child.info.run_id}'")
            assert [m.name for m in models] == ["model"]  # the exported model, as an MLflow model of the run
    status_of = {(float(c.data.params["orpo.beta"]), float(c.data.params["train.learning_rate"])):
                 c.info.status for c in children}
    # A completed trial's run ended itself; a run cut off by ASHA could not, so the sweep marked it KILLED.
    assert status_of == {k: "FINISHED" if t["status"] == "completed" else "KILLED" for k, t in trials.items()}
    tagged = [c for c in children if c.data.tags.get("orpo.best_trial") == "true"]
    assert [c.info.run_id for c in tagged] == [best["mlflow_run_id"]]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    # The λ plot compares completed trials; it needs two λ values that completed (ASHA may have cut λ=1 short).
    lambdas_completed = {t["beta"] for t in trials.values() if t["status"] == "completed"}
    expected = {"tune_results.json", "trials.md", "heatmap_eval_nll_loss.png"}
    assert expected | ({"lambda_effect.png"} if len(lambdas_completed) > 1 else set()) <= parent_artifacts
    assert ("lambda_effect.png" in parent_artifacts) == (len(lambdas_completed) > 1)
    assert parent.data.tags["best_trial"] == best["trial_id"]
    assert parent.data.metrics["best/eval_nll_loss"] == pytest.approx(best["metrics"]["eval_nll_loss"])
    # The best trial's model, registered with what chose it.
    [version] = client.search_model_versions("name = 'orpo-ray-best'")
    assert version.run_id == best["mlflow_run_id"] and parent.data.tags["registered_model"] == "orpo-ray-best/1"
    assert float(version.tags["orpo.beta"]) == best["beta"]
    assert float(version.tags["eval_nll_loss"]) == pytest.approx(best["metrics"]["eval_nll_loss"])
    assert parent.info.status == "FINISHED"



def test_tune_and_train_refuse_each_others_output_dir(tmp_path, monkeypatch, capsys):
    """The train lock, reused: a sweep on a directory another run holds stops before Ray starts, and while a
    sweep runs, `train` on its directory is refused."""
    import orpo_ray.launch.tune as tune_module
    from orpo_ray.cli import main
    from orpo_ray.launch.run_state import output_dir_lock

    out = tmp_path / "sweep"
    args = ["configs/tune_demo.yaml", f"output_dir={out}"]
    seen = []

    def sweep_started(*_, **__):  # the sweep got past its lock: a training run on its output_dir must be refused now
        seen.append(main(["train", *args, "--local"]))
        raise RuntimeError("stop the sweep here")

    monkeypatch.setattr(tune_module, "ensure_ray", sweep_started)
    with output_dir_lock(out):  # a live holder (this process), as a running `train` or `tune` would be
        assert main(["tune", *args]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert not seen and not (out / "sweep_state.json").exists()

    with pytest.raises(RuntimeError, match="stop the sweep here"):
        main(["tune", *args])
    assert seen == [2] and "is in use by another run" in capsys.readouterr().err
    assert not (out / ".orpo_run.lock").exists()  # released when the sweep ended
