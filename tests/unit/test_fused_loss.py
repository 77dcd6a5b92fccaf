"""The fused lm-head loss (forward/fused_loss.py) against the unfused path, and its grouping of pairs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo_ray.forward.chunked_lm_head import LmHead, LmHeadTargets, padded_targets, stats_from_targets
from orpo_ray.forward.collate import collate_pairs
from orpo_ray.forward.fused_loss import fused_policy_loss, pair_groups
from orpo_ray.forward.logprobs import outputs_from_token_stats
from orpo_ray.objectives.cpo import CPO
from orpo_ray.objectives.orpo import ORPO

ROWS = [{"prompt_ids": [1, 5, 9], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]},
        {"prompt_ids": [3], "chosen_ids": [4, 4, 10, 2], "rejected_ids": [2]},
        {"prompt_ids": [1, 2, 3, 4, 5, 6], "chosen_ids": [9, 2], "rejected_ids": [10, 3, 2]}]
VOCAB, WIDTH = 11, 4


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    batch = collate_pairs(ROWS, pad_token_id=0)
    n = batch["input_ids"].numel()
    hidden = torch.randn(n, WIDTH, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(VOCAB, dtype=torch.float64, generator=g, requires_grad=True)
    return batch, hidden, weight, bias


def _targets(batch, hidden, head, nll_on_prompt):
    dst = padded_targets(batch, nll_on_prompt)
    ids = batch["input_ids"].flatten().index_select(0, dst)
    return LmHeadTargets(hidden, head, dst - 1, ids, dst, tuple(batch["input_ids"].shape))


HEADS = {"plain": {}, "bias and scaling": {"multiplier": 1.5, "divisor": 4.0},
         "bias, scaling and soft-cap": {"multiplier": 1.5, "divisor": 4.0, "softcap": 0.7}}


@pytest.mark.parametrize("chunk", [2, 6, 100])  # pairs over several chunks (recomputed), groups of pairs, one group
@pytest.mark.parametrize("head_kind", list(HEADS))
@pytest.mark.parametrize("objective", [ORPO(beta=0.4, nll_on_prompt=True), CPO(beta=0.2, alpha=0.5)], ids=repr)
def test_fused_loss_equals_the_unfused_loss_and_gradients_fp64(objective, head_kind, chunk):
    """fp64 lm-head; the objectives compute in fp32 on both paths, so the tolerances are fp32's."""
    batch, hidden, weight, bias = _inputs(seed=chunk)
    bias_or_none = None if head_kind == "plain" else bias
    head = lambda w, b: LmHead(w, b, **HEADS[head_kind])  # noqa: E731

    def fused(h, w, b):
        return fused_policy_loss(_targets(batch, h, head(w, b), objective.nll_on_prompt), batch, objective, 0.8,
                                 chunk)

    def unfused(h, w, b):
        stats = stats_from_targets(_targets(batch, h, head(w, b), objective.nll_on_prompt), None)
        return objective.loss(outputs_from_token_stats(stats, batch, objective.nll_on_prompt), 0.8)

    args = (hidden, weight, bias_or_none) if bias_or_none is not None else (hidden, weight)
    loss, metrics = fused(hidden, weight, bias_or_none)
    ref_loss, ref_metrics = unfused(hidden, weight, bias_or_none)
    torch.testing.assert_close(loss.float(), ref_loss, rtol=1e-6, atol=1e-7)
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-6, atol=1e-7, msg=k)
    grads = torch.autograd.grad(loss, args)
    ref_grads = torch.autograd.grad(ref_loss, args)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_backward_scales_the_stored_gradients_by_the_upstream_gradient():
    """DeepSpeed scales the loss before backward and accumulation adds micro-batches: both reach the stored
    gradients only through the upstream scalar."""
    batch, hidden, weight, _ = _inputs(seed=5)
    objective = ORPO(beta=0.1)
    loss, _ = fused_policy_loss(_targets(batch, hidden, LmHead(weight), False), batch, objective, 1.0, 4)
    once = torch.autograd.grad(loss, (hidden, weight))
    loss, _ = fused_policy_loss(_targets(batch, hidden, LmHead(weight), False), batch, objective, 1.0, 4)
    scaled = torch.autograd.grad(loss * 2.5, (hidden, weight))
    for a, b in zip(once, scaled):
        torch.testing.assert_close(a * 2.5, b)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(1, 12))
def test_pair_groups_hold_whole_pairs_within_the_chunk(pairs, chunk):
    pair_of_target = torch.tensor(pairs)
    order, groups = pair_groups(pair_of_target, 6, chunk)
    ordered = pair_of_target[order].tolist()
    assert ordered == sorted(pairs) and sorted(order.tolist()) == list(range(len(pairs)))
    assert groups[0][0] == 0 and groups[-1][1] == len(pairs)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(groups, groups[1:] + [(groups[-1][1], None)]))
    for start, end in groups:
        inside = set(ordered[start:end])
        outside = set(ordered[:start] + ordered[end:])
        assert not inside & outside                      # no pair is split across groups
        assert end - start <= chunk or len(inside) == 1  # only a pair longer than the chunk overflows it
    for (s1, e1), (s2, e2) in zip(groups, groups[1:]):  # a group closes only when the next pair does not fit
        first_next = ordered[s2]
        assert (e1 - s1) + ordered.count(first_next) > chunk
