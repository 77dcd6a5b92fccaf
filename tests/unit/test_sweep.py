"""The pure parts of `orpo-ray tune`: search-space validation, trial configs, the trial table, the best trial."""

import json

import pytest

from orpo_ray.config import ConfigError, load_config
from orpo_ray.launch.sweep import (best_trial, check_metric, evaluations_per_trial, format_table, lambda_rows, trial_config,
                            trial_row)


def _metrics(acc, chosen=-1.0, rejected=-2.0, loss=1.0):
    return {"eval_rewards/accuracies": acc, "eval_logps/chosen": chosen, "eval_logps/rejected": rejected,
            "eval_loss": loss, "eval_rewards/margins": 0.1}


def _row(trial_id, beta, lr, status, metrics, **extra):
    return {"trial_id": trial_id, "beta": beta, "learning_rate": lr, "status": status, "step": 10,
            "metrics": metrics, "model_dir": f"/m/{trial_id}" if status == "completed" else None, **extra}


@pytest.mark.parametrize("override, key", [
    ("tune.beta=[]", "tune.beta"), ("tune.beta=[0.1,-1]", "tune.beta"),
    ("tune.learning_rate=[0.001,0]", "tune.learning_rate"),
    ("tune.learning_rate_min=0.01", "tune.learning_rate_min"),   # min >= max (1e-3)
    ("tune.num_samples=0", "tune.num_samples"), ("tune.max_concurrent_trials=0", "tune.max_concurrent_trials"),
    ("tune.asha_grace_period=0", "tune.asha_grace_period"), ("tune.asha_reduction_factor=1", "tune.asha_reduction_factor"),
])
def test_bad_search_spaces_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_the_metric_must_be_a_reported_eval_metric():
    check_metric(load_config(None, ["tune.metric=eval_loss"]))
    for bad in ("rewards/accuracies", "eval_accuracy"):  # a train metric; a name the loop never reports
        with pytest.raises(ConfigError, match="tune.metric"):
            check_metric(load_config(None, [f"tune.metric={bad}"]))


def test_trial_config_sets_lambda_lr_own_output_dir_and_run_name():
    base = load_config(None, ["output_dir=/sweeps/s1", "orpo.beta=0.1", "train.learning_rate=1e-3"])
    cfg = trial_config(base, "ab12_00003", 0.5, 3e-4)
    assert (cfg.orpo.beta, cfg.train.learning_rate) == (0.5, 3e-4)
    assert cfg.output_dir == "/sweeps/s1/trials/ab12_00003_beta0.5_lr0.0003"
    assert cfg.tracking.run_name == "s1 λ=0.5 lr=0.0003"
    assert (base.orpo.beta, base.output_dir) == (0.1, "/sweeps/s1")  # the base config is not changed


@pytest.mark.parametrize("overrides, pairs, expected", [
    (["train.max_steps=100", "train.eval_interval=25"], 0, 4),    # 25, 50, 75, 100
    (["train.max_steps=110", "train.eval_interval=25"], 0, 5),    # ... and the last step, 110
    (["train.max_steps=100", "train.eval_interval=0"], 0, 1),     # only at the end
    # no max_steps: 1000 pairs // (8 x 2 workers) = 62 steps per epoch, x 2 epochs = 124 -> 20, 40, ..., 120, 124
    (["train.max_steps=null", "train.epochs=2", "train.per_device_batch_size=8", "scaling.num_workers=2",
      "train.eval_interval=20"], 1000, 7),
])
def test_evaluations_per_trial_follow_the_training_loop(overrides, pairs, expected):
    assert evaluations_per_trial(load_config(None, overrides), pairs) == expected


