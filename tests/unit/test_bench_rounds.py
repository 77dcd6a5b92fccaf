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
