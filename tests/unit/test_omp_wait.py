"""scaling.omp_spin_count (orpo_ray/omp_wait.py): the OpenMP spin count every training process starts with."""

import pytest

from orpo_ray.config import ConfigError, load_config
from orpo_ray.omp_wait import AUTO_SPIN_COUNT, active, describe, omp_wait_env


@pytest.mark.parametrize("setting, exported, wanted", [
    ("auto", {}, {"GOMP_SPINCOUNT": str(AUTO_SPIN_COUNT)}),
    ("auto", {"GOMP_SPINCOUNT": "500"}, {}),              # the user's own stays
    ("auto", {"OMP_WAIT_POLICY": "ACTIVE"}, {}),          # so does a wait policy they chose
    (0, {}, {"GOMP_SPINCOUNT": "0"}),
    (300000, {"GOMP_SPINCOUNT": "500"}, {"GOMP_SPINCOUNT": "300000"}),  # a configured count wins
])
def test_the_spin_count_a_training_process_starts_with(setting, exported, wanted):
    assert omp_wait_env(setting, exported) == wanted


def test_the_plan_says_which_spin_count_and_why():
    assert describe("auto", {}) == f"{AUTO_SPIN_COUNT} (auto: Ray's processes share the cores)"
    assert describe(2000, {}) == "2000 (scaling.omp_spin_count)"
    assert describe("auto", {"GOMP_SPINCOUNT": "7"}) == "7 (exported GOMP_SPINCOUNT)"
    assert describe("auto", {"OMP_WAIT_POLICY": "PASSIVE"}) == "libgomp's own (exported OMP_WAIT_POLICY=PASSIVE)"
    assert active({"GOMP_SPINCOUNT": "10000"}) == "10000"
    assert active({}) == "300000 (libgomp's default)"


def test_a_negative_spin_count_is_rejected_by_name():
    with pytest.raises(ConfigError, match="scaling.omp_spin_count"):
        load_config(None, ["scaling.omp_spin_count=-1"])
    assert load_config(None, ["scaling.omp_spin_count=0"]).scaling.omp_spin_count == 0


def test_train_local_restarts_once_with_the_spin_count_a_ray_worker_gets(monkeypatch):
    from orpo_ray.launch.session import local_process_env, process_start_env

    cfg = load_config(None, ["scaling.allocator=system"])
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert process_start_env(cfg, local_instance=False) == {"GOMP_SPINCOUNT": str(AUTO_SPIN_COUNT)}
    assert local_process_env(cfg)["GOMP_SPINCOUNT"] == str(AUTO_SPIN_COUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", str(AUTO_SPIN_COUNT))  # the restarted process: no second restart
    assert local_process_env(cfg) is None