def test_trial_row_status_from_the_trial_directory(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.json").write_text(json.dumps({"eval": _metrics(0.9), "num_steps": 40, "model_dir": "/m",
                                                   "mlflow_run_id": "r1", "pairs_per_second": 50.0}))
    row = trial_row("t0", 0.1, 1e-3, done, {"eval_rewards/accuracies": 0.1, "checkpoint_path": "/c"}, None)
    # A completed trial's metrics are its final results, not Tune's last forwarded result.
    assert (row["status"], row["metrics"]["eval_rewards/accuracies"], row["step"]) == ("completed", 0.9, 40)
    assert (row["model_dir"], row["mlflow_run_id"], row["checkpoint_path"]) == ("/m", "r1", "/c")

    stopped = trial_row("t1", 0.1, 1e-3, tmp_path / "stopped", {"step": 20, "loss": 3.0,
                                                                  "eval_rewards/accuracies": 0.6}, None)
    assert (stopped["status"], stopped["step"], stopped["metrics"]) == ("stopped early", 20,
                                                                        {"eval_rewards/accuracies": 0.6})
    failed = trial_row("t2", 0.1, 1e-3, tmp_path / "failed", {}, "RayTaskError: boom")
    assert (failed["status"], failed["error"], failed["model_dir"]) == ("error", "RayTaskError: boom", None)


def test_best_trial_is_the_best_completed_one_by_mode():
    rows = [_row("a", 0.1, 1e-3, "completed", _metrics(0.7, loss=0.9)),
            _row("b", 0.5, 1e-3, "completed", _metrics(0.8, loss=1.2)),
            _row("c", 1.0, 1e-3, "stopped early", _metrics(0.95, loss=0.1)),   # no final model: not a candidate
            _row("d", 2.0, 1e-3, "error", {})]
    assert best_trial(rows, "eval_rewards/accuracies", "max")["trial_id"] == "b"
    assert best_trial(rows, "eval_loss", "min")["trial_id"] == "a"
    tie = [_row("x", 0.1, 1e-3, "completed", _metrics(1.0)), _row("y", 0.2, 1e-3, "completed", _metrics(1.0))]
    assert best_trial(tie, "eval_rewards/accuracies", "max")["trial_id"] == "x"  # the earlier trial
    assert best_trial(rows[2:], "eval_rewards/accuracies", "max") is None


def test_lambda_rows_take_the_best_learning_rate_per_lambda():
    rows = [_row("a", 0.5, 1e-3, "completed", _metrics(0.7, chosen=-1.0, rejected=-1.5)),
            _row("b", 0.5, 3e-3, "completed", _metrics(0.9, chosen=-0.5, rejected=-2.5)),
            _row("c", 0.0, 1e-3, "completed", _metrics(0.6, chosen=-0.4, rejected=-0.6))]
    assert lambda_rows(rows, "eval_rewards/accuracies", "max") == [
        {"beta": 0.0, "learning_rate": 1e-3, "accuracy": 0.6, "logp_margin": pytest.approx(0.2)},
        {"beta": 0.5, "learning_rate": 3e-3, "accuracy": 0.9, "logp_margin": pytest.approx(2.0)}]


def test_format_table_lists_every_trial_and_marks_the_best():
    rows = [_row("b", 0.5, 1e-3, "completed", _metrics(0.8)), _row("a", 0.1, 3e-3, "stopped early", {})]
    lines = format_table(rows, "eval_rewards/accuracies", best_id="b").splitlines()
    assert lines[0].startswith("| trial | λ | learning rate | status | step | eval_rewards/accuracies |")
    assert len(lines) == 4
    assert lines[2].startswith("| a | 0.1 | 0.003 | stopped early | 10 | - |")  # sorted by λ; missing metric "-"
    assert lines[3].startswith("| b (best) | 0.5 | 0.001 | completed | 10 | 0.8000 |")


def test_search_space_lists_are_typed():
    """YAML 1.1 reads `[3e-3, 1e-6]` as strings; the typed list makes them floats, and a word is refused."""
    cfg = load_config(None, ["tune.learning_rate=[3e-3,1e-6]", "tune.beta=[0, 1]"])
    assert cfg.tune.learning_rate == [3e-3, 1e-6] and cfg.tune.beta == [0.0, 1.0]
    with pytest.raises(ConfigError, match=r"tune\.beta\[1\] must be float"):
        load_config(None, ["tune.beta=[0.1,high]"])


