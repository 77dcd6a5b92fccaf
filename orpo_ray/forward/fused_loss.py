"""The chunked lm-head with the loss inside: each chunk's gradient is taken while its logits are in memory.

`chunked_lm_head._ChunkedLmHeadLogProb` keeps only the log-sum-exp in forward and computes every chunk's logits
a second time in backward: 4 matmuls of [rows, H] x [H, V] per chunk (forward, recompute, hidden and weight
gradients), about a quarter of a step on the bench model. The recompute is there because the upstream gradient
of a token's log-prob is only known once the loss is. Here the loss is known early, per group of whole pairs:

- every objective's loss is a sum over pairs plus the NLL, a sum over tokens (``Objective.preference_terms``,
  ``nll_coefficient``), with normalisers (pairs B, NLL tokens) that the masks give before any forward;
- so the targets are reordered pair by pair and cut into groups of whole pairs of at most ``chunk`` rows; for
  each group the forward computes its logits once, its log-probs, its share of the loss, the gradient of that
  share with respect to its log-probs (autograd on a few tiny tensors), and from the softmax still in the
  buffer the gradients of the hidden states, the weight and the bias: 3 matmuls per chunk instead of 4;
- backward only multiplies the stored gradients by the upstream scalar (DeepSpeed's loss scaling, accumulation).

A pair with more targets than ``chunk`` is a group of several chunks: its logits are computed for the log-probs
and again for the gradient (the unfused path's cost, for that pair only). So is every group under a final
soft-cap (Gemma 2/3), whose derivative needs the logits the softmax overwrote. Held from forward to backward:
the hidden-state gradient [M, H] and the weight gradient [V, H] (the parameter's gradient size).

Same numbers as ``policy_forward`` + ``Objective.loss`` (tests/unit/test_efficiency.py, test_families.py: loss,
metrics and gradients against the plain path, fp32 rel 1e-5). Pure module: torch only.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from orpo_ray.forward.chunked_lm_head import (
    LmHeadTargets,
    _chunk_forward,
    _ChunkBuffers,
    _compute_dtype,
    _InputGrads,
    _logit_grad_,
    _operands,
    _recomputed_softmax,
)
from orpo_ray.forward.logprobs import (
    PolicyOutputs,
    TokenStats,
    _target_response_mask,
    nll_target_mask,
    outputs_from_token_stats,
)

# (log-probs of one group's targets [m], group start, group end) -> that group's share of the loss (0-d)
GroupLossFn = Callable[[Tensor, int, int], Tensor]


def pair_groups(pair_of_target: Tensor, num_pairs: int, chunk: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """(order putting each pair's targets together, [(start, end)] of groups of whole pairs in that order).

    Pairs are taken in order and a group closes before the pair that would take it past ``chunk`` rows; a
    pair longer than ``chunk`` is a group on its own."""
    order = torch.argsort(pair_of_target, stable=True)
    groups, start, end = [], 0, 0
    for n in torch.bincount(pair_of_target, minlength=num_pairs).tolist():
        if end > start and end + n - start > chunk:
            groups.append((start, end))
            start = end
        end += n
    if end > start:
        groups.append((start, end))
    return order, groups


class _FusedPreferenceLoss(torch.autograd.Function):
    """The micro-batch's loss from the target hidden states, its input gradients computed in forward.

    hidden [M, H] (targets in group order), weight, bias, targets [M]; groups: [(start, end)]; group_loss: see
    ``GroupLossFn``. Returns (loss 0-d, detached log-probs [M], detached logit row sums [M]). Numerics as
    `_ChunkedLmHeadLogProb`: the matmul in ``compute_dtype``, everything after it in fp32 (fp64 for fp64).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                compute_dtype: torch.dtype, post: tuple[float, float | None], groups: list[tuple[int, int]],
                group_loss: GroupLossFn):
        acc, w, b = _operands(weight, bias, compute_dtype)
        m = hidden.shape[0]
        logps, lses, sums = (torch.empty(m, dtype=acc, device=hidden.device) for _ in range(3))
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grads = _InputGrads(hidden, weight, bias, acc, ctx.needs_input_grad[:3])
        buffers = _ChunkBuffers.for_call(m, chunk, w, acc)
        with torch.autocast(hidden.device.type, enabled=False):
            for start, end in groups:
                chunks = [slice(i, min(i + chunk, end)) for i in range(start, end, chunk)]
                for rows in chunks:  # log-probs; a one-chunk group keeps its shifted exp for the gradient
                    out = _chunk_forward(hidden[rows].to(compute_dtype), w, b, post, buffers, targets[rows])
                    logps[rows], lses[rows], sums[rows] = out.target_logps, out.lse, out.logit_sums
                kept = len(chunks) == 1 and post[1] is None
                with torch.enable_grad():
                    group_logps = logps[start:end].detach().requires_grad_()
                    share = group_loss(group_logps, start, end)
                    (upstream,) = (torch.autograd.grad(share, group_logps, allow_unused=True)
                                   if share.requires_grad else (None,))
                upstream = torch.zeros_like(group_logps) if upstream is None else upstream.detach()
                loss += share.detach()
                for rows in chunks:
                    h = hidden[rows].to(compute_dtype)
                    g = upstream[rows.start - start: rows.stop - start].unsqueeze(-1)
                    if kept:  # exp(x - top) * exp(top - lse) = softmax(x)
                        probs, x = out.shifted_exp.mul_(torch.exp(out.top - out.lse).unsqueeze(-1)), None
                    else:
                        probs, x = _recomputed_softmax(h, w, b, post, buffers, lses[rows])
                    grads.add(rows, _logit_grad_(probs, targets[rows], g, x, post), h, w, buffers)
        ctx.grads = grads
        ctx.weight_bias = (weight, bias)
        ctx.mark_non_differentiable(logps, sums)
        return loss, logps, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_logps: Tensor, _grad_sums: Tensor):
        grads = ctx.grads.scaled(*ctx.weight_bias, by=grad_loss)
        del ctx.grads
        return (*grads, None, None, None, None, None, None)


