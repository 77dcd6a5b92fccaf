"""Liger-Kernel's fused linear cross-entropy as the fast path's lm-head (``efficiency.lm_head: liger``, GPU).

ORPO needs the log-probability of every target token (the sequence means of the log-odds, the NLL), not one
mean cross-entropy, so this calls ``LigerFusedLinearCrossEntropyFunction`` with ``reduction="none"``: its
per-token loss is ``lse - logit[target]`` = -log p(target), in fp32, and its backward takes the per-token
upstream gradient. Liger's chunked Triton kernel then replaces `chunked_lm_head._ChunkedLmHeadLogProb` for
the same target rows (``chunked_lm_head.stats_from_targets``); everything else (layouts, loss) is unchanged.

What Liger's function has and `LmHead` needs: a bias and a final soft-cap it takes as arguments; a logit
multiplier / divisor (Cohere, Granite) it has not, so it is folded into the input and the bias
((h W^T + b) s = (s h) W^T + s b; autograd carries s back to h and b). The logit row sums (the detached
``logits/*`` metrics) it does not return: they are linear in h without a soft-cap (h . sum_v W_v + sum_v b_v),
and with one they take one extra no-grad pass over the logits, chunk by chunk.

Liger-Kernel >= 0.8.2 only: before it (linkedin/Liger-Kernel#1298), ``reduction="none"`` scaled grad_weight
and grad_bias by the upstream gradient after summing over tokens, which is wrong whenever tokens get different
gradients - always, here. Liger's Triton kernels need a CUDA device; ``TRITON_INTERPRET=1`` (Triton's CPU
interpreter, slow) is accepted too so the numbers can be checked on a machine without a GPU.

Pure module: torch only (liger_kernel is imported when the switch is used).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

import torch
from torch import Tensor

from orpo_ray.config import ConfigError
from orpo_ray.forward.chunked_lm_head import LmHead
from orpo_ray.forward.logprobs import target_logps

LIGER_MIN_VERSION = (0, 8, 2)
LIGER_INSTALL = "pip install 'liger-kernel==0.8.5' (it needs triton and a CUDA GPU)"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def liger_problem(device: torch.device) -> str | None:
    """Why Liger's fused lm-head cannot run on `device` here (None: it can). Cheapest check first."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"Liger's Triton kernels run on a CUDA GPU and this worker's device is {device.type} "
                "(set scaling.use_gpu: true on a machine with a GPU)")
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return f"liger-kernel is not installed on this worker: {LIGER_INSTALL}"
    if _version_tuple(version) < LIGER_MIN_VERSION:
        return (f"liger-kernel {version} is installed; >= {'.'.join(map(str, LIGER_MIN_VERSION))} is needed (earlier "
                "versions get the weight gradient wrong with per-token losses): " + LIGER_INSTALL)
    try:
        importlib.import_module("liger_kernel.ops.fused_linear_cross_entropy")
    except Exception as exc:  # noqa: BLE001 - triton missing or broken: say so, never run something else
        return f"liger_kernel does not import ({type(exc).__name__}: {exc})"
    return None


def require_liger(head: LmHead) -> None:
    """Raise ConfigError naming ``efficiency.lm_head`` unless Liger runs here and reproduces `head`'s log-probs.

    The user named Liger, so it is never swapped for another lm-head silently. The check runs a few of the
    head's own rows through both (no grad, no RNG): a version or device whose numbers differ stops the run."""
    problem = liger_problem(head.weight.device)
    if problem is None:
        with torch.no_grad():
            hidden = head.weight[:8].detach().clone()
            targets = torch.arange(hidden.shape[0], device=hidden.device).flip(0)
            ours = liger_target_logps(hidden, head, targets)[0]
            ref = target_logps(head.logits(hidden), targets)
            err = float((ours - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1.0))
        tolerance = 1e-5 if head.weight.dtype in (torch.float32, torch.float64) else 2e-2
        if not err <= tolerance:
            problem = f"its log-probs differ from the model's head (relative error {err:.1e} > {tolerance:g})"
    if problem:
        raise ConfigError(f"efficiency.lm_head=liger cannot be used: {problem}. Set efficiency.lm_head=chunked for "
                          "the project's chunked lm-head (any device).")


def logit_row_sums(hidden: Tensor, head: LmHead, chunk: int = 1024) -> Tensor:
    """Detached sum over the vocabulary of each row's logits, fp32, without an [M, V] tensor when it is linear."""
    scale, softcap = head.post
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        if softcap is None:
            acc = torch.promote_types(hidden.dtype, torch.float32)
            sums = hidden.to(acc) @ head.weight.to(acc).sum(0)
            if head.bias is not None:
                sums = sums + head.bias.to(acc).sum()
            return sums * scale
        # tanh is not linear: sum the logits themselves, chunk rows at a time (one extra forward matmul).
        return torch.cat([head.logits(hidden[i:i + chunk]).float().sum(-1) for i in range(0, hidden.shape[0], chunk)])


def liger_target_logps(hidden: Tensor, head: LmHead, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log p(targets[i] | hidden[i]) [M] fp32, detached logit row sums [M]) through Liger's fused kernel.

    Same contract as ``chunked_lm_head.chunked_target_logps``; the matmul runs in the autocast dtype (Liger's
    forward keeps the caller's autocast state), the log-sum-exp and the result in fp32."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    scale, softcap = head.post
    x, bias = hidden, head.bias
    if scale != 1.0:
        x = x * scale
        bias = None if bias is None else bias * scale
    # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
    #  softcap, return_z_loss, accum_dtype): no class weights, no ignored rows (only target rows come here),
    # no z-loss, no smoothing; weight/bias gradients accumulate in fp32 whatever the weights' dtype.
    loss = LigerFusedLinearCrossEntropyFunction.apply(
        x.contiguous(), head.weight, targets.contiguous(), bias, None, -100, 0.0, 0.0, "none", softcap, False,
        torch.float32)[0]
    return -loss, logit_row_sums(hidden.detach(), head)
