"""Prefix sharing and packing: compute each prompt once and no padding (arXiv 2410.20305 for the former).

Layout. A pair becomes one *segment* ``[prompt | chosen | rejected]`` (prefix sharing) or two segments
``[prompt | chosen]``, ``[prompt | rejected]`` (no sharing). Segments go into rows of ``pack_length`` tokens,
first-fit by decreasing length (``packing``), or one pair per row padded to the longest (no packing).
A boolean 4-D mask [R, 1, L, L] (True = may attend) lets a token see earlier tokens of its own segment whose
*branch* is the prompt (0) or its own branch (chosen 1 / rejected 2): the rejected part sees the prompt but not
the chosen part. Position ids restart for the rejected part at ``len(prompt)``, so each response gets exactly
the positions and context it has in the padded layout; the prompt's states are the same either way (causal).

Targets. The log-prob of a response token comes from the hidden state before it; for the first rejected token
that is the last *prompt* token, not the previous index. The batch therefore carries explicit ``src`` (flat
index into [R * L] hidden states), ``ids`` (target token) and ``dst`` (flat index into the padded [2B, T]
layout of ``collate.collate_pairs``). The padded masks travel along unchanged, so ``policy_forward`` and
``logprobs.outputs_from_token_stats`` treat both layouts alike and give the same losses.

Pure module: torch only.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from orpo_ray.forward.chunked_lm_head import LmHeadTargets, causal_lm_parts, stats_from_targets
from orpo_ray.forward.collate import collate_pairs, pair_rows
from orpo_ray.forward.logprobs import TokenStats
from orpo_ray.forward.matmul_shapes import padded_rows
from orpo_ray.forward.segment_attention import additive_mask, segment_attention

PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_segment", "packed_branch",
               "target_src", "target_ids", "target_dst", "target_is_prompt")


def _segments(rows: list[tuple[list, list, list]], prefix_sharing: bool) -> list[tuple[int, list, list, list]]:
    """(pair index, token ids, position ids, branch ids) for each segment."""
    out = []
    for i, (p, c, r) in enumerate(rows):
        n = len(p)
        if prefix_sharing:
            out.append((i, p + c + r, list(range(n + len(c))) + list(range(n, n + len(r))),
                        [0] * n + [1] * len(c) + [2] * len(r)))
        else:
            for resp in (c, r):
                out.append((i, p + resp, list(range(n + len(resp))), [0] * (n + len(resp))))
    return out


def _assign_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Segment indices per row: first-fit decreasing into rows of ``capacity``; ``None``: one per row."""
    if capacity is None:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        if lengths[i] > capacity:
            raise ValueError(f"a segment of {lengths[i]} tokens does not fit pack_length={capacity}")
        slot = next((k for k, f in enumerate(free) if f >= lengths[i]), None)
        if slot is None:
            rows.append([]), free.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def collate_packed(batch, pad_token_id: int, prefix_sharing: bool = True,
                   pack_length: int | str | None = None, pad_to_multiple_of: int | None = None) -> dict:
    """The padded batch of ``collate.collate_pairs`` plus the packed/prefix-shared layout described above.

    pack_length: tokens per row when packing; ``"longest"`` uses the longest segment of this batch; ``"all"``
        puts every segment into one row without padding (for `segment_attention`, where row length costs
        nothing); ``None`` puts one pair (or one sequence) per row.
    pad_to_multiple_of: rows padded to a multiple of this (a smaller one for short rows: `matmul_shapes.padded_rows`),
        unless ``pack_length`` is a number of tokens; the pad positions are outside every segment. So the model's
        matmuls see few shapes (`matmul_shapes`).
    """
    rows = pair_rows(batch)
    padded = collate_pairs(batch, pad_token_id)
    b, t = padded["input_ids"].shape[0] // 2, padded["input_ids"].shape[1]
    segs = _segments(rows, prefix_sharing)
    longest = max(len(s[1]) for s in segs)
    fixed_length = isinstance(pack_length, int)
    pack_length = {"longest": longest, "all": sum(len(s[1]) for s in segs)}.get(pack_length, pack_length)
    layout = _assign_rows([len(s[1]) for s in segs], pack_length)
    width = pack_length or longest
    if pad_to_multiple_of and not fixed_length:
        width = padded_rows(width, pad_to_multiple_of)
    r = len(layout)
    ids = torch.full((r, width), pad_token_id, dtype=torch.long)
    pos = torch.zeros((r, width), dtype=torch.long)
    segment = torch.full((r, width), -1, dtype=torch.long)
    branch = torch.zeros((r, width), dtype=torch.long)
    src, tgt, dst, is_prompt = [], [], [], []
    for row, members in enumerate(layout):
        offset = 0
        for k in members:
            pair, toks, positions, branches = segs[k]
            n, p = len(toks), len(rows[pair][0])
            base = row * width + offset
            ids[row, offset:offset + n] = torch.tensor(toks)
            pos[row, offset:offset + n] = torch.tensor(positions)
            segment[row, offset:offset + n] = k
            branch[row, offset:offset + n] = torch.tensor(branches)
            # Which padded row each part of this segment belongs to: chosen = pair, rejected = B + pair.
            parts = []
            if prefix_sharing:
                c = len(rows[pair][1])
                parts = [(pair, p, c), (b + pair, p + c, len(rows[pair][2]))]
            else:
                parts = [(pair if k % 2 == 0 else b + pair, p, n - p)]  # segments 2i, 2i+1: chosen, rejected
            for padded_row, start, length in parts:
                for j in range(length):  # response token j of this part sits at index start + j
                    src.append(base + (p - 1 if j == 0 else start + j - 1))
                    tgt.append(toks[start + j])
                    dst.append(padded_row * t + p + j)
                    is_prompt.append(False)
            if prefix_sharing or k % 2 == 0:  # prompt targets once per pair, into the chosen row
                for j in range(1, p):
                    src.append(base + j - 1), tgt.append(toks[j]), dst.append(pair * t + j), is_prompt.append(True)
            offset += n
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    padded.update(packed_input_ids=ids, packed_position_ids=pos, packed_segment=segment, packed_branch=branch,
                  target_src=as_long(src), target_ids=as_long(tgt), target_dst=as_long(dst),
                  target_is_prompt=torch.tensor(is_prompt, dtype=torch.bool))
    return padded


