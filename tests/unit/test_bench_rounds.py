"""commands/bench.run_rounds: every leg once per round, so drift of the machine spreads over all legs alike."""

from pathlib import Path

import orpo_ray.commands.bench as bench


def _fake_runs(monkeypatch, fails=()):
    calls = []

    def run_leg_once(spec, work, repeat):
        calls.append((spec["name"], repeat))
        if spec["name"] in fails:
            return None, f"{spec['name']} broke"
        return {"pairs_per_second": float(len(calls)), "peak_rss_mb": 100.0 + repeat, "round": repeat}, None

    monkeypatch.setattr(bench, "run_leg_once", run_leg_once)
    return calls


def test_legs_alternate_round_by_round(monkeypatch, capsys):
    calls = _fake_runs(monkeypatch)
    outcome = bench.run_rounds([{"name": "a"}, {"name": "b"}, {"name": "c"}], Path("."), repeats=3)
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2)]
    assert [r["pairs_per_second"] for r in outcome["b"][0]] == [2.0, 5.0, 8.0] and outcome["b"][1] is None
    assert capsys.readouterr().out.count("[bench] round ") == 9  # progress, one line a run


def test_a_failed_leg_is_not_run_again_and_keeps_its_error(monkeypatch):
    calls = _fake_runs(monkeypatch, fails={"b"})
    outcome = bench.run_rounds([{"name": "a"}, {"name": "b"}], Path("."), repeats=2)
    assert calls == [("a", 0), ("b", 0), ("a", 1)]
    assert outcome["b"] == ([], "b broke") and len(outcome["a"][0]) == 2


def test_at_least_one_round(monkeypatch):
    calls = _fake_runs(monkeypatch)
    bench.run_rounds([{"name": "a"}], Path("."), repeats=0)
    assert calls == [("a", 0)]


def _leg(name, kind, precision, pps_runs, peak, ray=False, overrides=()):
    return {"name": name, "kind": kind, "precision": precision, "ray": ray, "overrides": list(overrides),
            "pairs_per_second": max(pps_runs), "pairs_per_second_runs": list(pps_runs), "peak_rss_mb": peak,
            "losses": [2.0, 1.5]}


def test_through_ray_figures_against_best_trl_and_the_in_process_twin():
    legs = [_leg("trl-fp32", "trl", "fp32", [4.0], 2000.0), _leg("trl-bf16", "trl", "bf16", [5.0, 4.5], 2500.0),
            # same precision, other switches: faster, but not the Ray leg's twin
            _leg("orpo-plain-fp32", "orpo", "fp32", [30.0, 31.0], 2100.0, overrides=["efficiency.packing=false"]),
            _leg("orpo-defaults-fp32", "orpo", "fp32", [20.0, 24.0], 700.0),
            _leg("orpo-defaults-ray", "orpo", "fp32", [18.0, 22.0], 900.0, ray=True),
            _leg("orpo-bf16-ray", "orpo", "bf16", [10.0], 950.0, ray=True)]  # no in-process bf16 leg
    ratios = bench._ratios(legs)
    ray = ratios["through_ray"]["orpo-defaults-ray"]
    assert ray["speedup_vs_best_trl"] == 22.0 / 5.0 and ray["peak_rss_vs_best_trl"] == 900.0 / 2500.0
    assert ray["in_process_leg"] == "orpo-defaults-fp32" and ray["vs_in_process"] == 22.0 / 24.0
    assert ray["vs_in_process_by_round"] == [18.0 / 20.0, 22.0 / 24.0]
    assert ratios["through_ray"]["orpo-bf16-ray"] == {"speedup_vs_best_trl": 2.0, "peak_rss_vs_best_trl": 0.38}
    assert ratios["best_orpo"] == "orpo-plain-fp32"  # the headline ratio is unchanged: the fastest leg of ours


def test_no_ray_leg_no_through_ray_entry():
    legs = [_leg("trl-fp32", "trl", "fp32", [4.0], 2000.0), _leg("orpo-defaults-fp32", "orpo", "fp32", [20.0], 700.0)]
    assert "through_ray" not in bench._ratios(legs)


def test_a_legs_overrides_never_reach_the_next_leg():
    """gpu_check runs its legs one after another in one process from one spec: the plain leg's
    fused_layers=false and the Liger leg's lm_head=liger reached every later leg (seen on an H200)."""
    from orpo_ray.config import Config

    spec = {"config": Config().to_dict(), "work": "/tmp/w", "model_dir": "/tmp/m", "train": "/tmp/t.jsonl",
            "eval": "/tmp/e.jsonl", "precision": "fp32", "name": "first"}
    first = bench.orpo_leg_config({**spec, "overrides": ["efficiency.fused_layers=false", "scaling.use_gpu=true"]})
    assert first.efficiency.fused_layers is False and first.scaling.use_gpu is True
    second = bench.orpo_leg_config({**spec, "name": "second"})
    assert second.efficiency.fused_layers is True and second.scaling.use_gpu is False
    assert spec["config"] == Config().to_dict()
