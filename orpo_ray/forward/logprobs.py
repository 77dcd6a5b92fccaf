"""Model + padded batch -> per-sequence mean log-probs, response lengths and the SFT NLL (an objective's inputs).

The batch layout is the one in docs/architecture.md: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` are
prompt+rejected, right-padded; ``response_mask`` marks response tokens (EOS included). The log-prob of the token
at position t comes from the logits at t-1, so position 0 is never a target.

The work is split in two so a memory-saving lm-head variant can slot in later:

1. a *token-stats* function ``(model, batch) -> TokenStats`` runs the model and reduces the vocabulary axis away
   (per-position target log-prob and logit sum). ``full_logits_token_stats`` materialises the logits once; a
   chunked variant would apply the lm-head to slices of hidden states and never hold [N, T, V].
2. ``outputs_from_token_stats`` turns those [N, T] tensors into ``PolicyOutputs`` using only the masks.

Pure module: torch only (no ray / deepspeed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch
from torch import Tensor

# Rows of logits processed at once when reducing over the vocabulary; bounds the fp32 temporary to about
# _CHUNK_ELEMENTS * 4 bytes (64 MiB) whatever the dtype, batch size or vocabulary.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class PolicyOutputs:
    """What an objective (``orpo_ray.objectives``) needs from one forward pass over B preference pairs.

    chosen_logps / rejected_logps: [B] fp32, differentiable; mean log p over each response's tokens.
    chosen_tokens / rejected_tokens: [B] fp32 response token counts (targets); mean x count is the summed
        log-prob that CPO compares. None only where a test builds outputs by hand without them.
    nll: 0-d fp32, differentiable; token-mean NLL of the chosen rows (response only, or prompt+response).
    chosen_logits_mean / rejected_logits_mean: 0-d fp32, detached; mean logit over response positions x vocab
        (for logging only, TRL's ``logits/chosen`` / ``logits/rejected``).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    nll: Tensor
    chosen_logits_mean: Tensor
    rejected_logits_mean: Tensor
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None


class TokenStats(NamedTuple):
    """Per-position results of the lm-head, vocabulary already reduced away.

    logps: [N, T] fp32, differentiable; entry t = log p(input_ids[:, t] | tokens < t), entry 0 = 0.
    logit_sums: [N, T] fp32, detached; entry t = sum over the vocabulary of the logits at t-1 (entry 0 = 0).
    vocab_size: V, to turn logit sums into means.
    """

    logps: Tensor
    logit_sums: Tensor
    vocab_size: int


TokenStatsFn = Callable[[torch.nn.Module, Mapping[str, Tensor]], TokenStats]


def _accumulate_dtype(t: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (so float64 gradcheck is meaningful)."""
    return torch.promote_types(t.dtype, torch.float32)


class _TargetLogProb(torch.autograd.Function):
    """log_softmax(logits)[i, targets[i]] for 2-D logits [M, V], reducing V in fp32 row chunks.

    Why a custom Function: autograd through ``logits.float().log_softmax(-1)`` keeps an fp32 [M, V] tensor
    alive until backward (a full extra copy when the model runs in bf16). Here forward saves only the logits
    (held anyway) and the fp32 log-sum-exp [M]; backward recomputes the softmax chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        acc = _accumulate_dtype(logits)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for start in range(0, logits.shape[0], chunk_rows):
            lse[start : start + chunk_rows] = torch.logsumexp(logits[start : start + chunk_rows].to(acc), dim=-1)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(acc)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_rows = chunk_rows
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        step = ctx.chunk_rows
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            g = grad_out[rows].to(lse.dtype).unsqueeze(-1)
            # d(x_target - lse)/dx = onehot(target) - softmax(x)
            grad = torch.exp(logits[rows].to(lse.dtype) - lse[rows].unsqueeze(-1)).mul_(-g)
            grad.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
            grad_logits[rows] = grad.to(logits.dtype)
        return grad_logits, None, None


def target_logps(logits: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """log_softmax(logits)[i, targets[i]] [M] fp32 for 2-D logits [M, V], without an fp32 [M, V] copy kept."""
    rows = chunk_rows or max(1, _CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    return _TargetLogProb.apply(logits, targets, rows)


def _shift_right(per_next: Tensor) -> Tensor:
    """[N, T] "about token t+1" -> [N, T] "about token t" with a 0 in column 0 (position 0 is never a target)."""
    return torch.cat([per_next.new_zeros(per_next.shape[0], 1), per_next[:, :-1]], dim=1)


def _flat_next_tokens(logits: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten positions without copying logits: every position t is paired with input_ids[:, t+1].

    Slicing ``logits[:, :-1]`` and flattening would copy [N, T, V]; instead all T positions are used and the
    last one (which has no next token) gets a dummy target that ``_shift_right`` drops.
    """
    next_ids = torch.cat([input_ids[:, 1:], input_ids.new_zeros(input_ids.shape[0], 1)], dim=1)
    return logits.reshape(-1, logits.shape[-1]), next_ids.reshape(-1)


def token_logps(logits: Tensor, input_ids: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Per-token log-probs [N, T] fp32: entry t = log p(input_ids[:, t] | tokens < t) from logits[:, t-1]; entry 0 = 0.

    logits: [N, T, V] in any float dtype (bf16 is reduced in fp32 chunk by chunk, never copied whole).
    chunk_rows: positions reduced at once; default keeps each fp32 temporary near 64 MiB.
    """
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree")
    n, t, _ = logits.shape
    flat_logits, flat_next = _flat_next_tokens(logits, input_ids)
    per_next = target_logps(flat_logits, flat_next, chunk_rows).view(n, t)
    return _shift_right(per_next)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = -1) -> Tensor:
    """Mean of ``values`` where ``mask`` is true, along ``dim`` (``None``: over everything).

    An all-false slice gives 0, not NaN (denominator clamped to 1); the tokenize contract guarantees at least
    one response token per row, so this only guards against malformed batches poisoning a whole step.
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def full_logits_token_stats(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> TokenStats:
    """Default ``TokenStatsFn``: one ordinary forward pass, logits [N, T, V] materialised once."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # sum(dtype=fp32) accumulates in fp32 without materialising an fp32 copy of the logits.
    logit_sums = _shift_right(logits.detach().sum(-1, dtype=_accumulate_dtype(logits)))
    return TokenStats(token_logps(logits, batch["input_ids"]), logit_sums, logits.shape[-1])


def _target_response_mask(batch: Mapping[str, Tensor]) -> Tensor:
    """[2B, T] bool: response tokens that are targets (position 0 has no preceding logits, whatever the masks say)."""
    response = batch["response_mask"].bool().clone()
    response[:, 0] = False
    return response


def nll_target_mask(batch: Mapping[str, Tensor], nll_on_prompt: bool = False) -> Tensor:
    """[B, T] bool: the chosen rows' tokens the SFT NLL averages over (the response, or every real token from
    position 1 with ``nll_on_prompt``). Needs only the masks, so a step can count its tokens before any forward."""
    b = int(batch["num_pairs"])
    if not nll_on_prompt:
        return _target_response_mask(batch)[:b]
    mask = batch["attention_mask"][:b].bool().clone()
    mask[:, 0] = False
    return mask


def outputs_from_token_stats(
    stats: TokenStats, batch: Mapping[str, Tensor], nll_on_prompt: bool = False
) -> PolicyOutputs:
    """Reduce per-token stats to ``PolicyOutputs`` using the batch masks (see module docstring for the layout)."""
    b = int(batch["num_pairs"])
    response = _target_response_mask(batch)

    seq_logps = masked_mean(stats.logps, response, dim=-1)
    seq_tokens = response.sum(-1).to(seq_logps.dtype)
    # NLL is pooled over tokens (not a mean of per-row means), as cross-entropy over the chosen rows would be.
    nll_mask = nll_target_mask(batch, nll_on_prompt)
    nll = -masked_mean(stats.logps[:b], nll_mask, dim=None)

    def logits_mean(rows: slice) -> Tensor:
        return masked_mean(stats.logit_sums[rows], response[rows], dim=None).detach() / stats.vocab_size

    return PolicyOutputs(
        chosen_logps=seq_logps[:b],
        rejected_logps=seq_logps[b:],
        nll=nll,
        chosen_logits_mean=logits_mean(slice(0, b)),
        rejected_logits_mean=logits_mean(slice(b, None)),
        chosen_tokens=seq_tokens[:b],
        rejected_tokens=seq_tokens[b:],
    )


def policy_forward(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    nll_on_prompt: bool = False,
    token_stats: TokenStatsFn = full_logits_token_stats,
) -> PolicyOutputs:
    """Run ``model`` on the padded chosen+rejected batch and return an objective's inputs.

    nll_on_prompt: False (default, the paper's L_SFT) averages the NLL over the chosen responses only; True
        averages it over every real token of the chosen rows from position 1 on (prompt + response), as TRL does.
    token_stats: how to run the model and reduce the vocabulary; the default materialises full logits.
    """
    if batch["input_ids"].shape[0] != 2 * int(batch["num_pairs"]):
        raise ValueError(f"expected 2 * num_pairs rows, got {batch['input_ids'].shape[0]} for {batch['num_pairs']}")
    return outputs_from_token_stats(token_stats(model, batch), batch, nll_on_prompt)
