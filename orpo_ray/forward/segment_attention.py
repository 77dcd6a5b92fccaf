"""Attention one segment at a time over packed rows: no [L, L] mask over a row, no work across segments.

Why. Under one dense block mask (`packing.block_attention_mask`) attention over a packed row costs L^2 per head
and holds an [R, 1, L, L] mask, although only sum(s_i^2) of those scores are allowed; and rows must stay short
(the longest segment) so that waste stays bounded, which leaves padding in every row for the linear layers.
Here each segment runs the model's *own* attention function (sdpa, or the model's eager function with its
soft-cap, scaling and GQA handling) on its own slice of q, k, v. A purely causal segment (no prefix sharing)
needs no mask at all under sdpa (its is_causal kernel); a prefix-shared segment [prompt | chosen | rejected]
gets its own small [s, s] mask. Row length then costs nothing, so the whole batch goes into one row with no
padding (`layouts.make_collate`).

How it reaches the attention. transformers passes the model's extra forward keyword arguments down to every
attention call, and looks the attention function up by ``config._attn_implementation`` at each call. For the
one packed forward, `segment_attention` switches that name to `IMPLEMENTATION` (registered below) and the body
gets ``orpo_segments=Segments(...)``; a name without a mask function makes transformers build no mask. A
model that drops the keyword fails loudly here, and `fast_path` then falls back to the block mask.

Precision on CPU. Under bf16 (or fp16) autocast on a CPU, each sdpa segment runs PyTorch's CPU flash-attention
kernel in fp32 on inputs rounded to the autocast dtype, as autocast would round them (`_Fp32FlashAttention`).
Measured on the 8k bench (Intel Xeon with AMX, 2 threads): the kernel's *backward* took 3.9 ms per call in bf16
against 1.1 ms in fp32, 22% of the bf16 step, while the matmuls around it do gain from bf16. Backward keeps what
sdpa's own bf16 backward keeps (the bf16 inputs and output, the log-sum-exp) and upcasts them, so memory is that
of the bf16 path plus one fp32 copy of each prefix-shared segment's mask, shared by all layers. What the kernel
would not reproduce stays on transformers' sdpa function under autocast: attention dropout, a position bias, a
soft-cap; so does the eager base (Gemma 2's soft-cap), whose large matmuls gain from bf16.

Pure module: torch and transformers only.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from orpo_ray.lean_imports import import_model_code

import_model_code()  # before transformers' model code loads: 110 MB less in every training process

from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

SEGMENTS_KWARG = "orpo_segments"
IMPLEMENTATION = "orpo_segments"
BASES = ("sdpa", "eager")  # take a custom mask per call (flash kernels cannot take the prefix-shared mask)


@dataclass(frozen=True)
class Segments:
    """Where each segment sits in the packed rows, and what the base attention needs for it."""

    base: str                                # the model's own implementation: "sdpa" or "eager"
    spans: tuple[tuple[int, int, int], ...]  # (row, start, end) of every segment, row by row in order
    masks: tuple[Tensor | None, ...]         # per span: [1, 1, s, s] in the form `base` takes, or None (causal)
    # `_Fp32FlashAttention`'s additive fp32 form of a bool mask, made on first use and shared by every layer (a
    # copy per layer, kept for backward, would hold four bytes per score per layer)
    fp32_masks: dict = field(default_factory=dict, compare=False, repr=False)

    def fp32_mask(self, index: int) -> Tensor | None:
        mask = self.masks[index]
        if mask is None or mask.dtype != torch.bool:
            return mask
        if index not in self.fp32_masks:
            self.fp32_masks[index] = additive_mask(mask, torch.float32)
        return self.fp32_masks[index]


def segment_spans(segment: Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each run of one segment id in ``segment`` [R, L] (-1 = padding, skipped)."""
    seg = segment.detach().cpu()
    flat = seg.flatten()
    width = seg.shape[1]
    # A run starts where the id changes or a row starts.
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::width] = True
    begin = starts.nonzero().squeeze(-1).tolist()
    end = begin[1:] + [flat.numel()]
    ids = flat[begin].tolist() if begin else []
    return [(b // width, b % width, b % width + (e - b)) for b, e, k in zip(begin, end, ids) if k >= 0]


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = may attend) as eager attention takes it: eager *adds* the mask to the scores, so it
    needs 0 / -inf-like floats (a bool mask there would add 1 to allowed scores and mask nothing, silently)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def build_segments(segment: Tensor, branch: Tensor, base: str, mask_dtype: torch.dtype) -> Segments:
    """`Segments` for a ``collate_packed`` batch; ``mask_dtype``: the dtype of eager's additive masks."""
    if base not in BASES:
        raise ValueError(f"segment attention runs on {BASES} attention, not {base!r}")
    spans = segment_spans(segment)
    on_host = branch.detach().cpu()  # one device sync per step, not one per segment
    masks = []
    for row, start, end in spans:
        one_sequence = bool((on_host[row, start:end] == 0).all())
        if one_sequence and base == "sdpa":  # plain causal attention: sdpa's is_causal kernel, no mask
            masks.append(None)
            continue
        br = branch[row, start:end]
        allowed = torch.ones(end - start, end - start, dtype=torch.bool, device=branch.device).tril_()
        if not one_sequence:  # prompt (0) visible to all; a response branch sees only itself beyond the prompt
            allowed &= (br.unsqueeze(0) == 0) | (br.unsqueeze(0) == br.unsqueeze(1))
        masks.append((additive_mask(allowed, mask_dtype) if base == "eager" else allowed)[None, None])
    return Segments(base, tuple(spans), tuple(masks))


def _fp32_kernel_applies(query: Tensor, base: str, kwargs: dict) -> bool:
    """Whether this sdpa call runs through `_Fp32FlashAttention` (see the module docstring)."""
    if base != "sdpa" or query.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    if torch.get_autocast_dtype("cpu") not in (torch.bfloat16, torch.float16):
        return False
    # What transformers' sdpa function would do beyond plain attention (dropout, a position bias, a soft-cap)
    # stays with it; those are the only keywords that change its result.
    return not (kwargs.get("dropout") or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None)


class _Fp32FlashAttention(torch.autograd.Function):
    """PyTorch's CPU flash attention in fp32 on [1, heads, s, d] inputs already rounded to the autocast dtype;
    returns the output in that dtype, as autocast would. Backward takes what sdpa's own bf16 backward takes (the
    inputs, the rounded output, the log-sum-exp; no recomputation) and runs the fp32 kernel on it.
    ``mask``: additive fp32 [1, 1, s, s], or None for causal."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.float(), key.float(), value.float(), 0.0, mask is None, attn_mask=mask, scale=scale)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), query.float(), key.float(), value.float(), out.float(), lse, 0.0, ctx.mask is None,
            attn_mask=ctx.mask, scale=ctx.scale)
        return (*(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None)


def _fp32_sdpa(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
               kwargs: dict) -> Tensor:
    """transformers' sdpa attention for one segment ([1, heads, s, d] -> [1, s, heads, d]) through
    `_Fp32FlashAttention`: its GQA (key/value heads repeated), its scaling, causal where there is no mask.
    ``mask``: additive fp32 (`Segments.fp32_mask`), or None for a causal segment."""
    dtype = torch.get_autocast_dtype("cpu")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    out = _Fp32FlashAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), mask, kwargs.get("scaling"))
    return out.transpose(1, 2)


def _base_function(module: torch.nn.Module, base: str):
    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # transformers' eager attention is each model file's own function (soft-capping, scaling variants live there).
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}'s module has no eager_attention_forward to run per segment")
    return fn


def segmented_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """The transformers attention-function contract (q, k, v: [B, heads, L, d] -> [B, L, heads, d]),
    computed segment by segment; positions outside every segment (row padding) get zeros."""
    segments: Segments | None = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        raise RuntimeError(f"attention {IMPLEMENTATION!r} was called without {SEGMENTS_KWARG}=: the model did not "
                           "pass its forward's keyword arguments to its attention")
    base = _base_function(module, segments.base)
    fp32_kernel = _fp32_kernel_applies(query, segments.base, kwargs)
    rows, length = query.shape[0], query.shape[2]
    by_row: list[list[tuple[int, int, int]]] = [[] for _ in range(rows)]
    for index, (row, start, end) in enumerate(segments.spans):
        by_row[row].append((start, end, index))
    outputs = []
    for row, spans in enumerate(by_row):
        # One split per row and tensor, not a slice per segment: a slice's backward writes its gradient into a
        # zero tensor the size of the whole row (one per segment, then all summed); a split's is one concatenation.
        sizes, kept, filled = [], [], 0
        for start, end, index in spans:
            if start > filled:
                sizes.append(start - filled)
            kept.append((len(sizes), index))
            sizes.append(end - start)
            filled = end
        if filled < length:
            sizes.append(length - filled)
        q, k, v = ((t if rows == 1 else t[row:row + 1]).split(sizes, dim=2) for t in (query, key, value))
        pieces: list[Tensor | int] = list(sizes)  # a gap stays its length until zeros of the right shape exist
        for i, index in kept:
            if fp32_kernel:
                pieces[i] = _fp32_sdpa(module, q[i], k[i], v[i], segments.fp32_mask(index), kwargs)
            else:
                pieces[i], _ = base(module, q[i], k[i], v[i], segments.masks[index], **kwargs)
        outputs.append(pieces)
    template = next(p for pieces in outputs for p in pieces if isinstance(p, Tensor))
    return torch.cat([torch.cat([p if isinstance(p, Tensor) else template.new_zeros(1, p, *template.shape[2:])
                                 for p in pieces], dim=1) for pieces in outputs], dim=0), None


AttentionInterface.register(IMPLEMENTATION, segmented_attention_forward)


@contextmanager
def segment_attention(body: torch.nn.Module, segment: Tensor, branch: Tensor) -> Iterator[dict]:
    """Run ``body`` segment by segment inside this block: yields the keyword arguments for its forward."""
    config = body.config
    base = config._attn_implementation
    dtype = next(body.parameters()).dtype
    segments = build_segments(segment, branch, base, dtype)
    config._attn_implementation = IMPLEMENTATION
    try:
        yield {SEGMENTS_KWARG: segments}
    finally:
        config._attn_implementation = base
