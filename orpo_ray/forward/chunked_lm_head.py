"""Chunked lm-head: target log-probs straight from hidden states, never holding [N, T, V] logits.

The plain path (``logprobs.full_logits_token_stats``) runs the whole model and gets logits for every position
of every row, then reduces the vocabulary. Two things are wasted there: positions whose log-prob no loss term
reads (the prompt, unless ``nll_on_prompt``; padding), and memory for a [N, T, V] tensor plus its gradient.

Here the model body gives hidden states; only the *target* positions are gathered (``src`` indices into the
flattened hidden states), and ``_ChunkedLmHeadLogProb`` applies the lm-head weight to ``chunk`` of them at a
time: forward keeps only the log-sum-exp per target, backward recomputes each chunk's logits and accumulates
the gradients of the hidden states and of the weight chunk by chunk. Peak extra memory is ~ chunk x V floats.

``stats_from_targets`` scatters the per-target results back into the padded [2B, T] layout of
``collate.collate_pairs`` (``dst`` indices), so ``logprobs.outputs_from_token_stats`` is shared by every path.

Pure module: torch only.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from orpo_ray.forward.logprobs import TokenStats, _TargetLogProb


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning ``last_hidden_state``, lm-head Linear) of a HF causal LM, through wrappers.

    DeepSpeed/DDP engines keep the model in ``.module``; PEFT models expose ``get_base_model()`` (adapters are
    injected in place, so the body still runs them). ZeRO-2 does not partition parameters, so calling the body
    directly is safe there; ZeRO-3 would need the engine's gather hooks and is not supported by this path.
    """
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    body = getattr(inner, "model", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if body is None or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(inner).__name__}: the chunked lm-head needs a causal LM with .model and a Linear lm_head")
    if head.bias is not None:
        raise TypeError("the chunked lm-head does not support an lm_head bias")
    return body, head


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run the lm-head matmul in (bf16 under bf16 autocast, else the input's)."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class _ChunkedLmHeadLogProb(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[i, targets[i]] and the logit row sums, ``chunk`` rows at a time.

    The matmul runs in ``compute_dtype`` (bf16 under autocast, like ``nn.Linear`` would), the log-sum-exp and
    the returned values in fp32 (fp64 for fp64 inputs). Saved for backward: hidden [M, H], the weight
    (a parameter, not a copy), targets and the log-sum-exp [M].
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, compute_dtype: torch.dtype):
        acc = torch.promote_types(compute_dtype, torch.float32)
        w = weight.to(compute_dtype)
        m = hidden.shape[0]
        lse = torch.empty(m, dtype=acc, device=hidden.device)
        picked = torch.empty(m, dtype=acc, device=hidden.device)
        sums = torch.empty(m, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, m, chunk):
                rows = slice(start, start + chunk)
                logits = hidden[rows].to(compute_dtype) @ w.T
                sums[rows] = logits.sum(-1, dtype=acc)
                logits = logits.to(acc)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                picked[rows] = logits.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        ctx.mark_non_differentiable(sums)
        return picked - lse, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: Tensor, _grad_sums: Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        cd = ctx.compute_dtype
        w = weight.to(cd)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h = hidden[rows].to(cd)
                g = grad_logps[rows].to(lse.dtype).unsqueeze(-1)
                # d(x_target - lse)/dx = onehot(target) - softmax(x)
                grad = torch.exp((h @ w.T).to(lse.dtype) - lse[rows].unsqueeze(-1)).mul_(-g)
                grad.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
                grad = grad.to(cd)
                if grad_hidden is not None:
                    grad_hidden[rows] = (grad @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad.T @ h).to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_target_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(log p(targets[i] | hidden[i]) [M], detached logit row sums [M]) without an [M, V] tensor kept alive."""
    return _ChunkedLmHeadLogProb.apply(hidden, weight, targets, chunk, _compute_dtype(hidden))


def stats_from_targets(
    hidden_flat: Tensor,
    head: torch.nn.Module,
    src: Tensor,
    target_ids: Tensor,
    dst: Tensor,
    shape: tuple[int, int],
    chunk: int | None,
) -> TokenStats:
    """Per-target log-probs from ``hidden_flat[src]``, scattered to ``dst`` of a zero [2B, T] TokenStats.

    chunk: rows per lm-head chunk; ``None`` applies ``head`` to *every* row of ``hidden_flat`` at once (the
    un-chunked variant, kept for the ablation: full logits, then the target rows are picked).
    """
    if chunk is None:
        logits = head(hidden_flat).index_select(0, src)
        logps = _TargetLogProb.apply(logits, target_ids, max(1, (1 << 24) // logits.shape[-1]))
        sums = logits.detach().sum(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    else:
        logps, sums = chunked_target_logps(hidden_flat.index_select(0, src), head.weight, target_ids, chunk)
    n = shape[0] * shape[1]
    flat_logps = logps.new_zeros(n).index_put((dst,), logps)
    flat_sums = sums.new_zeros(n).index_put((dst,), sums.detach())
    return TokenStats(flat_logps.view(shape), flat_sums.view(shape), head.weight.shape[0])


def padded_targets(batch: Mapping[str, Tensor], nll_on_prompt: bool) -> Tensor:
    """Flat indices (into [2B, T]) of the positions some loss term reads, in the padded collate layout.

    Response tokens of every row, plus (with ``nll_on_prompt``) every real token of the chosen rows; never
    position 0 (it has no preceding logits).
    """
    needed = batch["response_mask"].bool().clone()
    if nll_on_prompt:
        b = int(batch["num_pairs"])
        needed[:b] |= batch["attention_mask"][:b].bool()
    needed[:, 0] = False
    return needed.flatten().nonzero().squeeze(-1)


def chunked_padded_token_stats(
    model: torch.nn.Module, batch: Mapping[str, Tensor], nll_on_prompt: bool, chunk: int
) -> TokenStats:
    """``TokenStatsFn`` for the padded layout: body on [2B, T], lm-head only on target positions, chunked."""
    body, head = causal_lm_parts(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = hidden.last_hidden_state
    shape = tuple(batch["input_ids"].shape)
    dst = padded_targets(batch, nll_on_prompt)
    ids = batch["input_ids"].flatten().index_select(0, dst)
    return stats_from_targets(hidden.reshape(-1, hidden.shape[-1]), head, dst - 1, ids, dst, shape, chunk)
