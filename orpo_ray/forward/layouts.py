"""Which collate and which lm-head path a run uses, from the ``efficiency`` config section.

One place that maps the switches to functions, so the training loop, evaluation and the benchmark agree:

    prefix_sharing / packing  -> ``packing.collate_packed`` + ``packing.packed_token_stats``
      + segment_attention     -> attention per segment (``segment_attention``), one row per batch
    chunked_lm_head only      -> ``collate.collate_pairs`` + ``chunked_lm_head.chunked_padded_token_stats``
    (chunked_lm_head's target rows go through ``liger_lm_head.liger_target_logps`` with ``lm_head: liger``)
    nothing                   -> ``collate.collate_pairs`` + ``logprobs.full_logits_token_stats``

Training takes the loss from ``make_policy_loss``: with chunked_lm_head and fused_loss, the lm-head computes it
(``fused_loss.fused_policy_loss`` on the same target rows); otherwise ``policy_forward`` + ``Objective.loss``.

Precision (bf16 autocast) is ``train.precision`` and applies on every path. Pure module: torch only.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from orpo_ray.config import Config
from orpo_ray.forward.chunked_lm_head import chunked_padded_token_stats, padded_lm_head_targets
from orpo_ray.forward.collate import collate_pairs
from orpo_ray.forward.liger_lm_head import liger_target_logps
from orpo_ray.forward.fused_loss import fused_policy_loss
from orpo_ray.forward.logprobs import TokenStatsFn, full_logits_token_stats, policy_forward
from orpo_ray.forward.matmul_shapes import row_multiple
from orpo_ray.forward.packing import collate_packed, packed_lm_head_targets, packed_token_stats


def uses_packed_layout(cfg: Config) -> bool:
    return cfg.efficiency.prefix_sharing or cfg.efficiency.packing


def matmul_rows(model: torch.nn.Module, precision: str, device: torch.device | str) -> int:
    """The multiple a packed row's length is rounded up to for ``model`` run at ``precision`` on ``device``, so its
    matmuls repeat their shapes where a new shape costs a kernel build (`matmul_shapes`); 1 elsewhere."""
    dtype = torch.bfloat16 if precision == "bf16" else next(model.parameters()).dtype  # as autocast_context runs it
    return row_multiple(device, dtype)


def make_collate(cfg: Config, pad_token_id: int, pad_to_multiple_of: int = 1) -> Callable[[object], dict]:
    """rows -> batch for ``policy_forward`` (the packed variants also carry the padded masks).

    pad_to_multiple_of: packed rows are padded to it (`matmul_rows` gives it); the padded layout is not."""
    e = cfg.efficiency
    if not uses_packed_layout(cfg):
        return partial(collate_pairs, pad_token_id=pad_token_id)
    # pack_length null: with segment attention the whole batch in one row (no padding at all; attention never
    # spans segments); under a dense block mask rows as long as the batch's longest segment (a row much longer
    # than its segments would spend L^2 work on masked-out blocks).
    pack_length = (e.pack_length or ("all" if e.segment_attention else "longest")) if e.packing else None
    return partial(collate_packed, pad_token_id=pad_token_id, prefix_sharing=e.prefix_sharing,
                   pack_length=pack_length, pad_to_multiple_of=pad_to_multiple_of)


def make_token_stats(cfg: Config, nll_on_prompt: bool) -> TokenStatsFn:
    """The ``token_stats`` argument of ``policy_forward`` matching ``make_collate``.

    nll_on_prompt: the objective's (``Objective.nll_on_prompt``); the packed and chunked paths compute prompt
    targets only when the NLL needs them.
    """
    e = cfg.efficiency
    chunk = e.lm_head_chunk_size if e.chunked_lm_head else None
    if e.chunked_lm_head and e.lm_head == "liger":  # Liger's fused kernel on the same target rows (GPU)
        chunk = liger_target_logps
    if uses_packed_layout(cfg):
        return partial(packed_token_stats, nll_on_prompt=nll_on_prompt, chunk=chunk, segments=e.segment_attention)
    if chunk is not None:
        return partial(chunked_padded_token_stats, nll_on_prompt=nll_on_prompt, chunk=chunk)
    return full_logits_token_stats


# (model, batch, nll_weight) -> (loss, detached metrics): one micro-batch's training loss
PolicyLossFn = Callable[[object, dict, float], tuple]


def make_policy_loss(cfg: Config, objective) -> PolicyLossFn:
    """The training loss of one micro-batch made by ``make_collate``, for ``objective`` (an ``Objective``)."""
    e = cfg.efficiency
    if e.chunked_lm_head and e.lm_head == "chunked" and e.fused_loss:
        nll_on_prompt = objective.nll_on_prompt
        if uses_packed_layout(cfg):
            targets = partial(packed_lm_head_targets, nll_on_prompt=nll_on_prompt, segments=e.segment_attention)
        else:
            targets = partial(padded_lm_head_targets, nll_on_prompt=nll_on_prompt)

        def fused(model, batch, nll_weight: float = 1.0):
            return fused_policy_loss(targets(model, batch), batch, objective, nll_weight, e.lm_head_chunk_size)

        return fused
    token_stats = make_token_stats(cfg, objective.nll_on_prompt)

    def unfused(model, batch, nll_weight: float = 1.0):
        return objective.loss(policy_forward(model, batch, objective.nll_on_prompt, token_stats=token_stats),
                              nll_weight)

    return unfused
