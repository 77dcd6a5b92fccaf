"""Metric names, averaging across micro-batches and ranks, results.json."""

from __future__ import annotations

import json

import pytest
import torch

from orpo_ray.forward.logprobs import PolicyOutputs
from orpo_ray.objectives.orpo import ORPO_METRIC_NAMES as TRAIN_METRIC_NAMES
from orpo_ray.objectives.orpo import orpo_loss
from orpo_ray.results import with_prefix, write_results
from orpo_ray.train.metrics import MetricAverager


def test_names_match_what_the_loss_returns():
    scalar = torch.tensor
    out = PolicyOutputs(scalar([-1.0]), scalar([-2.0]), scalar(1.0), scalar(0.0), scalar(0.0))
    _, metrics = orpo_loss(out, beta=0.1)
    assert sorted(metrics) == sorted(TRAIN_METRIC_NAMES)
    assert len(set(TRAIN_METRIC_NAMES)) == len(TRAIN_METRIC_NAMES)


def test_with_prefix():
    assert with_prefix({"loss": 1.0, "rewards/chosen": 2.0}, "eval_") == {"eval_loss": 1.0, "eval_rewards/chosen": 2.0}


def test_averager_means_tensors_and_floats():
    avg = MetricAverager()
    avg.add({"loss": torch.tensor(1.0), "nll_loss": 4.0})
    avg.add({"loss": torch.tensor(2.0, requires_grad=True) * 1, "nll_loss": 6.0})
    avg.add({"loss": 6.0})  # nll_loss missing from this micro-batch: averaged over the two that had it
    result = avg.compute()
    assert result == {"loss": pytest.approx(3.0), "nll_loss": pytest.approx(5.0)}
    assert all(type(v) is float for v in result.values())
    avg.reset()
    assert avg.compute() == {}


def test_averager_all_reduce_round_trip():
    # Two "ranks" with different numbers of micro-batches; summing the packed tensors (what all_reduce(SUM)
    # does) must give the mean over all micro-batches of all ranks.
    rank0, rank1 = MetricAverager(), MetricAverager()
    for v in (1.0, 2.0, 3.0):
        rank0.add({"loss": torch.tensor(v), "only_rank0": v})
    rank1.add({"loss": torch.tensor(10.0)})
    names = ["loss", "only_rank0", "never_seen"]
    packed = rank0.as_tensor(names) + rank1.as_tensor(names)
    assert packed.dtype == torch.float64 and packed.shape == (6,)
    merged = MetricAverager.from_tensor(packed, names).compute()
    assert merged == {"loss": pytest.approx(16.0 / 4), "only_rank0": pytest.approx(2.0)}
    with pytest.raises(ValueError):
        MetricAverager.from_tensor(packed, names[:2])


def test_write_results_atomic_sorted(tmp_path):
    path = tmp_path / "run" / "results.json"
    write_results(path, {"old": 1})
    write_results(path, {"eval_loss": torch.tensor(0.25), "b": 2, "a": [1, 2]})
    text = path.read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 2, "eval_loss": 0.25}
    assert text.index('"a"') < text.index('"b"') < text.index('"eval_loss"')
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left behind


def test_write_results_failure_keeps_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_results(path, {"loss": 1.0})
    with pytest.raises(TypeError):
        write_results(path, {"loss": object()})
    assert json.loads(path.read_text()) == {"loss": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_weighted_add_counts_a_short_batch_less():
    # 8 pairs with accuracy 1.0 and a short last batch of 2 pairs with accuracy 0.0: (8*1 + 2*0) / 10 = 0.8
    avg = MetricAverager()
    avg.add({"rewards/accuracies": 1.0}, weight=8)
    avg.add({"rewards/accuracies": torch.tensor(0.0)}, weight=2)
    assert avg.compute()["rewards/accuracies"] == pytest.approx(0.8)
    packed = avg.as_tensor(["rewards/accuracies"])
    assert MetricAverager.from_tensor(packed * 2, ["rewards/accuracies"]).compute()["rewards/accuracies"] == pytest.approx(0.8)


def test_packed_tensor_stays_on_the_device_the_metrics_are_on():
    """A GPU worker's metrics are CUDA tensors: sums and counts must be packed on that one device (the counts were
    built on the CPU, and every GPU run stopped at its first log step). 'meta' stands in for the GPU here."""
    avg = MetricAverager()
    avg.add({"loss": torch.tensor(2.0, device="meta"), "rewards/accuracies": 1.0}, weight=4)
    packed = avg.as_tensor(["loss", "rewards/accuracies", "never_reported"])
    assert packed.device.type == "meta" and packed.shape == (6,)
    assert MetricAverager().as_tensor(["loss"]).device.type == "cpu"  # nothing added: the CPU
