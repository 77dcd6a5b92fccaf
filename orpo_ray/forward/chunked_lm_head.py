"""Chunked lm-head: target log-probs straight from hidden states, never holding [N, T, V] logits.

The plain path (``logprobs.full_logits_token_stats``) runs the whole model and gets logits for every position
of every row, then reduces the vocabulary. Two things are wasted there: positions whose log-prob no loss term
reads (the prompt, unless ``nll_on_prompt``; padding), and memory for a [N, T, V] tensor plus its gradient.

Here the model body gives hidden states; only the *target* positions are gathered (``src`` indices into the
flattened hidden states), and ``_ChunkedLmHeadLogProb`` applies the lm-head to ``chunk`` of them at a time:
forward keeps only the log-sum-exp per target, backward recomputes each chunk's logits and accumulates the
gradients of the hidden states, the weight and the bias chunk by chunk. Peak extra memory is ~ chunk x V floats.

Model families differ in what follows ``hidden @ W.T``: a bias (Phi-2), a logit multiplier (Cohere's
``logit_scale``) or divisor (Granite's ``logits_scaling``), a final tanh soft-cap (Gemma 2/3's
``final_logit_softcapping``). `LmHead` carries those, read from the model's config; `forward.fast_path`
checks at load that it reproduces the model's own logits and turns the switch off when it does not.

``stats_from_targets`` scatters the per-target results back into the padded [2B, T] layout of
``collate.collate_pairs`` (``dst`` indices), so ``logprobs.outputs_from_token_stats`` is shared by every path.

Pure module: torch only (and `orpo_ray.allocator`'s question to the process's malloc).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from orpo_ray.allocator import jemalloc_keeps_freed_pages
from orpo_ray.forward.logprobs import TokenStats, target_logps
from orpo_ray.forward.matmul_shapes import round_up, row_multiple


@dataclass(frozen=True)
class LmHead:
    """logits = softcap(((hidden @ weight.T + bias) * multiplier) / divisor), as the model's forward computes them.

    softcap: ``None``, or c for ``c * tanh(x / c)``.
    """

    weight: Tensor
    bias: Tensor | None = None
    multiplier: float = 1.0
    divisor: float = 1.0
    softcap: float | None = None

    @property
    def post(self) -> tuple[float, float | None]:
        """(scale applied to the matmul output, soft-cap) for the autograd function."""
        return self.multiplier / self.divisor, self.softcap

    def logits(self, hidden: Tensor) -> Tensor:
        """All logits at once, the way the model's own head would produce them (the un-chunked ablation)."""
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        return _apply_post(z, *self.post)


def _apply_post(z: Tensor, scale: float, softcap: float | None) -> Tensor:
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _apply_post_(z: Tensor, scale: float, softcap: float | None) -> Tensor:
    """`_apply_post` in place (``z`` is a fresh, non-leaf chunk of logits)."""
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