def fused_policy_loss(
    targets: LmHeadTargets, batch: Mapping[str, Tensor], objective, nll_weight: float, chunk: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, detached metrics) as ``objective.loss(policy_forward(...), nll_weight)`` gives them.

    objective: an ``objectives.Objective`` (its ``preference_terms``, ``nll_coefficient`` and, for the metrics,
    ``loss``)."""
    b, width = int(batch["num_pairs"]), targets.shape[1]
    device = targets.dst.device
    row = torch.div(targets.dst, width, rounding_mode="floor")
    is_response = _target_response_mask(batch).flatten().index_select(0, targets.dst)
    nll_flat = torch.zeros(targets.shape[0] * width, dtype=torch.bool, device=device)
    nll_flat[: b * width] = nll_target_mask(batch, objective.nll_on_prompt).flatten()
    is_nll = nll_flat.index_select(0, targets.dst)

    order, groups = pair_groups(row % b, b, chunk)
    row, is_response, is_nll = row[order], is_response[order], is_nll[order]
    # Normalisers of the whole micro-batch, as outputs_from_token_stats uses them (clamped like masked_mean).
    tokens = torch.bincount(row[is_response], minlength=2 * b).to(torch.float32)
    nll_scale = objective.nll_coefficient * nll_weight / is_nll.sum().clamp(min=1).item()

    def group_loss(logps: Tensor, start: int, end: int) -> Tensor:
        rows, response, nll = row[start:end], is_response[start:end], is_nll[start:end]
        pairs = torch.unique(rows % b)
        sums = logps.new_zeros(2 * b).index_add(0, rows[response], logps[response])
        means = sums / tokens.to(logps.dtype).clamp(min=1)
        group = PolicyOutputs(chosen_logps=means[pairs], rejected_logps=means[b + pairs], nll=logps.new_zeros(()),
                              chosen_logits_mean=logps.new_zeros(()), rejected_logits_mean=logps.new_zeros(()),
                              chosen_tokens=tokens[pairs], rejected_tokens=tokens[b + pairs])
        return objective.preference_terms(group).sum() / b - nll_scale * logps[nll].sum()

    hidden = targets.hidden_flat.index_select(0, targets.src[order])
    head = targets.head
    loss, logps, sums = _FusedPreferenceLoss.apply(hidden, head.weight, head.bias, targets.ids[order], chunk,
                                                   _compute_dtype(hidden), head.post, groups, group_loss)
    # Metrics from the same log-probs, through the path every other layout takes (detached: no second graph).
    in_group_order = targets._replace(dst=targets.dst[order])  # logps and sums come back in group order
    stats = TokenStats(in_group_order.scatter(logps), in_group_order.scatter(sums), head.weight.shape[0])
    with torch.no_grad():
        _, metrics = objective.loss(outputs_from_token_stats(stats, batch, objective.nll_on_prompt), nll_weight)
    return loss, metrics