def test_workers_get_the_cluster_address_so_the_state_api_finds_their_cluster():
    """With several Ray instances on a machine, Ray's State API in a worker fails without RAY_ADDRESS, and Ray
    Train's placement-group cleaner then never frees a stopped trial's CPUs (seen: the next trial hung)."""
    from orpo_ray.launch.session import worker_env

    assert worker_env("127.0.0.1:6379")["RAY_ADDRESS"] == "127.0.0.1:6379"
    assert "RAY_ADDRESS" not in worker_env(None) and "RAY_ADDRESS" not in worker_env("auto")
    assert worker_env(None)["DS_ACCELERATOR"]
    import os

    for bound in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        assert worker_env(None)[bound] == os.environ[bound]


def test_saved_state_recognises_the_same_run_and_refuses_another(tmp_path):
    """The state file that lets a re-run resume (train runs and sweeps alike): same config -> the saved fields;
    a changed key -> ConfigError naming it; volatile keys (tracking, scaling.address ...) may change."""
    from orpo_ray.launch.run_state import read_state, save_state

    state_file = tmp_path / "state.json"
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert read_state(state_file, cfg, "sweep") is None
    save_state(state_file, cfg, mlflow_parent_run_id="abc", completed=False)
    assert read_state(state_file, cfg, "sweep") == {**json.loads(state_file.read_text()),
                                                    "mlflow_parent_run_id": "abc", "completed": False}
    assert read_state(state_file, load_config(None, [f"output_dir={tmp_path}", "tracking.enabled=false"]),
                      "sweep")["completed"] is False
    with pytest.raises(ConfigError, match=r"holds a sweep with a different config \(orpo\.beta\)"):
        read_state(state_file, load_config(None, [f"output_dir={tmp_path}", "orpo.beta=0.5"]), "sweep")


def test_trial_config_sets_the_objectives_beta_and_simpo_gamma():
    base = load_config(None, ["output_dir=/sweeps/s2", "objective=simpo", "simpo.gamma=1.0", "orpo.beta=0.1"])
    cfg = trial_config(base, "cd34_00001", 2.5, 1e-3, gamma=0.5)
    assert (cfg.simpo.beta, cfg.simpo.gamma, cfg.orpo.beta) == (2.5, 0.5, 0.1)  # ORPO's section untouched
    assert cfg.output_dir == "/sweeps/s2/trials/cd34_00001_beta2.5_gamma0.5_lr0.001"
    assert cfg.tracking.run_name == "s2 β=2.5 γ=0.5 lr=0.001"
    cpo = trial_config(load_config(None, ["objective=cpo"]), "t", 0.3, 1e-3)
    assert (cpo.cpo.beta, cpo.orpo.beta) == (0.3, 0.1)


def test_the_metric_must_be_one_the_objective_reports():
    check_metric(load_config(None, ["objective=simpo", "tune.metric=eval_preference_loss"]))
    with pytest.raises(ConfigError, match="tune.metric"):
        check_metric(load_config(None, ["objective=simpo", "tune.metric=eval_log_odds_ratio"]))  # ORPO's


def test_format_table_has_a_gamma_column_when_gamma_is_swept():
    rows = [_row("a", 2.0, 1e-3, "completed", _metrics(0.6), gamma=1.5),
            _row("b", 2.0, 1e-3, "completed", _metrics(0.8), gamma=0.5)]
    header, _, first, second = format_table(rows, "eval_rewards/accuracies", "b", beta_name="β").splitlines()
    assert header.startswith("| trial | β | γ | learning rate | status |")
    assert first.startswith("| b (best) | 2 | 0.5 | 0.001 |") and second.startswith("| a | 2 | 1.5 | 0.001 |")