class _ChunkBuffers:
    """The chunk-sized tensors of one lm-head call, allocated once and reused by every chunk.

    Why: a chunk's logits are big (1,024 x 8,192 fp32 = 32 MiB; x 32,000 = 125 MiB), above glibc's largest mmap
    threshold, so a fresh tensor per chunk is a fresh mmap that page-faults in every time. Measured on a 2-core
    EPYC: [1024, 256] x [256, 8192] took 55 ms into a new fp32 tensor and 41 ms into a reused one; in bf16 the
    product plus its fp32 copy took 20-23 ms fresh and 8 ms into reused buffers.

    logits: [min(m, chunk), V] in the accumulation dtype; low: the same in the matmul's dtype when that is
    narrower (bf16): the product lands there, is copied up into ``logits``, and later holds the chunk's logit
    gradient cast down for the backward matmuls; `weight_product`: the weight gradient's per-chunk product in
    the matmul's dtype and widened to the accumulator's (an in-place add of a bf16 tensor to an fp32 one would
    make a fresh fp32 copy of it each time).
    """

    # (key, buffers) of the last call on a CPU, reused by the next call with the same key (see `for_call`)
    _kept: tuple[tuple, "_ChunkBuffers"] | None = None

    @classmethod
    def for_call(cls, m: int, chunk: int, w: Tensor, acc: torch.dtype) -> "_ChunkBuffers":
        """Buffers for one lm-head call over ``m`` rows. On a CPU, those of the previous call when the weight's shape,
        the dtypes and the chunk size are the same (then sized for a whole chunk, whatever ``m`` is), until
        `release_chunk_buffers`.

        Why: glibc's malloc, and jemalloc under its own defaults, hand the pages of every freed tensor of 8 MB or
        more back to the OS at once, so each fresh chunk buffer page-faults in again, at ~2 us a page on the VMs
        measured (a 32 MB tensor allocated and freed in a loop: 8,192 faults each time). Under a malloc that keeps
        freed pages itself (the workers' jemalloc, `orpo_ray.allocator.JEMALLOC_CONF`) nothing is kept here: the
        freed buffer's pages serve the backward's next allocations, which lowered the 32k in-process leg's peak RSS
        from 1,363-1,381 to 1,334 MB (two runs each, same speed). Under jemalloc's defaults, kept between calls, the
        in-process bf16 leg of the 32k bench went from 5.60, 5.37, 5.60 to 6.60, 6.27, 6.38 pairs/s (1.54 M to 1.14-1.27 M
        minor faults; peak RSS 1,464-1,468 MB against 1,472-1,475), the 8k one from 18.25, 22.71, 18.43, 16.78 to
        21.18, 19.79, 19.01, 21.27 (alternating runs, Intel Xeon). The peak does not grow: the buffers exist at
        each step's peak (the end of the forward) either way. On a GPU the caching allocator already reuses memory."""
        if w.device.type != "cpu" or malloc_keeps_freed_pages():
            return cls(m, chunk, w, acc)
        key = (tuple(w.shape), w.dtype, acc, chunk)
        if cls._kept is None or cls._kept[0] != key:
            cls._kept = None  # the old buffers go before the new ones come
            cls._kept = (key, cls(chunk, chunk, w, acc))
        return cls._kept[1]

    def __init__(self, m: int, chunk: int, w: Tensor, acc: torch.dtype):
        self.multiple = row_multiple(w.device, w.dtype)
        rows = round_up(min(m, chunk), self.multiple)
        self.logits = torch.empty(rows, w.shape[0], dtype=acc, device=w.device)
        self.low = None if w.dtype == acc else torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device)
        # The chunk's matmul inputs padded with zero rows (`staged`), where matmul shapes cost a kernel build: only
        # under a narrower matmul dtype than the accumulator's, so the logit gradient always passes through ``low``.
        self.inputs = None
        if self.multiple > 1:
            assert self.low is not None, "padded lm-head rows need the narrow-dtype buffer"
            self.inputs = torch.empty(rows, w.shape[1], dtype=w.dtype, device=w.device)
        self._weight_product: tuple[Tensor, Tensor] | None = None

    def staged(self, h: Tensor) -> Tensor:
        """The chunk's hidden states [n, H] as the matmuls take them: followed by zero rows up to a multiple of
        `multiple` (`matmul_shapes`: the products then repeat their shapes from chunk to chunk), else ``h``."""
        if self.inputs is None:
            return h
        n, padded = h.shape[0], round_up(h.shape[0], self.multiple)
        self.inputs[:n].copy_(h)
        self.inputs[n:padded].zero_()
        return self.inputs[:padded]

    def low_grad(self, grad: Tensor) -> Tensor:
        """A chunk's logit gradient [n, V] cast down into ``low``, with the pad rows `staged` adds. Those rows
        still hold this chunk's product of the staged zero rows (the bias, or zeros: finite), and meet only those
        zero rows in the weight's product and rows dropped from the hidden states' gradient: not zeroed again."""
        n = grad.shape[0]
        self.low[:n].copy_(grad)
        return self.low[:round_up(n, self.multiple)]

    def weight_product(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """([V, H] in w's dtype, [V, H] in the accumulation dtype) for `_InputGrads.add`, which calls this only after the chunk's
        logit gradient was cast down into ``low``: ``logits`` is dead until the next chunk's product, so both
        live in its memory when it is big enough (H <= 2/3 of the chunk's rows for bf16 and fp32). They are
        taken at the end of the forward, when the activations peak: 98 MB saved there at V=32,000, H=512."""
        if self._weight_product is None:
            v, h = w.shape
            wide_bytes, low_bytes = v * h * self.logits.element_size(), v * h * w.element_size()
            flat = self.logits.view(-1)
            if flat.numel() * flat.element_size() >= wide_bytes + low_bytes:
                low = flat[v * h:].view(torch.uint8)[:low_bytes].view(w.dtype).view(v, h)
                self._weight_product = (low, flat[: v * h].view(v, h))
            else:
                self._weight_product = (torch.empty_like(w), torch.empty_like(w, dtype=self.logits.dtype))
        return self._weight_product


@functools.cache
def malloc_keeps_freed_pages() -> bool:
    """Whether this process's malloc keeps freed pages for reuse (asked once: it cannot change while it runs)."""
    return bool(jemalloc_keeps_freed_pages())


def release_chunk_buffers() -> None:
    """Free the lm-head buffers `_ChunkBuffers.for_call` keeps between calls (the loop calls it when training ends)."""
    _ChunkBuffers._kept = None


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, post: tuple[float, float | None],
                  buffers: _ChunkBuffers) -> Tensor:
    """post(h @ w.T + b) in the accumulation dtype, in ``buffers.logits[:len(h)]``.

    The product is what ``linear(h, w, b)`` computes (addmm / mm, in the matmul's dtype), then widened."""
    rows = h.shape[0]
    h = buffers.staged(h)
    logits = buffers.logits[:rows]
    product = logits if buffers.low is None else buffers.low[:h.shape[0]]
    if b is None:
        torch.mm(h, w.t(), out=product)
    else:
        torch.addmm(b, h, w.t(), out=product)
    if product is not logits:
        logits.copy_(product[:rows])
    return _apply_post_(logits, *post)