def block_attention_mask(segment: Tensor, branch: Tensor) -> Tensor:
    """[R, 1, L, L] bool: same segment, key not after query, key branch is the prompt or the query's branch.

    Padding positions (segment -1) attend only to themselves, so no softmax row is empty (an all-masked row
    gives NaN in sdpa, which would then leak into gradients through 0 * NaN).
    """
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    same = segment.unsqueeze(2) == segment.unsqueeze(1)
    branch_ok = (branch.unsqueeze(1) == 0) | (branch.unsqueeze(1) == branch.unsqueeze(2))
    mask = same & branch_ok & causal & (segment.unsqueeze(2) >= 0)
    mask |= torch.eye(length, dtype=torch.bool, device=segment.device)
    return mask.unsqueeze(1)


def mask_for_attention(mask: Tensor, body: torch.nn.Module) -> Tensor:
    """The block mask in the form the body's attention takes as-is: transformers passes a 4-D mask through
    unchanged, sdpa reads a bool mask, eager an additive one (`segment_attention.additive_mask`)."""
    impl = getattr(getattr(body, "config", None), "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return mask
    return additive_mask(mask, next(body.parameters()).dtype)


def packed_lm_head_targets(model: torch.nn.Module, batch: Mapping[str, Tensor], nll_on_prompt: bool,
                           segments: bool = False) -> LmHeadTargets:
    """One body pass over the packed rows; the targets are the positions some loss term reads.

    segments: attention segment by segment (`segment_attention`) instead of under the dense block mask."""
    body, head = causal_lm_parts(model)
    inputs = {"input_ids": batch["packed_input_ids"], "position_ids": batch["packed_position_ids"], "use_cache": False}
    if segments:
        with segment_attention(body, batch["packed_segment"], batch["packed_branch"]) as extra:
            hidden = body(**inputs, **extra).last_hidden_state
    else:
        mask = mask_for_attention(block_attention_mask(batch["packed_segment"], batch["packed_branch"]), body)
        hidden = body(**inputs, attention_mask=mask).last_hidden_state
    keep = slice(None) if nll_on_prompt else ~batch["target_is_prompt"]
    src, ids, dst = (batch[k][keep] for k in ("target_src", "target_ids", "target_dst"))
    return LmHeadTargets(hidden.reshape(-1, hidden.shape[-1]), head, src, ids, dst, tuple(batch["input_ids"].shape))


def packed_token_stats(
    model: torch.nn.Module, batch: Mapping[str, Tensor], nll_on_prompt: bool, chunk: int | None,
    segments: bool = False,
) -> TokenStats:
    """``TokenStatsFn`` for ``collate_packed`` batches: `packed_lm_head_targets`, then the lm-head on the target
    positions (chunked unless ``chunk`` is None), scattered into the padded [2B, T] layout."""
    return stats_from_targets(packed_lm_head_targets(model, batch, nll_on_prompt, segments), chunk)