def _logsumexp_(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log(sum(exp(logits), -1)), the row maxima), overwriting ``logits`` with exp(logits - row max).

    torch.logsumexp allocates a chunk-sized temporary per call (and glibc page-faults a fresh 32 MB one in each
    time); here the chunk's own buffer is reused. What is left in it is the softmax up to a per-row factor
    exp(max - lse), which `_FusedPreferenceLoss` turns into the gradient without recomputing the logits."""
    top = logits.amax(-1, keepdim=True)
    top.masked_fill_(~torch.isfinite(top), 0.0)  # an all -inf row gives -inf, not NaN (as torch.logsumexp)
    top = top.squeeze(-1)
    return logits.sub_(top.unsqueeze(-1)).exp_().sum(-1).log_().add_(top), top


def _logit_grad_(probs: Tensor, targets: Tensor, g: Tensor, logits: Tensor | None,
                 post: tuple[float, float | None]) -> Tensor:
    """d(sum_i g_i log_softmax(post(z))_i[target_i]) / dz for one chunk, written over ``probs`` (its softmax).

    logits: the chunk's post-processed logits x, needed only for a soft-cap's derivative (x = c tanh(u / c):
    dx/du = 1 - (x / c)^2); g: [rows, 1] upstream gradient of each row's log-prob."""
    scale, softcap = post
    grad = probs.mul_(-g)  # d(x_target - lse)/dx = onehot(target) - softmax(x)
    grad.scatter_add_(-1, targets.unsqueeze(-1), g)
    if softcap is not None:
        grad.mul_(1 - (logits / softcap).square_())
    if scale != 1.0:
        grad.mul_(scale)
    return grad


class _InputGrads:
    """Gradients of the lm-head's inputs, accumulated chunk by chunk from each chunk's logit gradient."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype,
                 need: tuple[bool, bool, bool]):
        self.hidden = torch.empty_like(hidden) if need[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None
        self.bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need[2] else None

    def add(self, rows: slice, grad: Tensor, h: Tensor, w: Tensor, buffers: _ChunkBuffers) -> None:
        """grad: [rows, V] d(loss)/d(logits) in the accumulation dtype; h, w: the chunk's matmul inputs;
        buffers: the call's `_ChunkBuffers` (``low`` is free again once the logits were widened)."""
        if self.bias is not None:
            self.bias += grad.sum(0)
        n = grad.shape[0]
        if buffers.low is not None:  # the matmuls run in w's dtype: cast down into the reused buffer
            grad, h = buffers.low_grad(grad), buffers.staged(h)  # zero rows beyond n add nothing to either product
        if self.hidden is not None:
            self.hidden[rows] = (grad @ w)[:n].to(self.hidden.dtype)
        if self.weight is not None:
            if grad.dtype == self.weight.dtype:  # accumulate in place: no [V, H] temporary per chunk
                self.weight.addmm_(grad.T, h)
            else:  # the product in w's dtype (as grad.T @ h gives it), then widened
                low, wide = buffers.weight_product(w)
                self.weight += wide.copy_(torch.mm(grad.T, h, out=low))

    def scaled(self, weight: Tensor, bias: Tensor | None, by: Tensor | None = None):
        """(hidden, weight, bias) gradients in the parameters' dtypes, times ``by`` (an upstream scalar)."""
        out = []
        for grad, like in ((self.hidden, None), (self.weight, weight), (self.bias, bias)):
            if grad is not None:
                grad = grad if by is None else grad.mul_(by.to(grad.dtype))  # ours alone: scaled in place
                grad = grad if like is None else grad.to(like.dtype)
            out.append(grad)
        return tuple(out)


def _operands(weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype):
    """(accumulation dtype, weight, bias) for the chunk matmuls: operands in ``compute_dtype``, results in fp32
    (fp64 for fp64)."""
    b = None if bias is None else bias.to(compute_dtype)
    return torch.promote_types(compute_dtype, torch.float32), weight.to(compute_dtype), b


class _ChunkForward(NamedTuple):
    shifted_exp: Tensor  # [rows, V] exp(logits - top), in the chunk's buffer
    logit_sums: Tensor   # [rows]
    target_logps: Tensor  # [rows] log p(target)
    lse: Tensor          # [rows]
    top: Tensor          # [rows] the row maxima (lse - top = log of shifted_exp's row sums)


def _chunk_forward(h: Tensor, w: Tensor, b: Tensor | None, post: tuple[float, float | None],
                   buffers: _ChunkBuffers, targets: Tensor) -> _ChunkForward:
    """One chunk's logits reduced to what both lm-head functions keep."""
    logits = _chunk_logits(h, w, b, post, buffers)
    sums = logits.sum(-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse, top = _logsumexp_(logits)
    return _ChunkForward(logits, sums, picked - lse, lse, top)


def _recomputed_softmax(h: Tensor, w: Tensor, b: Tensor | None, post: tuple[float, float | None],
                        buffers: _ChunkBuffers, lse: Tensor) -> tuple[Tensor, Tensor]:
    """(softmax, logits) of a chunk computed again from its saved log-sum-exp: in place on the fresh logits,
    unless a soft-cap's derivative still needs them."""
    logits = _chunk_logits(h, w, b, post, buffers)
    probs = (logits.clone() if post[1] is not None else logits).sub_(lse.unsqueeze(-1)).exp_()
    return probs, logits


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside DeepSpeed/DDP engines (``.module``) and PEFT wrappers.

    PEFT injects adapters in place, so the unwrapped model still runs them.
    """
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def head_config(config) -> tuple[float, float, float | None]:
    """(multiplier, divisor, soft-cap) of the final logits, from the config keys transformers' models read."""
    multiplier = float(getattr(config, "logit_scale", None) or 1.0)      # Cohere: logits * logit_scale
    divisor = float(getattr(config, "logits_scaling", None) or 1.0)      # Granite: logits / logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)          # Gemma 2/3: c * tanh(logits / c)
    return multiplier, divisor, (float(softcap) if softcap else None)


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, LmHead]:
    """(decoder body returning ``last_hidden_state``, `LmHead`) of a HF causal LM, through wrappers.

    The body is the model's ``base_model`` and the head its ``get_output_embeddings()`` (GPT-2's
    ``transformer``, GPT-NeoX's ``gpt_neox``, Llama's ``model``...), so no attribute name is assumed.
    ZeRO-2 does not partition parameters, so calling the body directly is safe there; ZeRO-3 would need the
    engine's gather hooks and is not supported by this path. Raises TypeError naming what is missing.
    """
    inner = unwrap_causal_lm(model)
    body = getattr(inner, "base_model", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    name = type(inner).__name__
    if body is None or body is inner:
        raise TypeError(f"{name} has no separate base model (body) to run without its head")
    if type(head) is not torch.nn.Linear:  # an adapter-wrapped or custom head would be bypassed by its weight
        raise TypeError(f"{name}'s output embedding is {type(head).__name__}, not a plain Linear")
    return body, LmHead(head.weight, head.bias, *head_config(inner.config))


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run the lm-head matmul in (bf16 under bf16 autocast, else the input's)."""
    device_type = t.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


class _ChunkedLmHeadLogProb(torch.autograd.Function):
    """log_softmax(post(hidden @ weight.T + bias))[i, targets[i]] and the logit row sums, ``chunk`` rows at a time.

    post: ``(scale, softcap)`` of `LmHead`. The matmul runs in ``compute_dtype`` (bf16 under autocast, like
    ``nn.Linear`` would), the scaling, log-sum-exp and returned values in fp32 (fp64 for fp64 inputs). Saved
    for backward: hidden [M, H], the weight and bias (parameters, not copies), targets and the log-sum-exp [M].
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                compute_dtype: torch.dtype, post: tuple[float, float | None]):
        acc, w, b = _operands(weight, bias, compute_dtype)
        logps, lse, sums = (torch.empty(hidden.shape[0], dtype=acc, device=hidden.device) for _ in range(3))
        buffers = _ChunkBuffers.for_call(hidden.shape[0], chunk, w, acc)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                out = _chunk_forward(hidden[rows].to(compute_dtype), w, b, post, buffers, targets[rows])
                logps[rows], lse[rows], sums[rows] = out.target_logps, out.lse, out.logit_sums
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.compute_dtype, ctx.post = chunk, compute_dtype, post
        ctx.mark_non_differentiable(sums)
        return logps, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: Tensor, _grad_sums: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        cd, post = ctx.compute_dtype, ctx.post
        _, w, b = _operands(weight, bias, cd)
        grads = _InputGrads(hidden, weight, bias, lse.dtype, ctx.needs_input_grad[:3])
        buffers = _ChunkBuffers.for_call(hidden.shape[0], ctx.chunk, w, lse.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h = hidden[rows].to(cd)
                probs, logits = _recomputed_softmax(h, w, b, post, buffers, lse[rows])
                g = grad_logps[rows].to(lse.dtype).unsqueeze(-1)
                grads.add(rows, _logit_grad_(probs, targets[rows], g, logits, post), h, w, buffers)
        return (*grads.scaled(weight, bias), None, None, None, None)


def chunked_target_logps(hidden: Tensor, head: LmHead | Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(log p(targets[i] | hidden[i]) [M], detached logit row sums [M]) without an [M, V] tensor kept alive.

    head: an `LmHead`, or a bare weight [V, H] (no bias, no scaling)."""
    head = head if isinstance(head, LmHead) else LmHead(head)
    return _ChunkedLmHeadLogProb.apply(hidden, head.weight, head.bias, targets, chunk, _compute_dtype(hidden),
                                       head.post)


# (target hidden states [M, H], head, target ids [M]) -> (log-probs [M], detached logit row sums [M])
TargetLogpsFn = Callable[[Tensor, LmHead, Tensor], tuple[Tensor, Tensor]]


class LmHeadTargets(NamedTuple):
    """What the lm-head needs after the model's body ran: where the targets are and where results go.

    hidden_flat: [N * L, H] the body's last hidden states, flattened; head: the model's `LmHead`;
    src: [M] indices into ``hidden_flat`` (the position predicting each target); ids: [M] target token ids;
    dst: [M] flat indices into the padded [2B, T] layout of ``collate.collate_pairs``; shape: (2B, T).
    """

    hidden_flat: Tensor
    head: LmHead
    src: Tensor
    ids: Tensor
    dst: Tensor
    shape: tuple[int, int]

    def scatter(self, per_target: Tensor) -> Tensor:
        """[M] per-target values -> [2B, T], zero where nothing is targeted."""
        flat = per_target.new_zeros(self.shape[0] * self.shape[1]).index_put((self.dst,), per_target)
        return flat.view(self.shape)


def stats_from_targets(targets: LmHeadTargets, chunk: int | None | TargetLogpsFn) -> TokenStats:
    """Per-target log-probs from ``hidden_flat[src]``, scattered to ``dst`` of a zero [2B, T] TokenStats.

    chunk: rows per lm-head chunk; ``None`` applies ``head`` to *every* row of ``hidden_flat`` at once (the
    un-chunked variant, kept for the ablation: full logits, then the target rows are picked); or a function
    with `chunked_target_logps`' contract less the chunk size (``liger_lm_head.liger_target_logps``).
    """
    hidden_flat, head, src, target_ids = targets.hidden_flat, targets.head, targets.src, targets.ids
    if callable(chunk):
        logps, sums = chunk(hidden_flat.index_select(0, src), head, target_ids)
    elif chunk is None:
        logits = head.logits(hidden_flat).index_select(0, src)
        logps = target_logps(logits, target_ids)
        sums = logits.detach().sum(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    else:
        logps, sums = chunked_target_logps(hidden_flat.index_select(0, src), head, target_ids, chunk)
    return TokenStats(targets.scatter(logps), targets.scatter(sums.detach()), head.weight.shape[0])


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


def padded_lm_head_targets(model: torch.nn.Module, batch: Mapping[str, Tensor], nll_on_prompt: bool) -> LmHeadTargets:
    """The body on the padded [2B, T] batch; the targets are the positions some loss term reads."""
    body, head = causal_lm_parts(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = hidden.last_hidden_state
    dst = padded_targets(batch, nll_on_prompt)
    ids = batch["input_ids"].flatten().index_select(0, dst)
    return LmHeadTargets(hidden.reshape(-1, hidden.shape[-1]), head, dst - 1, ids, dst, tuple(batch["input_ids"].shape))


def chunked_padded_token_stats(
    model: torch.nn.Module, batch: Mapping[str, Tensor], nll_on_prompt: bool, chunk: int
) -> TokenStats:
    """``TokenStatsFn`` for the padded layout: body on [2B, T], lm-head only on target positions, chunked."""
    return stats_from_targets(padded_lm_head_targets(model, batch, nll_on_prompt), chunk)
